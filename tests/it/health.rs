//! `/healthz` and `/readyz`, as a load balancer uses them: no credentials, up or down,
//! and back up by itself.

use reqwest::StatusCode;
use serde_json::Value;

use crate::common::*;

#[tokio::test]
async fn healthz_and_readyz_answer_without_credentials_and_follow_the_storage() {
    let reg = TestRegistry::start();
    let r = reg.anon.get(reg.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "alive");
    let r = reg.anon.get(reg.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "ready");
    assert_eq!(body["database"], "ok");
    assert_eq!(body["storage"], "ok");
    let r = reg.anon.head(reg.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // Only reads: anything else is refused, and a path below is not a health check.
    let r = reg.anon.post(reg.url("/readyz")).send().await.unwrap();
    assert_eq!(
        error_of(r).await,
        (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED".into())
    );
    let r = reg.anon.get(reg.url("/readyz/x")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // The blob storage goes away: not ready (503, in the OCI error format, saying which
    // part, and not where it lives), while the process stays alive.
    let blobs = reg.data.join("blobs");
    let aside = reg.data.join("blobs.aside");
    std::fs::rename(&blobs, &aside).unwrap();
    // An answer serves for a second (a flood of probes costs one check a second).
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = reg.anon.get(reg.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header(&r, "retry-after"), Some("1"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "UNAVAILABLE", "{body}");
    assert_eq!(
        body["errors"][0]["detail"]["storage"], "unavailable",
        "{body}"
    );
    assert_eq!(body["errors"][0]["detail"]["database"], "ok", "{body}");
    let text = body.to_string();
    assert!(!text.contains(reg.data.to_str().unwrap()), "{text}");
    let r = reg.anon.get(reg.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // It comes back: ready again, with no restart.
    std::fs::rename(&aside, &blobs).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = reg.anon.get(reg.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // Counted in the metrics under a route of their own.
    let m = reg.get("/metrics").await.text().await.unwrap();
    assert!(m.contains("route=\"health\""), "{m}");
}
