//! The agent's access to the registry: its token, the client that logs in with it, the
//! engine's `docker login`, and what happens when that access stops working.
//!
//! The token is read from `WHARF_AGENT_REGISTRY_TOKEN` or `token_file`; the file is
//! read again every few seconds, so a new token takes effect without a restart. When
//! the registry cannot be reached or refuses the token, following waits with a growing
//! pause between tries (so a revoked token is not tried at every poll), one
//! notification says so, and one more says when it works again. A token that expires
//! within [`WARN_BEFORE_S`] is reported in `status` and notified once.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::auth::Secret;
use crate::client::{Client, Credentials};
use crate::time::rfc3339;

/// How long before its token expires the agent starts to warn.
pub const WARN_BEFORE_S: i64 = 7 * 24 * 3600;
/// The longest pause between two tries while the registry refuses or is away.
const MAX_BACKOFF: Duration = Duration::from_secs(15 * 60);

/// What failed, from the least to the most it proves when it works: the agent's own
/// lookups on the registry, the engine's `docker login`, the engine's pull. A success
/// ends a problem of its kind or a lesser one, so a lookup that works does not end a
/// pull problem (a full disk, an engine that cannot reach the registry): it is said once
/// and backs off like the others.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Kind {
    Api,
    Login,
    Pull,
}

struct Problem {
    kind: Kind,
    error: String,
    since: i64,
    failures: u32,
    next_try: Instant,
}

struct Inner {
    /// The token now in use (None: none could be read; `read_error` says why).
    token: Option<Secret>,
    read_error: Option<String>,
    client: Option<Arc<Client>>,
    logged_in: bool,
    problem: Option<Problem>,
    /// Whether this token's coming expiry was notified: once per token.
    warned_expiry: bool,
}

pub struct Access {
    registry: String,
    host: String,
    username: String,
    token_file: Option<PathBuf>,
    scopes: Vec<String>,
    docker_config: PathBuf,
    base_backoff: Duration,
    inner: Mutex<Inner>,
}

/// Whether a registry error is about the token rather than the network.
fn refused(error: &str) -> bool {
    let e = error.to_ascii_lowercase();
    e.contains("refused to log in") || e.contains("unauthorized") || e.contains("denied")
}

