//! Streaming with bounded memory: pushing and pulling a blob far larger than any buffer
//! leaves the server's peak resident memory far below the blob's size.

use reqwest::StatusCode;

use crate::common::{Process, header};

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_512_mib_blob_streams_through_in_bounded_memory() {
    const SIZE: usize = 512 << 20;
    const PART: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let p = Process::start(&dir.path().join("data"));
    let client = crate::common::admin_client();

    // The content is generated as it is sent, so the test holds no copy either.
    let part =
        |i: usize| -> Vec<u8> { (0..PART).map(|j| ((i * 131 + j * 7) % 251) as u8).collect() };
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    for i in 0..SIZE / PART {
        sha2::Digest::update(&mut hasher, part(i));
    }
    let digest = format!("sha256:{}", hex::encode(sha2::Digest::finalize(hasher)));

    // The baseline includes the password checks (Argon2id takes 19 MiB by design).
    assert_eq!(
        client
            .get(format!("{}/v2/", p.base))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let baseline_mib = peak_rss_kib(p.child.id()) / 1024;
    let r = client
        .post(format!("{}/v2/big/one/blobs/uploads/", p.base))
        .send()
        .await
        .unwrap();
    let loc = header(&r, "location").unwrap().to_owned();
    let body =
        futures_util::stream::iter((0..SIZE / PART).map(move |i| Ok::<_, std::io::Error>(part(i))));
    let r = client
        .patch(format!("{}{loc}", p.base))
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = client
        .put(format!("{}{loc}?digest={digest}", p.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    // Two pulls at once, read slowly enough that a buffering server would pile up data.
    let mut pulls = Vec::new();
    for _ in 0..2 {
        let url = format!("{}/v2/big/one/blobs/{digest}", p.base);
        pulls.push(tokio::spawn(async move {
            let mut r = crate::common::admin_client().get(url).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            let mut h = <sha2::Sha256 as sha2::Digest>::new();
            let mut n = 0usize;
            while let Some(chunk) = r.chunk().await.unwrap() {
                n += chunk.len();
                sha2::Digest::update(&mut h, &chunk);
            }
            (
                n,
                format!("sha256:{}", hex::encode(sha2::Digest::finalize(h))),
            )
        }));
    }
    for pull in pulls {
        let (n, d) = pull.await.unwrap();
        assert_eq!((n, d.as_str()), (SIZE, digest.as_str()));
    }
    let peak_mib = peak_rss_kib(p.child.id()) / 1024;
    eprintln!(
        "server peak RSS: {baseline_mib} MiB after login, {peak_mib} MiB after a {} MiB push and two concurrent pulls",
        SIZE >> 20
    );
    assert!(
        peak_mib - baseline_mib < 48,
        "streaming a {} MiB blob grew peak RSS from {baseline_mib} to {peak_mib} MiB",
        SIZE >> 20
    );
}
