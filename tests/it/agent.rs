//! The deploy agent with the real docker engine and compose: three versions of a tiny
//! HTTP service, promoted in turn; the agent follows `:prod`, checks health and rolls
//! back by itself.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;
use crate::docker_cli::{Docker, copy_busybox};
use crate::webhooks::Receiver;

/// How a test image behaves.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// Healthy, and serves `/ready`.
    Healthy,
    /// Its healthcheck fails.
    Failing,
    /// Healthy by its healthcheck, but has no `/ready`.
    NotReady,
    /// Its healthcheck stays `starting` for minutes: a deploy of it waits.
    Starting,
    /// No healthcheck; exits a second after it starts (and is restarted).
    Crashing,
}

/// A busybox httpd image answering `version` on 8080.
fn build_version(d: &Docker, dir: &Path, image: &str, version: &str, kind: Kind) {
    let ctx = dir.join(version);
    std::fs::create_dir_all(&ctx).unwrap();
    copy_busybox(&ctx);
    let check = match kind {
        Kind::Healthy | Kind::NotReady => {
            r#"--interval=1s --timeout=1s --retries=2 CMD ["/bin/wget", "-q", "-O-", "http://127.0.0.1:8080/"]"#
        }
        Kind::Failing => r#"--interval=1s --timeout=1s --retries=2 CMD ["/bin/false"]"#,
        Kind::Starting => r#"--interval=1s --start-period=600s CMD ["/bin/false"]"#,
        Kind::Crashing => "NONE",
    };
    let cmd = if kind == Kind::Crashing {
        r#"["/bin/sh", "-c", "sleep 1; exit 1"]"#
    } else {
        r#"["/bin/httpd", "-f", "-p", "8080", "-h", "/www"]"#
    };
    let ready = if kind == Kind::Healthy {
        " && echo ready > /www/ready"
    } else {
        ""
    };
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM scratch\n\
             COPY busybox /bin/busybox\n\
             RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\
             RUN [\"/bin/sh\", \"-c\", \"mkdir /www && echo {version} > /www/index.html{ready}\"]\n\
             HEALTHCHECK {check}\n\
             LABEL org.opencontainers.image.version={version}\n\
             CMD {cmd}\n"
        ),
    )
    .unwrap();
    run(d.cmd().args(["build", "-q", "-t", image]).arg(&ctx));
    run(d.cmd().args(["push", image]));
}

