//! Quotas and usage through the API, `wharf quota`, `wharf usage` and `/metrics`.

use reqwest::StatusCode;
use serde_json::Value;

use crate::common::*;

#[tokio::test]
async fn quotas_refuse_pushes_past_them_counting_a_blob_once_per_namespace() {
    let reg = TestRegistry::start();
    wharf(&reg, &["quota", "set", "team/*", "1000B"]);
    let a = pattern(600, 1);
    reg.push_blob("team/a", &a).await;
    // The same blob in another repository of the namespace costs nothing more.
    reg.push_blob("team/b", &a).await;
    let b = pattern(600, 2);
    let r = reg
        .client
        .post(reg.url(&format!("/v2/team/b/blobs/uploads/?digest={}", sha256(&b))))
        .body(b.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "DENIED");
    assert_eq!(
        body["errors"][0]["message"],
        "quota of team/ exceeded: 1.2 KiB of 1000 B"
    );
    assert_eq!(
        reg.head(&format!("/v2/team/b/blobs/{}", sha256(&b)))
            .await
            .status(),
        StatusCode::NOT_FOUND,
        "nothing of the refused push is linked"
    );
    // Another namespace is not limited.
    reg.push_blob("other/x", &b).await;

    let usage: Value =
        serde_json::from_str(&wharf(&reg, &["usage", "--json", "--verify"])).unwrap();
    let row = |kind: &str, name: &str| {
        usage
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["kind"] == kind && r["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {kind} {name} in {usage:#}"))
    };
    assert_eq!(row("namespace", "team")["bytes"], 600);
    assert_eq!(row("namespace", "team")["quota"], 1000);
    assert_eq!(row("repository", "team/a")["bytes"], 600);
    assert_eq!(row("repository", "team/b")["bytes"], 600);
    assert_eq!(row("namespace", "other")["bytes"], 600);
    let only: Value = serde_json::from_str(&wharf(&reg, &["usage", "team", "--json"])).unwrap();
    assert!(
        only.as_array()
            .unwrap()
            .iter()
            .all(|r| r["name"].as_str().unwrap().starts_with("team"))
    );
    let table = wharf(&reg, &["usage"]);
    assert!(
        table.contains("team") && table.contains("1000 B (60%)"),
        "{table}"
    );

    // Past 85 %, one warning in the audit log and one `quota` event to the webhooks
    // that cover the namespace (not to one on a single repository of it).
    let receiver = crate::webhooks::Receiver::start();
    let add = |repos: &str, path: &str| {
        let url = format!("{}{path}", receiver.url);
        wharf(
            &reg,
            &[
                "webhook",
                "add",
                &url,
                "--repositories",
                repos,
                "--actions",
                "quota,push",
            ],
        )
    };
    add("team/*", "/ns");
    add("team/a", "/repo");
    let refused = wharf_fails(
        &reg,
        &[
            "webhook",
            "add",
            &receiver.url,
            "--actions",
            "quota",
            "--format",
            "cncf",
        ],
    );
    assert!(refused.contains("wharf format only"), "{refused}");
    reg.push_blob("team/a", &pattern(300, 3)).await;
    reg.push_blob("team/a", &pattern(10, 4)).await;
    let audit = wharf(&reg, &["audit", "--json"]);
    assert_eq!(audit.matches("quota.warning").count(), 1, "{audit}");
    let got = receiver.wait_for("/ns", 1);
    let warning = got[0].json();
    assert_eq!(warning["action"], "quota", "{warning}");
    assert_eq!(warning["quota"], "team/*");
    assert_eq!(warning["used_bytes"], 900);
    assert_eq!(warning["quota_bytes"], 1000);
    assert_eq!(warning["percent"], 90);
    assert_eq!(
        warning["message"],
        "team/ uses 900 B of its quota of 1000 B (90%)"
    );
    assert_eq!(got[0].header("wharf-event"), Some("quota"));
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(receiver.at("/ns").len(), 1, "warned once");
    assert!(
        receiver.at("/repo").is_empty(),
        "a narrower hook gets no namespace warning"
    );

    // A manifest PUT is refused while the namespace is over its quota.
    let (m, _) = {
        let config = br#"{"os":"linux"}"#;
        let c = reg.push_blob("team/a", config).await;
        (
            image_manifest((&c, config.len()), &[(&sha256(&a), a.len())]),
            c,
        )
    };
    wharf(&reg, &["quota", "set", "team/*", "500B"]);
    let (status, code) = error_of(reg.put_manifest("team/a", "v1", OCI_MANIFEST, &m).await).await;
    assert_eq!((status, code.as_str()), (StatusCode::FORBIDDEN, "DENIED"));
    wharf(&reg, &["quota", "remove", "team/*"]);
    assert_eq!(
        reg.put_manifest("team/a", "v1", OCI_MANIFEST, &m)
            .await
            .status(),
        StatusCode::CREATED
    );

    // The figures are in /metrics too.
    let metrics = reg.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("wharf_storage_bytes{namespace=\"other\"} 600"),
        "{metrics}"
    );
    assert!(
        metrics.contains("wharf_storage_bytes{repository=\"team/b\"} 600"),
        "{metrics}"
    );
    for m in [
        "wharf_repository_tags{repository=\"team/a\"} 1",
        "wharf_repository_manifests{repository=\"team/a\"} 1",
        "wharf_repository_last_push_seconds{repository=\"team/a\"}",
    ] {
        assert!(metrics.contains(m), "{m}: {metrics}");
    }
    let list = wharf(&reg, &["quota", "list"]);
    assert!(list.is_empty(), "{list}");

    // Bad input: a clear error, nothing changed.
    for (args, says) in [
        (vec!["quota", "set", "team/*", "lots"], "invalid size"),
        (vec!["quota", "set", "team/*", "0B"], "at least one byte"),
        (vec!["quota", "set", "team/*/x", "1GiB"], "team/*/x"),
        (vec!["quota", "set", "Team/*", "1GiB"], "namespace"),
        (vec!["quota", "remove", "team/*"], "no quota"),
    ] {
        let err = wharf_fails(&reg, &args);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert!(wharf(&reg, &["quota", "list"]).is_empty());
}
