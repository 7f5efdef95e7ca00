//! HTTPS on the listener with rustls, checked with curl and skopeo verifying the
//! certificate (no --insecure anywhere).

use std::process::Command;

use crate::common::{ADMIN_PASSWORD, Process, require_tool, run};

#[test]
fn serves_https_with_the_given_certificate() {
    require_tool("openssl", "apt-get install -y openssl");
    require_tool("curl", "apt-get install -y curl");
    require_tool("skopeo", "apt-get install -y skopeo");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert));

    let data = dir.path().join("data");
    let p = Process::start_with(
        &data,
        &[
            ("WHARF_TLS_CERT", cert.to_str().unwrap()),
            ("WHARF_TLS_KEY", key.to_str().unwrap()),
        ],
        &[],
    );
    let host = p.base.trim_start_matches("http://").to_owned();
    let url = format!("https://{host}/v2/");
    let creds = format!("admin:{ADMIN_PASSWORD}");
    let out = run(Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{scheme}",
            "--cacert",
        ])
        .arg(&cert)
        .args(["-u", &creds, &url]));
    assert_eq!(out, "200 HTTPS");
    // HTTP/2 when the client offers it, as the CNCF registry serves it; and a client
    // that offers only h2 gets it (ALPN).
    let out = run(Command::new("curl")
        .args([
            "-sS",
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
            "--cacert",
        ])
        .arg(&cert)
        .args(["-u", &creds, &url]));
    assert_eq!(out, "200 2");
    let alpn = Command::new("openssl")
        .args(["s_client", "-alpn", "h2", "-connect", &host])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&alpn.stdout);
    assert!(text.contains("ALPN protocol: h2"), "{text}");
    // Anonymous: the challenge names the https realm.
    let out = run(Command::new("curl")
        .args(["-sS", "-D", "-", "-o", "/dev/null", "--cacert"])
        .arg(&cert)
        .arg(&url));
    assert!(
        out.contains(&format!("realm=\"https://{host}/token\"")),
        "{out}"
    );
    // Plain HTTP to the TLS port fails.
    let plain = Command::new("curl")
        .args(["-sS", "--max-time", "5", &format!("http://{host}/v2/")])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&plain.stdout).contains("registry/2.0"));

    // skopeo through the token flow over TLS, trusting the certificate via a cert dir.
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(&cert, certs.join("ca.crt")).unwrap();
    let layout = dir.path().join("layout");
    let (m, _) = crate::common::one_image_layout(&layout);
    let dest = format!("docker://{host}/team/tls:v1");
    run(Command::new("skopeo")
        .args(["copy", "--dest-cert-dir"])
        .arg(&certs)
        .args(["--dest-creds", &creds])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(&dest));
    let raw = run(Command::new("skopeo")
        .args(["inspect", "--raw", "--cert-dir"])
        .arg(&certs)
        .args(["--creds", &creds, &dest]));
    assert_eq!(raw.as_bytes(), &m[..]);
    // A blob body over TLS passes through rustls: right bytes, none sent by sendfile.
    let manifest: serde_json::Value = serde_json::from_slice(&m).unwrap();
    let config = manifest["config"]["digest"].as_str().unwrap();
    let blob = std::fs::read(layout.join("blobs/sha256").join(&config[7..])).unwrap();
    let get = |path: &str| {
        run(Command::new("curl")
            .args(["-sS", "--fail", "--cacert"])
            .arg(&cert)
            .args(["-u", &creds, &format!("https://{host}{path}")]))
    };
    assert_eq!(
        get(&format!("/v2/team/tls/blobs/{config}")).as_bytes(),
        &blob[..]
    );
    let metrics = get("/metrics");
    assert!(
        metrics.contains("\nwharf_blob_sendfile_bytes_total 0\n"),
        "{metrics}"
    );
    p.kill9();

    // A key others can read is named at start (openssl wrote this one 0600).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut p = Process::start_with(
        &data,
        &[
            ("WHARF_TLS_CERT", cert.to_str().unwrap()),
            ("WHARF_TLS_KEY", key.to_str().unwrap()),
        ],
        &[],
    );
    let _ = p.child.kill();
    let _ = p.child.wait();
    let err = p.log();
    assert!(err.contains("is readable by other users"), "{err}");
}

#[test]
fn a_missing_or_bad_certificate_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.pem");
    std::fs::write(&bad, "not a certificate").unwrap();
    for (cert, key) in [
        (bad.to_str().unwrap(), bad.to_str().unwrap()),
        ("/nonexistent/cert.pem", "/nonexistent/key.pem"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_wharf"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--tls-cert",
                cert,
                "--tls-key",
                key,
                "--data",
            ])
            .arg(dir.path().join("d"))
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("TLS"), "{err}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            "x.pem",
            "--data",
        ])
        .arg(dir.path().join("d"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-key"));
}
