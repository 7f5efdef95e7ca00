//! podman pushes OCI-format images (docker pushes Docker schema 2): both must work.

use std::process::Command;

use crate::common::{TestRegistry, require_tool, run};
use crate::docker_cli::busybox_context;

fn podman() -> Command {
    require_tool("podman", "apt-get install -y podman");
    Command::new("podman")
}

#[test]
fn podman_build_push_rmi_pull_oci_format() {
    let reg = TestRegistry::start();
    let ctx = tempfile::tempdir().unwrap();
    busybox_context(ctx.path(), "hello from podman");
    let image = format!("{}/wharf-test/podman:v1", reg.host());
    let digest_file = ctx.path().join("digest");

    run(podman()
        .args(["build", "-q", "--format", "oci", "-t", &image])
        .arg(ctx.path()));
    run(podman()
        .args(["push", "--tls-verify=false", "--digestfile"])
        .arg(&digest_file)
        .arg(&image));
    let pushed = std::fs::read_to_string(&digest_file).unwrap();
    assert!(pushed.starts_with("sha256:"), "{pushed}");
    run(podman().args(["rmi", "-f", &image]));
    run(podman().args(["pull", "-q", "--tls-verify=false", &image]));
    let pulled = run(podman().args(["image", "inspect", "--format", "{{.Digest}}", &image]));
    assert_eq!(pulled.trim(), pushed.trim());
    run(podman().args(["rmi", "-f", &image]));
}
