//! Promotion, the tag details API and the CLI's credentials, against a running registry.

use std::process::Command;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::*;
use crate::docker_cli::{Docker, busybox_context};

/// The `wharf` CLI as a CI job runs it: credentials in the environment only.
fn cli(reg: &TestRegistry) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wharf"));
    c.env_remove("WHARF_CONFIG")
        .env("WHARF_REGISTRY", reg.host())
        .env("WHARF_USERNAME", "admin")
        .env("WHARF_PASSWORD", ADMIN_PASSWORD)
        .env("DOCKER_CONFIG", "/nonexistent");
    c
}

/// Request counts by route label, from `/metrics`.
async fn counts(reg: &TestRegistry) -> std::collections::BTreeMap<String, u64> {
    let r = reg.get("/metrics").await;
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    let mut out = std::collections::BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("wharf_http_requests_total{"))
    {
        let route = line
            .split("route=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let method = line
            .split("method=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        *out.entry(format!("{route} {method}")).or_default() += n;
    }
    out
}

fn delta(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
    key: &str,
) -> u64 {
    after.get(key).copied().unwrap_or(0) - before.get(key).copied().unwrap_or(0)
}

/// Pushes two platform images and an index over them (with a buildx-style attestation
/// entry), tagged `tag`; returns the index digest.
async fn push_index(reg: &TestRegistry, repo: &str, tag: &str) -> String {
    let mut entries = Vec::new();
    for (arch, variant) in [("amd64", None), ("arm64", Some("v8"))] {
        let config = format!("{{\"architecture\":\"{arch}\",\"os\":\"linux\"}}");
        let layer = format!("{arch} layer bytes").into_bytes();
        let c = reg.push_blob(repo, config.as_bytes()).await;
        let l = reg.push_blob(repo, &layer).await;
        let m = image_manifest((&c, config.len()), &[(&l, layer.len())]);
        let d = sha256(&m);
        assert_eq!(
            reg.put_manifest(repo, &d, OCI_MANIFEST, &m).await.status(),
            StatusCode::CREATED
        );
        let mut platform = json!({"os": "linux", "architecture": arch});
        if let Some(v) = variant {
            platform["variant"] = json!(v);
        }
        entries.push(
            json!({"mediaType": OCI_MANIFEST, "digest": d, "size": m.len(), "platform": platform}),
        );
    }
    // An attestation manifest, as buildx attaches one: not an image, not a platform.
    let att_cfg = reg.push_blob(repo, b"{}").await;
    let att = image_manifest((&att_cfg, 2), &[]);
    let att_d = sha256(&att);
    reg.put_manifest(repo, &att_d, OCI_MANIFEST, &att).await;
    entries.push(
        json!({"mediaType": OCI_MANIFEST, "digest": att_d, "size": att.len(),
        "platform": {"os": "unknown", "architecture": "unknown"},
        "annotations": {"vnd.docker.reference.type": "attestation-manifest"}}),
    );
    let index = serde_json::to_vec(
        &json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}),
    )
    .unwrap();
    assert_eq!(
        reg.put_manifest(repo, tag, OCI_INDEX, &index)
            .await
            .status(),
        StatusCode::CREATED
    );
    sha256(&index)
}

async fn digest_of(reg: &TestRegistry, repo: &str, tag: &str) -> Option<String> {
    let r = reg
        .client
        .head(reg.url(&format!("/v2/{repo}/manifests/{tag}")))
        .header("accept", format!("{OCI_MANIFEST}, {OCI_INDEX}"))
        .send()
        .await
        .unwrap();
    (r.status() == StatusCode::OK).then(|| header(&r, "docker-content-digest").unwrap().to_owned())
}

