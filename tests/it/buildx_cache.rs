//! buildx's registry cache (`cache-to: type=registry,ref=...,mode=max` and `cache-from`).
//!
//! The machines have no buildx (it is not packaged for Debian bookworm and the engine's
//! built-in BuildKit needs it), so the three manifest shapes buildkit's registry exporter
//! writes are kept in `tests/data/buildx/` byte for byte as it lays them out (compact
//! JSON, its field order, its annotations), with placeholders for the digests of the
//! blobs this test creates. The test then does what buildx does: check blobs with HEAD,
//! push the missing ones, PUT the cache manifest under the cache tag, overwrite it on
//! the next build, and read manifest and blobs back as `cache-from` does.

use std::process::Command;

use reqwest::StatusCode;
use serde_json::Value;

use crate::common::*;

const BUILDKIT_ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*";

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/data/buildx/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

struct Cache {
    manifest: Vec<u8>,
    blobs: Vec<Vec<u8>>,
}

/// A cache of two layers made by build `n`, in the shape of `template`.
fn cache(template: &str, n: u32) -> Cache {
    let layers: Vec<Vec<u8>> = (0..2)
        .map(|i| {
            format!("gzip bytes of layer {i} of build {n}")
                .repeat(50)
                .into_bytes()
        })
        .collect();
    let fill = |t: &str| {
        let mut t = t.to_owned();
        for (i, l) in layers.iter().enumerate() {
            t = t
                .replace(&format!("{{{{LAYER{i}}}}}"), &sha256(l))
                .replace(&format!("{{{{LAYER{i}_SIZE}}}}"), &l.len().to_string())
                .replace(
                    &format!("{{{{DIFF{i}}}}}"),
                    &sha256(format!("tar {i} {n}").as_bytes()),
                );
        }
        t
    };
    let config = fill(&fixture("cacheconfig.json")).into_bytes();
    let manifest = fill(template)
        .replace("{{CONFIG}}", &sha256(&config))
        .replace("{{CONFIG_SIZE}}", &config.len().to_string())
        .into_bytes();
    assert!(!String::from_utf8_lossy(&manifest).contains("{{"));
    let mut blobs = layers;
    blobs.push(config);
    Cache { manifest, blobs }
}

/// `cache-to`: HEAD each blob, push the missing ones, PUT the manifest.
async fn export(reg: &TestRegistry, repo: &str, tag: &str, c: &Cache, media_type: &str) {
    for b in &c.blobs {
        let r = reg.head(&format!("/v2/{repo}/blobs/{}", sha256(b))).await;
        if r.status() == StatusCode::NOT_FOUND {
            reg.push_blob(repo, b).await;
        }
    }
    let r = reg.put_manifest(repo, tag, media_type, &c.manifest).await;
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
}

/// `cache-from`: the manifest as pushed, then every blob it lists.
async fn import(reg: &TestRegistry, repo: &str, tag: &str, c: &Cache, media_type: &str) {
    let r = reg
        .client
        .get(reg.url(&format!("/v2/{repo}/manifests/{tag}")))
        .header("accept", BUILDKIT_ACCEPT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-type"), Some(media_type));
    assert_eq!(
        header(&r, "docker-content-digest"),
        Some(sha256(&c.manifest).as_str())
    );
    assert_eq!(r.bytes().await.unwrap().as_ref(), c.manifest.as_slice());
    for b in &c.blobs {
        let r = reg.get(&format!("/v2/{repo}/blobs/{}", sha256(b))).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.bytes().await.unwrap().as_ref(), b.as_slice());
    }
}

#[tokio::test]
async fn buildx_cache_exports_and_imports_in_every_shape() {
    let reg = TestRegistry::start();
    for (file, media_type) in [
        ("cache-index-oci.json", OCI_INDEX),
        (
            "cache-index-docker.json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
        ),
        ("cache-manifest-oci.json", OCI_MANIFEST),
    ] {
        let template = fixture(file);
        let repo = "team/api";
        let tag = format!("buildcache-{}", file.trim_end_matches(".json"));
        // First build writes the cache; the second build reads it back, then writes its
        // own, which moves the cache tag.
        let first = cache(&template, 1);
        export(&reg, repo, &tag, &first, media_type).await;
        import(&reg, repo, &tag, &first, media_type).await;
        let second = cache(&template, 2);
        export(&reg, repo, &tag, &second, media_type).await;
        import(&reg, repo, &tag, &second, media_type).await;
    }

    // A cache is listed with its size and no platform.
    let page: Value = reg
        .get("/api/v1/repositories/team/api/tags?ordering=name")
        .await
        .json()
        .await
        .unwrap();
    let oci = page["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "buildcache-cache-index-oci")
        .unwrap();
    assert_eq!(oci["platforms"], serde_json::json!([]));
    assert!(oci["size"].as_u64().unwrap() > 2000, "{oci}");

    // A cache index promotes to another repository like an image: its blobs are mounted.
    let out = run(Command::new(env!("CARGO_BIN_EXE_wharf"))
        .env("WHARF_USERNAME", "admin")
        .env("WHARF_PASSWORD", ADMIN_PASSWORD)
        .env("DOCKER_CONFIG", "/nonexistent")
        .args([
            "promote",
            &format!("{}/team/api:buildcache-cache-index-oci", reg.host()),
            &format!("{}/team/web:buildcache", reg.host()),
            "--json",
        ]));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["mounted_blobs"], 3);
    let r = reg
        .client
        .get(reg.url("/v2/team/web/manifests/buildcache"))
        .header("accept", BUILDKIT_ACCEPT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}
