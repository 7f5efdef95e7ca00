use reqwest::StatusCode;

use crate::common::{TestRegistry, error_of, header, sha256};

#[tokio::test]
async fn monolithic_push_then_get_and_head_carry_length_and_digest() {
    let reg = TestRegistry::start();
    let data = b"some layer bytes".repeat(1000);
    let digest = sha256(&data);
    let r = reg
        .client
        .post(reg.url(&format!("/v2/team/api/blobs/uploads/?digest={digest}")))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        header(&r, "location"),
        Some(format!("/v2/team/api/blobs/{digest}").as_str())
    );
    assert_eq!(header(&r, "docker-content-digest"), Some(digest.as_str()));

    let r = reg.get(&format!("/v2/team/api/blobs/{digest}")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        header(&r, "content-length"),
        Some(data.len().to_string().as_str())
    );
    assert_eq!(header(&r, "docker-content-digest"), Some(digest.as_str()));
    assert_eq!(r.bytes().await.unwrap(), data);

    let r = reg.head(&format!("/v2/team/api/blobs/{digest}")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        header(&r, "content-length"),
        Some(data.len().to_string().as_str())
    );
    assert_eq!(header(&r, "docker-content-digest"), Some(digest.as_str()));
    assert!(r.bytes().await.unwrap().is_empty());
}

#[tokio::test]
async fn wrong_digest_is_rejected_and_nothing_is_stored() {
    let reg = TestRegistry::start();
    let wrong = sha256(b"other content");
    let r = reg
        .client
        .post(reg.url(&format!("/v2/team/api/blobs/uploads/?digest={wrong}")))
        .body(b"actual content".to_vec())
        .send()
        .await
        .unwrap();
    let (s, code) = error_of(r).await;
    assert_eq!(
        (s, code.as_str()),
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID")
    );
    for d in [wrong, sha256(b"actual content")] {
        let (s, code) = error_of(reg.get(&format!("/v2/team/api/blobs/{d}")).await).await;
        assert_eq!((s, code.as_str()), (StatusCode::NOT_FOUND, "BLOB_UNKNOWN"));
    }
    assert!(reg.blob_files().is_empty());
    assert_eq!(
        reg.get("/v2/_catalog").await.text().await.unwrap(),
        r#"{"repositories":[]}"#
    );
    assert_eq!(
        std::fs::read_dir(reg.data.join("uploads")).unwrap().count(),
        0
    );
}

