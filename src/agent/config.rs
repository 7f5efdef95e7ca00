//! `agent.toml`: where the agent listens, the registry it pulls from, and its stacks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::client::ImageRef;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The agent's HTTP API and hooks [default: 127.0.0.1:5050].
    #[serde(default = "default_listen")]
    pub listen: String,
    /// History database and the agent's docker login [default: ./wharf-agent].
    #[serde(default = "default_data")]
    pub data: PathBuf,
    /// The registry: `host:port` or a URL.
    pub registry: String,
    /// The user of the read-only access token.
    pub username: String,
    /// A file holding the registry access token (or set WHARF_AGENT_REGISTRY_TOKEN).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Verifies the registry's webhook signatures (`POST /hooks/registry`).
    #[serde(default)]
    pub webhook_secret: Option<String>,
    /// The bearer token of `POST /hooks/deploy/<stack>`.
    #[serde(default)]
    pub deploy_token: Option<String>,
    /// How often followed tags are checked, as a fallback to webhooks (0: never).
    #[serde(default = "default_poll")]
    pub poll_interval_s: u64,
    /// Slack-compatible incoming webhook for deploy results.
    #[serde(default)]
    pub notify_url: Option<String>,
    /// Webhooks older than this are refused (replay window).
    #[serde(default = "default_window")]
    pub webhook_max_age_s: i64,
    /// A webhook or poll waits this long before it deploys, so the several tags one
    /// release moves (`prod`, `latest`, `main-abc1234`) give one deploy.
    #[serde(default = "default_coalesce")]
    pub coalesce_ms: u64,
    /// Images the agent pulled that stay on the server per service, the running one
    /// included, for rollbacks without the registry; older ones are removed after each
    /// deploy (0: never remove any).
    #[serde(default = "default_keep_images")]
    pub keep_images: usize,
    pub stacks: Vec<StackConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StackConfig {
    pub name: String,
    /// The compose project name [default: the stack's name].
    #[serde(default)]
    pub project: Option<String>,
    /// Compose files, relative to `workdir`.
    pub files: Vec<PathBuf>,
    #[serde(default)]
    pub env_file: Option<PathBuf>,
    pub workdir: PathBuf,
    /// Service → the image it follows (`team/api:prod`, on the agent's registry).
    pub services: BTreeMap<String, String>,
    /// Service → an HTTP URL that must answer 2xx for the service to be healthy (else
    /// the container's own healthcheck, else "running and not restarting").
    #[serde(default)]
    pub probes: BTreeMap<String, String>,
    /// How long a deploy may take to become healthy.
    #[serde(default = "default_health_timeout")]
    pub health_timeout_s: u64,
    /// Service → the zero-downtime proxy in front of it (see `agent::proxy`).
    #[serde(default)]
    pub proxy: BTreeMap<String, ProxyConfig>,
}

/// A service behind the agent's proxy: the agent listens on `listen` and forwards to
/// port `port` of the live container; the service itself publishes no port.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    pub listen: std::net::SocketAddr,
    /// The port the container listens on, on its own address.
    pub port: u16,
    /// After a switch, how long requests still at the old container may take.
    #[serde(default = "default_drain")]
    pub drain_s: u64,
    /// `docker stop` time of the old container, after the drain.
    #[serde(default = "default_stop")]
    pub stop_timeout_s: u64,
}

fn default_drain() -> u64 {
    30
}

fn default_stop() -> u64 {
    10
}

fn default_listen() -> String {
    "127.0.0.1:5050".into()
}
fn default_data() -> PathBuf {
    PathBuf::from("./wharf-agent")
}
fn default_poll() -> u64 {
    60
}
fn default_window() -> i64 {
    300
}
fn default_keep_images() -> usize {
    3
}

fn default_coalesce() -> u64 {
    1000
}
fn default_health_timeout() -> u64 {
    120
}

impl StackConfig {
    pub fn project(&self) -> &str {
        self.project.as_deref().unwrap_or(&self.name)
    }

    /// Each service's followed image.
    pub fn images(&self) -> anyhow::Result<BTreeMap<String, ImageRef>> {
        self.services
            .iter()
            .map(|(svc, image)| {
                let r = ImageRef::parse(image, Some("latest"))
                    .with_context(|| format!("stack {}: service {svc}", self.name))?;
                if r.tag().is_none() {
                    bail!(
                        "stack {}: service {svc} must follow a tag, not a digest",
                        self.name
                    );
                }
                Ok((svc.clone(), r))
            })
            .collect()
    }
}

