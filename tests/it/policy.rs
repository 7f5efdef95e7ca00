//! Tag immutability: released versions stay as they were; environment tags stay movable.

use reqwest::StatusCode;
use serde_json::Value;

use crate::common::*;

#[tokio::test]
async fn immutable_tags_cannot_be_overwritten_or_deleted_and_the_policy_is_named() {
    let reg = TestRegistry::start();
    let (v1, d1) = reg.push_image("team/api", "1.0.0", "one").await;
    assert_eq!(
        reg.put_manifest("team/api", "prod", OCI_MANIFEST, &v1)
            .await
            .status(),
        StatusCode::CREATED
    );
    let id =
        run(wharf_cmd(&reg.data).args(["policy", "immutable", "team/*", "--tags", "v*,[0-9]*"]));
    assert_eq!(id.trim(), "1");

    // Overwriting 1.0.0 with another image: 403 DENIED naming the policy, nothing moved.
    let (v2, d2) = reg.push_image("team/api", "2.0.0", "two").await;
    let r = reg
        .put_manifest("team/api", "1.0.0", OCI_MANIFEST, &v2)
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "DENIED");
    let msg = body["errors"][0]["message"].as_str().unwrap();
    assert!(
        msg.contains("\"1.0.0\"")
            && msg.contains("policy 1")
            && msg.contains("team/* tags v*,[0-9]*"),
        "{msg}"
    );
    assert_eq!(body["errors"][0]["detail"]["tag"], "1.0.0");
    let head = reg.head("/v2/team/api/manifests/1.0.0").await;
    assert_eq!(header(&head, "docker-content-digest"), Some(d1.as_str()));

    // The same through a push by digest with ?tag=: refused too.
    let r = reg
        .client
        .put(reg.url(&format!("/v2/team/api/manifests/{d2}?tag=1.0.0")))
        .header("content-type", OCI_MANIFEST)
        .body(v2.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await, (StatusCode::FORBIDDEN, "DENIED".into()));

    // Deleting the tag, or the manifest it points at: refused.
    let r = reg
        .client
        .delete(reg.url("/v2/team/api/manifests/1.0.0"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await, (StatusCode::FORBIDDEN, "DENIED".into()));
    let r = reg
        .client
        .delete(reg.url(&format!("/v2/team/api/manifests/{d1}")))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await, (StatusCode::FORBIDDEN, "DENIED".into()));

    // Re-pushing the same image under 1.0.0 changes nothing and is allowed (docker does it).
    assert_eq!(
        reg.put_manifest("team/api", "1.0.0", OCI_MANIFEST, &v1)
            .await
            .status(),
        StatusCode::CREATED
    );
    // prod and latest stay movable; new version tags are created freely.
    for tag in ["prod", "latest", "1.0.1"] {
        assert_eq!(
            reg.put_manifest("team/api", tag, OCI_MANIFEST, &v2)
                .await
                .status(),
            StatusCode::CREATED,
            "{tag}"
        );
    }
    let head = reg.head("/v2/team/api/manifests/prod").await;
    assert_eq!(header(&head, "docker-content-digest"), Some(d2.as_str()));
    // Repositories outside the pattern are not covered.
    let (_, _) = reg.push_image("other/api", "1.0.0", "one").await;
    reg.push_image("other/api", "1.0.0", "two").await;

    // Listed, then removed: the tag moves again.
    let list: Value =
        serde_json::from_str(&run(wharf_cmd(&reg.data).args(["policy", "list", "--json"])))
            .unwrap();
    assert_eq!(list[0]["repositories"], "team/*");
    assert_eq!(list[0]["tags"], serde_json::json!(["v*", "[0-9]*"]));
    run(wharf_cmd(&reg.data).args(["policy", "remove", "1"]));
    assert_eq!(
        reg.put_manifest("team/api", "1.0.0", OCI_MANIFEST, &v2)
            .await
            .status(),
        StatusCode::CREATED
    );
}

#[test]
fn bad_policies_are_refused_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for args in [
        vec!["policy", "immutable", "Team/*", "--tags", "v*"],
        vec!["policy", "immutable", "team/*", "--tags", "v/*"],
        vec!["policy", "immutable", "team/*", "--tags", "[0-9"],
        vec!["policy", "immutable", "team/*", "--tags", " , "],
        vec!["policy", "remove", "7"],
    ] {
        let out = wharf_cmd(&data).args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("wharf: "), "{args:?}: {err}");
    }
    let list = run(wharf_cmd(&data).args(["policy", "list", "--json"]));
    assert_eq!(list.trim(), "[]");
}