#[tokio::test]
async fn malformed_and_unsupported_digests_are_400() {
    let reg = TestRegistry::start();
    for d in [
        "sha256:nothex",
        "sha256:",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
        "nocolon",
        "sha256:ABC",
    ] {
        let (s, code) = error_of(reg.get(&format!("/v2/team/api/blobs/{d}")).await).await;
        assert_eq!(
            (s, code.as_str()),
            (StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
            "{d}"
        );
        let r = reg
            .client
            .post(reg.url(&format!("/v2/team/api/blobs/uploads/?digest={d}")))
            .body("x")
            .send()
            .await
            .unwrap();
        let (s, code) = error_of(r).await;
        assert_eq!(
            (s, code.as_str()),
            (StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
            "{d}"
        );
    }
}

#[tokio::test]
async fn sha512_blobs_and_the_empty_blob() {
    let reg = TestRegistry::start();
    let data = b"sha512 content";
    let d512 = format!(
        "sha512:{}",
        hex::encode(<sha2::Sha512 as sha2::Digest>::digest(data))
    );
    let r = reg
        .client
        .post(reg.url(&format!("/v2/team/api/blobs/uploads/?digest={d512}")))
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = reg.get(&format!("/v2/team/api/blobs/{d512}")).await;
    assert_eq!(header(&r, "docker-content-digest"), Some(d512.as_str()));
    assert_eq!(r.bytes().await.unwrap(), &data[..]);

    let empty = reg.push_blob("team/api", b"").await;
    let r = reg.get(&format!("/v2/team/api/blobs/{empty}")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-length"), Some("0"));
}

#[tokio::test]
async fn range_reads() {
    let reg = TestRegistry::start();
    let data: Vec<u8> = (0..2048u32).map(|i| (i % 251) as u8).collect();
    let digest = reg.push_blob("team/api", &data).await;
    let path = format!("/v2/team/api/blobs/{digest}");
    for (range, start, end) in [
        ("bytes=500-1499", 500, 1499),
        ("bytes=500-", 500, 2047),
        ("bytes=-500", 1548, 2047),
        ("bytes=2000-5000", 2000, 2047),
    ] {
        let r = reg
            .client
            .get(reg.url(&path))
            .header("range", range)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            header(&r, "content-range"),
            Some(format!("bytes {start}-{end}/2048").as_str())
        );
        assert_eq!(
            header(&r, "content-length"),
            Some((end - start + 1).to_string().as_str())
        );
        assert_eq!(r.bytes().await.unwrap(), &data[start..=end], "{range}");
    }
    for range in ["bytes=5000-10000", "bytes=500-0"] {
        let r = reg
            .client
            .get(reg.url(&path))
            .header("range", range)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(header(&r, "content-range"), Some("bytes */2048"));
        assert_eq!(
            error_of(r).await.1,
            "RANGE_INVALID",
            "the code names the range"
        );
    }
}

/// `wharf_blob_sendfile_bytes_total` from `/metrics`.
async fn sendfile_bytes(reg: &TestRegistry) -> u64 {
    let text = reg.get("/metrics").await.text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("wharf_blob_sendfile_bytes_total "))
        .expect("the sendfile counter in /metrics")
        .parse()
        .unwrap()
}

/// On plain HTTP the kernel sends blob bodies from the file (sendfile): every byte
/// arrives, whole and in ranges across the body's 1 MiB chunks, with other responses
/// between them on the same kept-alive connection, and `/metrics` counts exactly the
/// bytes sent that way.
#[tokio::test]
async fn blob_bodies_are_sent_from_the_file_and_arrive_whole() {
    let reg = TestRegistry::start();
    let data: Vec<u8> = (0..3 * 1024 * 1024 + 123_457u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let digest = reg.push_blob("team/api", &data).await;
    let small = reg.push_blob("team/api", b"a small blob").await;
    let path = format!("/v2/team/api/blobs/{digest}");
    let before = sendfile_bytes(&reg).await;
    let mut expected = 0;
    for _ in 0..2 {
        let r = reg.get(&path).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.bytes().await.unwrap() == data, "the whole blob differs");
        expected += data.len();

        let (start, end) = (1024 * 1024 - 7, 2 * 1024 * 1024 + 5);
        let r = reg
            .client
            .get(reg.url(&path))
            .header("range", format!("bytes={start}-{end}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
        assert!(
            r.bytes().await.unwrap() == data[start..=end],
            "the range differs"
        );
        expected += end - start + 1;

        let r = reg.head(&path).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.bytes().await.unwrap().is_empty());
        let r = reg.get("/v2/").await;
        assert_eq!(r.status(), StatusCode::OK);
        let r = reg.get(&format!("/v2/team/api/blobs/{small}")).await;
        assert_eq!(r.bytes().await.unwrap(), &b"a small blob"[..]);
        expected += 12;
    }
    assert_eq!(sendfile_bytes(&reg).await - before, expected as u64);
}

#[tokio::test]
async fn a_blob_is_readable_only_through_repositories_that_link_it() {
    let reg = TestRegistry::start();
    let digest = reg.push_blob("team/api", b"private bytes").await;
    let (s, code) = error_of(reg.get(&format!("/v2/other/app/blobs/{digest}")).await).await;
    assert_eq!((s, code.as_str()), (StatusCode::NOT_FOUND, "BLOB_UNKNOWN"));
    let r = reg.head(&format!("/v2/other/app/blobs/{digest}")).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_blob_is_stored_once_however_many_repositories_hold_it() {
    let reg = TestRegistry::start();
    for repo in ["a/one", "b/two", "c/three"] {
        reg.push_blob(repo, b"shared layer").await;
    }
    assert_eq!(reg.blob_files().len(), 1);
}

#[tokio::test]
async fn delete_unlinks_from_one_repository_only() {
    let reg = TestRegistry::start();
    let d = reg.push_blob("a/one", b"to delete").await;
    reg.push_blob("b/two", b"to delete").await;
    let r = reg
        .client
        .delete(reg.url(&format!("/v2/a/one/blobs/{d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(
        reg.get(&format!("/v2/a/one/blobs/{d}")).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        reg.get(&format!("/v2/b/two/blobs/{d}")).await.status(),
        StatusCode::OK
    );
    let r = reg
        .client
        .delete(reg.url(&format!("/v2/a/one/blobs/{d}")))
        .send()
        .await
        .unwrap();
    let (s, code) = error_of(r).await;
    assert_eq!((s, code.as_str()), (StatusCode::NOT_FOUND, "BLOB_UNKNOWN"));
}