/// What the stack answers over HTTP, or None.
fn serves(port: u16) -> Option<String> {
    let out = Command::new("curl")
        .args([
            "-fsS",
            "--max-time",
            "2",
            &format!("http://127.0.0.1:{port}/"),
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn wait_serving(port: u16, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if serves(port).as_deref() == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the stack never served {want} (serves {:?})",
            serves(port)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

struct Stack {
    agent: Child,
    dir: std::path::PathBuf,
    project: String,
}

/// Runs `wharf agent --config cfg`, its output appended to `agent.log` beside `cfg`,
/// and waits until it listens on `port`.
fn spawn_agent(cfg: &Path, port: u16) -> Child {
    spawn_agent_with(cfg, port, &[])
}

fn spawn_agent_with(cfg: &Path, port: u16, env: &[(&str, &Path)]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(cfg.with_file_name("agent.log"))
        .unwrap();
    let agent = wharf(&["agent", "--config"])
        .arg(cfg)
        .env_remove("DOCKER_CONFIG")
        .envs(env.iter().copied())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the agent did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    agent
}

impl Stack {
    fn start(cfg: &Path, port: u16, dir: &Path, project: &str) -> Stack {
        Stack {
            agent: spawn_agent(cfg, port),
            dir: dir.to_owned(),
            project: project.to_owned(),
        }
    }

    /// SIGKILLs the agent wherever it is, then starts it again.
    fn kill_and_restart(&mut self, cfg: &Path, port: u16) {
        self.agent.kill().unwrap();
        self.agent.wait().unwrap();
        self.agent = spawn_agent(cfg, port);
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.agent.kill();
        let _ = self.agent.wait();
        let _ = Command::new("docker-compose")
            .current_dir(&self.dir)
            .args([
                "-p",
                &self.project,
                "-f",
                "compose.yml",
                "down",
                "--remove-orphans",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn wharf(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wharf"));
    c.env_remove("WHARF_CONFIG").args(args);
    c
}

fn history(cfg: &Path) -> Vec<Value> {
    let out = run(wharf(&["deploy", "history", "web", "--json", "--agent-config"]).arg(cfg));
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The history once no deploy is running.
fn settled(cfg: &Path) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let h = history(cfg);
        if h.first().is_none_or(|d| d["state"] != "running") {
            return h;
        }
        assert!(Instant::now() < deadline, "a deploy never finished: {h:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `wharf promote <registry>/<repo>:<from> prod`, as CI would.
fn promote(reg: &TestRegistry, repo: &str, from: &str) {
    run(
        wharf(&["promote", &format!("{}/{repo}:{from}", reg.host()), "prod"])
            .env("WHARF_USERNAME", "admin")
            .env("WHARF_PASSWORD", ADMIN_PASSWORD)
            .env("DOCKER_CONFIG", "/nonexistent"),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_deploys_promotions_rolls_back_unhealthy_releases_and_on_request() {
    require_tool("docker-compose", "apt-get install -y docker-compose");
    require_tool("curl", "apt-get install -y curl");
    let reg = TestRegistry::start();
    let d = Docker::new();
    d.login(reg.host(), "admin", ADMIN_PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let nonce = nonce();
    let image = |v: &str| format!("{}/team/web:{v}", reg.host());
    build_version(&d, dir.path(), &image("v1"), "v1", Kind::Healthy);
    build_version(&d, dir.path(), &image("v2"), "v2", Kind::Healthy);
    build_version(&d, dir.path(), &image("v3"), "v3", Kind::Failing);

    // The stack, as a team writes it: the image by registry, repository and tag.
    let app_port = free_port();
    let agent_port = free_port();
    let stack_dir = dir.path().join("stack");
    std::fs::create_dir_all(&stack_dir).unwrap();
    std::fs::write(
        stack_dir.join("compose.yml"),
        "services:\n  web:\n    image: ${REGISTRY}/team/web:prod\n    ports: [\"127.0.0.1:${APP_PORT}:8080\"]\n",
    )
    .unwrap();
    std::fs::write(
        stack_dir.join(".env.prod"),
        format!("REGISTRY={}\nAPP_PORT={app_port}\n", reg.host()),
    )
    .unwrap();
    std::fs::write(dir.path().join("token"), ADMIN_PASSWORD).unwrap();
    let notify = Receiver::start();
    let project = format!("wharf-agent-{nonce}");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{agent_port}\"\ndata = \"agent-data\"\nregistry = \"{}\"\nusername = \"admin\"\n\
             token_file = \"token\"\nwebhook_secret = \"webhook-secret-0123\"\ndeploy_token = \"deploy-token-0123\"\n\
             poll_interval_s = 0\nnotify_url = \"{}/notify\"\n\n\
             [[stacks]]\nname = \"web\"\nproject = \"{project}\"\nworkdir = \"stack\"\nfiles = [\"compose.yml\"]\n\
             env_file = \".env.prod\"\nhealth_timeout_s = 40\n[stacks.services]\nweb = \"team/web:prod\"\n",
            reg.host(),
            notify.url
        ),
    )
    .unwrap();
    let stack = Stack::start(&cfg, agent_port, &stack_dir, &project);
    // The registry tells the agent about :prod.
    run(wharf_cmd(&reg.data).args([
        "webhook",
        "add",
        &format!("http://127.0.0.1:{agent_port}/hooks/registry"),
        "--secret",
        "webhook-secret-0123",
        "--repositories",
        "team/*",
        "--tags",
        "prod",
    ]));

    // 1. v1 to prod: the stack serves v1; one successful deploy.
    promote(&reg, "team/web", "v1");
    wait_serving(app_port, "v1");
    let h = settled(&cfg);
    assert_eq!(h.len(), 1, "{h:?}");
    assert_eq!(
        (
            h[0]["kind"].as_str(),
            h[0]["state"].as_str(),
            h[0]["trigger"].as_str()
        ),
        (Some("deploy"), Some("success"), Some("webhook"))
    );
    let v1_deploy = h[0]["id"].as_i64().unwrap();
    assert!(
        h[0]["after"]["web"].as_str().unwrap().contains("@sha256:"),
        "pinned by digest"
    );
    // The running container uses the digest, never a local tag.
    let pinned =
        std::fs::read_to_string(dir.path().join("agent-data/stacks/web/pinned.override.yml"))
            .unwrap();
    assert!(pinned.contains("@sha256:"), "{pinned}");

    // 2. v2: the webhook redeploys.
    promote(&reg, "team/web", "v2");
    wait_serving(app_port, "v2");
    assert_eq!(settled(&cfg)[0]["state"], "success");

    // 3. v3 fails its healthcheck: the agent goes back to v2 by itself, and says so.
    promote(&reg, "team/web", "v3");
    let deadline = Instant::now() + Duration::from_secs(90);
    let h = loop {
        let h = history(&cfg);
        if h.len() >= 4 && h[0]["state"] != "running" {
            break h;
        }
        assert!(Instant::now() < deadline, "no rollback: {h:?}");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(serves(app_port).as_deref(), Some("v2"));
    assert_eq!(
        (h[1]["kind"].as_str(), h[1]["state"].as_str()),
        (Some("deploy"), Some("failed"))
    );
    assert!(
        h[1]["error"].as_str().unwrap().contains("unhealthy"),
        "{:?}",
        h[1]
    );
    assert!(h[1]["logs"].is_string());
    assert_eq!(
        (h[0]["kind"].as_str(), h[0]["state"].as_str()),
        (Some("rollback"), Some("success"))
    );
    assert_eq!(h[0]["rollback_of"], h[1]["id"]);
    assert_eq!(h[0]["after"], h[2]["after"], "back on v2's digest");
    let notes = notify.wait_for("/notify", 3);
    assert!(
        notes
            .iter()
            .any(|n| n.json()["text"].as_str().unwrap().contains("rolled back")),
        "{notes:?}"
    );
    // A notification names the release by its version, next to its digest.
    let text = notes.last().unwrap().json()["text"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        text.contains("web=v3 (sha256:") && text.contains("rolled back to web=v2 (sha256:"),
        "{text}"
    );

    // 4. Roll back to the v1 deploy by its id.
    let out = deploy_ok(&cfg, &["rollback", "web", "--to", &v1_deploy.to_string()]);
    assert!(out.contains("deployed"), "{out}");
    assert_eq!(serves(app_port).as_deref(), Some("v1"));

    // Webhooks with a bad signature, an old timestamp or a replayed id deploy nothing.
    let before = history(&cfg).len();
    let hook = format!("http://127.0.0.1:{agent_port}/hooks/registry");
    let body = serde_json::json!({"id": "evt-1", "action": "tag", "repository": "team/web", "tag": "prod", "digest": "sha256:00"}).to_string();
    let now = wharf::auth::now_secs();
    // Posts the event signed with `secret` at time `t`; returns the status.
    let post = |secret: &str, t: i64| {
        let sig = wharf::events::signature(secret, t, body.as_bytes());
        let (hook, body) = (hook.clone(), body.clone());
        async move {
            reqwest::Client::new()
                .post(hook)
                .header("wharf-signature", sig)
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(post("wrong-secret-0123", now).await, 401);
    assert_eq!(post("webhook-secret-0123", now - 3600).await, 401);
    assert_eq!(post("webhook-secret-0123", now).await, 202);
    // The same event again (a retry, a second webhook): done already, 200.
    assert_eq!(post("webhook-secret-0123", now).await, 200);
    std::thread::sleep(Duration::from_secs(2));
    // The one accepted event found prod where it is (v3, unhealthy): it was tried and
    // rolled back to v1; the refused ones did nothing.
    let h = settled(&cfg);
    assert!(h.len() <= before + 2, "{h:?}");
    assert_eq!(serves(app_port).as_deref(), Some("v1"));

    // The deploy hook (CI's manual path): a tag for the stack, with the deploy token.
    let deploy = |token: &str, body: &str| {
        let (token, body) = (token.to_owned(), body.to_owned());
        async move {
            let r = reqwest::Client::new()
                .post(format!("http://127.0.0.1:{agent_port}/hooks/deploy/web"))
                .bearer_auth(token)
                .body(body)
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    assert_eq!(deploy("wrong", "").await.0, 401);
    assert_eq!(deploy("deploy-token-0123", "{not json").await.0, 400);
    let (code, v) = deploy("deploy-token-0123", r#"{"tag": "v2"}"#).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["result"], "deployed");
    assert_eq!(serves(app_port).as_deref(), Some("v2"));
    let status: Value = serde_json::from_str(&deploy_ok(&cfg, &["status", "--json"])).unwrap();
    assert_eq!(status["stacks"][0]["stack"], "web");

    // With the registry gone, a rollback still works: the images stayed on the server.
    let images = [image("v1"), image("v2"), image("v3")];
    reg.stop();
    let out = deploy_ok(&cfg, &["rollback", "web", "--to", &v1_deploy.to_string()]);
    assert!(out.contains("deployed"), "{out}");
    assert_eq!(serves(app_port).as_deref(), Some("v1"));
    drop(stack);
    let _ = Command::new("docker")
        .arg("rmi")
        .arg("-f")
        .args(&images)
        .output();
}

#[tokio::test(flavor = "multi_thread")]
async fn polling_deploys_when_the_webhook_receiver_is_down() {
    require_tool("docker-compose", "apt-get install -y docker-compose");
    require_tool("curl", "apt-get install -y curl");
    let reg = TestRegistry::start();
    let d = Docker::new();
    d.login(reg.host(), "admin", ADMIN_PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let nonce = nonce();
    let image = format!("{}/team/poll:v1", reg.host());
    build_version(&d, dir.path(), &image, "v1", Kind::Healthy);
    // The registry's webhook points where nothing listens: every delivery fails.
    let dead = free_port();
    let out = run(wharf_cmd(&reg.data).args([
        "webhook",
        "add",
        &format!("http://127.0.0.1:{dead}/hooks/registry"),
        "--secret",
        "webhook-secret-0123",
        "--tags",
        "prod",
    ]));
    let hook = out.lines().next().unwrap().to_owned();

    let (app_port, agent_port) = (free_port(), free_port());
    let stack_dir = dir.path().join("stack");
    std::fs::create_dir_all(&stack_dir).unwrap();
    std::fs::write(
        stack_dir.join("compose.yml"),
        format!("services:\n  web:\n    image: {}/team/poll:prod\n    ports: [\"127.0.0.1:{app_port}:8080\"]\n", reg.host()),
    )
    .unwrap();
    std::fs::write(dir.path().join("token"), ADMIN_PASSWORD).unwrap();
    let project = format!("wharf-poll-{nonce}");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{agent_port}\"\nregistry = \"{}\"\nusername = \"admin\"\ntoken_file = \"token\"\n\
             poll_interval_s = 1\n\n[[stacks]]\nname = \"web\"\nproject = \"{project}\"\nworkdir = \"stack\"\n\
             files = [\"compose.yml\"]\n[stacks.services]\nweb = \"team/poll:prod\"\n",
            reg.host()
        ),
    )
    .unwrap();
    // The server has compose as the docker CLI plugin (`docker compose`), installed for
    // the user in ~/.docker/cli-plugins, where the agent must find it although it runs
    // docker with its own config folder. Debian has no compose v2, so the plugin here
    // is a shim that forwards to docker-compose v1: it tests the plugin path and the
    // `docker compose ...` command lines, not compose v2 itself.
    let home = dir.path().join("home");
    let plugins = home.join(".docker/cli-plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::write(
        plugins.join("docker-compose"),
        "#!/bin/sh\nif [ \"$1\" = docker-cli-plugin-metadata ]; then\n\
         echo '{\"SchemaVersion\":\"0.1.0\",\"Vendor\":\"wharf tests\",\"Version\":\"v2-shim\"}'\n\
         exit 0\nfi\nshift\nexec docker-compose \"$@\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        plugins.join("docker-compose"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let _stack = Stack {
        agent: spawn_agent_with(&cfg, agent_port, &[("HOME", &home)]),
        dir: stack_dir.clone(),
        project: project.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
        if log.contains("compose is `docker compose`") {
            break;
        }
        assert!(Instant::now() < deadline, "compose v2 not found: {log}");
        std::thread::sleep(Duration::from_millis(100));
    }
    promote(&reg, "team/poll", "v1");
    wait_serving(app_port, "v1");
    let h = settled(&cfg);
    assert_eq!(h[0]["trigger"], "poll");
    assert_eq!(h[0]["state"], "success");
    // The registry kept trying its webhook meanwhile, and its log says so.
    let log: Value = serde_json::from_str(&run(wharf_cmd(&reg.data).args([
        "webhook",
        "deliveries",
        &hook,
        "--json",
    ])))
    .unwrap();
    assert_eq!(log[0]["status"], "pending");
    assert!(log[0]["attempts"].as_i64().unwrap() >= 1, "{log}");
    assert!(log[0]["last_error"].is_string());
    let _ = Command::new("docker").args(["rmi", "-f", &image]).output();
}

/// Every file under `dir`, read as text where it can be.
fn files_under(dir: &Path) -> Vec<(std::path::PathBuf, String)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else if let Ok(bytes) = std::fs::read(&p) {
            out.push((p, String::from_utf8_lossy(&bytes).into_owned()));
        }
    }
    out
}

/// The command lines of every process on the machine.
fn process_list() -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .collect()
}

/// A manifest as docker pushed it: digest, media type, bytes.
async fn manifest_of(reg: &TestRegistry, tag: &str) -> (String, String, Vec<u8>) {
    manifest_of_repo(reg, "team/svc", tag).await
}

async fn manifest_of_repo(reg: &TestRegistry, repo: &str, tag: &str) -> (String, String, Vec<u8>) {
    let r = reg
        .client
        .get(reg.url(&format!("/v2/{repo}/manifests/{tag}")))
        .header(
            "accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let media_type = header(&r, "content-type").unwrap().to_owned();
    let manifest = r.bytes().await.unwrap().to_vec();
    (sha256(&manifest), media_type, manifest)
}

/// Waits until the registry has delivered `n` events to webhook `hook`.
fn wait_delivered(reg: &TestRegistry, hook: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log: Value = serde_json::from_str(&run(wharf_cmd(&reg.data).args([
            "webhook",
            "deliveries",
            hook,
            "--json",
        ])))
        .unwrap();
        let delivered = log
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["status"] == "delivered")
            .count();
        if delivered >= n {
            return;
        }
        assert!(Instant::now() < deadline, "not delivered: {log}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The id of the container running `service` in compose project `project`.
fn container(project: &str, service: &str) -> String {
    let out = run(Command::new("docker").args([
        "ps",
        "-q",
        "--filter",
        &format!("label=com.docker.compose.project={project}"),
        "--filter",
        &format!("label=com.docker.compose.service={service}"),
    ]));
    let id = out.trim().to_owned();
    assert!(
        !id.is_empty() && !id.contains('\n'),
        "{project}/{service}: {out:?}"
    );
    id
}

/// A `wharf deploy ...` that must succeed; returns its stdout.
fn deploy_ok(cfg: &Path, args: &[&str]) -> String {
    run(wharf(&["deploy"]).args(args).arg("--agent-config").arg(cfg))
}

/// A `wharf deploy ...` that must fail; returns its stderr.
fn deploy_fails(cfg: &Path, args: &[&str]) -> String {
    let out = wharf(&["deploy"])
        .args(args)
        .arg("--agent-config")
        .arg(cfg)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn bursts_deploy_once_probes_gate_one_deploy_runs_at_a_time_and_a_restart_finishes_it() {
    require_tool("docker-compose", "apt-get install -y docker-compose");
    require_tool("curl", "apt-get install -y curl");
    let reg = TestRegistry::start();
    let d = Docker::new();
    d.login(reg.host(), "admin", ADMIN_PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let nonce = nonce();
    let image = |v: &str| format!("{}/team/svc:{v}", reg.host());
    for (v, kind) in [
        ("v1", Kind::Healthy),
        ("v2", Kind::Healthy),
        ("noready", Kind::NotReady),
        ("slow", Kind::Starting),
        ("crash", Kind::Crashing),
    ] {
        build_version(&d, dir.path(), &image(v), v, kind);
    }
    // The server pulls with a read-only token, made as an admin would make it.
    let token = run(wharf_cmd(&reg.data).args([
        "token",
        "create",
        "--user",
        "admin",
        "--scope",
        "repository:team/*:pull",
        "--name",
        "prod-server",
    ]))
    .trim()
    .to_owned();
    assert!(token.len() >= 20, "{token}");
    std::fs::write(dir.path().join("token"), &token).unwrap();

    // Two services on one repository: `api` follows prod (with a readiness probe),
    // `worker` follows latest.
    let (app_port, agent_port) = (free_port(), free_port());
    let stack_dir = dir.path().join("stack");
    std::fs::create_dir_all(&stack_dir).unwrap();
    std::fs::write(
        stack_dir.join("compose.yml"),
        format!(
            "services:\n  api:\n    image: {r}/team/svc:prod\n    ports: [\"127.0.0.1:{app_port}:8080\"]\n\
             \x20 worker:\n    image: {r}/team/svc:latest\n    restart: always\n",
            r = reg.host()
        ),
    )
    .unwrap();
    let project = format!("wharf-burst-{nonce}");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{agent_port}\"\ndata = \"agent-data\"\nregistry = \"{}\"\nusername = \"admin\"\n\
             token_file = \"token\"\nwebhook_secret = \"webhook-secret-0123\"\ndeploy_token = \"deploy-token-0123\"\n\
             poll_interval_s = 0\ncoalesce_ms = 2000\n\n\
             [[stacks]]\nname = \"web\"\nproject = \"{project}\"\nworkdir = \"stack\"\nfiles = [\"compose.yml\"]\n\
             health_timeout_s = 15\n[stacks.services]\napi = \"team/svc:prod\"\nworker = \"team/svc:latest\"\n\
             [stacks.probes]\napi = \"http://127.0.0.1:{app_port}/ready\"\n",
            reg.host(),
        ),
    )
    .unwrap();
    let mut stack = Stack::start(&cfg, agent_port, &stack_dir, &project);
    let hook = run(wharf_cmd(&reg.data).args([
        "webhook",
        "add",
        &format!("http://127.0.0.1:{agent_port}/hooks/registry"),
        "--secret",
        "webhook-secret-0123",
    ]));
    let hook = hook.lines().next().unwrap().to_owned();

    // 1. One push moves prod, latest and main-abc1234 to v1: three events, one deploy.
    let (v1, media_type, manifest) = manifest_of(&reg, "v1").await;
    let r = reg
        .put_manifest(
            "team/svc",
            &format!("{v1}?tag=prod&tag=latest&tag=main-abc1234"),
            &media_type,
            &manifest,
        )
        .await;
    assert_eq!(r.status(), 201);
    wait_serving(app_port, "v1");
    wait_delivered(&reg, &hook, 3);
    let h = settled(&cfg);
    assert_eq!(h.len(), 1, "one deploy for the burst: {h:#?}");
    assert_eq!(
        (h[0]["state"].as_str(), h[0]["trigger"].as_str()),
        (Some("success"), Some("webhook"))
    );
    let pin = format!("{}/team/svc@{v1}", reg.host());
    assert_eq!(h[0]["after"]["api"].as_str(), Some(pin.as_str()));
    assert_eq!(h[0]["after"]["worker"].as_str(), Some(pin.as_str()));
    let v1_pins = h[0]["after"].clone();

    // The same as a client that pushes one tag at a time does it (docker, buildx with
    // several -t): three PUTs a quarter second apart, three webhooks, still one deploy.
    let (v2, media_type, manifest) = manifest_of(&reg, "v2").await;
    for tag in ["prod", "latest", "main-abc1234"] {
        let r = reg
            .put_manifest("team/svc", tag, &media_type, &manifest)
            .await;
        assert_eq!(r.status(), 201);
        std::thread::sleep(Duration::from_millis(250));
    }
    wait_serving(app_port, "v2");
    wait_delivered(&reg, &hook, 6);
    // Longer than the coalescing window: nothing more comes.
    std::thread::sleep(Duration::from_secs(3));
    let h = settled(&cfg);
    assert_eq!(h.len(), 2, "one deploy for the burst: {h:#?}");
    let pin = format!("{}/team/svc@{v2}", reg.host());
    assert_eq!(h[0]["after"]["api"].as_str(), Some(pin.as_str()));
    assert_eq!(h[0]["after"]["worker"].as_str(), Some(pin.as_str()));
    assert_eq!(h[0]["before"], v1_pins);
    let v2_pins = h[0]["after"].clone();

    // 2. The probe gates a deploy: `noready` is healthy by its own healthcheck but has
    // no /ready, so it is rolled back.
    let out = wharf(&[
        "deploy",
        "now",
        "web",
        "--tag",
        "noready",
        "--json",
        "--agent-config",
    ])
    .arg(&cfg)
    .output()
    .unwrap();
    assert!(!out.status.success());
    let outcome: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(outcome["result"], "rolled_back", "{outcome}");
    let error = outcome["error"].as_str().unwrap();
    assert!(
        error.contains("probe") && error.contains("/ready"),
        "{error}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("rolled back"),
        "{out:?}"
    );
    assert_eq!(serves(app_port).as_deref(), Some("v2"));
    let h = settled(&cfg);
    assert_eq!(
        (h[1]["state"].as_str(), h[1]["trigger"].as_str()),
        (Some("failed"), Some("cli"))
    );
    assert_eq!(h[0]["after"], v2_pins);

    // 3. One deploy at a time: while `slow` waits for health, the hook's deploy is
    // queued behind it; with `?wait=false` the hook answers at once with its job.
    let mut slow = wharf(&["deploy", "now", "web", "--tag", "slow", "--agent-config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let slow_id = loop {
        let h = history(&cfg);
        if h[0]["state"] == "running" {
            break h[0]["id"].as_i64().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the slow deploy never ran: {h:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Up, so the stack is half-way.
    let deadline = Instant::now() + Duration::from_secs(30);
    while serves(app_port).as_deref() != Some("slow") {
        assert!(Instant::now() < deadline, "slow never came up");
        std::thread::sleep(Duration::from_millis(200));
    }
    let hook = reqwest::Client::new();
    let r = hook
        .post(format!(
            "http://127.0.0.1:{agent_port}/hooks/deploy/web?wait=false"
        ))
        .bearer_auth("deploy-token-0123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let queued = r.json::<Value>().await.unwrap()["job"]
        .as_str()
        .unwrap()
        .to_owned();
    let job_of = |id: String| {
        let hook = hook.clone();
        async move {
            let r = hook
                .get(format!("http://127.0.0.1:{agent_port}/api/deploys/{id}"))
                .bearer_auth("deploy-token-0123")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    assert_eq!(job_of(queued.clone()).await["state"], "queued");

    // The agent dies mid-deploy. At its restart the deploy is recorded as interrupted
    // and the stack goes back to v2, the last healthy deploy.
    stack.kill_and_restart(&cfg, agent_port);
    let _ = slow.wait();
    wait_serving(app_port, "v2");
    // The queued job never ran: it says so.
    assert_eq!(job_of(queued.clone()).await["state"], "interrupted");
    let h = settled(&cfg);
    let interrupted = h.iter().find(|d| d["id"] == slow_id).unwrap();
    assert_eq!(interrupted["state"], "interrupted", "{h:#?}");
    assert_eq!(
        (
            h[0]["kind"].as_str(),
            h[0]["trigger"].as_str(),
            h[0]["state"].as_str()
        ),
        (Some("rollback"), Some("recovery"), Some("success")),
        "{h:#?}"
    );
    assert_eq!(h[0]["after"], v2_pins);

    // 4. The seeds' rollback options: to a tag, and to a digest.
    let out = deploy_ok(&cfg, &["rollback", "web", "--tag", "v1"]);
    assert!(out.contains("deployed"), "{out}");
    assert_eq!(serves(app_port).as_deref(), Some("v1"));
    assert_eq!(settled(&cfg)[0]["after"], v1_pins);
    let out = deploy_ok(&cfg, &["rollback", "web", "--digest", &v2]);
    assert!(out.contains("deployed"), "{out}");
    assert_eq!(serves(app_port).as_deref(), Some("v2"));
    assert_eq!(settled(&cfg)[0]["after"], v2_pins);
    // A version named holds the stack: `deploy now` of the followed tags waits for
    // `resume`, which goes to them (v2 already): nothing to do.
    let out = deploy_ok(&cfg, &["now", "web"]);
    assert!(out.contains("held"), "{out}");
    let out = deploy_ok(&cfg, &["resume", "web"]);
    assert!(out.contains("unchanged"), "{out}");

    // One service at a tag of its own: only that service's container is replaced.
    let api_before = container(&project, "api");
    let out = deploy_ok(&cfg, &["now", "web", "--service", "worker=v1"]);
    assert!(out.contains("deployed"), "{out}");
    let h = settled(&cfg);
    assert_eq!(h[0]["after"]["worker"], v1_pins["worker"]);
    assert_eq!(h[0]["after"]["api"], v2_pins["api"]);
    assert!(
        h[0]["actor"].as_str().unwrap().starts_with("cli:"),
        "{:?}",
        h[0]
    );
    assert_eq!(
        container(&project, "api"),
        api_before,
        "api was not touched"
    );
    // A service that keeps crashing (no healthcheck, restarted by compose) is unhealthy:
    // rolled back.
    let err = deploy_fails(&cfg, &["now", "web", "--service", "worker=crash"]);
    assert!(err.contains("rolled back"), "{err}");
    let h = settled(&cfg);
    // `crash` is no version; the image's version label names it.
    assert_eq!(h[1]["versions"]["worker"], "crash", "{:?}", h[1]);
    let error = h[1]["error"].as_str().unwrap();
    assert!(error.contains("service worker is unhealthy"), "{error}");
    // Seen at its first restart, not after a crash loop.
    let restarts: u64 = error
        .split("restarts ")
        .nth(1)
        .and_then(|n| n.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{error}"));
    assert!(restarts <= 1, "{error}");
    assert_eq!(h[0]["after"]["worker"], v1_pins["worker"]);
    assert_eq!(serves(app_port).as_deref(), Some("v2"));

    // Bad requests are refused with a reason and change nothing.
    let before = history(&cfg).len();
    for (args, says) in [
        (
            vec!["rollback", "web", "--digest", &sha256(b"nowhere")],
            "no repository of web holds",
        ),
        (
            vec!["rollback", "web", "--digest", "sha256:zz"],
            "not a digest",
        ),
        (
            vec!["rollback", "web", "--to", "9999"],
            "web has no deploy 9999",
        ),
        (
            vec!["now", "web", "--service", "db=v1"],
            "has no service \"db\"",
        ),
        (
            vec!["now", "web", "--tag", "nope"],
            "team/svc:nope is not in the registry",
        ),
        (vec!["now", "nostack"], "no stack nostack"),
    ] {
        let err = deploy_fails(&cfg, &args);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert_eq!(history(&cfg).len(), before);

    // The token is in no process's command line, no compose or agent file, and no log.
    assert!(!process_list().iter().any(|p| p.contains(&token)));
    for (path, text) in files_under(&stack_dir)
        .into_iter()
        .chain(files_under(&dir.path().join("agent-data")))
    {
        assert!(!text.contains(&token), "{} holds the token", path.display());
    }
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
    assert!(log.contains("recovered"), "{log}");
    assert!(!log.contains(&token));
    drop(stack);
    let _ = Command::new("docker")
        .arg("rmi")
        .arg("-f")
        .args(["v1", "v2", "noready", "slow", "crash"].map(image))
        .output();
}

/// What the agent's status says of stack `web`.
fn status_of(cfg: &Path) -> Value {
    let out = run(wharf(&["deploy", "status", "--json", "--agent-config"]).arg(cfg));
    let v: Value = serde_json::from_str(&out).unwrap();
    v["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stack"] == "web")
        .unwrap()
        .clone()
}

/// Deploys of the image pinned as `pin` in the history.
fn deploys_of(h: &[Value], pin: &Value) -> usize {
    h.iter()
        .filter(|d| d["kind"] == "deploy" && d["after"]["web"] == *pin)
        .count()
}

/// Issue 15, left running: a hand-started stack is the agent's baseline; a release
/// that failed its health check is quarantined and never comes back with the polls; a
/// version named holds the stack until `resume`; a plain rollback quarantines what it
/// leaves; `--force` deploys a quarantined release on purpose.
#[tokio::test(flavor = "multi_thread")]
async fn failed_releases_stay_away_explicit_versions_hold_and_running_stacks_are_the_baseline() {
    require_tool("docker-compose", "apt-get install -y docker-compose");
    require_tool("curl", "apt-get install -y curl");
    let reg = TestRegistry::start();
    let d = Docker::new();
    d.login(reg.host(), "admin", ADMIN_PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let nonce = nonce();
    let repo = format!("team/q{nonce}");
    for (v, kind) in [
        ("v1", Kind::Healthy),
        ("v2", Kind::Failing),
        ("v3", Kind::Healthy),
        ("v4", Kind::Healthy),
        ("v5", Kind::Healthy),
    ] {
        build_version(
            &d,
            dir.path(),
            &format!("{}/{repo}:{v}", reg.host()),
            &format!("{v}-{nonce}"),
            kind,
        );
    }
    let pin = |v: &str| -> Value {
        let out = run(
            wharf(&["tags", "list", &format!("{}/{repo}", reg.host()), "--json"])
                .env("WHARF_USERNAME", "admin")
                .env("WHARF_PASSWORD", ADMIN_PASSWORD)
                .env("DOCKER_CONFIG", "/nonexistent"),
        );
        let tags: Value = serde_json::from_str(&out).unwrap();
        let digest = tags
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["tag"] == v || t["name"] == v)
            .unwrap_or_else(|| panic!("{v} not in {tags}"))["digest"]
            .as_str()
            .unwrap()
            .to_owned();
        Value::String(format!("{}/{repo}@{digest}", reg.host()))
    };
    let (app_port, agent_port) = (free_port(), free_port());
    let stack_dir = dir.path().join("stack");
    std::fs::create_dir_all(&stack_dir).unwrap();
    std::fs::write(
        stack_dir.join("compose.yml"),
        format!(
            "services:\n  web:\n    image: {}/{repo}:prod\n    ports: [\"127.0.0.1:{app_port}:8080\"]\n",
            reg.host()
        ),
    )
    .unwrap();
    let project = format!("wharf-q-{nonce}");
    // Started by hand, before the agent: v1.
    promote(&reg, &repo, "v1");
    run(Command::new("docker-compose")
        .current_dir(&stack_dir)
        .env("DOCKER_CONFIG", d.config_dir())
        .args(["-p", &project, "-f", "compose.yml", "up", "-d"]));
    wait_serving(app_port, &format!("v1-{nonce}"));

    std::fs::write(dir.path().join("token"), ADMIN_PASSWORD).unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{agent_port}\"\nregistry = \"{}\"\nusername = \"admin\"\ntoken_file = \"token\"\n\
             poll_interval_s = 1\ncoalesce_ms = 100\n\n[[stacks]]\nname = \"web\"\nproject = \"{project}\"\nworkdir = \"stack\"\n\
             files = [\"compose.yml\"]\nhealth_timeout_s = 30\n[stacks.services]\nweb = \"{repo}:prod\"\n",
            reg.host()
        ),
    )
    .unwrap();
    let _stack = Stack::start(&cfg, agent_port, &stack_dir, &project);

    // The running containers are the baseline: nothing to deploy.
    let deadline = Instant::now() + Duration::from_secs(60);
    let h = loop {
        let h = settled(&cfg);
        if !h.is_empty() {
            break h;
        }
        assert!(Instant::now() < deadline, "no baseline recorded");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(h.len(), 1, "{h:#?}");
    assert_eq!(h[0]["trigger"], "baseline");
    assert_eq!(h[0]["after"]["web"], pin("v1"));

    // v2 fails its health check: rolled back to the baseline, once, and quarantined.
    promote(&reg, &repo, "v2");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let h = settled(&cfg);
        if h.iter()
            .any(|d| d["kind"] == "rollback" && d["trigger"] == "unhealthy")
        {
            break;
        }
        assert!(Instant::now() < deadline, "v2 was not rolled back: {h:#?}");
        std::thread::sleep(Duration::from_millis(300));
    }
    wait_serving(app_port, &format!("v1-{nonce}"));
    std::thread::sleep(Duration::from_secs(6)); // six polls see prod at v2
    let h = settled(&cfg);
    assert_eq!(
        deploys_of(&h, &pin("v2")),
        1,
        "v2 came back with the polls: {h:#?}"
    );
    let st = status_of(&cfg);
    let q = st["quarantined"].as_array().unwrap();
    assert!(
        q.iter().any(|q| q["image"] == pin("v2") && q["reason"].as_str().unwrap().contains("unhealthy")),
        "{st:#}"
    );
    // On purpose, it is deployed again (and rolled back again).
    let out = deploy_fails(&cfg, &["now", "web", "--force"]);
    assert!(
        out.contains("rolled back") || out.contains("rolled_back"),
        "{out}"
    );
    assert_eq!(deploys_of(&settled(&cfg), &pin("v2")), 2);
    wait_serving(app_port, &format!("v1-{nonce}"));

    // A new digest on the tag deploys as usual.
    promote(&reg, &repo, "v3");
    wait_serving(app_port, &format!("v3-{nonce}"));
    settled(&cfg);

    // A version named holds: prod moves to v4, the stack stays on v1 over six polls.
    // What runs is named by its version, next to the digest.
    let out = deploy_ok(&cfg, &["rollback", "web", "--tag", "v1"]);
    assert!(out.contains("deployed web=v1 ("), "{out}");
    assert_eq!(settled(&cfg)[0]["versions"]["web"], "v1");
    let text = deploy_ok(&cfg, &["status"]);
    assert!(text.contains("running web=v1 (sha256:"), "{text}");
    let text = deploy_ok(&cfg, &["history", "web"]);
    assert!(
        text.contains("web=v3 (sha256:") && !text.contains("null"),
        "{text}"
    );
    promote(&reg, &repo, "v4");
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        serves(app_port).as_deref(),
        Some(format!("v1-{nonce}").as_str())
    );
    let st = status_of(&cfg);
    assert!(st["held"].is_object(), "{st:#}");
    assert_eq!(st["followed_now"]["web"], pin("v4"), "{st:#}");
    // `resume` follows the tag again at once.
    let out = deploy_ok(&cfg, &["resume", "web"]);
    assert!(out.contains("deployed"), "{out}");
    wait_serving(app_port, &format!("v4-{nonce}"));
    settled(&cfg);
    assert!(status_of(&cfg)["held"].is_null());

    // A plain rollback says v4 is bad: back to v1, no hold, v4 quarantined; the next
    // new digest on the tag deploys.
    let out = deploy_ok(&cfg, &["rollback", "web"]);
    assert!(out.contains("deployed"), "{out}");
    wait_serving(app_port, &format!("v1-{nonce}"));
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        serves(app_port).as_deref(),
        Some(format!("v1-{nonce}").as_str())
    );
    let st = status_of(&cfg);
    assert!(st["held"].is_null(), "{st:#}");
    assert!(
        st["quarantined"]
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q["image"] == pin("v4")),
        "{st:#}"
    );
    promote(&reg, &repo, "v5");
    wait_serving(app_port, &format!("v5-{nonce}"));
    for v in ["v1", "v2", "v3", "v4", "v5"] {
        let _ = Command::new("docker")
            .args(["rmi", "-f", &format!("{}/{repo}:{v}", reg.host())])
            .output();
    }
}

/// The texts the agent has notified so far.
fn notes(r: &Receiver) -> Vec<String> {
    r.at("/notify")
        .iter()
        .map(|n| {
            serde_json::from_slice::<Value>(&n.body).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// The agent's status of its registry access.
fn registry_status(cfg: &Path) -> Value {
    let out = run(wharf(&["deploy", "status", "--json", "--agent-config"]).arg(cfg));
    serde_json::from_str::<Value>(&out).unwrap()["registry"].clone()
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Issue 15, credentials: an agent started while the registry is down waits for it; a
/// revoked token is said once (not at every poll) and does not lock the user's other
/// tokens out; a new token in the token file is used without a restart; a token about
/// to expire is warned about in `status` and once by notification; `token list` shows
/// the days left.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_that_stops_working_is_said_once_and_a_new_one_is_used_without_a_restart() {
    require_tool("docker-compose", "apt-get install -y docker-compose");
    require_tool("curl", "apt-get install -y curl");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("registry");
    let addr = format!("127.0.0.1:{}", free_port());
    let reg = TestRegistry::start_at(&addr, &data, |_| {});
    let d = Docker::new();
    d.login(reg.host(), "admin", ADMIN_PASSWORD);
    let nonce = nonce();
    let repo = format!("team/cred{nonce}");
    for v in ["v1", "v2"] {
        let image = format!("{}/{repo}:{v}", reg.host());
        build_version(
            &d,
            dir.path(),
            &image,
            &format!("{v}-{nonce}"),
            Kind::Healthy,
        );
    }
    promote(&reg, &repo, "v1");
    add_user(&reg, "deployer", "deployer password 1");
    run(wharf_cmd(&data).args(["grant", "deployer", "team/*", "pull"]));
    let create = |name: &str, expires: &str| -> String {
        run(wharf_cmd(&data).args([
            "token",
            "create",
            "--user",
            "deployer",
            "--scope",
            "repository:team/*:pull",
            "--expires",
            expires,
            "--name",
            name,
        ]))
        .trim()
        .to_owned()
    };
    // The server's token expires in three days; CI has a token of its own.
    let first = create("prod-1", "3d");
    let ci = create("ci", "90d");
    std::fs::write(dir.path().join("token"), &first).unwrap();

    let (app_port, agent_port) = (free_port(), free_port());
    let stack_dir = dir.path().join("stack");
    std::fs::create_dir_all(&stack_dir).unwrap();
    std::fs::write(
        stack_dir.join("compose.yml"),
        format!(
            "services:\n  web:\n    image: {}/{repo}:prod\n    ports: [\"127.0.0.1:{app_port}:8080\"]\n",
            reg.host()
        ),
    )
    .unwrap();
    let notify = Receiver::start();
    let project = format!("wharf-cred-{nonce}");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{agent_port}\"\nregistry = \"{addr}\"\nusername = \"deployer\"\n\
             token_file = \"token\"\npoll_interval_s = 1\nnotify_url = \"{}/notify\"\n\n\
             [[stacks]]\nname = \"web\"\nproject = \"{project}\"\nworkdir = \"stack\"\n\
             files = [\"compose.yml\"]\n[stacks.services]\nweb = \"{repo}:prod\"\n",
            notify.url
        ),
    )
    .unwrap();

    // The registry is down (a reboot): the agent starts anyway and says so.
    reg.stop();
    let _stack = Stack::start(&cfg, agent_port, &stack_dir, &project);
    wait_until("the agent sees the registry is down", 30, || {
        registry_status(&cfg)["ok"] == false
    });
    let out = run(wharf(&["deploy", "status", "--agent-config"]).arg(&cfg));
    assert!(out.contains("FAILING"), "{out}");
    std::thread::sleep(Duration::from_secs(3));
    let down: Vec<String> = notes(&notify);
    assert_eq!(
        down.iter()
            .filter(|n| n.contains("cannot be reached"))
            .count(),
        1,
        "{down:?}"
    );
    // Back up: the agent deploys by itself and says the registry works again.
    let reg = TestRegistry::start_at(&addr, &data, |_| {});
    wait_serving(app_port, &format!("v1-{nonce}"));
    wait_until("the recovery is notified", 30, || {
        notes(&notify)
            .iter()
            .any(|n| n.contains("works for the agent again"))
    });
    // The token expires in less than a week: said in status, and notified once.
    let st = registry_status(&cfg);
    assert_eq!(st["ok"], true, "{st}");
    assert_eq!(st["token_days_left"], 2, "{st}");
    assert!(
        st["warning"].as_str().unwrap().contains("expires in 2 day"),
        "{st}"
    );
    let out = run(wharf(&["deploy", "status", "--agent-config"]).arg(&cfg));
    assert!(
        out.contains("WARNING") && out.contains("expires in 2 day"),
        "{out}"
    );
    let expiring = |n: &Vec<String>| n.iter().filter(|n| n.contains("expires at")).count();
    assert_eq!(expiring(&notes(&notify)), 1, "{:?}", notes(&notify));
    let out = run(wharf_cmd(&data).args(["token", "list", "--user", "deployer"]));
    assert!(out.contains("LEFT") && out.contains(" 2d "), "{out}");

    // Revoked: said once over many polls; the stack keeps running v1.
    let list: Value = serde_json::from_str(&run(
        wharf_cmd(&data).args(["token", "list", "--user", "deployer", "--json"])
    ))
    .unwrap();
    let id_of = |name: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    run(wharf_cmd(&data).args(["token", "revoke", &id_of("prod-1")]));
    promote(&reg, &repo, "v2");
    wait_until("the agent sees the token refused", 30, || {
        registry_status(&cfg)["error"].is_string()
    });
    std::thread::sleep(Duration::from_secs(8));
    let n = notes(&notify);
    assert_eq!(
        n.iter().filter(|n| n.contains("refuses")).count(),
        1,
        "{n:?}"
    );
    assert_eq!(serves(app_port), Some(format!("v1-{nonce}")));
    let st = registry_status(&cfg);
    assert_eq!(st["ok"], false, "{st}");
    assert!(st["failures"].as_i64().unwrap() >= 2, "{st}");
    // The agent's failures lock nobody out: the user's CI token still works.
    let ci_client = client_as("deployer", &ci);
    let r = token(&reg, &ci_client, &[&format!("repository:{repo}:pull")]).await;
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    // Nothing was deployed or quarantined meanwhile.
    assert!(
        status_of(&cfg)["quarantined"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let before = history(&cfg).len();

    // A new token in the file: used without a restart, the new release goes out.
    let second = create("prod-2", "1y");
    std::fs::write(dir.path().join("token"), format!("{second}\n")).unwrap();
    wait_serving(app_port, &format!("v2-{nonce}"));
    let h = settled(&cfg);
    assert_eq!(h.len(), before + 1, "{h:?}");
    assert_eq!(h[0]["state"], "success");
    let st = registry_status(&cfg);
    assert_eq!(st["ok"], true, "{st}");
    assert_eq!(st["token_days_left"], 364, "{st}");
    assert!(st["warning"].is_null(), "{st}");
    let n = notes(&notify);
    assert_eq!(
        n.iter()
            .filter(|n| n.contains("works for the agent again"))
            .count(),
        2,
        "{n:?}"
    );
    assert_eq!(expiring(&n), 1, "{n:?}");
    let list: Value = serde_json::from_str(&run(
        wharf_cmd(&data).args(["token", "list", "--user", "deployer", "--json"])
    ))
    .unwrap();
    let prod2 = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "prod-2")
        .unwrap();
    assert_eq!(prod2["days_left"], 364, "{prod2}");
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
    assert!(
        !log.contains(&first) && !log.contains(&second),
        "a token in the log"
    );
    let _ = Command::new("docker")
        .arg("rmi")
        .arg("-f")
        .args(["v1", "v2"].map(|v| format!("{}/{repo}:{v}", reg.host())))
        .output();
}

/// Issue 15, the CI deploy job: its hook call waits for the deploy the registry's
/// webhook started and answers with that release's real outcome (the example job fails
/// on an unhealthy release and passes on a healthy one, never on a 409); `?wait=false`
/// answers 202 with a job to read at `/api/deploys/<id>`.
#[tokio::test(flavor = "multi_thread")]
async fn the_ci_deploy_job_gets_the_real_outcome_of_the_release_it_pushed() {
    require_tool("docker-compose", "apt-get install -y docker-compose");
    require_tool("curl", "apt-get install -y curl");
    let reg = TestRegistry::start();
    let d = Docker::new();
    d.login(reg.host(), "admin", ADMIN_PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let nonce = nonce();
    let repo = format!("team/ci{nonce}");
    for (v, kind) in [
        ("v1", Kind::Healthy),
        ("v2", Kind::Failing),
        ("v3", Kind::Healthy),
        ("slow", Kind::Starting),
    ] {
        let image = format!("{}/{repo}:{v}", reg.host());
        build_version(&d, dir.path(), &image, &format!("{v}-{nonce}"), kind);
    }
    let (app_port, agent_port) = (free_port(), free_port());
    let stack_dir = dir.path().join("stack");
    std::fs::create_dir_all(&stack_dir).unwrap();
    std::fs::write(
        stack_dir.join("compose.yml"),
        format!(
            "services:\n  web:\n    image: {}/{repo}:prod\n    ports: [\"127.0.0.1:{app_port}:8080\"]\n",
            reg.host()
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("token"), ADMIN_PASSWORD).unwrap();
    let project = format!("wharf-ci-{nonce}");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{agent_port}\"\nregistry = \"{}\"\nusername = \"admin\"\n\
             token_file = \"token\"\nwebhook_secret = \"webhook-secret-0123\"\n\
             deploy_token = \"deploy-token-0123\"\npoll_interval_s = 0\n\n\
             [[stacks]]\nname = \"prod\"\nproject = \"{project}\"\nworkdir = \"stack\"\n\
             files = [\"compose.yml\"]\nhealth_timeout_s = 20\n[stacks.services]\nweb = \"{repo}:prod\"\n",
            reg.host()
        ),
    )
    .unwrap();
    let _stack = Stack::start(&cfg, agent_port, &stack_dir, &project);
    run(wharf_cmd(&reg.data).args([
        "webhook",
        "add",
        &format!("http://127.0.0.1:{agent_port}/hooks/registry"),
        "--secret",
        "webhook-secret-0123",
        "--tags",
        "prod",
    ]));
    let url = format!("http://127.0.0.1:{agent_port}");
    let history = || {
        let out = run(wharf(&["deploy", "history", "prod", "--json", "--agent-config"]).arg(&cfg));
        serde_json::from_str::<Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    };
    let wait_running = || {
        wait_until("the webhook's deploy starts", 30, || {
            history().first().is_some_and(|d| d["state"] == "running")
        })
    };

    // A healthy release: CI pushes, the webhook starts the deploy, CI's hook call
    // comes during it and gets its outcome.
    promote(&reg, &repo, "v1");
    wait_running();
    for file in ["build.yml", "manual.yml"] {
        let (ok, out) = crate::examples::run_deploy_step(file, &url, "deploy-token-0123", "prod");
        assert!(ok, "{file}: {out}");
        assert!(
            out.contains("\"result\":\"unchanged\"") || out.contains("\"result\":\"deployed\""),
            "{out}"
        );
    }
    assert_eq!(serves(app_port), Some(format!("v1-{nonce}")));
    let h = history();
    assert_eq!(h.len(), 1, "one deploy of v1: {h:?}");
    assert_eq!(h[0]["trigger"], "webhook");

    // An unhealthy release: the job fails, on the real outcome (the webhook's deploy
    // rolled back, so the release is quarantined), and deploys it no second time.
    promote(&reg, &repo, "v2");
    wait_running();
    let (ok, out) =
        crate::examples::run_deploy_step("build.yml", &url, "deploy-token-0123", "prod");
    assert!(!ok, "{out}");
    // That deploy's outcome: rolled back, with the unhealthy deploy's id.
    assert!(out.contains("\"result\":\"rolled_back\""), "{out}");
    assert!(out.contains("did not go out healthy"), "{out}");
    assert_eq!(serves(app_port), Some(format!("v1-{nonce}")));
    let h = history();
    assert_eq!(h.len(), 3, "v2 deployed once, then rolled back: {h:?}");
    assert_eq!(
        (h[1]["state"].as_str(), h[0]["kind"].as_str()),
        (Some("failed"), Some("rollback"))
    );
    let unhealthy = h[1]["id"].as_i64().unwrap();
    assert!(out.contains(&format!("\"id\":{unhealthy}")), "{out}");
    // Asked again after it ended, the answer is the quarantine, naming that deploy.
    let (ok, out) =
        crate::examples::run_deploy_step("build.yml", &url, "deploy-token-0123", "prod");
    assert!(!ok, "{out}");
    assert!(out.contains("\"result\":\"quarantined\""), "{out}");
    assert!(out.contains(&format!("\"deploy\":{unhealthy}")), "{out}");

    // Without waiting: 202 and a job that ends with the outcome.
    let http = reqwest::Client::new();
    promote(&reg, &repo, "v3");
    let r = http
        .post(format!("{url}/hooks/deploy/prod?wait=false"))
        .bearer_auth("deploy-token-0123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let job = r.json::<Value>().await.unwrap()["job"]
        .as_str()
        .unwrap()
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(90);
    let done = loop {
        let r = http
            .get(format!("{url}/api/deploys/{job}"))
            .bearer_auth("deploy-token-0123")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let j: Value = r.json().await.unwrap();
        if j["state"] == "done" {
            break j;
        }
        assert!(
            ["queued", "running"].contains(&j["state"].as_str().unwrap()),
            "{j}"
        );
        assert!(Instant::now() < deadline, "the job never ended: {j}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(done["status"], 200, "{done}");
    assert!(
        ["deployed", "unchanged"].contains(&done["answer"]["result"].as_str().unwrap()),
        "{done}"
    );
    wait_serving(app_port, &format!("v3-{nonce}"));
    // Jobs are read with a token, exist or are said not to, and bad input is refused.
    for (path, token, want) in [
        (format!("/api/deploys/{job}"), None, 401),
        (format!("/api/deploys/{job}"), Some("wrong-token-0123"), 401),
        (
            format!("/api/deploys/{}", "0".repeat(32)),
            Some("deploy-token-0123"),
            404,
        ),
        ("/api/deploys/abc".into(), Some("deploy-token-0123"), 400),
    ] {
        let mut rb = http.get(format!("{url}{path}"));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), want, "{path}");
        assert!(r.json::<Value>().await.unwrap()["error"].is_string());
    }

    // Many at once: while a deploy runs, 16 more wait; past that they are refused (429).
    let r = http
        .post(format!("{url}/hooks/deploy/prod?wait=false"))
        .bearer_auth("deploy-token-0123")
        .body(r#"{"tag": "slow"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    wait_running();
    let mut jobs = Vec::new();
    // A full queue is refused at once (429, no job), or, for a call that came before the
    // queue had counted the last ones, in its job's answer.
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let r = http
            .post(format!("{url}/hooks/deploy/prod?wait=false"))
            .bearer_auth("deploy-token-0123")
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            assert!(r.json::<Value>().await.unwrap()["error"].is_string());
            statuses.push(429);
            continue;
        }
        assert_eq!(r.status(), 202);
        jobs.push(
            r.json::<Value>().await.unwrap()["job"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    for job in jobs {
        loop {
            let j: Value = http
                .get(format!("{url}/api/deploys/{job}"))
                .bearer_auth("deploy-token-0123")
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if j["state"] == "done" {
                statuses.push(j["status"].as_i64().unwrap());
                break;
            }
            assert!(Instant::now() < deadline, "job {job} never ended: {j}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        4,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        16,
        "{statuses:?}"
    );
    wait_serving(app_port, &format!("v3-{nonce}"));

    // A job a person started with the API token is not the deploy token's to read.
    let api_token = std::fs::read_to_string(dir.path().join("wharf-agent/api.token")).unwrap();
    let r = http
        .post(format!("{url}/api/stacks/prod/deploy?wait=false"))
        .bearer_auth(api_token.trim())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let theirs = r.json::<Value>().await.unwrap()["job"]
        .as_str()
        .unwrap()
        .to_owned();
    for (token, want) in [("deploy-token-0123", 404), (api_token.trim(), 200)] {
        let r = http
            .get(format!("{url}/api/deploys/{theirs}"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), want);
    }
    let before = history().len();
    let r = http
        .post(format!("{url}/hooks/deploy/prod?wait=maybe"))
        .bearer_auth("deploy-token-0123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(history().len(), before);
    let _ = Command::new("docker")
        .arg("rmi")
        .arg("-f")
        .args(["v1", "v2", "v3", "slow"].map(|v| format!("{}/{repo}:{v}", reg.host())))
        .output();
}

/// Whether the engine holds `image` (`repo@sha256:...`).
fn present(image: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", image])
        .output()
        .unwrap()
        .status
        .success()
}

/// Issue 15, the server's disk: beyond `keep_images` per service, the images the agent
/// pulled are removed after each deploy, except one quarantined in the last day; a
/// rollback to a removed one pulls it again.
#[tokio::test(flavor = "multi_thread")]
async fn old_images_are_removed_beyond_keep_images_and_a_rollback_pulls_them_back() {
    require_tool("docker-compose", "apt-get install -y docker-compose");
    require_tool("curl", "apt-get install -y curl");
    let reg = TestRegistry::start();
    let d = Docker::new();
    d.login(reg.host(), "admin", ADMIN_PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let nonce = nonce();
    let repo = format!("team/prune{nonce}");
    let versions = [
        ("v1", Kind::Healthy),
        ("v2", Kind::Healthy),
        ("v3", Kind::Failing),
        ("v4", Kind::Healthy),
        ("v5", Kind::Healthy),
    ];
    let mut pins = std::collections::BTreeMap::new();
    for (v, kind) in versions {
        let image = format!("{}/{repo}:{v}", reg.host());
        build_version(&d, dir.path(), &image, &format!("{v}-{nonce}"), kind);
        let (digest, _, _) = manifest_of_repo(&reg, &repo, v).await;
        pins.insert(v, format!("{}/{repo}@{digest}", reg.host()));
        // Only what the agent pulls is on the engine.
        run(d.cmd().args(["image", "rm", &image]));
    }
    // An image of the same repository the user pulled by digest themselves: the agent
    // never pulled it, and never removes it.
    let own = format!("{}/{repo}:mine", reg.host());
    build_version(
        &d,
        dir.path(),
        &own,
        &format!("mine-{nonce}"),
        Kind::Healthy,
    );
    let (digest, _, _) = manifest_of_repo(&reg, &repo, "mine").await;
    let own_pin = format!("{}/{repo}@{digest}", reg.host());
    run(d.cmd().args(["image", "rm", &own]));
    run(d.cmd().args(["pull", "-q", &own_pin]));
    let (app_port, agent_port) = (free_port(), free_port());
    let stack_dir = dir.path().join("stack");
    std::fs::create_dir_all(&stack_dir).unwrap();
    std::fs::write(
        stack_dir.join("compose.yml"),
        format!(
            "services:\n  web:\n    image: {}/{repo}:prod\n    ports: [\"127.0.0.1:{app_port}:8080\"]\n",
            reg.host()
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("token"), ADMIN_PASSWORD).unwrap();
    let project = format!("wharf-prune-{nonce}");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{agent_port}\"\nregistry = \"{}\"\nusername = \"admin\"\n\
             token_file = \"token\"\npoll_interval_s = 1\nkeep_images = 2\n\n\
             [[stacks]]\nname = \"web\"\nproject = \"{project}\"\nworkdir = \"stack\"\n\
             files = [\"compose.yml\"]\nhealth_timeout_s = 20\n[stacks.services]\nweb = \"{repo}:prod\"\n",
            reg.host()
        ),
    )
    .unwrap();
    let _stack = Stack::start(&cfg, agent_port, &stack_dir, &project);
    for (v, kind) in versions {
        promote(&reg, &repo, v);
        if kind == Kind::Healthy {
            wait_serving(app_port, &format!("{v}-{nonce}"));
        } else {
            wait_until("the unhealthy release is rolled back", 90, || {
                let h = history(&cfg);
                h.len() >= 2 && h[0]["kind"] == "rollback" && h[0]["state"] == "success"
            });
        }
        settled(&cfg);
    }
    wait_serving(app_port, &format!("v5-{nonce}"));
    // Kept: the running v5 and v4 (two per service), and v3, quarantined today.
    for (v, want) in [
        ("v1", false),
        ("v2", false),
        ("v3", true),
        ("v4", true),
        ("v5", true),
    ] {
        assert_eq!(present(&pins[v]), want, "{v} present");
    }
    // A rollback to v1 pulls it again; then v4 is the one beyond two.
    let v1_deploy = history(&cfg)
        .iter()
        .rev()
        .find(|d| d["after"]["web"] == pins["v1"].as_str())
        .unwrap()["id"]
        .as_i64()
        .unwrap();
    let out = deploy_ok(&cfg, &["rollback", "web", "--to", &v1_deploy.to_string()]);
    assert!(out.contains("deployed"), "{out}");
    wait_serving(app_port, &format!("v1-{nonce}"));
    for (v, want) in [
        ("v1", true),
        ("v2", false),
        ("v3", true),
        ("v4", false),
        ("v5", true),
    ] {
        assert_eq!(present(&pins[v]), want, "{v} present after the rollback");
    }
    assert!(
        present(&own_pin),
        "an image the agent did not pull was removed"
    );
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
    assert!(log.contains("removed"), "{log}");

    // Issue 16: the agent reports what runs (v1) and its rollback targets (the last two
    // healthy before it) to the registry, and retention never deletes those digests.
    let digest_of = |v: &str| pins[v].rsplit_once('@').unwrap().1.to_owned();
    let mut reported = Vec::new();
    wait_until("the agent reports its deploys", 30, || {
        let out = crate::common::wharf(&reg, &["deploys", "--json"]);
        let rows: Value = serde_json::from_str(&out).unwrap();
        reported = rows
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["stack"] == "web" && r["repository"] == repo.as_str())
            .map(|r| {
                (
                    r["state"].as_str().unwrap().to_owned(),
                    r["digest"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        reported.contains(&("running".to_owned(), digest_of("v1")))
    });
    assert!(
        reported.contains(&("previous".to_owned(), digest_of("v5"))),
        "{reported:?}"
    );
    assert!(
        reported.contains(&("previous".to_owned(), digest_of("v4"))),
        "{reported:?}"
    );
    let table = crate::common::wharf(&reg, &["deploys"]);
    assert!(
        table.contains("running") && table.contains(&repo),
        "{table}"
    );
    crate::common::wharf(
        &reg,
        &[
            "retention",
            "set",
            &repo,
            "--delete-older",
            "1s",
            "--tags",
            "v*",
        ],
    );
    let plan: Value =
        serde_json::from_str(&crate::common::wharf(&reg, &["retention", "run", "--json"])).unwrap();
    let mut deleted: Vec<&str> = plan["deletions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["tag"].as_str())
        .collect();
    deleted.sort();
    assert_eq!(
        deleted,
        ["v2", "v3"],
        "deployed digests are spared: {plan:#}"
    );
    for v in ["v1", "v4", "v5"] {
        let r = reg.get(&format!("/v2/{repo}/manifests/{v}")).await;
        assert_eq!(r.status(), reqwest::StatusCode::OK, "{v}");
    }
    let _ = Command::new("docker")
        .arg("rmi")
        .args(pins.values())
        .arg(&own_pin)
        .output();
}

/// Issue 15, drift and stopping: a stopped container or an edited compose file shows in
/// `deploy status` and `deploy now` puts it back; SIGTERM during a poll-started deploy
/// lets it end (here: rolled back) before the agent exits, so nothing is half applied.
#[tokio::test(flavor = "multi_thread")]
async fn drift_is_shown_and_repaired_and_a_stop_lets_the_running_deploy_end() {
    require_tool("docker-compose", "apt-get install -y docker-compose");
    require_tool("curl", "apt-get install -y curl");
    let reg = TestRegistry::start();
    let d = Docker::new();
    d.login(reg.host(), "admin", ADMIN_PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let nonce = nonce();
    let repo = format!("team/drift{nonce}");
    for (v, kind) in [("v1", Kind::Healthy), ("slow", Kind::Starting)] {
        let image = format!("{}/{repo}:{v}", reg.host());
        build_version(&d, dir.path(), &image, &format!("{v}-{nonce}"), kind);
    }
    let (app_port, agent_port) = (free_port(), free_port());
    let stack_dir = dir.path().join("stack");
    std::fs::create_dir_all(&stack_dir).unwrap();
    let compose = |env: &str| {
        format!(
            "services:\n  web:\n    image: {}/{repo}:prod\n    ports: [\"127.0.0.1:{app_port}:8080\"]\n    environment:\n      MODE: {env}\n",
            reg.host()
        )
    };
    std::fs::write(stack_dir.join("compose.yml"), compose("one")).unwrap();
    std::fs::write(dir.path().join("token"), ADMIN_PASSWORD).unwrap();
    let project = format!("wharf-drift-{nonce}");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{agent_port}\"\nregistry = \"{}\"\nusername = \"admin\"\n\
             token_file = \"token\"\npoll_interval_s = 1\n\n\
             [[stacks]]\nname = \"web\"\nproject = \"{project}\"\nworkdir = \"stack\"\n\
             files = [\"compose.yml\"]\nhealth_timeout_s = 8\n[stacks.services]\nweb = \"{repo}:prod\"\n",
            reg.host()
        ),
    )
    .unwrap();
    let mut stack = Stack::start(&cfg, agent_port, &stack_dir, &project);
    promote(&reg, &repo, "v1");
    wait_serving(app_port, &format!("v1-{nonce}"));
    settled(&cfg);
    assert_eq!(status_of(&cfg)["state"], "running");
    let deploys = history(&cfg).len();

    // Stopped by hand: status says so, the polls leave it alone, `deploy now` starts it.
    run(Command::new("docker").args(["stop", "-t", "1", &container(&project, "web")]));
    let st = status_of(&cfg);
    assert_eq!(st["state"], "drifted", "{st:#}");
    assert!(
        st["drift"][0].as_str().unwrap().contains("web is exited"),
        "{st:#}"
    );
    let text = deploy_ok(&cfg, &["status"]);
    assert!(text.contains("DRIFT: web is exited"), "{text}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        serves(app_port),
        None,
        "a poll restarted what a person stopped"
    );
    let out = deploy_ok(&cfg, &["now", "web"]);
    assert!(out.contains("deployed"), "{out}");
    wait_serving(app_port, &format!("v1-{nonce}"));
    assert_eq!(status_of(&cfg)["state"], "running");

    // The compose file edited: drift until `deploy now` applies it.
    std::fs::write(stack_dir.join("compose.yml"), compose("two")).unwrap();
    let st = status_of(&cfg);
    assert!(
        st["drift"]
            .to_string()
            .contains("compose or env files changed"),
        "{st:#}"
    );
    let out = deploy_ok(&cfg, &["now", "web"]);
    assert!(out.contains("deployed"), "{out}");
    let env = run(Command::new("docker").args([
        "inspect",
        "-f",
        "{{json .Config.Env}}",
        &container(&project, "web"),
    ]));
    assert!(env.contains("MODE=two"), "{env}");
    assert_eq!(status_of(&cfg)["state"], "running");
    let out = deploy_ok(&cfg, &["now", "web"]);
    assert!(out.contains("unchanged"), "{out}");
    assert_eq!(history(&cfg).len(), deploys + 2);

    // SIGTERM while a poll deploys `slow` (which never gets healthy): the agent waits
    // for the deploy to end, rolled back to v1, then exits.
    promote(&reg, &repo, "slow");
    wait_until("the poll deploys slow", 30, || {
        history(&cfg)[0]["state"] == "running"
    });
    let pid = stack.agent.id().to_string();
    run(Command::new("kill").args(["-TERM", &pid]));
    let exit = stack.agent.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
    assert_eq!(serves(app_port), Some(format!("v1-{nonce}")));
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
    assert!(
        log.contains("stopping once the running deploy has ended"),
        "{log}"
    );
    stack.agent = spawn_agent(&cfg, agent_port);
    let h = settled(&cfg);
    assert!(h.iter().all(|d| d["state"] != "interrupted"), "{h:#?}");
    assert_eq!(
        (
            h[1]["state"].as_str(),
            h[0]["kind"].as_str(),
            h[0]["state"].as_str()
        ),
        (Some("failed"), Some("rollback"), Some("success")),
        "{h:#?}"
    );
    let _ = Command::new("docker")
        .arg("rmi")
        .arg("-f")
        .args(["v1", "slow"].map(|v| format!("{}/{repo}:{v}", reg.host())))
        .output();
}

/// Sends a GET to the stack's public port every 50 ms (on kept-alive connections, as a
/// browser would) until stopped; counts what failed and what answered.
struct Prober {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<(usize, Vec<String>)>,
}

impl Prober {
    fn start(port: u16) -> Prober {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = std::sync::Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(3))
                .build()
                .unwrap();
            let (mut failed, mut answers) = (0, Vec::new());
            // Bounded: ten minutes at most.
            for _ in 0..12_000 {
                if s.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                match http.get(format!("http://127.0.0.1:{port}/")).send().await {
                    Ok(r) if r.status() == 200 => {
                        answers.push(r.text().await.unwrap_or_default().trim().to_owned())
                    }
                    Ok(r) => {
                        failed += 1;
                        answers.push(format!("status {}", r.status()));
                    }
                    Err(e) => {
                        failed += 1;
                        answers.push(format!("error {e}"));
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (failed, answers)
        });
        Prober { stop, task }
    }

    /// (failed requests, every answer in order).
    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.task.await.unwrap()
    }
}

/// Issue 15, zero-downtime cutover: with the agent's proxy in front of a service, a
/// healthy deploy, an unhealthy release (never live) and a manual rollback each fail no
/// request of a prober hitting the public port every 50 ms.
#[tokio::test(flavor = "multi_thread")]
async fn the_proxy_cuts_over_without_a_failed_request_and_an_unhealthy_release_is_never_live() {
    require_tool("docker-compose", "apt-get install -y docker-compose");
    let reg = TestRegistry::start();
    let d = Docker::new();
    d.login(reg.host(), "admin", ADMIN_PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let nonce = nonce();
    let repo = format!("team/px{nonce}");
    for (v, kind) in [
        ("v1", Kind::Healthy),
        ("v2", Kind::Healthy),
        ("v3", Kind::NotReady),
    ] {
        let image = format!("{}/{repo}:{v}", reg.host());
        build_version(&d, dir.path(), &image, &format!("{v}-{nonce}"), kind);
    }
    let (app_port, agent_port) = (free_port(), free_port());
    let stack_dir = dir.path().join("stack");
    std::fs::create_dir_all(&stack_dir).unwrap();
    // The service publishes no port: the agent's proxy owns the public one.
    std::fs::write(
        stack_dir.join("compose.yml"),
        format!("services:\n  web:\n    image: {}/{repo}:prod\n", reg.host()),
    )
    .unwrap();
    std::fs::write(dir.path().join("token"), ADMIN_PASSWORD).unwrap();
    let project = format!("wharf-px-{nonce}");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{agent_port}\"\nregistry = \"{}\"\nusername = \"admin\"\n\
             token_file = \"token\"\npoll_interval_s = 1\n\n\
             [[stacks]]\nname = \"web\"\nproject = \"{project}\"\nworkdir = \"stack\"\n\
             files = [\"compose.yml\"]\nhealth_timeout_s = 15\n[stacks.services]\nweb = \"{repo}:prod\"\n\
             [stacks.probes]\nweb = \"http://127.0.0.1:{app_port}/ready\"\n\
             [stacks.proxy.web]\nlisten = \"127.0.0.1:{app_port}\"\nport = 8080\ndrain_s = 2\nstop_timeout_s = 1\n",
            reg.host()
        ),
    )
    .unwrap();
    let _stack = Stack::start(&cfg, agent_port, &stack_dir, &project);
    promote(&reg, &repo, "v1");
    wait_serving(app_port, &format!("v1-{nonce}"));
    settled(&cfg);

    let prober = Prober::start(app_port);
    // A healthy release.
    promote(&reg, &repo, "v2");
    wait_serving(app_port, &format!("v2-{nonce}"));
    settled(&cfg);
    // An unhealthy one (healthy by its healthcheck, but its probe fails: asked of the
    // new container, not of the live one behind the public port).
    promote(&reg, &repo, "v3");
    wait_until("the unhealthy release is rolled back", 90, || {
        let h = history(&cfg);
        h[0]["kind"] == "rollback" && h[0]["state"] == "success"
    });
    let h = settled(&cfg);
    assert!(
        h[1]["error"].as_str().unwrap().contains("/ready"),
        "{:?}",
        h[1]
    );
    // A manual rollback.
    let v1 = h.iter().rev().find(|d| d["state"] == "success").unwrap()["id"]
        .as_i64()
        .unwrap();
    let out = deploy_ok(&cfg, &["rollback", "web", "--to", &v1.to_string()]);
    assert!(out.contains("deployed"), "{out}");
    wait_serving(app_port, &format!("v1-{nonce}"));
    settled(&cfg);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (failed, answers) = prober.finish().await;
    let bad: Vec<&String> = answers.iter().filter(|a| !a.contains(&nonce)).collect();
    assert_eq!(failed, 0, "failed requests: {bad:?}");
    assert!(answers.len() > 50, "{}", answers.len());
    assert!(
        !answers.iter().any(|a| a.starts_with("v3")),
        "the unhealthy release was live"
    );
    assert!(answers.iter().any(|a| a.starts_with("v2")));
    // One container runs, the live one.
    let ids = run(Command::new("docker").args([
        "ps",
        "-q",
        "--filter",
        &format!("label=com.docker.compose.project={project}"),
    ]));
    assert_eq!(ids.lines().count(), 1, "{ids}");
    let _ = Command::new("docker")
        .arg("rmi")
        .arg("-f")
        .args(["v1", "v2", "v3"].map(|v| format!("{}/{repo}:{v}", reg.host())))
        .output();
}

/// Issue 15, faster health: a new container that crashes ends the deploy while compose
/// is still replacing another service (whose old container takes its 10 s stop timeout:
/// busybox httpd ignores SIGTERM), at the crash's first restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_crashing_service_ends_the_deploy_before_compose_is_done_with_the_others() {
    require_tool("docker-compose", "apt-get install -y docker-compose");
    require_tool("curl", "apt-get install -y curl");
    let reg = TestRegistry::start();
    let d = Docker::new();
    d.login(reg.host(), "admin", ADMIN_PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let nonce = nonce();
    let repo = format!("team/early{nonce}");
    for (v, kind) in [
        ("v1", Kind::Healthy),
        ("v2", Kind::Healthy),
        ("crash", Kind::Crashing),
    ] {
        let image = format!("{}/{repo}:{v}", reg.host());
        build_version(&d, dir.path(), &image, &format!("{v}-{nonce}"), kind);
    }
    let (app_port, agent_port) = (free_port(), free_port());
    let stack_dir = dir.path().join("stack");
    std::fs::create_dir_all(&stack_dir).unwrap();
    // `fast` stops in a second; `slow` waits out the default 10 s.
    std::fs::write(
        stack_dir.join("compose.yml"),
        format!(
            "services:\n  fast:\n    image: {r}/{repo}:prod\n    restart: always\n    stop_grace_period: 1s\n\
             \x20 slow:\n    image: {r}/{repo}:prod\n    ports: [\"127.0.0.1:{app_port}:8080\"]\n",
            r = reg.host()
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("token"), ADMIN_PASSWORD).unwrap();
    let project = format!("wharf-early-{nonce}");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{agent_port}\"\nregistry = \"{}\"\nusername = \"admin\"\n\
             token_file = \"token\"\npoll_interval_s = 0\n\n\
             [[stacks]]\nname = \"web\"\nproject = \"{project}\"\nworkdir = \"stack\"\n\
             files = [\"compose.yml\"]\nhealth_timeout_s = 30\n[stacks.services]\n\
             fast = \"{repo}:prod\"\nslow = \"{repo}:prod\"\n",
            reg.host()
        ),
    )
    .unwrap();
    let _stack = Stack::start(&cfg, agent_port, &stack_dir, &project);
    deploy_ok(&cfg, &["now", "web", "--tag", "v1"]);
    wait_serving(app_port, &format!("v1-{nonce}"));
    let err = deploy_fails(
        &cfg,
        &[
            "now",
            "web",
            "--service",
            "fast=crash",
            "--service",
            "slow=v2",
        ],
    );
    let h = settled(&cfg);
    assert!(err.contains("rolled back"), "{err}\n{h:#?}");
    let error = h[1]["error"].as_str().unwrap();
    assert!(error.contains("service fast is unhealthy"), "{error}");
    assert!(
        error.contains("seen while compose was still bringing up the others"),
        "{error}"
    );
    let restarts: u64 = error
        .split("restarts ")
        .nth(1)
        .and_then(|n| n.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{error}"));
    assert!(restarts <= 1, "{error}");
    wait_serving(app_port, &format!("v1-{nonce}"));
    let _ = Command::new("docker")
        .arg("rmi")
        .arg("-f")
        .args(["v1", "v2", "crash"].map(|v| format!("{}/{repo}:{v}", reg.host())))
        .output();
}
