use std::process::Command;
use std::time::Duration;

use reqwest::StatusCode;

use crate::common::{Process, TestRegistry, free_port, header, sha256};

#[tokio::test]
async fn an_upload_resumes_after_a_restart_and_committed_data_survives() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let digest = sha256(&data);

    let reg = TestRegistry::start_in(&data_dir);
    let (manifest, manifest_d) = reg.push_image("team/api", "v1", "kept").await;
    let r = reg
        .client
        .post(reg.url("/v2/team/api/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let loc = header(&r, "location").unwrap().to_owned();
    let r = reg
        .client
        .patch(reg.url(&loc))
        .header("content-range", "0-99999")
        .body(data[..100_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    reg.stop();

    let reg = TestRegistry::start_in(&data_dir);
    let r = reg.client.get(reg.url(&loc)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&r, "range"), Some("0-99999"));
    let r = reg
        .client
        .patch(reg.url(&loc))
        .header("content-range", "100000-299999")
        .body(data[100_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "range"), Some("0-299999"));
    // The running hash was lost with the process; the digest is still verified.
    let bad = reg
        .client
        .put(reg.url(&format!("{loc}?digest={}", sha256(b"no"))))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
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
        data
    );

    let r = reg.get("/v2/team/api/manifests/v1").await;
    assert_eq!(
        header(&r, "docker-content-digest"),
        Some(manifest_d.as_str())
    );
    assert_eq!(r.bytes().await.unwrap(), manifest);
}

/// SIGTERM: the server stops accepting, lets the request in flight finish, exits 0, and
/// said where it listened and where its data is.
#[tokio::test]
async fn sigterm_finishes_requests_in_flight_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut p = Process::start(&data_dir);
    let client = crate::common::admin_client();
    let r = client
        .post(format!("{}/v2/team/api/blobs/uploads/", p.base))
        .send()
        .await
        .unwrap();
    let loc = header(&r, "location").unwrap().to_owned();

    // A slow streamed chunk: 10 parts, 100 ms apart; SIGTERM arrives in the middle.
    let body = futures_util::stream::unfold(0u32, |i| async move {
        if i == 10 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some((Ok::<_, std::io::Error>(vec![b'x'; 1000]), i + 1))
    });
    let url = format!("{}{loc}", p.base);
    let upload = tokio::spawn(async move {
        crate::common::admin_client()
            .patch(url)
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(350)).await;
    let pid = p.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );

    let r = upload
        .await
        .unwrap()
        .expect("the request in flight completes");
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&r, "range"), Some("0-9999"));
    let status = p.child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    let log = p.log();
    assert!(log.contains("listening on http://127.0.0.1:"), "{log}");
    assert!(log.contains(&data_dir.display().to_string()), "{log}");

    // The chunk is durable: a new process resumes from it.
    let p = Process::start(&data_dir);
    let r = client.get(format!("{}{loc}", p.base)).send().await.unwrap();
    assert_eq!(header(&r, "range"), Some("0-9999"));
}

#[test]
fn bad_flags_and_config_exit_non_zero_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "listen = 5\n").unwrap();
    for args in [
        vec!["serve", "--listen", "nowhere"],
        vec!["serve", "--config", bad.to_str().unwrap()],
        vec!["serve", "--config", "/nonexistent/wharf.toml"],
        vec!["no-such-command"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_wharf"))
            .args(&args)
            .env("WHARF_DATA", dir.path().join("d"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.trim().is_empty(), "{args:?}: no message");
    }
}

#[test]
fn env_vars_configure_serve_and_flags_win() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("wharf.toml");
    std::fs::write(&cfg, "listen = \"127.0.0.1:1\"\n").unwrap();
    // The file says port 1 (unusable), WHARF_LISTEN overrides it with an invalid value
    // that the --listen flag overrides in turn: only flag > env > file starts.
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("WHARF_CONFIG", &cfg)
        .env("WHARF_LISTEN", "invalid")
        .env("WHARF_DATA", dir.path().join("envdata"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The port accepts connections as soon as it is bound, a moment before the database
    // is opened: wait for both.
    let db = dir.path().join("envdata").join("meta.db");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() || !db.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "did not start on the --listen port with WHARF_DATA (database there: {})",
            db.exists()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn sigint_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Process::start(&dir.path().join("data"));
    let pid = p.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = p.child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
}
