//! podman pushes OCI-format images (docker pushes Docker schema 2): both must work.

use std::process::Command;

use crate::common::{ADMIN_PASSWORD, TestRegistry, nonce, require_tool, run};
use crate::docker_cli::busybox_context;

fn podman() -> Command {
    require_tool("podman", "apt-get install -y podman");
    Command::new("podman")
}

#[test]
fn podman_build_push_rmi_pull_oci_format() {
    let reg = TestRegistry::start();
    let ctx = tempfile::tempdir().unwrap();
    // Unique content per run, so no cache of earlier runs can stand in for this push.
    let nonce = nonce();
    busybox_context(ctx.path(), &format!("hello from podman {nonce}"));
    let image = format!("{}/wharf-test/podman:v1", reg.host());
    let digest_file = ctx.path().join("digest");
    let creds = format!("admin:{ADMIN_PASSWORD}");

    run(podman()
        .args(["build", "-q", "--format", "oci", "-t", &image])
        .arg(ctx.path()));
    run(podman()
        .args([
            "push",
            "--tls-verify=false",
            "--creds",
            &creds,
            "--digestfile",
        ])
        .arg(&digest_file)
        .arg(&image));
    let pushed = std::fs::read_to_string(&digest_file).unwrap();
    assert!(pushed.starts_with("sha256:"), "{pushed}");
    run(podman().args(["rmi", "-f", &image]));
    run(podman().args([
        "pull",
        "-q",
        "--tls-verify=false",
        "--creds",
        &creds,
        &image,
    ]));
    run(podman().args(["image", "exists", &image]));
    // The registry serves v1 at the digest podman pushed.
    let r = reg
        .client
        .head(reg.url("/v2/wharf-test/podman/manifests/v1"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send();
    let r = tokio::runtime::Runtime::new().unwrap().block_on(r).unwrap();
    assert_eq!(
        crate::common::header(&r, "docker-content-digest"),
        Some(pushed.trim())
    );
    run(podman().args(["rmi", "-f", &image]));
}
