//! Blobs in an S3-compatible store: a real Garage the harness starts (`testgarage`),
//! metadata in a real PostgreSQL, the docker CLI against it, a chunked upload spread over
//! two replicas, and blob GETs redirected to presigned URLs.

use reqwest::StatusCode;

use crate::common::{ADMIN_PASSWORD, TestRegistry, nonce, pattern, run, sha256};
use crate::docker_cli::{Docker, busybox_context};

fn s3(bucket: &str, endpoint: &str, redirect: bool) -> wharf::config::Storage {
    wharf::config::Storage::S3(wharf::store::blob::S3Config {
        bucket: bucket.into(),
        endpoint: endpoint.into(),
        region: crate::testgarage::REGION.into(),
        path_style: true,
        prefix: String::new(),
        access_key_id: Some(crate::testgarage::KEY_ID.into()),
        secret_access_key: Some(crate::testgarage::SECRET.into()),
        redirect,
    })
}

fn shared(
    url: &str,
    storage: &wharf::config::Storage,
) -> impl FnOnce(&mut wharf::config::Config) + use<> {
    let (url, storage) = (url.to_owned(), storage.clone());
    move |c| {
        c.database_url = Some(wharf::auth::Secret::new(url));
        c.storage = storage;
    }
}

fn docker_round_trip(reg: &TestRegistry, repo: &str) {
    let ctx = tempfile::tempdir().unwrap();
    let nonce = nonce();
    busybox_context(ctx.path(), &format!("hello from s3 {nonce}"));
    let image = format!("{}/{repo}-{nonce}:v1", reg.host());
    let d = Docker::new();
    d.login(reg.host(), "admin", ADMIN_PASSWORD);
    run(d.cmd().args(["build", "-q", "-t", &image]).arg(ctx.path()));
    let pushed = run(d.cmd().args(["push", &image]));
    assert!(pushed.contains("digest: sha256:"), "{pushed}");
    run(d.cmd().args(["rmi", "-f", &image]));
    run(d.cmd().args(["pull", &image]));
    let out = run(d.cmd().args(["run", "--rm", &image]));
    assert_eq!(out.trim(), format!("hello from s3 {nonce}"));
    run(d.cmd().args(["rmi", "-f", &image]));
}

#[test]
fn docker_pushes_and_pulls_with_blobs_in_s3_and_metadata_in_postgresql() {
    let url = crate::postgres::database();
    let (bucket, endpoint) = crate::testgarage::bucket();
    let reg = TestRegistry::start_tuned(shared(&url, &s3(&bucket, &endpoint, false)));
    docker_round_trip(&reg, "s3/busybox");
    // No blob was kept on the local disk.
    assert!(reg.blob_files().is_empty(), "{:?}", reg.blob_files());
}

/// With `redirect = true` a blob GET answers 307 to a presigned URL of the bucket, and
/// docker pulls through it.
#[test]
fn docker_pulls_through_the_presigned_redirect() {
    let url = crate::postgres::database();
    let (bucket, endpoint) = crate::testgarage::bucket();
    let reg = TestRegistry::start_tuned(shared(&url, &s3(&bucket, &endpoint, true)));
    docker_round_trip(&reg, "s3/redirected");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let data = pattern(3000, 4);
        let digest = reg.push_blob("s3/raw", &data).await;
        let no_follow = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let r = no_follow
            .get(reg.url(&format!("/v2/s3/raw/blobs/{digest}")))
            .basic_auth("admin", Some(ADMIN_PASSWORD))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT);
        let location = r.headers()["location"].to_str().unwrap().to_owned();
        assert!(location.starts_with(&endpoint), "{location}");
        let fetched = reqwest::get(&location)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(sha256(&fetched), digest);
        // HEAD is answered by wharf itself, and a caller without access gets no URL.
        let head = reg
            .client
            .head(reg.url(&format!("/v2/s3/raw/blobs/{digest}")))
            .send()
            .await
            .unwrap();
        assert_eq!(head.status(), StatusCode::OK);
        let anon = no_follow
            .get(reg.url(&format!("/v2/s3/raw/blobs/{digest}")))
            .send()
            .await
            .unwrap();
        assert_eq!(anon.status(), StatusCode::UNAUTHORIZED);
    });
}

