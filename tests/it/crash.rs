//! SIGKILL at awkward moments: nothing acknowledged is lost, nothing partial is served,
//! and the store works again without repair.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;

use crate::common::{
    OCI_MANIFEST, Process, header, image_manifest, pattern, sha256, stalling_body,
};

#[tokio::test]
async fn kill_during_a_large_chunked_upload_then_resume() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    const CHUNK: usize = 8 << 20;
    let data = pattern(3 * CHUNK, 7);
    let digest = sha256(&data);
    let client = crate::common::admin_client();

    let p = Process::start(&data_dir);
    let r = client
        .post(format!("{}/v2/big/blob/blobs/uploads/", p.base))
        .send()
        .await
        .unwrap();
    let loc = header(&r, "location").unwrap().to_owned();
    let r = client
        .patch(format!("{}{loc}", p.base))
        .header("content-range", format!("0-{}", CHUNK - 1))
        .body(data[..CHUNK].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);

    // Chunk 2 is half sent when the server dies.
    let url = format!("{}{loc}", p.base);
    let half = data[CHUNK..CHUNK + CHUNK / 2].to_vec();
    let in_flight = tokio::spawn(async move {
        crate::common::admin_client()
            .patch(url)
            .header("content-range", format!("{}-{}", CHUNK, 2 * CHUNK - 1))
            .header("content-length", CHUNK.to_string())
            .body(stalling_body(half))
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.kill9();
    assert!(
        in_flight.await.unwrap().is_err(),
        "the interrupted request cannot have succeeded"
    );

    let p = Process::start(&data_dir);
    let r = client.get(format!("{}{loc}", p.base)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        header(&r, "range"),
        Some(format!("0-{}", CHUNK - 1).as_str()),
        "only whole chunks count"
    );
    // Nothing is readable as a blob yet.
    assert_eq!(
        client
            .head(format!("{}/v2/big/blob/blobs/{digest}", p.base))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    for (i, chunk) in data.chunks(CHUNK).enumerate().skip(1) {
        let r = client
            .patch(format!("{}{loc}", p.base))
            .header(
                "content-range",
                format!("{}-{}", i * CHUNK, (i + 1) * CHUNK - 1),
            )
            .body(chunk.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    let r = client
        .put(format!("{}{loc}?digest={digest}", p.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let got = client
        .get(format!("{}/v2/big/blob/blobs/{digest}", p.base))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(sha256(&got), digest);
}

#[tokio::test]
async fn kill_during_a_monolithic_blob_push_serves_nothing_partial() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let data = pattern(4 << 20, 3);
    let digest = sha256(&data);
    let p = Process::start(&data_dir);
    let url = format!("{}/v2/team/api/blobs/uploads/?digest={digest}", p.base);
    let half = data[..2 << 20].to_vec();
    let len = data.len();
    let in_flight = tokio::spawn(async move {
        crate::common::admin_client()
            .post(url)
            .header("content-length", len.to_string())
            .body(stalling_body(half))
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.kill9();
    assert!(in_flight.await.unwrap().is_err());

    let p = Process::start(&data_dir);
    let client = crate::common::admin_client();
    let r = client
        .get(format!("{}/v2/team/api/blobs/{digest}", p.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // The cut-off upload can never be resumed (no client knows its id): the restart
    // removes its row and its bytes.
    let uploads = data_dir.join("uploads");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(&uploads).unwrap().next().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the cut-off monolithic upload was not removed at restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rows: i64 = rusqlite::Connection::open(data_dir.join("meta.db"))
        .unwrap()
        .query_row("SELECT count(*) FROM uploads", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 0);
    // And the same push now succeeds.
    let r = client
        .post(format!(
            "{}/v2/team/api/blobs/uploads/?digest={digest}",
            p.base
        ))
        .body(data)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn kill_during_manifest_pushes_loses_no_acknowledged_tag() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let p = Process::start(&data_dir);
    let base = p.base.clone();
    let acked: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();

    // Four pushers, each pushing images (two blobs and a tagged manifest) as fast as it can.
    let mut pushers = Vec::new();
    for w in 0..4u8 {
        let (base, acked) = (base.clone(), Arc::clone(&acked));
        pushers.push(tokio::spawn(async move {
            let client = crate::common::admin_client();
            for i in 0..10_000u32 {
                let config = format!("{{\"worker\":{w},\"i\":{i}}}").into_bytes();
                let layer = pattern(64 * 1024 + i as usize, w);
                let mut digests = Vec::new();
                for blob in [&config, &layer] {
                    let d = sha256(blob);
                    let url = format!("{base}/v2/crash/w{w}/blobs/uploads/?digest={d}");
                    match client.post(url).body(blob.clone()).send().await {
                        Ok(r) if r.status() == StatusCode::CREATED => digests.push(d),
                        _ => return,
                    }
                }
                let m = image_manifest((&digests[0], config.len()), &[(&digests[1], layer.len())]);
                let tag = format!("t{i}");
                let url = format!("{base}/v2/crash/w{w}/manifests/{tag}");
                match client
                    .put(url)
                    .header("content-type", OCI_MANIFEST)
                    .body(m.clone())
                    .send()
                    .await
                {
                    Ok(r) if r.status() == StatusCode::CREATED => {
                        acked
                            .lock()
                            .unwrap()
                            .insert(format!("crash/w{w}:{tag}"), sha256(&m));
                    }
                    _ => return,
                }
            }
        }));
    }
    // Kill once enough pushes were acknowledged, with others in flight.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 40 {
        assert!(std::time::Instant::now() < deadline, "pushes too slow");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    p.kill9();
    for t in pushers {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 40);

    let p = Process::start(&data_dir);
    let client = crate::common::admin_client();
    for (reference, digest) in &acked {
        let (repo, tag) = reference.split_once(':').unwrap();
        let r = client
            .get(format!("{}/v2/{repo}/manifests/{tag}", p.base))
            .header("accept", OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{reference} lost");
        let body = r.bytes().await.unwrap();
        assert_eq!(&sha256(&body), digest, "{reference} changed");
        let m: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let mut blobs = vec![m["config"]["digest"].as_str().unwrap().to_owned()];
        blobs.extend(
            m["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["digest"].as_str().unwrap().to_owned()),
        );
        for b in blobs {
            let bytes = client
                .get(format!("{}/v2/{repo}/blobs/{b}", p.base))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            assert_eq!(sha256(&bytes), b, "blob {b} of {reference} corrupt");
        }
    }
    // Every blob file is whole: its content hashes to its name.
    let mut stack = vec![data_dir.join("blobs")];
    let mut files = 0;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let name = path.file_name().unwrap().to_str().unwrap().to_owned();
                assert_eq!(
                    sha256(&std::fs::read(&path).unwrap()),
                    format!("sha256:{name}"),
                    "corrupt blob file"
                );
                files += 1;
            }
        }
    }
    assert!(files >= 80, "{files} blob files");
    // The store works on without repair.
    let d = sha256(b"after the crash");
    let r = client
        .post(format!("{}/v2/crash/w0/blobs/uploads/?digest={d}", p.base))
        .body("after the crash")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
}
