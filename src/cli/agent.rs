//! `wharf agent` (the deploy agent) and `wharf deploy` (its client).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Subcommand;
use serde_json::Value;
use wharf::agent::config::AgentConfig;
use wharf::agent::{Agent, api};
use wharf::time::rfc3339;

/// `wharf agent --config agent.toml` (the global `--config`, or WHARF_CONFIG).
#[derive(clap::Args, Debug)]
pub struct AgentArgs {}

/// The agent's API token: `<data>/api.token`, made on first start (mode 0600).
fn api_token(data: &Path, create: bool) -> anyhow::Result<String> {
    let path = data.join("api.token");
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    if !create {
        bail!("{} is empty", path.display());
    }
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("system randomness");
    let token = hex::encode(b);
    std::fs::create_dir_all(data)?;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(token.as_bytes())?;
    Ok(token)
}

pub fn agent(_: AgentArgs, config: Option<&Path>) -> anyhow::Result<()> {
    let config =
        config.context("give the agent's configuration: wharf agent --config agent.toml")?;
    let config = AgentConfig::load(config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let shutdown = super::shutdown_signal()?;
        let token = api_token(&config.data, true)?;
        let listen = config.listen.clone();
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        // The proxies hold a connection each per client: room for them, as the registry.
        let proxies: usize = config.stacks.iter().map(|s| s.proxy.len()).sum();
        wharf::server::raise_descriptor_limit(
            (proxies * 2 * wharf::agent::proxy::MAX_CONNECTIONS).max(64),
        );
        let agent = Agent::start(config).await?;
        tokio::spawn(Arc::clone(&agent).poll());
        let app = api::router(Arc::new(api::ApiState {
            agent: Arc::clone(&agent),
            api_token: token,
        }));
        tracing::info!("wharf agent listening on http://{listen}");
        // At SIGTERM the running deploys end first (healthy or rolled back); requests
        // waiting for one get their answer, new ones are refused meanwhile.
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let draining = tokio::spawn(async move {
            if stop_rx.await.is_ok() {
                agent.drain().await;
            }
        });
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                shutdown.await;
                let _ = stop_tx.send(());
            })
            .await?;
        let _ = draining.await;
        tracing::info!("wharf agent stopped");
        Ok(())
    })
}

#[derive(clap::Args, Debug)]
pub struct DeployArgs {
    #[command(subcommand)]
    cmd: DeployCmd,
    /// The agent's configuration: its address and API token are read from it
    #[arg(long, env = "WHARF_AGENT_CONFIG", value_name = "FILE", global = true)]
    agent_config: Option<PathBuf>,
    /// The agent's URL [default: from --agent-config]
    #[arg(long, env = "WHARF_AGENT_URL", value_name = "URL", global = true)]
    agent: Option<String>,
    /// The agent's API token [default: from --agent-config's data directory]
    #[arg(
        long,
        env = "WHARF_AGENT_TOKEN",
        value_name = "TOKEN",
        global = true,
        hide_env_values = true
    )]
    agent_token: Option<String>,
    /// Print the agent's answer as JSON (every deploy command).
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum DeployCmd {
    /// What each stack runs and its last deploy.
    Status,
    /// Every deploy and rollback of a stack, newest first.
    History { stack: String },
    /// Deploy now: the followed tags, or --tag for every service, or --service svc=tag
    /// (a version named holds the stack there until `resume`).
    Now {
        stack: String,
        #[arg(long)]
        tag: Option<String>,
        #[arg(long = "service", value_name = "SERVICE=TAG")]
        services: Vec<String>,
        /// Deploy even a quarantined digest, even while the stack is held.
        #[arg(long)]
        force: bool,
    },
    /// Follow the tags again after a hold, deploying what they point at now.
    Resume { stack: String },
    /// Hold the stack where it is: following waits for `resume`.
    Pause { stack: String },
    /// Go back: to a past deploy (--to ID), a tag (--tag), a digest (--digest), or by
    /// default to the healthy deploy before the current one.
    Rollback {
        stack: String,
        #[arg(long, conflicts_with_all = ["tag", "digest"])]
        to: Option<i64>,
        #[arg(long, conflicts_with = "digest")]
        tag: Option<String>,
        #[arg(long)]
        digest: Option<String>,
    },
}

/// `api=v1.4.2 (sha256:0123456789ab) web=sha256:...`: each service's version where
/// one is known, and its digest.
fn short(pins: &Value, versions: &Value) -> String {
    let map = |v: &Value| -> Option<std::collections::BTreeMap<String, String>> {
        serde_json::from_value(v.clone()).ok()
    };
    match map(pins) {
        Some(p) => wharf::agent::describe_with(&p, &map(versions).unwrap_or_default(), " "),
        None => "-".into(),
    }
}

