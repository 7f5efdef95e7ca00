use reqwest::{Response, StatusCode};

use crate::common::{TestRegistry, error_of, header, sha256};

async fn start(reg: &TestRegistry, repo: &str) -> String {
    let r = reg
        .client
        .post(reg.url(&format!("/v2/{repo}/blobs/uploads/")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let loc = header(&r, "location").unwrap().to_owned();
    assert!(
        loc.starts_with(&format!("/v2/{repo}/blobs/uploads/")),
        "{loc}"
    );
    let id = loc.rsplit('/').next().unwrap();
    assert_eq!(header(&r, "docker-upload-uuid"), Some(id));
    assert_eq!(header(&r, "range"), Some("0-0"));
    loc
}

async fn patch(reg: &TestRegistry, loc: &str, range: Option<&str>, data: &[u8]) -> Response {
    let mut req = reg
        .client
        .patch(reg.url(loc))
        .header("content-type", "application/octet-stream")
        .body(data.to_vec());
    if let Some(range) = range {
        req = req.header("content-range", range);
    }
    req.send().await.unwrap()
}

async fn status(reg: &TestRegistry, loc: &str) -> Response {
    reg.client.get(reg.url(loc)).send().await.unwrap()
}

#[tokio::test]
async fn chunked_upload_with_ordered_chunks_status_and_final_chunk_in_put() {
    let reg = TestRegistry::start();
    let data: Vec<u8> = (0..30_000u32).map(|i| (i % 253) as u8).collect();
    let digest = sha256(&data);
    let loc = start(&reg, "team/api").await;

    let r = patch(&reg, &loc, Some("0-9999"), &data[..10_000]).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&r, "range"), Some("0-9999"));
    assert_eq!(header(&r, "location"), Some(loc.as_str()));
    assert!(header(&r, "docker-upload-uuid").is_some());

    // Out of order: a repeat of the first chunk, and a gap. 416 with the current range,
    // and the session survives unchanged.
    for range in ["0-9999", "10001-20000"] {
        let r = patch(&reg, &loc, Some(range), &data[..10_000]).await;
        assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(header(&r, "range"), Some("0-9999"));
    }
    let r = status(&reg, &loc).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&r, "range"), Some("0-9999"));
    assert_eq!(header(&r, "location"), Some(loc.as_str()));

    let r = patch(&reg, &loc, Some("10000-19999"), &data[10_000..20_000]).await;
    assert_eq!(header(&r, "range"), Some("0-19999"));

    // A PUT whose final chunk does not start at the end is also 416.
    let r = reg
        .client
        .put(reg.url(&format!("{loc}?digest={digest}")))
        .header("content-range", "5-10004")
        .body(data[20_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);

    let r = reg
        .client
        .put(reg.url(&format!("{loc}?digest={digest}")))
        .header("content-range", "20000-29999")
        .body(data[20_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        header(&r, "location"),
        Some(format!("/v2/team/api/blobs/{digest}").as_str())
    );
    assert_eq!(header(&r, "docker-content-digest"), Some(digest.as_str()));
    assert_eq!(
        reg.get(&format!("/v2/team/api/blobs/{digest}"))
            .await
            .bytes()
            .await
            .unwrap(),
        data
    );

    // The session is closed.
    let (s, code) = error_of(status(&reg, &loc).await).await;
    assert_eq!(
        (s, code.as_str()),
        (StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN")
    );
}

#[tokio::test]
async fn streamed_patch_without_content_range_or_length() {
    let reg = TestRegistry::start();
    let parts: Vec<Vec<u8>> = (0..5).map(|i| vec![i as u8; 70_000]).collect();
    let all: Vec<u8> = parts.concat();
    let digest = sha256(&all);
    let loc = start(&reg, "team/api").await;
    let stream = futures_util::stream::iter(parts.into_iter().map(Ok::<_, std::io::Error>));
    let r = reg
        .client
        .patch(reg.url(&loc))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(
        header(&r, "range"),
        Some(format!("0-{}", all.len() - 1).as_str())
    );
    // Then PUT with no body.
    let r = reg
        .client
        .put(reg.url(&format!("{loc}?digest={digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        reg.get(&format!("/v2/team/api/blobs/{digest}"))
            .await
            .bytes()
            .await
            .unwrap(),
        all
    );
}

#[tokio::test]
async fn post_then_single_put_with_the_whole_body() {
    let reg = TestRegistry::start();
    let loc = start(&reg, "team/api").await;
    let digest = sha256(b"whole");
    let r = reg
        .client
        .put(reg.url(&format!("{loc}?digest={digest}")))
        .body("whole")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        reg.get(&format!("/v2/team/api/blobs/{digest}"))
            .await
            .text()
            .await
            .unwrap(),
        "whole"
    );
}

#[tokio::test]
async fn digest_mismatch_on_put_stores_nothing_and_keeps_the_session() {
    let reg = TestRegistry::start();
    let loc = start(&reg, "team/api").await;
    patch(&reg, &loc, None, b"abc").await;
    let wrong = sha256(b"abd");
    let r = reg
        .client
        .put(reg.url(&format!("{loc}?digest={wrong}")))
        .send()
        .await
        .unwrap();
    let (s, code) = error_of(r).await;
    assert_eq!(
        (s, code.as_str()),
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID")
    );
    assert_eq!(
        reg.get(&format!("/v2/team/api/blobs/{wrong}"))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    assert!(reg.blob_files().is_empty());
    let r = status(&reg, &loc).await;
    assert_eq!(header(&r, "range"), Some("0-2"));
    // Missing digest parameter.
    let r = reg.client.put(reg.url(&loc)).send().await.unwrap();
    let (s, code) = error_of(r).await;
    assert_eq!(
        (s, code.as_str()),
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID")
    );
    // And the right digest still completes it.
    let r = reg
        .client
        .put(reg.url(&format!("{loc}?digest={}", sha256(b"abc"))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn length_mismatch_and_bad_content_range_are_rejected_without_change() {
    let reg = TestRegistry::start();
    let loc = start(&reg, "team/api").await;
    // Content-Range says 10 bytes, the body has 4.
    let r = patch(&reg, &loc, Some("0-9"), b"abcd").await;
    let (s, code) = error_of(r).await;
    assert_eq!(
        (s, code.as_str()),
        (StatusCode::BAD_REQUEST, "SIZE_INVALID")
    );
    let r = patch(&reg, &loc, Some("nonsense"), b"abcd").await;
    let (s, code) = error_of(r).await;
    assert_eq!(
        (s, code.as_str()),
        (StatusCode::BAD_REQUEST, "BLOB_UPLOAD_INVALID")
    );
    let r = status(&reg, &loc).await;
    assert_eq!(header(&r, "range"), Some("0-0"));
    let r = patch(&reg, &loc, Some("0-3"), b"abcd").await;
    assert_eq!(header(&r, "range"), Some("0-3"));
}

#[tokio::test]
async fn unknown_uploads_are_404_blob_upload_unknown() {
    let reg = TestRegistry::start();
    let loc = start(&reg, "team/api").await;
    let id = loc.rsplit('/').next().unwrap();
    let unknown = "/v2/team/api/blobs/uploads/9b2b8c39-4f5e-4d7e-9a35-4c1c7a0d0c11";
    let other_repo = format!("/v2/other/app/blobs/uploads/{id}");
    let not_uuid = "/v2/team/api/blobs/uploads/..%2F..%2Fetc";
    for path in [unknown, other_repo.as_str(), not_uuid] {
        let checks = [
            reg.client.get(reg.url(path)).send().await.unwrap(),
            reg.client
                .patch(reg.url(path))
                .body("x")
                .send()
                .await
                .unwrap(),
            reg.client
                .put(reg.url(&format!("{path}?digest={}", sha256(b"x"))))
                .body("x")
                .send()
                .await
                .unwrap(),
            reg.client.delete(reg.url(path)).send().await.unwrap(),
        ];
        for r in checks {
            let (s, code) = error_of(r).await;
            assert_eq!(
                (s, code.as_str()),
                (StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"),
                "{path}"
            );
        }
    }
    // The real session was not touched by the attempt through another repository.
    assert_eq!(status(&reg, &loc).await.status(), StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn cancel_removes_the_session_and_its_bytes() {
    let reg = TestRegistry::start();
    let loc = start(&reg, "team/api").await;
    patch(&reg, &loc, None, b"partial").await;
    let r = reg.client.delete(reg.url(&loc)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(status(&reg, &loc).await.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        std::fs::read_dir(reg.data.join("uploads")).unwrap().count(),
        0
    );
}

#[tokio::test]
async fn cross_repository_mount() {
    let reg = TestRegistry::start();
    let d = reg.push_blob("team/base", b"base layer").await;
    let files_before = reg.blob_files().len();

    // Mounted from a repository that holds it: 201, exact Location, no bytes moved.
    let r = reg
        .client
        .post(reg.url(&format!(
            "/v2/team/app/blobs/uploads/?mount={d}&from=team/base"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        header(&r, "location"),
        Some(format!("/v2/team/app/blobs/{d}").as_str())
    );
    assert_eq!(header(&r, "docker-content-digest"), Some(d.as_str()));
    assert_eq!(
        reg.get(&format!("/v2/team/app/blobs/{d}"))
            .await
            .text()
            .await
            .unwrap(),
        "base layer"
    );
    assert_eq!(reg.blob_files().len(), files_before);

    // From a repository that does not hold it: fall back to an upload session.
    let r = reg
        .client
        .post(reg.url(&format!(
            "/v2/x/y/blobs/uploads/?mount={d}&from=nothere/repo"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(
        header(&r, "location")
            .unwrap()
            .starts_with("/v2/x/y/blobs/uploads/")
    );
    assert_eq!(
        reg.get(&format!("/v2/x/y/blobs/{d}")).await.status(),
        StatusCode::NOT_FOUND
    );

    // Without `from`: 201 only if this repository already links the blob.
    let r = reg
        .client
        .post(reg.url(&format!("/v2/x/z/blobs/uploads/?mount={d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(
        reg.get(&format!("/v2/x/z/blobs/{d}")).await.status(),
        StatusCode::NOT_FOUND
    );
    let r = reg
        .client
        .post(reg.url(&format!("/v2/team/app/blobs/uploads/?mount={d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    // Bad input.
    let r = reg
        .client
        .post(reg.url("/v2/team/app/blobs/uploads/?mount=sha256:nothex&from=team/base"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.1, "DIGEST_INVALID");
    let r = reg
        .client
        .post(reg.url(&format!(
            "/v2/team/app/blobs/uploads/?mount={d}&from=Bad/Name"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.1, "NAME_INVALID");
}

#[tokio::test]
async fn idle_uploads_expire_with_their_bytes() {
    let reg = TestRegistry::start();
    let idle = start(&reg, "team/api").await;
    patch(&reg, &idle, None, b"abandoned").await;
    // Upload data no session owns (as a crash between the deletes of a cancel leaves).
    std::fs::write(
        reg.data
            .join("uploads/3f0c8c1e-0000-4000-8000-000000000000"),
        b"orphan",
    )
    .unwrap();

    let store = wharf::store::Store::open_local(&reg.data).unwrap();
    // Not idle long enough: only the orphan goes.
    assert_eq!(
        store
            .expire_uploads(
                std::time::Duration::from_secs(3600),
                std::time::Duration::from_secs(3600)
            )
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        std::fs::read_dir(reg.data.join("uploads")).unwrap().count(),
        1
    );
    assert_eq!(status(&reg, &idle).await.status(), StatusCode::NO_CONTENT);
    // Idle past the limit: the session and its bytes go.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert_eq!(
        store
            .expire_uploads(
                std::time::Duration::from_millis(1),
                std::time::Duration::from_millis(1)
            )
            .await
            .unwrap(),
        1
    );
    let (s, code) = error_of(status(&reg, &idle).await).await;
    assert_eq!(
        (s, code.as_str()),
        (StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN")
    );
    assert_eq!(
        std::fs::read_dir(reg.data.join("uploads")).unwrap().count(),
        0
    );
}
