use reqwest::StatusCode;
use serde_json::json;

use crate::common::{
    OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST, TestRegistry, error_of, header, image_manifest,
    sha256,
};

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

#[tokio::test]
async fn push_and_pull_by_tag_and_digest_exact_bytes() {
    let reg = TestRegistry::start();
    let c = reg.push_blob("team/api", b"{}cfg").await;
    let l = reg.push_blob("team/api", b"layer").await;
    // Deliberately odd whitespace: the registry must store and hash the bytes as sent.
    let body = format!(
        "{{ \"schemaVersion\": 2, \"mediaType\": \"{OCI_MANIFEST}\",\n  \"config\": {{\"mediaType\": \"{OCI_CONFIG}\", \"digest\": \"{c}\", \"size\": 5}},\n  \"layers\": [{{\"mediaType\": \"{OCI_LAYER}\", \"digest\": \"{l}\", \"size\": 5}}] }}"
    );
    let digest = sha256(body.as_bytes());
    let r = reg
        .put_manifest("team/api", "v1", OCI_MANIFEST, body.as_bytes())
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        header(&r, "location"),
        Some(format!("/v2/team/api/manifests/{digest}").as_str())
    );
    assert_eq!(header(&r, "docker-content-digest"), Some(digest.as_str()));

    for reference in ["v1", digest.as_str()] {
        let r = reg
            .get(&format!("/v2/team/api/manifests/{reference}"))
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header(&r, "content-type"), Some(OCI_MANIFEST));
        assert_eq!(header(&r, "docker-content-digest"), Some(digest.as_str()));
        assert_eq!(
            header(&r, "content-length"),
            Some(body.len().to_string().as_str())
        );
        assert_eq!(r.text().await.unwrap(), body);
        let r = reg
            .head(&format!("/v2/team/api/manifests/{reference}"))
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            header(&r, "content-length"),
            Some(body.len().to_string().as_str())
        );
        assert_eq!(header(&r, "docker-content-digest"), Some(digest.as_str()));
        assert!(r.bytes().await.unwrap().is_empty());
    }
    // Push by digest, and the same manifest under more tags.
    let r = reg
        .put_manifest("team/api", &digest, OCI_MANIFEST, body.as_bytes())
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = reg
        .put_manifest("team/api", "latest", OCI_MANIFEST, body.as_bytes())
        .await;
    assert_eq!(header(&r, "docker-content-digest"), Some(digest.as_str()));
}

#[tokio::test]
async fn manifest_with_missing_blob_is_manifest_blob_unknown_and_changes_nothing() {
    let reg = TestRegistry::start();
    let c = reg.push_blob("team/api", b"cfg").await;
    let missing = sha256(b"never pushed");
    let m = image_manifest((&c, 3), &[(&missing, 12)]);
    let (s, code) = error_of(reg.put_manifest("team/api", "v1", OCI_MANIFEST, &m).await).await;
    assert_eq!(
        (s, code.as_str()),
        (StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN")
    );
    assert_eq!(
        reg.get("/v2/team/api/manifests/v1").await.status(),
        StatusCode::NOT_FOUND
    );
    let tags: serde_json::Value = reg
        .get("/v2/team/api/tags/list")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(tags["tags"], json!([]));

    // A blob of another repository does not count.
    let l = reg.push_blob("other/repo", b"elsewhere").await;
    let m = image_manifest((&c, 3), &[(&l, 9)]);
    let (_, code) = error_of(reg.put_manifest("team/api", "v1", OCI_MANIFEST, &m).await).await;
    assert_eq!(code, "MANIFEST_BLOB_UNKNOWN");

    // A descriptor whose size is wrong is invalid.
    let l = reg.push_blob("team/api", b"elsewhere").await;
    let m = image_manifest((&c, 3), &[(&l, 999)]);
    let (s, code) = error_of(reg.put_manifest("team/api", "v1", OCI_MANIFEST, &m).await).await;
    assert_eq!(
        (s, code.as_str()),
        (StatusCode::BAD_REQUEST, "MANIFEST_INVALID")
    );
}

#[tokio::test]
async fn indexes_need_their_children_in_the_repository() {
    let reg = TestRegistry::start();
    let (amd, amd_d) = reg.push_image("team/api", "amd", "amd64").await;
    let (arm, arm_d) = reg.push_image("team/api", "arm", "arm64").await;
    let index = |media: &str, child_type: &str| {
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": media,
            "manifests": [
                {"mediaType": child_type, "digest": amd_d, "size": amd.len(), "platform": {"os": "linux", "architecture": "amd64"}},
                {"mediaType": child_type, "digest": arm_d, "size": arm.len(), "platform": {"os": "linux", "architecture": "arm64"}},
            ]
        }))
        .unwrap()
    };
    let idx = index(OCI_INDEX, OCI_MANIFEST);
    let (s, code) = error_of(
        reg.put_manifest("other/repo", "multi", OCI_INDEX, &idx)
            .await,
    )
    .await;
    assert_eq!(
        (s, code.as_str()),
        (StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN")
    );
    let r = reg.put_manifest("team/api", "multi", OCI_INDEX, &idx).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = reg.get("/v2/team/api/manifests/multi").await;
    assert_eq!(header(&r, "content-type"), Some(OCI_INDEX));
    assert_eq!(r.bytes().await.unwrap(), idx);

    // Docker's manifest list works the same way (children typed as OCI here; the types
    // of children are not constrained).
    let list = index(DOCKER_LIST, OCI_MANIFEST);
    assert_eq!(
        reg.put_manifest("team/api", "dl", DOCKER_LIST, &list)
            .await
            .status(),
        StatusCode::CREATED
    );
    assert_eq!(
        header(&reg.get("/v2/team/api/manifests/dl").await, "content-type"),
        Some(DOCKER_LIST)
    );
}