#[tokio::test]
async fn promotion_moves_tags_without_uploading_a_blob() {
    let reg = TestRegistry::start();
    let (_, single) = reg.push_image("team/api", "staging", "one").await;
    let (_, old) = reg.push_image("team/api", "prod", "old").await;
    let multi = push_index(&reg, "team/api", "multi").await;
    let before = counts(&reg).await;

    // Dry run: says what would happen, changes nothing.
    let out = run(cli(&reg).args(["promote", "team/api:staging", "team/web:prod", "--dry-run"]));
    assert!(
        out.contains(&format!("team/web:prod would move to {single}")),
        "{out}"
    );
    assert!(out.contains("would mount 2 blob(s)"), "{out}");
    assert_eq!(digest_of(&reg, "team/web", "prod").await, None);

    // Same repository: prints the digest moved and the previous one.
    let out = run(cli(&reg).args(["promote", "team/api:staging", "team/api:prod"]));
    assert!(
        out.contains(&format!("team/api:prod moved to {single}")),
        "{out}"
    );
    assert!(out.contains(&format!("previous {old}")), "{out}");
    assert_eq!(
        digest_of(&reg, "team/api", "prod").await.as_deref(),
        Some(single.as_str())
    );
    // A bare tag as the target means the same repository; re-running is a no-op.
    let out = run(cli(&reg).args(["promote", "team/api:staging", "prod"]));
    assert!(out.contains("already at"), "{out}");

    // Across repositories: blobs mounted, not uploaded.
    let out: Value = serde_json::from_str(&run(cli(&reg).args([
        "promote",
        "team/api:staging",
        "team/web:prod",
        "--json",
    ])))
    .unwrap();
    assert_eq!(out["digest"], single.as_str());
    assert_eq!(out["previous"], Value::Null);
    assert_eq!(out["mounted_blobs"], 2);
    assert_eq!(
        digest_of(&reg, "team/web", "prod").await.as_deref(),
        Some(single.as_str())
    );

    // A multi-platform index, within the repository and into another one with all its
    // children (the attestation included).
    run(cli(&reg).args(["promote", "team/api:multi", "team/api:stable"]));
    assert_eq!(
        digest_of(&reg, "team/api", "stable").await.as_deref(),
        Some(multi.as_str())
    );
    let out: Value = serde_json::from_str(&run(cli(&reg).args([
        "promote",
        &format!("team/api@{multi}"),
        "other/app:prod",
        "--json",
    ])))
    .unwrap();
    assert_eq!(out["copied_manifests"], 3);
    assert_eq!(out["mounted_blobs"], 5);
    let r = reg
        .client
        .get(reg.url("/v2/other/app/manifests/prod"))
        .header("accept", OCI_INDEX)
        .send()
        .await
        .unwrap();
    let index: Value = r.json().await.unwrap();
    for e in index["manifests"].as_array().unwrap() {
        let d = e["digest"].as_str().unwrap();
        assert!(
            digest_of(&reg, "other/app", d).await.is_some(),
            "child {d} missing"
        );
    }

    let after = counts(&reg).await;
    assert_eq!(delta(&before, &after, "upload_start POST"), 0, "{after:?}");
    for m in ["GET", "PATCH", "PUT", "DELETE"] {
        assert_eq!(
            delta(&before, &after, &format!("upload {m}")),
            0,
            "{after:?}"
        );
    }
    assert_eq!(delta(&before, &after, "blob_mount POST"), 7, "{after:?}");
    assert_eq!(
        delta(&before, &after, "blob GET"),
        0,
        "no blob was read: {after:?}"
    );

    // The tag details listing shows what each tag is, in one call.
    let list: Value = serde_json::from_str(&run(cli(&reg).args([
        "tags",
        "list",
        "other/app",
        "--json",
    ])))
    .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["name"], "prod");
    assert_eq!(
        list[0]["platforms"],
        json!(["linux/amd64", "linux/arm64/v8"])
    );
    let layer_sizes = "amd64 layer bytes".len() + "arm64 layer bytes".len();
    assert_eq!(list[0]["size"], layer_sizes);
    let table = run(cli(&reg).args(["tags", "list", "team/api"]));
    for tag in ["staging", "prod", "multi", "stable"] {
        assert!(table.lines().any(|l| l.starts_with(tag)), "{table}");
    }
    assert!(table.contains("linux/amd64,linux/arm64/v8"), "{table}");

    // Bad input: a clear message, a non-zero exit, nothing changed.
    for args in [
        vec!["promote", "team/api:nope", "team/api:prod"],
        vec![
            "promote",
            "team/api:staging",
            "team/api@sha256:0000000000000000000000000000000000000000000000000000000000000000",
        ],
        vec!["promote", "Team/api:staging", "team/api:prod"],
        vec![
            "promote",
            "127.0.0.1:1/team/api:staging",
            "127.0.0.2:1/team/api:prod",
        ],
        vec!["tags", "list", "team/api:prod"],
    ] {
        let out = cli(&reg).args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with("wharf: ") && err.len() > 20,
            "{args:?}: {err}"
        );
    }
    assert_eq!(
        digest_of(&reg, "team/api", "prod").await.as_deref(),
        Some(single.as_str())
    );
}