/// A chunked upload whose chunks go to different replicas (as a load balancer sends
/// them), some smaller than S3's 5 MiB part minimum: the blob is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_upload_spread_over_two_replicas_makes_one_whole_blob() {
    let url = crate::postgres::database();
    let (bucket, endpoint) = crate::testgarage::bucket();
    let storage = s3(&bucket, &endpoint, false);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = {
        let (d1, d2) = (dir.path().join("a"), dir.path().join("b"));
        let (s1, s2) = (shared(&url, &storage), shared(&url, &storage));
        tokio::task::spawn_blocking(move || {
            let a = TestRegistry::start_tuned_in(&d1, s1);
            (a, TestRegistry::start_tuned_in(&d2, s2))
        })
        .await
        .unwrap()
    };
    let data = pattern(12 * 1024 * 1024 + 321, 8);
    let digest = sha256(&data);
    let r = a
        .client
        .post(a.url("/v2/team/big/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let mut location = r.headers()["location"].to_str().unwrap().to_owned();
    let cuts = [0, 1024 * 1024, 3 * 1024 * 1024, 9 * 1024 * 1024, data.len()];
    for (i, w) in cuts.windows(2).enumerate() {
        let reg = if i % 2 == 0 { &b } else { &a };
        let chunk = data[w[0]..w[1]].to_vec();
        let path = location.trim_start_matches(&a.base).to_owned();
        let r = reg
            .client
            .patch(reg.url(&path))
            .header("content-type", "application/octet-stream")
            .header("content-range", format!("{}-{}", w[0], w[1] - 1))
            .body(chunk)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED, "chunk {i}");
        location = r.headers()["location"].to_str().unwrap().to_owned();
        location = location.replace(&b.base, &a.base);
    }
    let path = location.trim_start_matches(&a.base).to_owned();
    let sep = if path.contains('?') { '&' } else { '?' };
    let r = a
        .client
        .put(a.url(&format!("{path}{sep}digest={digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "{:?}", r.text().await);
    for reg in [&a, &b] {
        let got = reg
            .get(&format!("/v2/team/big/blobs/{digest}"))
            .await
            .bytes()
            .await
            .unwrap();
        assert!(got == data, "the blob is whole");
    }
}

/// A replica started with a bucket that does not exist, or a database nothing listens
/// on, stops at once with a message that says which.
#[test]
fn a_replica_with_a_wrong_bucket_or_database_fails_at_start_saying_which() {
    let url = crate::postgres::database();
    let (_, endpoint) = crate::testgarage::bucket();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("wharf.toml");
    let write = |bucket: &str| {
        std::fs::write(
            &config,
            format!(
                "[storage]\ntype = \"s3\"\nbucket = \"{bucket}\"\nendpoint = \"{endpoint}\"\n\
                 region = \"{}\"\npath_style = true\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
                crate::testgarage::REGION,
                crate::testgarage::KEY_ID,
                crate::testgarage::SECRET
            ),
        )
        .unwrap()
    };
    write("no-such-bucket");
    let serve = |database: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_wharf"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(dir.path().join("data"))
            .arg("--config")
            .arg(&config)
            .env("WHARF_DATABASE_URL", database)
            .env("WHARF_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .output()
            .unwrap()
    };
    let out = serve(&url);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("blob storage cannot be used") && err.contains("NoSuchBucket"),
        "{err}"
    );
    let (bucket, _) = crate::testgarage::bucket();
    write(&bucket);
    let port = crate::common::free_port();
    let out = serve(&format!("postgres://wharf@127.0.0.1:{port}/wharf"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("database cannot be reached"), "{err}");
}

/// On a Garage cluster of three nodes with replication factor 3, one node stopped:
/// pushes and pulls go on (the other two are a quorum), and what was pushed before is
/// whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_and_pulls_go_on_with_one_garage_node_of_three_stopped() {
    let url = crate::postgres::database();
    let mut garage = tokio::task::spawn_blocking(crate::testgarage::Cluster3::start)
        .await
        .unwrap();
    let storage = s3(&garage.bucket, &garage.endpoints[0], false);
    let reg = {
        let s = shared(&url, &storage);
        tokio::task::spawn_blocking(move || TestRegistry::start_tuned(s))
            .await
            .unwrap()
    };
    let before = reg.push_image("team/ha", "before", "three nodes").await;
    garage.stop(2);
    let after = reg.push_image("team/ha", "after", "two nodes").await;
    for (tag, (manifest, _)) in [("before", &before), ("after", &after)] {
        let r = reg.get(&format!("/v2/team/ha/manifests/{tag}")).await;
        assert_eq!(r.status(), StatusCode::OK, "{tag}");
        assert_eq!(&r.bytes().await.unwrap()[..], &manifest[..]);
        let m: serde_json::Value = serde_json::from_slice(manifest).unwrap();
        for d in [&m["config"]["digest"], &m["layers"][0]["digest"]] {
            let d = d.as_str().unwrap();
            let bytes = reg
                .get(&format!("/v2/team/ha/blobs/{d}"))
                .await
                .bytes()
                .await
                .unwrap();
            assert_eq!(sha256(&bytes), d, "{tag}: {d}");
        }
    }
}