/// One line for a deploy's answer.
fn outcome_text(stack: &str, v: &Value) -> String {
    let id = |k: &str| v[k].as_i64().map_or("-".into(), |i| format!("#{i}"));
    let error = v["error"].as_str().unwrap_or("");
    match v["result"].as_str().unwrap_or("") {
        "deployed" => {
            let versions: Vec<String> = v["versions"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(s, ver)| format!("{s}={}", ver.as_str().unwrap_or("")))
                .collect();
            if versions.is_empty() {
                format!("{stack}: deployed ({})", id("id"))
            } else {
                format!("{stack}: deployed {} ({})", versions.join(" "), id("id"))
            }
        }
        "unchanged" => format!(
            "{stack}: unchanged, it runs what deploy {} deployed",
            id("deploy")
        ),
        "held" => format!(
            "{stack}: held at {} by {}; following waits for `wharf deploy resume {stack}`",
            id("deploy"),
            v["actor"].as_str().unwrap_or("-")
        ),
        "quarantined" => format!(
            "{stack}: not deployed: {} quarantined ({})",
            v["services"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            v["reason"].as_str().unwrap_or("")
        ),
        "rolled_back" => format!(
            "{stack}: deploy {} was unhealthy ({error}); rolled back ({})",
            id("id"),
            id("rollback")
        ),
        "failed" => format!("{stack}: deploy {} FAILED: {error}", id("id")),
        _ if v.get("held").is_some() => format!(
            "{stack}: held at {}; following waits for `wharf deploy resume {stack}`",
            id("deploy")
        ),
        _ => v.to_string(),
    }
}

pub fn deploy(a: DeployArgs) -> anyhow::Result<()> {
    let (url, token) = match (&a.agent, &a.agent_token, &a.agent_config) {
        (Some(u), Some(t), _) => (u.clone(), t.clone()),
        (u, t, Some(cfg)) => {
            let c = AgentConfig::load(cfg)?;
            (
                u.clone().unwrap_or_else(|| format!("http://{}", c.listen)),
                match t {
                    Some(t) => t.clone(),
                    None => api_token(&c.data, false)?,
                },
            )
        }
        _ => bail!(
            "which agent? give --agent-config FILE (or WHARF_AGENT_CONFIG), or --agent URL with --agent-token"
        ),
    };
    let url = url.trim_end_matches('/').to_owned();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(900))
            .build()?;
        let call = |method: reqwest::Method, path: String, body: Option<Value>| {
            let (http, url, token) = (http.clone(), url.clone(), token.clone());
            async move {
                let mut rb = http
                    .request(method, format!("{url}{path}"))
                    .bearer_auth(token);
                if let Some(b) = body {
                    rb = rb.json(&b);
                }
                let r = rb
                    .send()
                    .await
                    .with_context(|| format!("cannot reach the agent at {url}"))?;
                let status = r.status();
                let v: Value = r.json().await.unwrap_or(Value::Null);
                if !status.is_success() {
                    bail!(
                        "the agent answered {status}: {}",
                        v.get("error").and_then(|e| e.as_str()).unwrap_or("")
                    );
                }
                Ok(v)
            }
        };
        let actor = format!(
            "cli:{}",
            std::env::var("USER").unwrap_or_else(|_| "unknown".into())
        );
        let json = a.json;
        let print_outcome = |stack: &str, v: &Value| -> anyhow::Result<()> {
            if json {
                out!("{}", serde_json::to_string_pretty(v)?);
            } else {
                out!("{}", outcome_text(stack, v));
            }
            match v.get("result").and_then(|r| r.as_str()) {
                Some("failed") => bail!("the deploy failed"),
                Some("rolled_back") => bail!("the deploy was unhealthy and was rolled back"),
                Some("quarantined") => bail!(
                    "not deployed: the release was unhealthy before{} and is quarantined (`deploy now --force` deploys it anyway)",
                    v["deploy"]
                        .as_i64()
                        .map(|d| format!(" (deploy #{d})"))
                        .unwrap_or_default()
                ),
                _ => Ok(()),
            }
        };
        match a.cmd {
            DeployCmd::Status => {
                let v = call(reqwest::Method::GET, "/api/status".into(), None).await?;
                if json {
                    out!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    let r = &v["registry"];
                    let left = r["token_days_left"]
                        .as_i64()
                        .map(|d| format!(", token expires in {d} day(s)"))
                        .unwrap_or_default();
                    if r["ok"].as_bool() == Some(true) {
                        out!(
                            "registry     {} as {}: ok{left}",
                            r["url"].as_str().unwrap_or(""),
                            r["username"].as_str().unwrap_or("")
                        );
                    } else {
                        out!(
                            "registry     {} as {}: FAILING since {} ({} tries, next in {}s){left}",
                            r["url"].as_str().unwrap_or(""),
                            r["username"].as_str().unwrap_or(""),
                            r["failing_since"].as_i64().map(rfc3339).unwrap_or("-".into()),
                            r["failures"].as_i64().unwrap_or(0),
                            r["next_try_in_s"].as_i64().unwrap_or(0)
                        );
                    }
                    if let Some(w) = r["warning"].as_str() {
                        out!("{:<12} WARNING: {w}", "");
                    }
                    for s in v["stacks"].as_array().into_iter().flatten() {
                        let last = &s["last"];
                        out!(
                            "{:<12} {} {}  last #{} {} {} ({})",
                            s["stack"].as_str().unwrap_or(""),
                            s["state"].as_str().unwrap_or("running"),
                            short(&s["running"], &s["versions"]),
                            last["id"].as_i64().map_or("-".into(), |i| i.to_string()),
                            last["kind"].as_str().unwrap_or("-"),
                            last["state"].as_str().unwrap_or("-"),
                            last["started_at"].as_i64().map(rfc3339).unwrap_or_default()
                        );
                        for d in s["drift"].as_array().into_iter().flatten() {
                            out!(
                                "{:<12} DRIFT: {} (`wharf deploy now {}` puts it back)",
                                "",
                                d.as_str().unwrap_or(""),
                                s["stack"].as_str().unwrap_or("")
                            );
                        }
                        let held = &s["held"];
                        if held.is_object() {
                            out!(
                                "{:<12} held at #{} by {} since {}; the followed tags point at {}",
                                "",
                                held["deploy"].as_i64().map_or("-".into(), |i| i.to_string()),
                                held["actor"].as_str().unwrap_or("-"),
                                held["since"].as_i64().map(rfc3339).unwrap_or_default(),
                                short(&s["followed_now"], &Value::Null)
                            );
                        }
                        for q in s["quarantined"].as_array().into_iter().flatten() {
                            let image = q["image"].as_str().unwrap_or("");
                            let d = image.rsplit_once('@').map_or(image, |(_, d)| d);
                            out!(
                                "{:<12} quarantined {}={} since {}: {}",
                                "",
                                q["service"].as_str().unwrap_or(""),
                                d.get(..19).unwrap_or(d),
                                q["since"].as_i64().map(rfc3339).unwrap_or_default(),
                                q["reason"].as_str().unwrap_or("")
                            );
                        }
                    }
                }
            }
            DeployCmd::History { stack } => {
                let v = call(
                    reqwest::Method::GET,
                    format!("/api/stacks/{stack}/history"),
                    None,
                )
                .await?;
                if json {
                    out!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    out!(
                        "{:<5} {:<9} {:<12} {:<10} {:<20} {:<8} AFTER / ERROR",
                        "ID",
                        "KIND",
                        "TRIGGER",
                        "STATE",
                        "STARTED",
                        "SECONDS"
                    );
                    for d in v.as_array().into_iter().flatten() {
                        let secs = match (d["started_at"].as_i64(), d["finished_at"].as_i64()) {
                            (Some(a), Some(b)) => format!("{:.1}", (b - a) as f64 / 1000.0),
                            _ => "-".into(),
                        };
                        out!(
                            "{:<5} {:<9} {:<12} {:<10} {:<20} {:<8} {}{}",
                            d["id"].as_i64().map_or("-".into(), |i| i.to_string()),
                            d["kind"].as_str().unwrap_or(""),
                            d["trigger"].as_str().unwrap_or(""),
                            d["state"].as_str().unwrap_or(""),
                            d["started_at"].as_i64().map(rfc3339).unwrap_or_default(),
                            secs,
                            short(&d["after"], &d["versions"]),
                            d["error"]
                                .as_str()
                                .map(|e| format!("  ({e})"))
                                .unwrap_or_default()
                        );
                    }
                }
            }
            DeployCmd::Resume { stack } => {
                let v = call(
                    reqwest::Method::POST,
                    format!("/api/stacks/{stack}/resume"),
                    Some(serde_json::json!({ "actor": actor })),
                )
                .await?;
                print_outcome(&stack, &v)?;
            }
            DeployCmd::Pause { stack } => {
                let v = call(
                    reqwest::Method::POST,
                    format!("/api/stacks/{stack}/pause"),
                    Some(serde_json::json!({ "actor": actor })),
                )
                .await?;
                print_outcome(&stack, &v)?;
            }
            DeployCmd::Now {
                stack,
                tag,
                services,
                force,
            } => {
                let mut map = serde_json::Map::new();
                for s in &services {
                    let (svc, t) = s
                        .split_once('=')
                        .with_context(|| format!("--service {s:?}: expected SERVICE=TAG"))?;
                    map.insert(svc.to_owned(), Value::String(t.to_owned()));
                }
                let body = serde_json::json!({ "tag": tag, "services": map, "actor": actor, "force": force });
                let v = call(
                    reqwest::Method::POST,
                    format!("/api/stacks/{stack}/deploy"),
                    Some(body),
                )
                .await?;
                print_outcome(&stack, &v)?;
            }
            DeployCmd::Rollback {
                stack,
                to,
                tag,
                digest,
            } => {
                let body =
                    serde_json::json!({ "to": to, "tag": tag, "digest": digest, "actor": actor });
                let v = call(
                    reqwest::Method::POST,
                    format!("/api/stacks/{stack}/rollback"),
                    Some(body),
                )
                .await?;
                print_outcome(&stack, &v)?;
            }
        }
        Ok(())
    })
}
