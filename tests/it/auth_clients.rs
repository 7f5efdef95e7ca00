//! Access control with real clients: docker login with a password and with an access
//! token, logout, anonymous pulls of public repositories; skopeo with --creds.

use std::process::Command;

use crate::common::{TestRegistry, nonce, output_with_stdin, require_tool, run, wharf_cmd};
use crate::docker_cli::{Docker, busybox_context};

#[test]
fn docker_login_push_pull_with_user_and_token_then_logout() {
    let reg = TestRegistry::start();
    let host = reg.host().to_owned();
    let ctx = tempfile::tempdir().unwrap();
    let nonce = nonce();
    busybox_context(ctx.path(), &format!("auth {nonce}"));
    let out = output_with_stdin(
        wharf_cmd(&reg.data).args(["user", "add", "ci", "--password-stdin"]),
        "ci user password",
    );
    assert!(out.status.success());
    run(wharf_cmd(&reg.data).args(["grant", "ci", "team/*", "push"]));
    let image = format!("{host}/team/app-{nonce}:v1");
    let public_image = format!("{host}/pub/app-{nonce}:v1");

    // Push as a user.
    let d = Docker::new();
    run(d.cmd().args(["build", "-q", "-t", &image]).arg(ctx.path()));
    run(d.cmd().args(["tag", &image, &public_image]));
    let err = d.fails(&["push", &image]);
    assert!(
        err.contains("unauthorized") || err.contains("denied"),
        "{err}"
    );
    d.login(&host, "ci", "ci user password");
    run(d.cmd().args(["push", &image]));
    // ci has no right on pub/*.
    let err = d.fails(&["push", &public_image]);
    assert!(err.contains("denied"), "{err}");

    // Pull on a server with a read-only access token.
    let token = run(wharf_cmd(&reg.data).args([
        "token",
        "create",
        "--user",
        "ci",
        "--scope",
        "repository:team/*:pull",
        "--name",
        "server",
    ]));
    let server = Docker::new();
    server.login(&host, "ci", token.trim());
    run(server.cmd().args(["rmi", "-f", &image]));
    run(server.cmd().args(["pull", &image]));
    assert_eq!(
        run(server.cmd().args(["run", "--rm", &image])).trim(),
        format!("auth {nonce}")
    );
    // The read-only token cannot push.
    let err = server.fails(&["push", &image]);
    assert!(err.contains("denied"), "{err}");

    // After logout, a private pull fails; a public one works anonymously.
    run(server.cmd().args(["logout", &host]));
    run(server.cmd().args(["rmi", "-f", &image]));
    let err = server.fails(&["pull", &image]);
    assert!(
        err.contains("unauthorized") || err.contains("denied"),
        "{err}"
    );
    d.login(&host, "admin", crate::common::ADMIN_PASSWORD);
    run(d.cmd().args(["push", &public_image]));
    run(wharf_cmd(&reg.data).args(["repo", "visibility", "pub/*", "public"]));
    run(server.cmd().args(["rmi", "-f", &public_image]));
    run(server.cmd().args(["pull", &public_image]));
    for i in [&image, &public_image] {
        let _ = Command::new("docker").args(["rmi", "-f", i]).output();
    }
}

#[test]
fn skopeo_with_access_token_credentials_both_ways() {
    require_tool("skopeo", "apt-get install -y skopeo");
    let reg = TestRegistry::start();
    let work = tempfile::tempdir().unwrap();
    // A one-image OCI layout to copy in and out.
    let layout = work.path().join("src");
    let (m, md) = crate::common::one_image_layout(&layout);

    let push = run(wharf_cmd(&reg.data).args([
        "token",
        "create",
        "--user",
        "admin",
        "--scope",
        "repository:team/*:pull,push",
        "--name",
        "ci",
    ]));
    let pull = run(wharf_cmd(&reg.data).args([
        "token",
        "create",
        "--user",
        "admin",
        "--scope",
        "repository:team/*:pull",
        "--name",
        "srv",
    ]));
    let dest = format!("docker://{}/team/skopeo:v1", reg.host());
    let src = format!("oci:{}:v1", layout.display());
    // The pull token cannot push; the push token can.
    let out = Command::new("skopeo")
        .args([
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            &format!("admin:{}", pull.trim()),
            &src,
            &dest,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    run(Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        &format!("admin:{}", push.trim()),
        &src,
        &dest,
    ]));
    let out_dir = work.path().join("out");
    run(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        "--src-creds",
        &format!("admin:{}", pull.trim()),
        &dest,
        &format!("oci:{}:v1", out_dir.display()),
    ]));
    assert_eq!(
        std::fs::read(out_dir.join("blobs/sha256").join(&md[7..])).unwrap(),
        m
    );
    // Without credentials the private repository is refused.
    let out = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", &dest])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