#[tokio::test]
async fn tag_details_api_pages_orders_and_guards() {
    let reg = TestRegistry::start();
    for i in 0..5 {
        reg.push_image("team/api", &format!("t{i}"), &format!("s{i}"))
            .await;
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let page: Value = reg
        .get("/api/v1/repositories/team/api/tags?page_size=2")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["count"], 5);
    let names = |v: &Value| -> Vec<String> {
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_owned())
            .collect()
    };
    // Newest first by default, like Docker Hub.
    assert_eq!(names(&page), ["t4", "t3"]);
    assert_eq!(page["previous"], Value::Null);
    let next = page["next"].as_str().unwrap();
    assert!(
        next.starts_with(&reg.base) && next.contains("page=2"),
        "{next}"
    );
    let p3: Value = reg
        .client
        .get(next.replace("page=2", "page=3"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(names(&p3), ["t0"]);
    assert_eq!(p3["next"], Value::Null);
    assert!(p3["previous"].as_str().unwrap().contains("page=2"));
    let by_name: Value = reg
        .get("/api/v1/repositories/team/api/tags?ordering=name&page_size=100")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(names(&by_name), ["t0", "t1", "t2", "t3", "t4"]);
    let r0 = &by_name["results"][0];
    assert_eq!(r0["platforms"], json!(["linux/amd64"]));
    assert_eq!(r0["media_type"], OCI_MANIFEST);
    assert_eq!(r0["size"], "layer of s0".len());
    assert!(r0["last_pushed"].as_str().unwrap().ends_with('Z'));

    // Docker Hub's path, for scripts written against it (`jq '.results[].name'`).
    let hub: Value = reg
        .get("/v2/repositories/team/api/tags/?page_size=100")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(hub["count"], 5);

    // Bad input and access: OCI errors.
    for q in ["page=0", "page_size=x", "ordering=size", "page=-1"] {
        let r = reg
            .get(&format!("/api/v1/repositories/team/api/tags?{q}"))
            .await;
        assert_eq!(
            error_of(r).await,
            (StatusCode::BAD_REQUEST, "UNSUPPORTED".into()),
            "{q}"
        );
    }
    let r = reg.get("/api/v1/repositories/team/nothing/tags").await;
    assert_eq!(
        error_of(r).await,
        (StatusCode::NOT_FOUND, "NAME_UNKNOWN".into())
    );
    let r = reg.get("/api/v1/repositories/Team/api/tags").await;
    assert_eq!(error_of(r).await.0, StatusCode::BAD_REQUEST);
    let r = reg
        .anon
        .get(reg.url("/api/v1/repositories/team/api/tags"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(r).await,
        (StatusCode::UNAUTHORIZED, "UNAUTHORIZED".into())
    );
    let r = reg
        .client
        .post(reg.url("/api/v1/repositories/team/api/tags"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.0, StatusCode::METHOD_NOT_ALLOWED);

    // A user without pull on the repository sees nothing; metrics are for admins.
    let out = output_with_stdin(
        wharf_cmd(&reg.data).args(["user", "add", "dev", "--password-stdin"]),
        "dev-password-1",
    );
    assert!(out.status.success());
    let dev = client_as("dev", "dev-password-1");
    let r = dev
        .get(reg.url("/api/v1/repositories/team/api/tags"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await, (StatusCode::FORBIDDEN, "DENIED".into()));
    let r = dev.get(reg.url("/metrics")).send().await.unwrap();
    assert_eq!(error_of(r).await, (StatusCode::FORBIDDEN, "DENIED".into()));
    let r = reg.anon.get(reg.url("/metrics")).send().await.unwrap();
    assert_eq!(error_of(r).await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn cli_credentials_come_from_flags_then_env_then_docker_config() {
    let reg = TestRegistry::start();
    reg.push_image("team/api", "prod", "one").await;
    let dir = tempfile::tempdir().unwrap();
    let docker_config = |user: &str, password: &str| {
        use base64::Engine as _;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        std::fs::write(
            dir.path().join("config.json"),
            json!({"auths": {reg.host(): {"auth": auth}}}).to_string(),
        )
        .unwrap();
    };
    let base = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_wharf"));
        c.env_remove("WHARF_CONFIG")
            .env_remove("WHARF_USERNAME")
            .env_remove("WHARF_PASSWORD")
            .env("DOCKER_CONFIG", dir.path())
            .args(["tags", "list", &format!("{}/team/api", reg.host())]);
        c
    };
    let ok = |c: &mut Command| {
        let out = c.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Nothing anywhere: a clear hint.
    let (success, err) = ok(&mut base());
    assert!(!success);
    assert!(
        err.contains("needs credentials") && err.contains("docker login"),
        "{err}"
    );
    // docker's config alone.
    docker_config("admin", ADMIN_PASSWORD);
    assert!(ok(&mut base()).0);
    // The environment wins over docker's config...
    docker_config("admin", "wrong");
    assert!(!ok(&mut base()).0);
    assert!(
        ok(base()
            .env("WHARF_USERNAME", "admin")
            .env("WHARF_PASSWORD", ADMIN_PASSWORD))
        .0
    );
    // ...and flags over the environment.
    let mut c = base();
    c.env("WHARF_USERNAME", "admin")
        .env("WHARF_PASSWORD", "wrong")
        .args(["--username", "admin", "--password-stdin"]);
    assert!(output_with_stdin(&mut c, ADMIN_PASSWORD).status.success());
    let (success, err) = ok(base()
        .env("WHARF_USERNAME", "admin")
        .env("WHARF_PASSWORD", "wrong"));
    assert!(!success);
    assert!(err.contains("refused to log in admin"), "{err}");

    // docker login may keep a refresh token (`identitytoken`) instead of the password.
    let r = reg
        .anon
        .post(reg.url("/token"))
        .form(&[
            ("grant_type", "password"),
            ("username", "admin"),
            ("password", ADMIN_PASSWORD),
            ("access_type", "offline"),
            ("service", "wharf"),
        ])
        .send()
        .await
        .unwrap();
    let answer: Value = r.json().await.unwrap();
    let refresh = answer["refresh_token"].as_str().unwrap();
    {
        use base64::Engine as _;
        let auth = base64::engine::general_purpose::STANDARD.encode("admin:");
        std::fs::write(
            dir.path().join("config.json"),
            json!({"auths": {reg.host(): {"auth": auth, "identitytoken": refresh}}}).to_string(),
        )
        .unwrap();
    }
    let (success, err) = ok(&mut base());
    assert!(success, "{err}");
}

#[test]
fn docker_push_promote_and_pull_the_promoted_tag() {
    let reg = TestRegistry::start();
    let d = Docker::new();
    d.login(reg.host(), "admin", ADMIN_PASSWORD);
    let ctx = tempfile::tempdir().unwrap();
    let nonce = nonce();
    busybox_context(ctx.path(), &format!("release {nonce}"));
    let staging = format!("{}/team/api-{nonce}:staging", reg.host());
    let prod = format!("{}/team/web-{nonce}:prod", reg.host());
    run(d
        .cmd()
        .args(["build", "-q", "-t", &staging])
        .arg(ctx.path()));
    run(d.cmd().args(["push", &staging]));
    // The CLI uses the login docker just stored.
    let mut promote = Command::new(env!("CARGO_BIN_EXE_wharf"));
    promote
        .env_remove("WHARF_USERNAME")
        .env_remove("WHARF_PASSWORD")
        .env_remove("WHARF_CONFIG")
        .env("DOCKER_CONFIG", d.config_dir())
        .args(["promote", &staging, &prod]);
    let out = run(&mut promote);
    assert!(out.contains("moved to sha256:"), "{out}");
    run(d.cmd().args(["rmi", "-f", &staging]));
    let pulled = run(d.cmd().args(["pull", &prod]));
    assert!(pulled.contains("Downloaded newer image"), "{pulled}");
    let said = run(d.cmd().args(["run", "--rm", &prod]));
    assert_eq!(said.trim(), format!("release {nonce}"));

    // Under an immutability policy, docker cannot overwrite a release; prod still moves.
    let release = format!("{}/team/web-{nonce}:1.0.0", reg.host());
    run(d.cmd().args(["tag", &prod, &release]));
    run(d.cmd().args(["push", &release]));
    run(wharf_cmd(&reg.data).args(["policy", "immutable", "team/*", "--tags", "v*,[0-9]*"]));
    let ctx2 = tempfile::tempdir().unwrap();
    busybox_context(ctx2.path(), &format!("other {nonce}"));
    run(d
        .cmd()
        .args(["build", "-q", "-t", &release])
        .arg(ctx2.path()));
    let err = d.fails(&["push", &release]);
    assert!(
        err.contains("immutable") && err.contains("policy 1"),
        "{err}"
    );
    run(d.cmd().args(["tag", &release, &prod]));
    run(d.cmd().args(["push", &prod]));
    run(d.cmd().args(["rmi", "-f", &prod, &release]));
}

#[test]
fn the_registry_serves_its_own_cli_for_ci_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let p = Process::start(&dir.path().join("data"));
    let name = format!("wharf-{}-{}", std::env::consts::OS, std::env::consts::ARCH);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let anon = reqwest::Client::new();
        let r = anon
            .get(format!("{}/api/v1/cli/{name}", p.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let served = r.bytes().await.unwrap();
        let built = std::fs::read(env!("CARGO_BIN_EXE_wharf")).unwrap();
        assert!(
            served.as_ref() == built.as_slice(),
            "the served CLI is not this build"
        );
        let r = anon
            .get(format!("{}/api/v1/cli/wharf-plan9-mips", p.base))
            .send()
            .await
            .unwrap();
        let (status, code) = error_of(r).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::NOT_FOUND, "NAME_UNKNOWN")
        );
    });
}
