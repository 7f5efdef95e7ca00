use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{OCI_INDEX, OCI_MANIFEST, TestRegistry, error_of, header, sha256};

#[tokio::test]
async fn referrers_api_with_filter_and_oci_subject() {
    let reg = TestRegistry::start();
    let (subject, subject_d) = reg.push_image("team/api", "v1", "subject").await;
    let empty = reg.push_blob("team/api", b"{}").await;
    let sig = reg.push_blob("team/api", b"signature").await;

    let referrer = |artifact_type: Option<&str>, config_type: &str, note: &str| {
        let mut m = json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": config_type, "digest": empty, "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": sig, "size": 9}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject_d, "size": subject.len()},
            "annotations": {"note": note}
        });
        if let Some(t) = artifact_type {
            m["artifactType"] = json!(t);
        }
        serde_json::to_vec(&m).unwrap()
    };
    let a = referrer(
        Some("application/vnd.example.sig"),
        "application/vnd.oci.empty.v1+json",
        "a",
    );
    let b = referrer(None, "application/vnd.example.sbom.config", "b");
    for m in [&a, &b] {
        let r = reg
            .put_manifest("team/api", &sha256(m), OCI_MANIFEST, m)
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
        assert_eq!(header(&r, "oci-subject"), Some(subject_d.as_str()));
    }
    // An index can refer too; with no artifactType it has none in the listing.
    let idx = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject_d, "size": subject.len()}
    }))
    .unwrap();
    let r = reg
        .put_manifest("team/api", &sha256(&idx), OCI_INDEX, &idx)
        .await;
    assert_eq!(header(&r, "oci-subject"), Some(subject_d.as_str()));

    let r = reg
        .get(&format!("/v2/team/api/referrers/{subject_d}"))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-type"), Some(OCI_INDEX));
    assert_eq!(header(&r, "oci-filters-applied"), None);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["schemaVersion"], 2);
    assert_eq!(body["mediaType"], OCI_INDEX);
    let mut got: Vec<Value> = body["manifests"].as_array().unwrap().clone();
    got.sort_by_key(|d| d["size"].as_u64());
    let mut want = vec![
        json!({"mediaType": OCI_MANIFEST, "digest": sha256(&a), "size": a.len(), "artifactType": "application/vnd.example.sig", "annotations": {"note": "a"}}),
        json!({"mediaType": OCI_MANIFEST, "digest": sha256(&b), "size": b.len(), "artifactType": "application/vnd.example.sbom.config", "annotations": {"note": "b"}}),
        json!({"mediaType": OCI_INDEX, "digest": sha256(&idx), "size": idx.len()}),
    ];
    want.sort_by_key(|d| d["size"].as_u64());
    assert_eq!(got, want);

    let r = reg
        .get(&format!(
            "/v2/team/api/referrers/{subject_d}?artifactType=application/vnd.example.sig"
        ))
        .await;
    assert_eq!(header(&r, "oci-filters-applied"), Some("artifactType"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(body["manifests"][0]["digest"], sha256(&a));

    // Deleting a referrer removes it from the list.
    reg.client
        .delete(reg.url(&format!("/v2/team/api/manifests/{}", sha256(&a))))
        .send()
        .await
        .unwrap();
    let body: Value = reg
        .get(&format!("/v2/team/api/referrers/{subject_d}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["manifests"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn referrers_of_unknown_subjects_are_empty_and_bad_digests_400() {
    let reg = TestRegistry::start();
    let unknown = sha256(b"no such manifest");
    for repo in ["team/api", "never/pushed"] {
        let r = reg.get(&format!("/v2/{repo}/referrers/{unknown}")).await;
        assert_eq!(r.status(), StatusCode::OK);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["manifests"], json!([]));
    }
    let (s, code) = error_of(reg.get("/v2/team/api/referrers/sha256:nothex").await).await;
    assert_eq!(
        (s, code.as_str()),
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID")
    );
}

#[tokio::test]
async fn a_referrer_whose_subject_does_not_exist_yet_is_accepted() {
    let reg = TestRegistry::start();
    let empty = reg.push_blob("team/api", b"{}").await;
    let ghost = sha256(b"ghost");
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/x",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [],
        "subject": {"mediaType": OCI_MANIFEST, "digest": ghost, "size": 10}
    }))
    .unwrap();
    let r = reg
        .put_manifest("team/api", &sha256(&m), OCI_MANIFEST, &m)
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(header(&r, "oci-subject"), Some(ghost.as_str()));
    let body: Value = reg
        .get(&format!("/v2/team/api/referrers/{ghost}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["manifests"].as_array().unwrap().len(), 1);
}