impl AgentConfig {
    pub fn load(path: &Path) -> anyhow::Result<AgentConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let c: AgentConfig = toml::from_str(&text)
            .with_context(|| format!("{} is not a valid agent config", path.display()))?;
        // Relative paths are relative to the config file.
        let base = path.parent().unwrap_or(Path::new("."));
        let mut c = c;
        if c.data.is_relative() {
            c.data = base.join(&c.data);
        }
        if let Some(t) = &c.token_file {
            if t.is_relative() {
                c.token_file = Some(base.join(t));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        let mut listens = std::collections::BTreeSet::new();
        for s in &mut c.stacks {
            if s.workdir.is_relative() {
                s.workdir = base.join(&s.workdir);
            }
            if !crate::oci::name::valid_tag(&s.name) || !names.insert(s.name.clone()) {
                bail!("stack name {:?} is invalid or repeated", s.name);
            }
            if s.files.is_empty() || s.services.is_empty() {
                bail!("stack {} needs compose files and services", s.name);
            }
            s.images()?;
            if let Some(p) = s.probes.keys().find(|p| !s.services.contains_key(*p)) {
                bail!(
                    "stack {}: probe for {p:?}, which is not one of its services",
                    s.name
                );
            }
            if let Some(p) = s.proxy.keys().find(|p| !s.services.contains_key(*p)) {
                bail!(
                    "stack {}: proxy for {p:?}, which is not one of its services",
                    s.name
                );
            }
            for (svc, p) in &s.proxy {
                if !listens.insert(p.listen) {
                    bail!(
                        "stack {}: the proxy of {svc} listens on {}, as another proxy does",
                        s.name,
                        p.listen
                    );
                }
            }
            for (svc, url) in &s.probes {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    bail!(
                        "stack {}: the probe of {svc} must be an http(s) URL, not {url:?}",
                        s.name
                    );
                }
            }
        }
        crate::client::endpoint(&c.registry)?;
        Ok(c)
    }

    /// The registry token: WHARF_AGENT_REGISTRY_TOKEN, else `token_file`.
    pub fn registry_token(&self) -> anyhow::Result<crate::auth::Secret> {
        read_token(self.token_file.as_deref())
    }

    pub fn stack(&self, name: &str) -> Option<&StackConfig> {
        self.stacks.iter().find(|s| s.name == name)
    }
}

/// The registry token: WHARF_AGENT_REGISTRY_TOKEN, else the file at `path`.
pub fn read_token(path: Option<&Path>) -> anyhow::Result<crate::auth::Secret> {
    if let Ok(t) = std::env::var("WHARF_AGENT_REGISTRY_TOKEN") {
        if !t.is_empty() {
            return Ok(crate::auth::Secret::new(t));
        }
    }
    read_token_file(path)
}

/// The token in `path`, trimmed.
fn read_token_file(path: Option<&Path>) -> anyhow::Result<crate::auth::Secret> {
    let path =
        path.context("give the registry token in token_file or WHARF_AGENT_REGISTRY_TOKEN")?;
    let t = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let t = t.trim();
    if t.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(crate::auth::Secret::new(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> anyhow::Result<AgentConfig> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, text).unwrap();
        AgentConfig::load(&p)
    }

    const HEAD: &str = "registry = \"127.0.0.1:5000\"\nusername = \"u\"\n\n";

    fn stack(name: &str, proxy: &str) -> String {
        format!(
            "[[stacks]]\nname = \"{name}\"\nworkdir = \".\"\nfiles = [\"c.yml\"]\n\
             [stacks.services]\nweb = \"team/web:prod\"\n{proxy}"
        )
    }

    #[test]
    fn proxies_are_checked_when_the_config_is_read() {
        let ok = "[stacks.proxy.web]\nlisten = \"127.0.0.1:8081\"\nport = 8080\n";
        let c = load(&format!("{HEAD}{}", stack("a", ok))).unwrap();
        let p = &c.stacks[0].proxy["web"];
        assert_eq!((p.port, p.drain_s, p.stop_timeout_s), (8080, 30, 10));
        assert_eq!(c.keep_images, 3);
        for (proxy, says) in [
            (
                "[stacks.proxy.db]\nlisten = \"127.0.0.1:8081\"\nport = 1\n",
                "not one of its services",
            ),
            (
                "[stacks.proxy.web]\nlisten = \"nowhere\"\nport = 1\n",
                "not a valid agent config",
            ),
            (
                "[stacks.proxy.web]\nlisten = \"127.0.0.1:1\"\nport = 99999\n",
                "not a valid agent config",
            ),
            (
                "[stacks.proxy.web]\nlisten = \"127.0.0.1:1\"\nport = 1\nbogus = 1\n",
                "not a valid agent config",
            ),
        ] {
            let e = load(&format!("{HEAD}{}", stack("a", proxy))).unwrap_err();
            assert!(format!("{e:#}").contains(says), "{proxy}: {e:#}");
        }
        // Two proxies on one address, in different stacks.
        let e = load(&format!("{HEAD}{}\n{}", stack("a", ok), stack("b", ok))).unwrap_err();
        assert!(format!("{e:#}").contains("as another proxy does"), "{e:#}");
    }
}
