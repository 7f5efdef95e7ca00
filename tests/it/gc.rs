//! Garbage collection through the API and `wharf gc`: what deletes free, what the delay
//! keeps, what a tagged manifest needs, referrers, `wharf repo delete`, and a stress run
//! with kills.

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::*;

fn gc_now(c: &mut wharf::config::Config) {
    c.gc.delay = Duration::ZERO;
    c.gc_interval = Duration::ZERO; // passes are run by the test
}

/// `wharf gc` with `args` on the registry's data directory (with no delay unless
/// `args` give one), parsed from `--json`.
fn gc_json(reg: &TestRegistry, args: &[&str]) -> Value {
    let mut all = vec!["gc", "--json"];
    if !args.contains(&"--gc-delay") {
        all.extend(["--gc-delay", "0s"]);
    }
    all.extend_from_slice(args);
    serde_json::from_str(&wharf(reg, &all)).expect("gc --json prints JSON")
}

fn removed_blobs(report: &Value) -> BTreeSet<String> {
    report["removed"]["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["digest"].as_str().unwrap().to_owned())
        .collect()
}

pub fn index_of(children: &[(&str, usize)]) -> Vec<u8> {
    let m: Vec<Value> = children
        .iter()
        .map(|(d, s)| {
            json!({"mediaType": OCI_MANIFEST, "digest": d, "size": s,
            "platform": {"architecture": "amd64", "os": "linux"}})
        })
        .collect();
    serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": m}))
        .unwrap()
}

/// Asserts `repo:reference` can be pulled whole: every manifest, and every blob's bytes
/// re-hashed to its digest.
pub async fn assert_pullable(reg: &TestRegistry, repo: &str, reference: &str) {
    let mut work = vec![reference.to_owned()];
    while let Some(r) = work.pop() {
        let got = reg
            .client
            .get(reg.url(&format!("/v2/{repo}/manifests/{r}")))
            .header("accept", format!("{OCI_MANIFEST}, {OCI_INDEX}"))
            .send()
            .await
            .unwrap();
        assert_eq!(got.status(), StatusCode::OK, "{repo}:{r}");
        let body = got.bytes().await.unwrap();
        let m: Value = serde_json::from_slice(&body).unwrap();
        if let Some(children) = m["manifests"].as_array() {
            for c in children {
                work.push(c["digest"].as_str().unwrap().to_owned());
            }
            continue;
        }
        let mut blobs = vec![m["config"]["digest"].as_str().unwrap().to_owned()];
        for l in m["layers"].as_array().unwrap() {
            blobs.push(l["digest"].as_str().unwrap().to_owned());
        }
        for b in blobs {
            let got = reg.get(&format!("/v2/{repo}/blobs/{b}")).await;
            assert_eq!(got.status(), StatusCode::OK, "{repo} blob {b}");
            assert_eq!(sha256(&got.bytes().await.unwrap()), b, "{repo} blob {b}");
        }
    }
}

async fn delete(reg: &TestRegistry, path: &str) -> StatusCode {
    reg.client
        .delete(reg.url(path))
        .send()
        .await
        .unwrap()
        .status()
}

async fn catalog(reg: &TestRegistry) -> Vec<String> {
    let v: Value = reg.get("/v2/_catalog").await.json().await.unwrap();
    v["repositories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect()
}

/// Pushes an image of `config` and `layers` tagged `tag`; returns its manifest digest
/// and the blob digests.
async fn push(
    reg: &TestRegistry,
    repo: &str,
    tag: &str,
    config: &str,
    layers: &[&[u8]],
) -> (String, Vec<String>) {
    let c = reg.push_blob(repo, config.as_bytes()).await;
    let mut ls = Vec::new();
    for l in layers {
        ls.push((reg.push_blob(repo, l).await, l.len()));
    }
    let refs: Vec<(&str, usize)> = ls.iter().map(|(d, s)| (d.as_str(), *s)).collect();
    let m = image_manifest((&c, config.len()), &refs);
    let r = reg.put_manifest(repo, tag, OCI_MANIFEST, &m).await;
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
    let mut blobs = vec![c];
    blobs.extend(ls.into_iter().map(|(d, _)| d));
    (sha256(&m), blobs)
}

/// As clients and conformance suites do: delete the tags, then the manifests, then the
/// blobs; one pass then frees every byte, and the emptied repositories leave the
/// catalog. The dry run lists exactly what the pass removes.
#[tokio::test]
async fn deleting_tags_manifests_then_blobs_frees_everything_after_one_pass() {
    let reg = TestRegistry::start_tuned(gc_now);
    let shared = pattern(300_000, 7);
    let mut pushed = Vec::new();
    for (repo, seed) in [("gc/one", 1u8), ("gc/two", 2)] {
        let own = pattern(100_000, seed);
        let config = format!(r#"{{"architecture":"amd64","os":"linux","n":{seed}}}"#);
        let (m, blobs) = push(&reg, repo, "v1", &config, &[&shared, &own]).await;
        pushed.push((repo, m, blobs));
    }
    assert_eq!(reg.blob_files().len(), 5);
    assert_eq!(catalog(&reg).await, ["gc/one", "gc/two"]);
    // Nothing is garbage yet, with the default delay or none.
    let dry = gc_json(&reg, &["--dry-run", "--gc-delay", "24h"]);
    assert_eq!(dry["blobs"], 0, "{dry}");

    for (repo, m, blobs) in &pushed {
        assert_eq!(
            delete(&reg, &format!("/v2/{repo}/manifests/v1")).await,
            StatusCode::ACCEPTED
        );
        assert_eq!(
            delete(&reg, &format!("/v2/{repo}/manifests/{m}")).await,
            StatusCode::ACCEPTED
        );
        for b in blobs {
            assert_eq!(
                delete(&reg, &format!("/v2/{repo}/blobs/{b}")).await,
                StatusCode::ACCEPTED
            );
        }
    }
    assert!(
        catalog(&reg).await.is_empty(),
        "emptied repositories leave the catalog"
    );
    assert_eq!(
        reg.blob_files().len(),
        5,
        "a delete frees no byte by itself"
    );

    // Links went with the blob deletes, so even the default delay frees the bytes.
    let dry = gc_json(&reg, &["--dry-run", "--gc-delay", "24h"]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["blobs"], 5, "{dry}");
    assert_eq!(reg.blob_files().len(), 5, "a dry run deletes nothing");
    let real = gc_json(&reg, &["--gc-delay", "24h"]);
    assert_eq!(real["dry_run"], false);
    assert_eq!(removed_blobs(&real), removed_blobs(&dry));
    assert_eq!(real["bytes"], dry["bytes"]);
    let configs: u64 = [1u8, 2]
        .iter()
        .map(|n| format!(r#"{{"architecture":"amd64","os":"linux","n":{n}}}"#).len() as u64)
        .sum();
    assert_eq!(
        real["bytes"].as_u64(),
        Some(300_000 + 2 * 100_000 + configs),
        "{real}"
    );
    assert!(reg.blob_files().is_empty(), "{:?}", reg.blob_files());
    assert_eq!(real["repositories"], 2, "{real}");
    // The pass is recorded and audited.
    let audit = wharf(&reg, &["audit", "--json"]);
    assert!(audit.contains("\"gc\""), "{audit}");
    let again = gc_json(&reg, &[]);
    assert_eq!(
        (again["blobs"].as_u64(), again["links"].as_u64()),
        (Some(0), Some(0))
    );

    // The plain report names the counts.
    let text = wharf(&reg, &["gc", "--dry-run"]);
    assert!(text.starts_with("would remove 0 blobs"), "{text}");
}

/// A manifest deleted while its blobs stay linked: the links are kept for the delay,
/// then go (here with `--gc-delay 0s` and `WHARF_GC_DELAY=0s`); a bad delay is refused.
#[tokio::test]
async fn the_delay_keeps_recent_links_and_the_flag_and_env_set_it() {
    let reg = TestRegistry::start_tuned(|c| c.gc_interval = Duration::ZERO);
    let (m, _) = push(&reg, "gc/delay", "v1", r#"{"os":"linux"}"#, &[b"layer one"]).await;
    assert_eq!(
        delete(&reg, "/v2/gc/delay/manifests/v1").await,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        delete(&reg, &format!("/v2/gc/delay/manifests/{m}")).await,
        StatusCode::ACCEPTED
    );
    let kept = gc_json(&reg, &["--gc-delay", "24h"]);
    assert_eq!(
        (kept["links"].as_u64(), kept["blobs"].as_u64()),
        (Some(0), Some(0)),
        "{kept}"
    );
    assert_eq!(reg.blob_files().len(), 2);
    let dry = gc_json(&reg, &["--dry-run", "--gc-delay", "0s"]);
    assert_eq!(
        (dry["links"].as_u64(), dry["blobs"].as_u64()),
        (Some(2), Some(2)),
        "{dry}"
    );
    let out = run(wharf_cmd(&reg.data)
        .args(["gc", "--json"])
        .env("WHARF_GC_DELAY", "0s"));
    let real: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (real["links"].as_u64(), real["blobs"].as_u64()),
        (Some(2), Some(2)),
        "{real}"
    );
    assert!(reg.blob_files().is_empty());
    let err = wharf_fails(&reg, &["gc", "--gc-delay", "soon"]);
    assert!(err.contains("soon"), "{err}");
}

/// Whatever is deleted around them, a pass never takes what a tagged manifest needs:
/// layers shared with deleted images, blobs mounted from a repository that deleted
/// them, the children of a tagged index, a buildx cache index's blobs. An index cannot
/// be pushed over a deleted child, and a child of a tagged index cannot be deleted.
#[tokio::test]
async fn a_pass_never_takes_what_a_tagged_manifest_needs() {
    let reg = TestRegistry::start_tuned(gc_now);
    let base = pattern(200_000, 3);
    let (gone, _) = push(
        &reg,
        "keep/app",
        "old",
        r#"{"n":"old"}"#,
        &[&base, b"old top"],
    )
    .await;
    let (_, kept_blobs) = push(
        &reg,
        "keep/app",
        "new",
        r#"{"n":"new"}"#,
        &[&base, b"new top"],
    )
    .await;
    // Mounted into another repository, then deleted from the first.
    let mount = reg
        .client
        .post(reg.url(&format!(
            "/v2/keep/other/blobs/uploads/?mount={}&from=keep/app",
            kept_blobs[2]
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(mount.status(), StatusCode::CREATED);
    let (_, _) = push(&reg, "keep/other", "v1", r#"{"n":"other"}"#, &[b"new top"]).await;
    // An index tagged, over two untagged children.
    let (c1, _) = push(
        &reg,
        "keep/multi",
        "tmp1",
        r#"{"arch":"amd64"}"#,
        &[b"amd64 layer"],
    )
    .await;
    let (c2, _) = push(
        &reg,
        "keep/multi",
        "tmp2",
        r#"{"arch":"arm64"}"#,
        &[b"arm64 layer"],
    )
    .await;
    let size = |d: &str, all: &[(String, usize)]| all.iter().find(|x| x.0 == d).unwrap().1;
    let mut sizes = Vec::new();
    for (t, d) in [("tmp1", &c1), ("tmp2", &c2)] {
        let body = reg
            .get(&format!("/v2/keep/multi/manifests/{t}"))
            .await
            .bytes()
            .await
            .unwrap();
        sizes.push((d.clone(), body.len()));
    }
    let index = index_of(&[(&c1, size(&c1, &sizes)), (&c2, size(&c2, &sizes))]);
    assert_eq!(
        reg.put_manifest("keep/multi", "latest", OCI_INDEX, &index)
            .await
            .status(),
        StatusCode::CREATED
    );
    for t in ["tmp1", "tmp2"] {
        assert_eq!(
            delete(&reg, &format!("/v2/keep/multi/manifests/{t}")).await,
            StatusCode::ACCEPTED
        );
    }
    // A child of the tagged index cannot be deleted.
    let (status, code) = error_of(
        reg.client
            .delete(reg.url(&format!("/v2/keep/multi/manifests/{c1}")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "DENIED"));
    // A buildx-style cache index lists blobs directly.
    let cache_blob = reg.push_blob("keep/cache", b"cache layer").await;
    let cache = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_LAYER, "digest": cache_blob, "size": 11}]}))
    .unwrap();
    assert_eq!(
        reg.put_manifest("keep/cache", "buildcache", OCI_INDEX, &cache)
            .await
            .status(),
        StatusCode::CREATED
    );

    // Now delete the old image and the first repository's copies of what it mounted.
    assert_eq!(
        delete(&reg, "/v2/keep/app/manifests/old").await,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        delete(&reg, &format!("/v2/keep/app/manifests/{gone}")).await,
        StatusCode::ACCEPTED
    );
    let r = gc_json(&reg, &[]);
    assert!(
        r["blobs"].as_u64().unwrap() >= 2,
        "the old image's own blobs go: {r}"
    );
    assert_pullable(&reg, "keep/app", "new").await;
    assert_pullable(&reg, "keep/other", "v1").await;
    assert_pullable(&reg, "keep/multi", "latest").await;
    let got = reg.get(&format!("/v2/keep/cache/blobs/{cache_blob}")).await;
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(got.bytes().await.unwrap().as_ref(), b"cache layer");

    // An index over a child deleted first is refused, and a later pass changes nothing.
    let (c3, _) = push(
        &reg,
        "keep/multi",
        "tmp3",
        r#"{"arch":"riscv64"}"#,
        &[b"riscv layer"],
    )
    .await;
    let c3_len = reg
        .get(&format!("/v2/keep/multi/manifests/{c3}"))
        .await
        .bytes()
        .await
        .unwrap()
        .len();
    assert_eq!(
        delete(&reg, &format!("/v2/keep/multi/manifests/{c3}")).await,
        StatusCode::ACCEPTED
    );
    let (status, code) = error_of(
        reg.put_manifest("keep/multi", "next", OCI_INDEX, &index_of(&[(&c3, c3_len)]))
            .await,
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN")
    );
    gc_json(&reg, &[]);
    assert_pullable(&reg, "keep/multi", "latest").await;
    assert_pullable(&reg, "keep/app", "new").await;
}

/// Referrers go with their subject (the default), their bytes with the next pass; with
/// `delete_referrers = false` they stay, and so do their bytes.
#[tokio::test]
async fn referrers_go_with_their_subject_unless_configured_otherwise() {
    for keep in [false, true] {
        let reg = TestRegistry::start_tuned(|c| {
            gc_now(c);
            c.gc.delete_referrers = !keep;
        });
        let (subject, _) = push(&reg, "ref/app", "v1", r#"{"n":1}"#, &[b"app layer"]).await;
        let subject_len = reg
            .get("/v2/ref/app/manifests/v1")
            .await
            .bytes()
            .await
            .unwrap()
            .len();
        let sig = reg.push_blob("ref/app", b"a signature").await;
        let empty = reg.push_blob("ref/app", b"{}").await;
        let referrer = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.example.sig",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": sig, "size": 11}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": subject_len}
        }))
        .unwrap();
        let rd = sha256(&referrer);
        assert_eq!(
            reg.put_manifest("ref/app", &rd, OCI_MANIFEST, &referrer)
                .await
                .status(),
            StatusCode::CREATED
        );
        assert_eq!(
            delete(&reg, "/v2/ref/app/manifests/v1").await,
            StatusCode::ACCEPTED
        );
        assert_eq!(
            delete(&reg, &format!("/v2/ref/app/manifests/{subject}")).await,
            StatusCode::ACCEPTED
        );
        let list: Value = reg
            .get(&format!("/v2/ref/app/referrers/{subject}"))
            .await
            .json()
            .await
            .unwrap();
        let n = list["manifests"].as_array().unwrap().len();
        let still = reg
            .get(&format!("/v2/ref/app/manifests/{rd}"))
            .await
            .status();
        // `wharf gc` reads the setting from the same wharf.toml as the server.
        let file = reg.data.with_file_name("wharf.toml");
        std::fs::write(&file, format!("delete_referrers = {}\n", !keep)).unwrap();
        gc_json(&reg, &["--config", file.to_str().unwrap()]);
        let sig_blob = reg.get(&format!("/v2/ref/app/blobs/{sig}")).await.status();
        if keep {
            assert_eq!((n, still, sig_blob), (1, StatusCode::OK, StatusCode::OK));
        } else {
            assert_eq!((n, still), (0, StatusCode::NOT_FOUND));
            assert_eq!(sig_blob, StatusCode::NOT_FOUND);
            assert!(reg.blob_files().is_empty(), "{:?}", reg.blob_files());
        }
    }
}

/// `wharf repo delete` takes a repository out of the catalog at once; the next pass
/// frees its bytes but not those another repository holds. A policy protecting one of
/// its tags refuses it; an unknown or malformed name is a clear error.
#[tokio::test]
async fn repo_delete_removes_a_repository_and_its_bytes_go_to_gc() {
    let reg = TestRegistry::start_tuned(gc_now);
    let shared = pattern(50_000, 9);
    push(&reg, "team/x", "v1", r#"{"r":"x"}"#, &[&shared, b"x only"]).await;
    push(&reg, "team/y", "v1", r#"{"r":"y"}"#, &[&shared]).await;
    assert_eq!(reg.blob_files().len(), 4);
    let out = wharf_cmd(&reg.data)
        .args(["repo", "delete", "team/x"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("1 tags, 1 manifests, 3 blob links"), "{said}");
    assert_eq!(catalog(&reg).await, ["team/y"]);
    let (status, code) = error_of(reg.get("/v2/team/x/tags/list").await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "NAME_UNKNOWN")
    );
    assert_eq!(
        reg.get("/v2/team/x/manifests/v1").await.status(),
        StatusCode::NOT_FOUND
    );
    let r = gc_json(&reg, &[]);
    assert_eq!(r["blobs"], 2, "x's config and own layer: {r}");
    assert_eq!(reg.blob_files().len(), 2);
    assert_pullable(&reg, "team/y", "v1").await;

    wharf(&reg, &["policy", "immutable", "team/*", "--tags", "v*"]);
    let err = wharf_fails(&reg, &["repo", "delete", "team/y"]);
    assert!(err.contains("immutable") && err.contains("v1"), "{err}");
    assert_pullable(&reg, "team/y", "v1").await;
    let err = wharf_fails(&reg, &["repo", "delete", "team/nothing"]);
    assert!(err.contains("no repository team/nothing"), "{err}");
    let err = wharf_fails(&reg, &["repo", "delete", "Team/../Y"]);
    assert!(err.contains("not a repository name"), "{err}");
}

/// One pusher of the stress run: pushes images (layers shared across repositories,
/// mounts), indexes and referrers, moves and deletes tags, deletes manifests and blobs,
/// until `until`. Every answer is allowed except a 5xx other than 503 (the registry
/// being killed shows as connection errors, which end nothing).
async fn stress_worker(base: String, id: u64, until: std::time::Instant) -> u64 {
    let c = admin_client();
    let mut seed = id
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    let url = |p: String| format!("{base}{p}");
    let mut ops = 0;
    let mut i = 0u64;
    while std::time::Instant::now() < until {
        i += 1;
        let repo = format!("s/r{}", next(3));
        let tag = format!("t{}", next(4));
        let ok = |r: &Result<reqwest::Response, reqwest::Error>| match r {
            Ok(r) => {
                let s = r.status();
                assert!(
                    !s.is_server_error() || s == StatusCode::SERVICE_UNAVAILABLE,
                    "{} answered {s}",
                    r.url()
                );
                s.is_success()
            }
            Err(_) => false,
        };
        let put_blob = |repo: String, data: Vec<u8>| {
            let c = c.clone();
            let d = sha256(&data);
            let u = url(format!("/v2/{repo}/blobs/uploads/?digest={d}"));
            async move { (ok(&c.post(u).body(data).send().await), d) }
        };
        let put_manifest = |repo: String, reference: String, mt: &'static str, body: Vec<u8>| {
            let c = c.clone();
            let u = url(format!("/v2/{repo}/manifests/{reference}"));
            async move { ok(&c.put(u).header("content-type", mt).body(body).send().await) }
        };
        match next(10) {
            // An image: a shared layer (uploaded again, or mounted from another
            // repository), its own layer and config.
            0..=4 => {
                let shared = pattern(20_000 + next(5) as usize, 1);
                let shared_d = sha256(&shared);
                if next(2) == 0 {
                    let from = format!("s/r{}", next(3));
                    let _ = c
                        .post(url(format!(
                            "/v2/{repo}/blobs/uploads/?mount={shared_d}&from={from}"
                        )))
                        .send()
                        .await;
                } else {
                    put_blob(repo.clone(), shared.clone()).await;
                }
                let own = format!("layer {id} {i}").into_bytes();
                let config = format!(r#"{{"os":"linux","w":{id},"i":{i}}}"#).into_bytes();
                let (_, od) = put_blob(repo.clone(), own.clone()).await;
                let (_, cd) = put_blob(repo.clone(), config.clone()).await;
                let m = image_manifest(
                    (&cd, config.len()),
                    &[(&shared_d, shared.len()), (&od, own.len())],
                );
                put_manifest(repo.clone(), tag.clone(), OCI_MANIFEST, m).await;
            }
            // An index over two untagged images.
            5 => {
                let mut children = Vec::new();
                for k in 0..2 {
                    let config =
                        format!(r#"{{"os":"linux","w":{id},"i":{i},"k":{k}}}"#).into_bytes();
                    let (_, cd) = put_blob(repo.clone(), config.clone()).await;
                    let m = image_manifest((&cd, config.len()), &[]);
                    let md = sha256(&m);
                    put_manifest(repo.clone(), md.clone(), OCI_MANIFEST, m.clone()).await;
                    children.push((md, m.len()));
                }
                let refs: Vec<(&str, usize)> =
                    children.iter().map(|(d, s)| (d.as_str(), *s)).collect();
                put_manifest(repo.clone(), "idx".into(), OCI_INDEX, index_of(&refs)).await;
            }
            // A referrer of whatever the tag points at now.
            6 => {
                let Ok(r) = c
                    .get(url(format!("/v2/{repo}/manifests/{tag}")))
                    .send()
                    .await
                else {
                    continue;
                };
                if !r.status().is_success() {
                    continue;
                }
                let Ok(body) = r.bytes().await else { continue };
                let sig = format!("sig {id} {i}").into_bytes();
                let (_, sd) = put_blob(repo.clone(), sig.clone()).await;
                let (_, ed) = put_blob(repo.clone(), b"{}".to_vec()).await;
                let referrer = serde_json::to_vec(&json!({
                    "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "artifactType": "application/vnd.example.sig",
                    "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": ed, "size": 2},
                    "layers": [{"mediaType": "application/octet-stream", "digest": sd, "size": sig.len()}],
                    "subject": {"mediaType": OCI_MANIFEST, "digest": sha256(&body), "size": body.len()}
                }))
                .unwrap();
                put_manifest(repo.clone(), sha256(&referrer), OCI_MANIFEST, referrer).await;
            }
            // Deletes: a tag; a manifest by digest (refused if a tagged index needs it);
            // a shared blob (refused while a tag needs it).
            7 => {
                let _ = c
                    .delete(url(format!("/v2/{repo}/manifests/{tag}")))
                    .send()
                    .await;
            }
            8 => {
                if let Ok(r) = c
                    .head(url(format!("/v2/{repo}/manifests/{tag}")))
                    .send()
                    .await
                {
                    if let Some(d) = r.headers().get("docker-content-digest") {
                        let d = d.to_str().unwrap().to_owned();
                        let _ = c
                            .delete(url(format!("/v2/{repo}/manifests/{d}")))
                            .send()
                            .await;
                    }
                }
            }
            _ => {
                let d = sha256(&pattern(20_000 + next(5) as usize, 1));
                let r = c.delete(url(format!("/v2/{repo}/blobs/{d}"))).send().await;
                ok(&r);
            }
        }
        ops += 1;
    }
    ops
}

/// Several pushers sharing layers across repositories, moving and deleting tags,
/// mounting, pushing indexes and referrers, while the server collects garbage in a
/// loop with no delay and `wharf gc` runs beside it; the server is killed with SIGKILL
/// during passes and restarted. In the end every tag is pullable whole (each blob
/// re-hashed), and after one more pass no blob file, blob row or link is left that
/// nothing references.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gc_stress_with_kills_leaves_every_tag_whole_and_nothing_unreferenced() {
    gc_stress(None).await;
}

/// The same run with the metadata in PostgreSQL: the server and `wharf gc` are
/// replicas of one database, each pass in serializable transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gc_stress_on_postgresql_leaves_every_tag_whole_and_nothing_unreferenced() {
    gc_stress(Some(crate::postgres::database())).await;
}

/// The metadata database of a stress run, for its final checks.
enum Db {
    Sqlite(rusqlite::Connection),
    Postgres(tokio_postgres::Client),
}

impl Db {
    async fn open(data: &std::path::Path, url: Option<&str>) -> Db {
        match url {
            None => Db::Sqlite(rusqlite::Connection::open(data.join("meta.db")).unwrap()),
            Some(url) => {
                let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                Db::Postgres(client)
            }
        }
    }

    async fn count(&self, sql: &str) -> i64 {
        match self {
            Db::Sqlite(db) => db.query_row(sql, [], |r| r.get(0)).unwrap(),
            Db::Postgres(db) => db.query_one(sql, &[]).await.unwrap().get(0),
        }
    }

    async fn strings(&self, sql: &str) -> BTreeSet<String> {
        match self {
            Db::Sqlite(db) => db
                .prepare(sql)
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect(),
            Db::Postgres(db) => db
                .query(sql, &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect(),
        }
    }
}

async fn gc_stress(database_url: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("wharf.toml");
    // On PostgreSQL a pass takes longer (each step is a round trip): with passes every
    // 10 ms the server would hold the collector's lease almost always, and `wharf gc`
    // beside it would never get a turn.
    let interval = if database_url.is_some() {
        "150ms"
    } else {
        "10ms"
    };
    std::fs::write(&config, format!("gc_interval = \"{interval}\"\n")).unwrap();
    let mut env = vec![
        ("WHARF_GC_DELAY", "0s"),
        ("WHARF_CONFIG", config.to_str().unwrap()),
    ];
    if let Some(url) = &database_url {
        env.push(("WHARF_DATABASE_URL", url.as_str()));
    }
    let env = env;
    let admin = {
        let (data, url) = (data.clone(), database_url.clone());
        move || {
            let mut c = wharf_cmd(&data);
            if let Some(url) = &url {
                c.env("WHARF_DATABASE_URL", url);
            }
            c
        }
    };
    let mut total_ops = 0;
    let mut cli_passes = 0;
    for round in 0..4 {
        let server = Process::start_with(&data, &env, &[]);
        let until = std::time::Instant::now() + Duration::from_millis(2500);
        let workers: Vec<_> = (0..4)
            .map(|w| tokio::spawn(stress_worker(server.base.clone(), round * 10 + w, until)))
            .collect();
        // `wharf gc` beside the server's own passes.
        let cli = {
            let admin = admin.clone();
            std::thread::spawn(move || {
                let mut n = 0;
                while std::time::Instant::now() < until {
                    let out = admin().args(["gc", "--gc-delay", "0s"]).output().unwrap();
                    let err = String::from_utf8_lossy(&out.stderr);
                    // One pass at a time: refused while the server's runs (or while a
                    // killed server's lease has not run out).
                    if out.status.success() {
                        n += 1;
                    } else {
                        assert!(
                            err.contains("another garbage collection pass"),
                            "wharf gc: {err}"
                        );
                    }
                }
                n
            })
        };
        let mut server = Some(server);
        if round < 3 {
            // Killed in the middle of the load (and, with passes every 10 ms, of a pass).
            tokio::time::sleep(Duration::from_millis(1200 + 300 * round)).await;
            server.take().unwrap().kill9();
        }
        for w in workers {
            total_ops += w.await.unwrap();
        }
        cli_passes += cli.join().unwrap();
        if let Some(s) = server {
            s.kill9();
        }
    }
    eprintln!("stress: {total_ops} operations, {cli_passes} wharf gc runs");
    assert!(total_ops > 100, "the load ran: {total_ops} operations");
    assert!(
        cli_passes >= 1,
        "wharf gc ran beside the server: {cli_passes}"
    );

    // With replicas sharing the database, a killed server's uploads keep their write
    // leases until they run out (30 s): no replica may expire an upload another could be
    // writing. Once they have, the restart removes the uploads the kills cut off.
    if database_url.is_some() {
        std::thread::sleep(Duration::from_secs(31));
    }
    // A restart (which removes the uploads the kills cut off), then the check.
    let server = Process::start_with(&data, &env[1..], &[]);
    let reg = TestRegistry::attach(&server.base, &data);
    let mut tags = 0;
    for repo in catalog(&reg).await {
        let v: Value = reg
            .get(&format!("/v2/{repo}/tags/list"))
            .await
            .json()
            .await
            .unwrap();
        for t in v["tags"].as_array().unwrap() {
            assert_pullable(&reg, &repo, t.as_str().unwrap()).await;
            tags += 1;
        }
    }
    assert!(tags > 0, "some tags survived the run");
    // The last kill may have left a pass's lease: it runs out within 30 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let r = loop {
        let out = admin()
            .args(["gc", "--json", "--gc-delay", "0s"])
            .output()
            .unwrap();
        if out.status.success() {
            break serde_json::from_slice::<Value>(&out.stdout).unwrap();
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("another garbage collection pass"), "{err}");
        assert!(
            std::time::Instant::now() < deadline,
            "the lease never ran out"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(r["uploads"], 0, "a pass of wharf gc expires no upload: {r}");
    let db = Db::open(&data, database_url.as_deref()).await;
    assert_eq!(
        db.count(
            "SELECT count(*) FROM repository_blobs rb WHERE NOT EXISTS (SELECT 1 FROM manifest_references r
              WHERE r.repository = rb.repository AND r.child = rb.digest)"
        )
        .await,
        0,
        "links nothing references"
    );
    assert_eq!(
        db.count(
            "SELECT count(*) FROM blobs b WHERE b.deleting_at IS NOT NULL
                OR (NOT EXISTS (SELECT 1 FROM repository_blobs rb WHERE rb.digest = b.digest)
                    AND NOT EXISTS (SELECT 1 FROM manifest_references r WHERE r.child = b.digest))"
        )
        .await,
        0,
        "blob rows nothing references"
    );
    let collected = db
        .count("SELECT CAST(coalesce(sum(blobs), 0) AS BIGINT) FROM gc_runs WHERE NOT dry_run")
        .await;
    let passes = db.count("SELECT count(*) FROM gc_runs").await;
    eprintln!("stress: {passes} passes collected {collected} blobs");
    assert!(
        collected > 10,
        "the passes collected while the load ran: {collected}"
    );
    let rows = db.strings("SELECT digest FROM blobs").await;
    let files: BTreeSet<String> = reg
        .blob_files()
        .iter()
        .map(|p| format!("sha256:{}", p.file_name().unwrap().to_str().unwrap()))
        .collect();
    let files_only: Vec<_> = files.difference(&rows).collect();
    let rows_only: Vec<_> = rows.difference(&files).collect();
    assert!(
        files_only.is_empty() && rows_only.is_empty(),
        "blob files and rows are the same set: files without a row {files_only:?}, rows without a file {rows_only:?}"
    );
    // And the tags are still whole after it.
    for repo in catalog(&reg).await {
        let v: Value = reg
            .get(&format!("/v2/{repo}/tags/list"))
            .await
            .json()
            .await
            .unwrap();
        for t in v["tags"].as_array().unwrap() {
            assert_pullable(&reg, &repo, t.as_str().unwrap()).await;
        }
    }
    server.kill9();
}

/// The docker CLI pushes, pulls and runs images while the server collects garbage every
/// 100 ms; a deleted image's own layers are freed once the delay has passed, the other
/// image (sharing busybox with it) still pulls and runs, and the deleted one can be
/// pushed again.
#[test]
fn docker_push_and_pull_with_gc_running() {
    use crate::docker_cli::{Docker, busybox_context};
    let delay = Duration::from_secs(3);
    let reg = TestRegistry::start_tuned(|c| {
        c.gc.delay = delay;
        c.gc_interval = Duration::from_millis(100);
    });
    let d = Docker::new();
    d.login(reg.host(), "admin", ADMIN_PASSWORD);
    let n = nonce();
    let image = |tag: &str| format!("{}/gcd/app-{n}:{tag}", reg.host());
    for tag in ["one", "two"] {
        let ctx = tempfile::tempdir().unwrap();
        busybox_context(ctx.path(), &format!("{tag} {n}"));
        run(d
            .cmd()
            .args(["build", "-q", "-t", &image(tag)])
            .arg(ctx.path()));
        let pushed = run(d.cmd().args(["push", &image(tag)]));
        assert!(pushed.contains("digest: sha256:"), "{pushed}");
    }
    let before = reg.blob_files().len();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let r = reg
            .client
            .head(reg.url(&format!("/v2/gcd/app-{n}/manifests/one")))
            .header(
                "accept",
                "application/vnd.docker.distribution.manifest.v2+json",
            )
            .send()
            .await
            .unwrap();
        let digest = header(&r, "docker-content-digest").unwrap().to_owned();
        assert_eq!(
            delete(&reg, &format!("/v2/gcd/app-{n}/manifests/{digest}")).await,
            StatusCode::ACCEPTED
        );
    });
    // The server's passes free the deleted image's own blobs after the delay.
    let deadline = std::time::Instant::now() + delay + Duration::from_secs(20);
    while reg.blob_files().len() > before - 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the deleted image's blobs were not collected: {} of {before} left",
            reg.blob_files().len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for tag in ["one", "two"] {
        run(d.cmd().args(["rmi", "-f", &image(tag)]));
    }
    run(d.cmd().args(["pull", &image("two")]));
    let out = run(d.cmd().args(["run", "--rm", &image("two")]));
    assert_eq!(out.trim(), format!("two {n}"));
    let err = d.fails(&["pull", &image("one")]);
    assert!(
        err.contains("not found") || err.contains("unknown"),
        "{err}"
    );
    // Built again, the deleted image pushes and runs again.
    let ctx = tempfile::tempdir().unwrap();
    busybox_context(ctx.path(), &format!("one {n}"));
    run(d
        .cmd()
        .args(["build", "-q", "-t", &image("one")])
        .arg(ctx.path()));
    run(d.cmd().args(["push", &image("one")]));
    run(d.cmd().args(["rmi", "-f", &image("one")]));
    run(d.cmd().args(["pull", &image("one")]));
    let out = run(d.cmd().args(["run", "--rm", &image("one")]));
    assert_eq!(out.trim(), format!("one {n}"));
    for tag in ["one", "two"] {
        run(d.cmd().args(["rmi", "-f", &image(tag)]));
    }
}
