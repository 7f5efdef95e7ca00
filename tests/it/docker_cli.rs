//! The docker CLI against the engine on this machine. No image can be pulled from the
//! internet, so the test image is built `FROM scratch` with Debian's static busybox.

use std::path::Path;
use std::process::Command;

use crate::common::{ADMIN_PASSWORD, TestRegistry, nonce, output_with_stdin, require_tool, run};

/// Puts the machine's static busybox into a build context.
pub fn copy_busybox(dir: &Path) {
    require_tool("busybox", "apt-get install -y busybox-static");
    let busybox = run(Command::new("sh").args(["-c", "command -v busybox"]));
    std::fs::copy(busybox.trim(), dir.join("busybox")).unwrap();
}

pub fn busybox_context(dir: &Path, message: &str) {
    copy_busybox(dir);
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM scratch\n\
             COPY busybox /bin/busybox\n\
             RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\
             RUN [\"/bin/sh\", \"-c\", \"echo '{message}' > /message\"]\n\
             CMD [\"/bin/cat\", \"/message\"]\n"
        ),
    )
    .unwrap();
}

/// The docker CLI with its own config directory, so logins of parallel tests never
/// share `~/.docker/config.json`.
pub struct Docker {
    config: tempfile::TempDir,
}

impl Docker {
    pub fn new() -> Docker {
        require_tool(
            "docker",
            "the docker engine and CLI (apt-get install -y docker.io)",
        );
        Docker {
            config: tempfile::tempdir().unwrap(),
        }
    }

    /// The directory holding this CLI's `config.json` (its logins).
    pub fn config_dir(&self) -> &Path {
        self.config.path()
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new("docker");
        c.env("DOCKER_CONFIG", self.config.path());
        c
    }

    pub fn login(&self, host: &str, user: &str, password: &str) {
        let out = output_with_stdin(
            self.cmd()
                .args(["login", "-u", user, "--password-stdin", host]),
            password,
        );
        assert!(
            out.status.success(),
            "docker login failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs a docker command that must fail; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().unwrap();
        assert!(!out.status.success(), "docker {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

#[test]
fn docker_build_push_rmi_pull_run() {
    let reg = TestRegistry::start();
    let ctx = tempfile::tempdir().unwrap();
    let nonce = nonce();
    busybox_context(ctx.path(), &format!("hello from wharf {nonce}"));
    let image = format!("{}/wharf-test/busybox-{nonce}:v1", reg.host());
    let d = Docker::new();
    d.login(reg.host(), "admin", ADMIN_PASSWORD);
    let docker = || d.cmd();

    run(docker().args(["build", "-q", "-t", &image]).arg(ctx.path()));
    let pushed = run(docker().args(["push", &image]));
    assert!(pushed.contains("digest: sha256:"), "{pushed}");
    run(docker().args(["rmi", "-f", &image]));
    let pulled = run(docker().args(["pull", &image]));
    assert!(pulled.contains("Downloaded newer image"), "{pulled}");
    let out = run(docker().args(["run", "--rm", &image]));
    assert_eq!(out.trim(), format!("hello from wharf {nonce}"));

    // A second push of the same image moves no layer bytes.
    let again = run(docker().args(["push", &image]));
    assert!(again.contains("Layer already exists"), "{again}");
    run(docker().args(["rmi", "-f", &image]));
}