impl Access {
    pub fn new(
        config: &super::config::AgentConfig,
        scopes: Vec<String>,
        docker_config: &Path,
    ) -> anyhow::Result<Access> {
        let (_, host) = crate::client::endpoint(&config.registry)?;
        let a = Access {
            registry: config.registry.clone(),
            host,
            username: config.username.clone(),
            token_file: config.token_file.clone(),
            scopes,
            docker_config: docker_config.to_owned(),
            base_backoff: Duration::from_secs(config.poll_interval_s.clamp(1, 60)),
            inner: Mutex::new(Inner {
                token: None,
                read_error: None,
                client: None,
                logged_in: false,
                problem: None,
                warned_expiry: false,
            }),
        };
        a.refresh_token();
        Ok(a)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read_token(&self) -> anyhow::Result<Secret> {
        super::config::read_token(self.token_file.as_deref())
    }

    /// Reads the token again; true if it changed (the client is rebuilt, the engine
    /// logs in again at the next pull, and the pause between tries starts over).
    pub fn refresh_token(&self) -> bool {
        let read = self.read_token();
        let mut g = self.lock();
        match read {
            Ok(t) => {
                g.read_error = None;
                if g.token.as_ref().map(|c| c.expose()) == Some(t.expose()) {
                    return false;
                }
                let mut client = match Client::new(
                    &self.registry,
                    Some(Credentials::Basic {
                        user: self.username.clone(),
                        password: t.clone(),
                    }),
                ) {
                    Ok(c) => c,
                    Err(e) => {
                        g.read_error = Some(format!("{e:#}"));
                        return false;
                    }
                };
                for s in &self.scopes {
                    client = client.with_scope(s.clone());
                }
                let first = g.token.is_none();
                g.token = Some(t);
                g.client = Some(Arc::new(client));
                g.logged_in = false;
                g.warned_expiry = false;
                if let Some(p) = &mut g.problem {
                    p.failures = 0;
                    p.next_try = Instant::now();
                }
                if !first {
                    tracing::info!("agent: the registry token changed; using the new one");
                }
                true
            }
            Err(e) => {
                let e = format!("{e:#}");
                if g.read_error.as_deref() != Some(&e) {
                    tracing::warn!("agent: cannot read the registry token: {e}");
                }
                g.read_error = Some(e);
                false
            }
        }
    }

    /// The client of the current token.
    pub fn client(&self) -> anyhow::Result<Arc<Client>> {
        let g = self.lock();
        match (&g.client, &g.read_error) {
            (Some(c), _) => Ok(Arc::clone(c)),
            (None, Some(e)) => anyhow::bail!("no registry token: {e}"),
            (None, None) => anyhow::bail!("no registry token"),
        }
    }

    /// Whether following may talk to the registry now (false while it pauses after a
    /// failure).
    pub fn may_try(&self) -> bool {
        self.lock()
            .problem
            .as_ref()
            .is_none_or(|p| Instant::now() >= p.next_try)
    }

    /// Whether access is failing now.
    pub fn failing(&self) -> bool {
        self.lock().problem.is_some()
    }

    /// Whether the engine is logged in with the current token.
    pub fn logged_in(&self) -> bool {
        self.lock().logged_in
    }

    /// Records a failure; the notification to send when access has just stopped working.
    pub fn failed(&self, kind: Kind, error: &str) -> Option<String> {
        let mut g = self.lock();
        let now = crate::auth::now_secs();
        let expired = g
            .client
            .as_ref()
            .and_then(|c| c.credential_expires_at())
            .filter(|at| *at <= now && refused(error));
        let error = match expired {
            Some(at) => format!(
                "the registry token expired at {}: {error}",
                rfc3339(at * 1000)
            ),
            None => error.to_owned(),
        };
        let first = g.problem.is_none();
        if let Some(p) = &mut g.problem {
            if Instant::now() < p.next_try {
                // Another stack in the same round: one failure, not one per stack.
                p.error = error;
                return None;
            }
        }
        let p = g.problem.get_or_insert(Problem {
            kind,
            error: error.clone(),
            since: now,
            failures: 0,
            next_try: Instant::now(),
        });
        p.error = error.clone();
        p.kind = kind;
        p.failures = p.failures.saturating_add(1);
        let pause = self
            .base_backoff
            .saturating_mul(1u32 << (p.failures - 1).min(16))
            .min(MAX_BACKOFF);
        p.next_try = Instant::now() + pause;
        tracing::warn!(
            "agent: the registry at {} cannot be used ({error}); deploys of new releases wait, next try in {}s",
            self.host,
            pause.as_secs()
        );
        if !first {
            return None;
        }
        let what = if kind == Kind::Pull && !refused(&error) {
            "cannot be pulled from by the docker engine on this server (its disk, its network or its settings?)".to_owned()
        } else if refused(&error) {
            format!(
                "refuses the agent's token for {}: give it a new token (token_file is read again by itself)",
                self.username
            )
        } else {
            "cannot be reached".to_owned()
        };
        Some(format!(
            "wharf: the registry at {} {what}. New releases are not deployed until it works again; the stacks keep running what they run. ({error})",
            self.host
        ))
    }

    /// Records a success; the notifications to send (access works again, the token
    /// expires soon).
    pub fn succeeded(&self, kind: Kind) -> Vec<String> {
        let mut g = self.lock();
        let mut out = Vec::new();
        let ends = g.problem.as_ref().is_some_and(|p| p.kind <= kind);
        if let Some(p) = g.problem.take_if(|_| ends) {
            out.push(format!(
                "wharf: the registry at {} works for the agent again (it failed {} time(s) since {}: {})",
                self.host,
                p.failures,
                rfc3339(p.since * 1000),
                p.error
            ));
        }
        let now = crate::auth::now_secs();
        let expires = g.client.as_ref().and_then(|c| c.credential_expires_at());
        if let Some(at) = expires {
            if at - now < WARN_BEFORE_S && !g.warned_expiry {
                g.warned_expiry = true;
                out.push(format!(
                    "wharf: the agent's registry token for {} expires at {} (in {} day(s)); create a new one (`wharf token create ... --expires 1y`) and write it to the token file",
                    self.username,
                    rfc3339(at * 1000),
                    (at - now).max(0) / 86400
                ));
            }
        }
        out
    }

    /// Logs the engine in with the current token unless it already is.
    pub async fn docker_login(&self) -> anyhow::Result<()> {
        let token = {
            let g = self.lock();
            if g.logged_in {
                return Ok(());
            }
            g.token.clone()
        };
        let Some(token) = token else {
            return Err(self
                .client()
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("no registry token")));
        };
        super::compose::login(
            &self.docker_config,
            &self.host,
            &self.username,
            token.expose(),
        )
        .await?;
        let mut g = self.lock();
        if g.token.as_ref().map(|t| t.expose()) == Some(token.expose()) {
            g.logged_in = true;
        }
        Ok(())
    }

