use reqwest::StatusCode;

use crate::common::{TestRegistry, error_of, header};

#[tokio::test]
async fn base_endpoint_answers_with_the_api_version() {
    let reg = TestRegistry::start();
    for path in ["/v2/", "/v2"] {
        let r = reg.get(path).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            header(&r, "docker-distribution-api-version"),
            Some("registry/2.0")
        );
        assert_eq!(r.text().await.unwrap(), "{}");
    }
    let r = reg.head("/v2/").await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn unknown_paths_and_methods_get_oci_errors() {
    let reg = TestRegistry::start();
    let (s, code) = error_of(reg.get("/v2/team/api/nothing/here").await).await;
    assert_eq!((s, code.as_str()), (StatusCode::NOT_FOUND, "NAME_UNKNOWN"));
    let (s, _) = error_of(reg.get("/other").await).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let r = reg
        .client
        .put(reg.url("/v2/_catalog"))
        .send()
        .await
        .unwrap();
    let (s, code) = error_of(r).await;
    assert_eq!(
        (s, code.as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED")
    );
    let r = reg
        .client
        .post(reg.url("/v2/team/api/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn invalid_repository_names_are_400_name_invalid_and_create_nothing() {
    let reg = TestRegistry::start();
    let long = format!("{}/x", "a".repeat(255));
    for name in [
        "Team/api",
        "team%2Fapi",
        "team//api",
        "team/api.",
        "-team",
        "team/_api",
        long.as_str(),
    ] {
        for path in [
            format!("/v2/{name}/tags/list"),
            format!("/v2/{name}/manifests/latest"),
            format!("/v2/{name}/blobs/uploads/"),
        ] {
            let r = if path.ends_with("uploads/") {
                reg.client.post(reg.url(&path)).send().await.unwrap()
            } else {
                reg.get(&path).await
            };
            let (s, code) = error_of(r).await;
            assert_eq!(
                (s, code.as_str()),
                (StatusCode::BAD_REQUEST, "NAME_INVALID"),
                "{path}"
            );
        }
    }
    let r = reg.get("/v2/_catalog").await;
    assert_eq!(r.text().await.unwrap(), r#"{"repositories":[]}"#);
}

#[tokio::test]
async fn deeply_nested_names_work() {
    let reg = TestRegistry::start();
    let repo = "a/b/c/d/e/f/g/h/i/j/blobs/uploads/manifests/tags";
    let (_, digest) = reg.push_image(repo, "latest", "deep").await;
    let r = reg.get(&format!("/v2/{repo}/manifests/latest")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "docker-content-digest"), Some(digest.as_str()));
    let r = reg.get(&format!("/v2/{repo}/tags/list")).await;
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["tags"][0],
        "latest"
    );
}

/// Dot segments must reach the server as sent; HTTP clients normalise them away, so this
/// speaks HTTP/1.1 over a plain socket.
#[test]
fn dot_segments_in_names_are_rejected() {
    use std::io::{Read, Write};
    let reg = TestRegistry::start();
    for path in [
        "/v2/team/../other/tags/list",
        "/v2/team/./api/manifests/latest",
        "/v2/../v2/x/tags/list",
    ] {
        let mut s = std::net::TcpStream::connect(reg.host()).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 400"), "{path}: {out}");
        assert!(out.contains("NAME_INVALID"), "{path}: {out}");
    }
}