#[tokio::test]
async fn docker_schema2_artifacts_and_buildx_cache_manifests() {
    let reg = TestRegistry::start();
    // Docker v2 schema 2.
    let c = reg.push_blob("team/api", b"cfg").await;
    let l = reg.push_blob("team/api", b"lyr").await;
    let docker = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": c, "size": 3},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": l, "size": 3},
                   {"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "digest": sha256(b"foreign"), "size": 7, "urls": ["https://example.invalid/x"]}]
    }))
    .unwrap();
    assert_eq!(
        reg.put_manifest("team/api", "docker", DOCKER_MANIFEST, &docker)
            .await
            .status(),
        StatusCode::CREATED
    );

    // An artifact: artifactType with the empty config, no mediaType field, no Content-Type.
    let empty = reg.push_blob("team/api", b"{}").await;
    let art = serde_json::to_vec(&json!({
        "schemaVersion": 2, "artifactType": "application/vnd.example.sbom",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [{"mediaType": "application/spdx+json", "digest": l, "size": 3}]
    }))
    .unwrap();
    let r = reg
        .client
        .put(reg.url("/v2/team/api/manifests/sbom"))
        .body(art.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        header(
            &reg.get("/v2/team/api/manifests/sbom").await,
            "content-type"
        ),
        Some(OCI_MANIFEST)
    );

    // buildx's registry cache: an index whose entries are blobs, not manifests.
    let cache_cfg = reg.push_blob("team/api", br#"{"layers":[]}"#).await;
    let cache = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": l, "size": 3, "annotations": {"buildkit/createdat": "2026-01-01T00:00:00Z"}},
            {"mediaType": "application/vnd.buildkit.cacheconfig.v0", "digest": cache_cfg, "size": 13}
        ]
    }))
    .unwrap();
    assert_eq!(
        reg.put_manifest("team/api", "buildcache", OCI_INDEX, &cache)
            .await
            .status(),
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn malformed_manifests_are_manifest_invalid_and_change_nothing() {
    let reg = TestRegistry::start();
    let c = reg.push_blob("team/api", b"cfg").await;
    let good = image_manifest((&c, 3), &[]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (OCI_MANIFEST, b"{not json".to_vec()),
        (OCI_MANIFEST, b"[]".to_vec()),
        (
            OCI_MANIFEST,
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#
                .to_vec(),
        ),
        (
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            br#"{"schemaVersion":1,"name":"x","tag":"y","fsLayers":[]}"#.to_vec(),
        ),
        (DOCKER_MANIFEST, good.clone()), // Content-Type disagrees with mediaType
        ("text/plain", br#"{"schemaVersion":2,"config":{}}"#.to_vec()),
        (
            OCI_MANIFEST,
            String::from_utf8(good.clone())
                .unwrap()
                .replace(&c, "sha256:nothex")
                .into_bytes(),
        ),
    ];
    for (ct, body) in cases {
        let (s, code) = error_of(reg.put_manifest("team/api", "bad", ct, &body).await).await;
        assert_eq!(
            (s, code.as_str()),
            (StatusCode::BAD_REQUEST, "MANIFEST_INVALID"),
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
    assert_eq!(
        reg.get("/v2/team/api/manifests/bad").await.status(),
        StatusCode::NOT_FOUND
    );

    // By digest, the body must have that digest.
    let wrong = sha256(b"something else");
    let (s, code) = error_of(
        reg.put_manifest("team/api", &wrong, OCI_MANIFEST, &good)
            .await,
    )
    .await;
    assert_eq!(
        (s, code.as_str()),
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID")
    );
    let (s, code) = error_of(
        reg.put_manifest("team/api", "sha256:nothex", OCI_MANIFEST, &good)
            .await,
    )
    .await;
    assert_eq!(
        (s, code.as_str()),
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID")
    );
    // Invalid tags on push.
    for tag in [".hidden", "-dash", &"x".repeat(129)] {
        let (s, code) =
            error_of(reg.put_manifest("team/api", tag, OCI_MANIFEST, &good).await).await;
        assert_eq!(
            (s, code.as_str()),
            (StatusCode::BAD_REQUEST, "TAG_INVALID"),
            "{tag}"
        );
    }
    let tags: serde_json::Value = reg
        .get("/v2/team/api/tags/list")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(tags["tags"], json!([]));
}

#[tokio::test]
async fn reads_of_unknown_or_malformed_references() {
    let reg = TestRegistry::start();
    reg.push_image("team/api", "v1", "x").await;
    let (s, code) = error_of(reg.get("/v2/team/api/manifests/nope").await).await;
    assert_eq!(
        (s, code.as_str()),
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
    );
    // An invalid tag names nothing: 404, as conformance expects.
    let (s, _) = error_of(reg.get("/v2/team/api/manifests/.INVALID").await).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(
        reg.head("/v2/team/api/manifests/.INVALID").await.status(),
        StatusCode::NOT_FOUND
    );
    // A malformed digest is a bad request, never a 500.
    for d in ["sha256:nothex", "sha256:", "sha999:abc"] {
        let (s, code) = error_of(reg.get(&format!("/v2/team/api/manifests/{d}")).await).await;
        assert_eq!(
            (s, code.as_str()),
            (StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
            "{d}"
        );
    }
    assert_eq!(
        reg.head("/v2/team/api/manifests/sha256:nothex")
            .await
            .status(),
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn manifest_size_limit_is_4_mib_with_a_clear_413() {
    let reg = TestRegistry::start();
    let c = reg.push_blob("team/api", b"cfg").await;
    let manifest_with = |pad: usize| {
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": c, "size": 3},
            "layers": [],
            "annotations": {"pad": "x".repeat(pad)}
        }))
        .unwrap()
    };
    let near = manifest_with(3_900_000);
    assert_eq!(
        reg.put_manifest("team/api", "big", OCI_MANIFEST, &near)
            .await
            .status(),
        StatusCode::CREATED
    );
    let over = manifest_with(4 * 1024 * 1024);
    let r = reg
        .put_manifest("team/api", "huge", OCI_MANIFEST, &over)
        .await;
    let (s, code) = error_of(r).await;
    assert_eq!(
        (s, code.as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "MANIFEST_INVALID")
    );
    // Also without a Content-Length (streamed body).
    let stream = futures_util::stream::iter(
        over.chunks(65536)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let r = reg
        .client
        .put(reg.url("/v2/team/api/manifests/huge"))
        .header("content-type", OCI_MANIFEST)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        reg.get("/v2/team/api/manifests/huge").await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn accept_header_negotiation() {
    let reg = TestRegistry::start();
    reg.push_image("team/api", "v1", "x").await;
    let get = |accept: &'static str| {
        reg.client
            .get(reg.url("/v2/team/api/manifests/v1"))
            .header("accept", accept)
            .send()
    };
    assert_eq!(get(OCI_MANIFEST).await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        get("application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json;q=0.9")
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(get("*/*").await.unwrap().status(), StatusCode::OK);
    let (s, code) = error_of(get(DOCKER_MANIFEST).await.unwrap()).await;
    assert_eq!(
        (s, code.as_str()),
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
    );
}

#[tokio::test]
async fn delete_by_tag_and_by_digest() {
    let reg = TestRegistry::start();
    let (m, d) = reg.push_image("team/api", "v1", "x").await;
    reg.put_manifest("team/api", "latest", OCI_MANIFEST, &m)
        .await;

    let r = reg
        .client
        .delete(reg.url("/v2/team/api/manifests/latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(
        reg.head("/v2/team/api/manifests/latest").await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        reg.head("/v2/team/api/manifests/v1").await.status(),
        StatusCode::OK
    );
    assert_eq!(
        reg.head(&format!("/v2/team/api/manifests/{d}"))
            .await
            .status(),
        StatusCode::OK
    );

    let r = reg
        .client
        .delete(reg.url(&format!("/v2/team/api/manifests/{d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(
        reg.head(&format!("/v2/team/api/manifests/{d}"))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        reg.head("/v2/team/api/manifests/v1").await.status(),
        StatusCode::NOT_FOUND
    );
    let tags: serde_json::Value = reg
        .get("/v2/team/api/tags/list")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(tags["tags"], json!([]));

    for reference in ["v1", d.as_str()] {
        let r = reg
            .client
            .delete(reg.url(&format!("/v2/team/api/manifests/{reference}")))
            .send()
            .await
            .unwrap();
        let (s, code) = error_of(r).await;
        assert_eq!(
            (s, code.as_str()),
            (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
        );
    }
}

#[tokio::test]
async fn a_tag_moves_atomically_to_the_new_manifest() {
    let reg = TestRegistry::start();
    let (_, d1) = reg.push_image("team/api", "prod", "one").await;
    let (_, d2) = reg.push_image("team/api", "prod", "two").await;
    assert_ne!(d1, d2);
    let r = reg.head("/v2/team/api/manifests/prod").await;
    assert_eq!(header(&r, "docker-content-digest"), Some(d2.as_str()));
    // The old manifest stays pullable by digest.
    assert_eq!(
        reg.head(&format!("/v2/team/api/manifests/{d1}"))
            .await
            .status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn push_by_digest_with_tag_parameters() {
    let reg = TestRegistry::start();
    let c = reg.push_blob("team/api", b"cfg").await;
    let m = image_manifest((&c, 3), &[]);
    let d = sha256(&m);
    let r = reg
        .client
        .put(reg.url(&format!(
            "/v2/team/api/manifests/{d}?tag=1.0.0&tag=1.0&tag=latest"
        )))
        .header("content-type", OCI_MANIFEST)
        .body(m.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let applied: Vec<&str> = r
        .headers()
        .get_all("oci-tag")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(applied, ["1.0.0", "1.0", "latest"]);
    let tags: serde_json::Value = reg
        .get("/v2/team/api/tags/list")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(tags["tags"], json!(["1.0", "1.0.0", "latest"]));
    // An invalid tag parameter rejects the whole push.
    let r = reg
        .client
        .put(reg.url(&format!("/v2/team/api/manifests/{d}?tag=ok&tag=.bad")))
        .header("content-type", OCI_MANIFEST)
        .body(m)
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.1, "TAG_INVALID");
    let tags: serde_json::Value = reg
        .get("/v2/team/api/tags/list")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(tags["tags"], json!(["1.0", "1.0.0", "latest"]));
}

#[tokio::test]
async fn manifests_addressed_by_sha512() {
    let reg = TestRegistry::start();
    let c = reg.push_blob("team/api", b"cfg").await;
    let m = image_manifest((&c, 3), &[]);
    let d512 = format!(
        "sha512:{}",
        hex::encode(<sha2::Sha512 as sha2::Digest>::digest(&m))
    );
    let r = reg.put_manifest("team/api", &d512, OCI_MANIFEST, &m).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(header(&r, "docker-content-digest"), Some(d512.as_str()));
    let r = reg.get(&format!("/v2/team/api/manifests/{d512}")).await;
    assert_eq!(header(&r, "docker-content-digest"), Some(d512.as_str()));
    assert_eq!(r.bytes().await.unwrap(), m);
    // The same bytes under a sha512 digest that does not match are refused.
    let wrong = format!("sha512:{}", "0".repeat(128));
    let (s, code) = error_of(reg.put_manifest("team/api", &wrong, OCI_MANIFEST, &m).await).await;
    assert_eq!(
        (s, code.as_str()),
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID")
    );
}