    /// For `deploy status`.
    pub fn status(&self) -> Value {
        let g = self.lock();
        let now = crate::auth::now_secs();
        let expires = g.client.as_ref().and_then(|c| c.credential_expires_at());
        let warning = match (&g.problem, &g.read_error, expires) {
            (Some(p), _, _) => Some(p.error.clone()),
            (None, Some(e), _) => Some(format!("cannot read the registry token: {e}")),
            (None, None, Some(at)) if at - now < WARN_BEFORE_S => Some(format!(
                "the registry token expires in {} day(s); create a new one and write it to the token file",
                (at - now).max(0) / 86400
            )),
            _ => None,
        };
        json!({
            "url": self.registry,
            "username": self.username,
            "ok": g.problem.is_none() && g.client.is_some(),
            "error": g.problem.as_ref().map(|p| p.error.clone()),
            "failing_since": g.problem.as_ref().map(|p| p.since * 1000),
            "failures": g.problem.as_ref().map_or(0, |p| p.failures),
            "next_try_in_s": g.problem.as_ref().map(|p| p.next_try.saturating_duration_since(Instant::now()).as_secs()),
            "token_expires_at": expires.map(|at| at * 1000),
            "token_days_left": expires.map(|at| (at - now).max(0) / 86400),
            "warning": warning,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(dir: &Path) -> Access {
        std::fs::write(dir.join("token"), "wharf_test_token_0123456789").unwrap();
        std::fs::write(
            dir.join("agent.toml"),
            "registry = \"127.0.0.1:9\"\nusername = \"deployer\"\ntoken_file = \"token\"\n\
             poll_interval_s = 1\nstacks = []\n",
        )
        .unwrap();
        let c = super::super::config::AgentConfig::load(&dir.join("agent.toml")).unwrap();
        Access::new(&c, vec![], &dir.join("docker")).unwrap()
    }

    #[test]
    fn a_pull_problem_is_said_once_and_only_a_pull_ends_it() {
        let dir = tempfile::tempdir().unwrap();
        let a = access(dir.path());
        let first = a.failed(Kind::Pull, "docker pull x failed: no space left on device");
        assert!(
            first
                .unwrap()
                .contains("cannot be pulled from by the docker engine")
        );
        // The registry answers lookups meanwhile: that is no recovery of the pull.
        assert!(a.succeeded(Kind::Api).is_empty());
        assert!(a.failing() && !a.may_try());
        assert_eq!(a.failed(Kind::Pull, "again"), None, "said twice");
        let back = a.succeeded(Kind::Pull);
        assert_eq!(back.len(), 1, "{back:?}");
        assert!(back[0].contains("works for the agent again"));
        assert!(!a.failing() && a.may_try());
        // A lookup problem ends with a lookup that works.
        assert!(a.failed(Kind::Api, "cannot reach the registry").is_some());
        assert_eq!(a.succeeded(Kind::Api).len(), 1);
    }

    #[test]
    fn a_token_refused_is_named_and_a_new_token_file_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let a = access(dir.path());
        let m = a
            .failed(
                Kind::Api,
                "the registry refused to log in deployer: 401 UNAUTHORIZED",
            )
            .unwrap();
        assert!(m.contains("refuses the agent's token for deployer"), "{m}");
        assert!(!a.may_try());
        assert!(!a.refresh_token(), "the same token is no change");
        std::fs::write(dir.path().join("token"), "wharf_new_token_0123456789\n").unwrap();
        assert!(a.refresh_token());
        // The pause starts over for the new token; the problem stays until it works.
        assert!(a.may_try() && a.failing());
        // An empty file (written in two steps, say) keeps the token in use.
        std::fs::write(dir.path().join("token"), "").unwrap();
        assert!(!a.refresh_token());
        assert!(a.client().is_ok());
    }
}
