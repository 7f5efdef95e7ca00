//! The docker engine and compose, driven through their CLIs (compose has no API): a
//! stack is pulled and brought up with an override file that pins every followed
//! service to `repo@sha256:...`, so a stale local tag can never be what runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::config::StackConfig;

/// `docker compose` (v2) or `docker-compose` (v1), whichever the server has, with the
/// agent's own docker config (its registry login).
#[derive(Debug, Clone)]
pub struct Compose {
    program: Vec<String>,
    docker_config: PathBuf,
}

async fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// docker finds CLI plugins (compose v2 among them) in `$DOCKER_CONFIG/cli-plugins` as
/// well as the system's folders. The agent runs docker with its own config folder, so
/// it links the user's plugins there: a compose v2 installed for the user (in
/// `~/.docker/cli-plugins`) is found as the user would find it.
fn link_user_plugins(docker_config: &Path) {
    let user = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")));
    let Some(user) = user else {
        return;
    };
    let plugins = user.join("cli-plugins");
    let link = docker_config.join("cli-plugins");
    let _ = std::fs::create_dir_all(docker_config);
    if plugins.is_dir() && plugins != link && std::fs::symlink_metadata(&link).is_err() {
        if let Err(e) = std::os::unix::fs::symlink(&plugins, &link) {
            tracing::warn!(error = %e, "agent: cannot link {}", plugins.display());
        }
    }
}

impl Compose {
    pub async fn detect(docker_config: &Path) -> anyhow::Result<Compose> {
        link_user_plugins(docker_config);
        let v2 = Command::new("docker")
            .args(["compose", "version"])
            .env("DOCKER_CONFIG", docker_config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success());
        let program = if v2 {
            vec!["docker".into(), "compose".into()]
        } else if succeeds("docker-compose", &["version"]).await {
            vec!["docker-compose".into()]
        } else {
            bail!("neither `docker compose` nor `docker-compose` is installed");
        };
        Ok(Compose {
            program,
            docker_config: docker_config.to_owned(),
        })
    }

    pub fn name(&self) -> String {
        self.program.join(" ")
    }

    fn command(&self, stack: &StackConfig, override_file: &Path) -> Command {
        let mut c = Command::new(&self.program[0]);
        c.args(&self.program[1..])
            .env("DOCKER_CONFIG", &self.docker_config)
            .current_dir(&stack.workdir)
            .arg("-p")
            .arg(stack.project())
            .arg("--project-directory")
            .arg(&stack.workdir);
        if let Some(env) = &stack.env_file {
            c.arg("--env-file").arg(env);
        }
        for f in &stack.files {
            c.arg("-f").arg(f);
        }
        // Before the first deploy there is no override: the stack runs from its own files.
        if override_file.exists() {
            c.arg("-f").arg(override_file);
        }
        // A deploy that stops waiting for compose (a service failed while the others were
        // still coming up) stops compose too.
        c.stdin(Stdio::null()).kill_on_drop(true);
        c
    }

