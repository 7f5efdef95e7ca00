//! `wharf migrate --to`: an embedded registry copied, while it serves, to PostgreSQL and
//! S3 (Garage), then again with only what changed, then served from there; a blob
//! whose bytes are not its digest is never copied.

use std::path::Path;

use reqwest::StatusCode;
use serde_json::Value;

use crate::common::{
    ADMIN_PASSWORD, TestRegistry, client_as, output_with_stdin, run, sha256, wharf_cmd,
};

fn dest_config(dir: &Path, url: &str, bucket: &str, endpoint: &str) -> std::path::PathBuf {
    let path = dir.join("scaled.toml");
    std::fs::write(
        &path,
        format!(
            "database_url = \"{url}\"\n\
             data = \"{}\"\n\
             [storage]\n\
             type = \"s3\"\n\
             bucket = \"{bucket}\"\n\
             endpoint = \"{endpoint}\"\n\
             region = \"{}\"\n\
             path_style = true\n\
             access_key_id = \"{}\"\n\
             secret_access_key = \"{}\"\n",
            dir.join("scaled-data").display(),
            crate::testgarage::REGION,
            crate::testgarage::KEY_ID,
            crate::testgarage::SECRET,
        ),
    )
    .unwrap();
    path
}

fn migrate(data: &Path, to: &Path) -> std::process::Output {
    wharf_cmd(data)
        .args(["migrate", "--json", "--to"])
        .arg(to)
        .output()
        .unwrap()
}

fn report(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "wharf migrate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn pull_all(reg: &TestRegistry, repo: &str, tag: &str) -> Vec<u8> {
    let r = reg.get(&format!("/v2/{repo}/manifests/{tag}")).await;
    assert_eq!(r.status(), StatusCode::OK, "{repo}:{tag}");
    let manifest = r.bytes().await.unwrap().to_vec();
    let m: Value = serde_json::from_slice(&manifest).unwrap();
    let mut digests = vec![m["config"]["digest"].as_str().unwrap().to_owned()];
    for l in m["layers"].as_array().unwrap() {
        digests.push(l["digest"].as_str().unwrap().to_owned());
    }
    for d in digests {
        let bytes = reg
            .get(&format!("/v2/{repo}/blobs/{d}"))
            .await
            .bytes()
            .await
            .unwrap();
        assert_eq!(sha256(&bytes), d, "{repo}:{tag} blob");
    }
    manifest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_registry_moves_to_postgresql_and_s3_with_a_second_run_for_what_changed() {
    let url = crate::postgres::database();
    let (bucket, endpoint) = crate::testgarage::bucket();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let old = {
        let data = data.clone();
        tokio::task::spawn_blocking(move || TestRegistry::start_in(&data))
            .await
            .unwrap()
    };
    let (m1, _) = old.push_image("team/api", "v1", "first").await;
    let (m2, _) = old.push_image("team/web", "v1", "second").await;
    old.push_image("team/web", "old", "third").await;
    let out = output_with_stdin(
        wharf_cmd(&data).args(["user", "add", "dev", "--password-stdin"]),
        "dev-password-1",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    run(wharf_cmd(&data).args(["grant", "dev", "team/*", "push"]));
    let token: Value = old
        .client
        .get(old.url("/token?service=wharf&scope=repository:team/api:pull"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["token"].as_str().unwrap().to_owned();
    let to = dest_config(dir.path(), &url, &bucket, &endpoint);

    // While the old registry serves.
    let first = report(&migrate(&data, &to));
    assert!(first["blobs_copied"].as_u64().unwrap() >= 6, "{first}");
    assert_eq!(first["blobs_present"], 0, "{first}");

    // What changes meanwhile: a push, a tag deleted.
    let (m3, _) = old.push_image("team/api", "v2", "fourth").await;
    let r = old
        .client
        .delete(old.url("/v2/team/web/manifests/old"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let second = report(&migrate(&data, &to));
    assert_eq!(second["blobs_copied"], 2, "only the new image's: {second}");
    assert!(second["rows_deleted"].as_u64().unwrap() >= 1, "{second}");

    // Bytes that are not their digest are never copied, and the metadata is not
    // switched: the run fails, and says so.
    let (_, d5) = old.push_image("team/api", "v3", "fifth").await;
    let m5: Value = serde_json::from_slice(
        &old.get(&format!("/v2/team/api/manifests/{d5}"))
            .await
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    let layer = m5["layers"][0]["digest"].as_str().unwrap().to_owned();
    let file = old
        .blob_files()
        .into_iter()
        .find(|p| layer.ends_with(p.file_name().unwrap().to_str().unwrap()))
        .unwrap();
    std::fs::write(&file, b"not the layer").unwrap();
    let bad = migrate(&data, &to);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains(&layer) && err.contains("not copied"), "{err}");
    old.stop();

    // The new registry serves what the old one held when the second run ended.
    let new = {
        let to = to.clone();
        let scaled = dir.path().join("scaled-data");
        tokio::task::spawn_blocking(move || {
            let config = wharf::config::Config::resolve(Default::default(), Some(&to)).unwrap();
            TestRegistry::start_tuned_in(&scaled, move |c| {
                c.database_url = config.database_url;
                c.storage = config.storage;
            })
        })
        .await
        .unwrap()
    };
    assert_eq!(pull_all(&new, "team/api", "v1").await, m1);
    assert_eq!(pull_all(&new, "team/web", "v1").await, m2);
    assert_eq!(pull_all(&new, "team/api", "v2").await, m3);
    assert_eq!(
        new.get("/v2/team/web/manifests/old").await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        new.get("/v2/team/api/manifests/v3").await.status(),
        StatusCode::NOT_FOUND,
        "the failed run switched nothing"
    );
    // Users, grants, and the signing key came along: the old token and passwords work.
    let r = new
        .anon
        .get(new.url("/v2/team/api/manifests/v1"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let dev = client_as("dev", "dev-password-1");
    let r = dev
        .get(new.url("/v2/team/api/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = client_as("admin", ADMIN_PASSWORD)
        .get(new.url("/v2/_catalog"))
        .send()
        .await
        .unwrap();
    let catalog: Value = r.json().await.unwrap();
    assert_eq!(
        catalog["repositories"],
        serde_json::json!(["team/api", "team/web"])
    );
    // The usage counters came along equal to a recomputation.
    run(wharf_cmd(&new.data)
        .env("WHARF_DATABASE_URL", &url)
        .args(["usage", "--verify"]));
}