    async fn run(&self, mut c: Command, what: &str) -> anyhow::Result<String> {
        let out = c
            .output()
            .await
            .with_context(|| format!("running {}", self.name()))?;
        if !out.status.success() {
            bail!(
                "{what} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `compose <args> <services>` on the stack with its pinning override.
    async fn services_cmd(
        &self,
        stack: &StackConfig,
        override_file: &Path,
        args: &[&str],
        services: &[String],
    ) -> anyhow::Result<()> {
        let mut c = self.command(stack, override_file);
        c.args(args).args(services);
        self.run(c, &format!("compose {}", args[0]))
            .await
            .map(|_| ())
    }

    /// `up -d --no-deps` of `services`; `recreate`: their containers are replaced even
    /// where they look current (after a deploy that stopped compose half way).
    pub async fn up(
        &self,
        stack: &StackConfig,
        override_file: &Path,
        services: &[String],
        recreate: bool,
    ) -> anyhow::Result<()> {
        let args: &[&str] = if recreate {
            &["up", "-d", "--no-deps", "--force-recreate"]
        } else {
            &["up", "-d", "--no-deps"]
        };
        self.services_cmd(stack, override_file, args, services)
            .await
    }

    /// Starts `count` containers of `service` from the current files, leaving those
    /// that run: the new version beside the old.
    pub async fn scale_beside(
        &self,
        stack: &StackConfig,
        override_file: &Path,
        service: &str,
        count: usize,
    ) -> anyhow::Result<()> {
        let mut c = self.command(stack, override_file);
        c.args(["up", "-d", "--no-deps", "--no-recreate", "--scale"])
            .arg(format!("{service}={count}"))
            .arg(service);
        self.run(c, "compose up --scale").await.map(|_| ())
    }

    /// The containers of `service` in the stack's project, running or not (one-off `run`
    /// containers aside), asked of the engine by compose's labels: as `compose ps -a`
    /// would answer, without starting compose (docker-compose v1 takes most of a second
    /// to start, which a health watch cannot spend on every look).
    pub async fn containers(
        &self,
        stack: &StackConfig,
        _override_file: &Path,
        service: &str,
    ) -> anyhow::Result<Vec<String>> {
        let project = format!(
            "label=com.docker.compose.project={}",
            project_label(stack.project())
        );
        let service = format!("label=com.docker.compose.service={service}");
        let out = docker(&[
            "ps",
            "-a",
            "-q",
            "--no-trunc",
            "--filter",
            &project,
            "--filter",
            &service,
            "--filter",
            "label=com.docker.compose.oneoff=False",
        ])
        .await?;
        Ok(out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }
}

/// The project name as compose writes it in its labels: lower case, only letters,
/// digits, `-` and `_`.
fn project_label(project: &str) -> String {
    project
        .to_lowercase()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        .collect()
}

/// A fingerprint of what the stack's own files say (each compose file and the env
/// file, by name and content): a deploy records it, so an edit shows as drift.
pub fn config_hash(stack: &StackConfig) -> String {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    for f in stack.files.iter().chain(stack.env_file.iter()) {
        let path = stack.workdir.join(f);
        h.update(path.to_string_lossy().as_bytes());
        h.update([0]);
        match std::fs::read(&path) {
            Ok(bytes) => {
                h.update((bytes.len() as u64).to_le_bytes());
                h.update(&bytes);
            }
            Err(_) => h.update(b"(missing)"),
        }
        h.update([0]);
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// Writes the override pinning each service to its digest reference, atomically.
pub fn write_override(path: &Path, pins: &BTreeMap<String, String>) -> anyhow::Result<()> {
    let mut text =
        String::from("# Written by wharf agent: each service pinned to a digest.\nservices:\n");
    for (svc, image) in pins {
        text.push_str(&format!("  {svc}:\n    image: {image}\n"));
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A container's state: `running`, `exited`, ...; its health if it has a healthcheck;
/// and how often it restarted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub status: String,
    pub health: Option<String>,
    pub restarts: u64,
    /// The image reference the container was created with (the pin, once deployed).
    pub image: String,
    /// The id of the image it runs (`sha256:...` of its config).
    pub image_id: String,
}

pub async fn inspect(id: &str) -> anyhow::Result<State> {
    let text = docker(&[
        "inspect",
        "-f",
        "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}-{{end}} {{.RestartCount}} {{.Config.Image}} {{.Image}}",
        id,
    ])
    .await?;
    let mut parts = text.split_whitespace();
    let status = parts.next().unwrap_or("").to_owned();
    let health = parts.next().filter(|h| *h != "-").map(str::to_owned);
    let restarts = parts.next().and_then(|r| r.parse().ok()).unwrap_or(0);
    let image = parts.next().unwrap_or("").to_owned();
    let image_id = parts.next().unwrap_or("").to_owned();
    Ok(State {
        status,
        health,
        restarts,
        image,
        image_id,
    })
}

/// Runs `docker <args>` (no stdin; killed if dropped, or after a minute): its output, or
/// an error with what docker said.
async fn docker(args: &[&str]) -> anyhow::Result<String> {
    let name = args.first().copied().unwrap_or("");
    let subject = args.last().copied().unwrap_or("");
    let run = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(SHORT_TIMEOUT, run)
        .await
        .map_err(|_| anyhow::anyhow!("docker {name} {subject} did not answer within a minute"))?
        .with_context(|| format!("running docker {name}"))?;
    if !out.status.success() {
        bail!(
            "docker {name} {subject} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `repo@sha256:...` reference of the image container `id` runs, as the engine knows
/// it pulled from `repo` (`host/path`); None if it has none from there.
pub async fn repo_digest(id: &str, repo: &str) -> Option<String> {
    let image = docker(&["inspect", "-f", "{{.Image}}", id]).await.ok()?;
    let out = docker(&[
        "image",
        "inspect",
        "-f",
        "{{json .RepoDigests}}",
        image.trim(),
    ])
    .await
    .ok()?;
    let digests: Vec<String> = serde_json::from_str(&out).ok()?;
    let prefix = format!("{repo}@");
    digests.into_iter().find(|d| d.starts_with(&prefix))
}

/// Whether the engine holds every image (`repo@sha256:...`) already.
pub async fn present_locally(images: &[&String]) -> bool {
    for i in images {
        if image_id(i).await.is_none() {
            return false;
        }
    }
    true
}

/// The container's address on its first network.
pub async fn container_ip(id: &str) -> anyhow::Result<std::net::IpAddr> {
    docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
        id,
    ])
    .await?
    .split_whitespace()
    .find_map(|ip| ip.parse().ok())
    .with_context(|| format!("container {id} has no IP address"))
}

/// Stops and removes one container (`docker stop -t`, then `docker rm -f`).
pub async fn retire(id: &str, stop_timeout_s: u64) -> anyhow::Result<()> {
    // The stop is waited for as long as it is allowed to take, and a little more.
    let stop = Command::new("docker")
        .args(["stop", "-t", &stop_timeout_s.to_string(), id])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let _ = tokio::time::timeout(Duration::from_secs(stop_timeout_s + 30), stop).await;
    docker(&["rm", "-f", id]).await.map(|_| ())
}

/// The id of a local image (`sha256:...` of its config), if the engine has it.
pub async fn image_id(image: &str) -> Option<String> {
    docker(&["image", "inspect", "--format", "{{.Id}}", image])
        .await
        .ok()
        .map(|id| id.trim().to_owned())
}

/// Every image the engine holds by digest, as `repo@sha256:...`.
pub async fn local_digests() -> anyhow::Result<std::collections::BTreeSet<String>> {
    let out = docker(&[
        "images",
        "--digests",
        "--format",
        "{{.Repository}}@{{.Digest}}",
    ])
    .await?;
    Ok(out
        .lines()
        .filter(|l| l.contains("@sha256:"))
        .map(str::to_owned)
        .collect())
}

/// `docker image rm` of one reference: the image goes when nothing else names it; one a
/// container uses is refused by the engine and stays.
pub async fn remove_image(image: &str) -> anyhow::Result<()> {
    docker(&["image", "rm", image]).await.map(|_| ())
}

/// One label of a local image, if it has it.
pub async fn image_label(image: &str, label: &str) -> Option<String> {
    let out = docker(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config.Labels}}",
        image,
    ])
    .await
    .ok()?;
    let labels: BTreeMap<String, String> = serde_json::from_str(&out).ok()?;
    // Free text from whoever built the image: only what could be a tag is shown (and
    // posted in notifications).
    labels
        .get(label)
        .filter(|v| crate::oci::name::valid_tag(v))
        .cloned()
}

/// A pull that stalls (a registry that accepts and then sends nothing) is given up after
/// this, so it cannot hold a stack's deploys, or a stop, forever.
const PULL_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// `docker login` and `docker inspect` answer at once, or something is wrong.
const SHORT_TIMEOUT: Duration = Duration::from_secs(60);

/// `docker pull` of one image with the agent's docker config (its registry login).
pub async fn pull_image(docker_config: &Path, image: &str) -> anyhow::Result<()> {
    let out = tokio::time::timeout(
        PULL_TIMEOUT,
        Command::new("docker")
            .env("DOCKER_CONFIG", docker_config)
            .args(["pull", "--quiet", image])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| {
        anyhow::anyhow!(
            "docker pull {image} did not finish within {} minutes",
            PULL_TIMEOUT.as_secs() / 60
        )
    })?
    .context("running docker pull")?;
    if !out.status.success() {
        bail!(
            "docker pull {image} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The last lines of a container's log (both streams).
pub async fn logs_tail(id: &str, lines: usize) -> String {
    const MAX: usize = 64 * 1024;
    let run = Command::new("docker")
        .args(["logs", "--tail", &lines.to_string(), id])
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(SHORT_TIMEOUT, run).await {
        Ok(Ok(out)) => {
            let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&out.stderr));
            if s.len() > MAX {
                // The end is what matters: cut at a character boundary before it.
                let mut cut = s.len() - MAX;
                while !s.is_char_boundary(cut) {
                    cut += 1;
                }
                s = format!("(cut to the last 64 KiB)\n{}", &s[cut..]);
            }
            s
        }
        Ok(Err(e)) => format!("(no logs: {e})"),
        Err(_) => "(no logs: docker logs did not answer)".to_owned(),
    }
}

/// Logs the engine in to the registry with the token on stdin, into the agent's own
/// docker config: the token is in no command line and no compose file.
pub async fn login(
    docker_config: &Path,
    host: &str,
    user: &str,
    token: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(docker_config)?;
    let mut child = Command::new("docker")
        .env("DOCKER_CONFIG", docker_config)
        .args(["login", host, "-u", user, "--password-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("running docker login")?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(token.as_bytes()).await?;
    drop(stdin);
    let out = tokio::time::timeout(SHORT_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| anyhow::anyhow!("docker login {host} did not answer within a minute"))??;
    if !out.status.success() {
        bail!(
            "docker login {host} as {user} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
