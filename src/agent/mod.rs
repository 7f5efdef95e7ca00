//! The deploy agent: follows tags on the registry and keeps a compose stack on them,
//! health-checked, rolled back by itself when a new version is unhealthy.
//!
//! A deploy resolves each followed tag to a digest, pins every service to
//! `repo@sha256:...` in an override file, pulls, brings the changed services up, and
//! waits for them to be healthy. If they are not, the stack goes back to the digests of
//! the last healthy deploy. One deploy at a time per stack; every deploy and rollback is
//! recorded in the agent's database with what ran before and after.

pub mod access;
pub mod api;
pub mod compose;
pub mod config;
pub mod history;
pub mod proxy;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::oci::Reference;
use compose::Compose;
use config::{AgentConfig, StackConfig};
use history::{Deploy, History, NewDeploy, Pins};

/// What a deploy should run, and what it does to following.
///
/// | asked for | held? | quarantines |
/// |---|---|---|
/// | a webhook, a poll, `deploy now` | skipped while held; never to a quarantined digest | — |
/// | `deploy now --force` | deploys while held too, quarantined digests included | — |
/// | `deploy now --tag/--service`, `rollback --to/--tag/--digest` | holds the stack there | nothing |
/// | plain `rollback` | no | what it rolls away from |
/// | an unhealthy deploy, rolled back | no | the digests that were unhealthy |
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// Run this tag for every service instead of the one it follows.
    pub tag: Option<String>,
    /// Per-service tags, over `tag`.
    pub services: BTreeMap<String, String>,
    /// Exact references (`repo@sha256:...`) per service: a rollback.
    pub pins: Option<Pins>,
    /// The followed tags (a webhook, a poll, `deploy now` with no version): skipped
    /// while the stack is held, and never to a quarantined digest unless `force`.
    pub follow: bool,
    /// Deploy even a quarantined digest, even while held: on purpose.
    pub force: bool,
    /// An explicit version: once deployed, the stack is held there.
    pub hold: bool,
    /// A plain rollback: the digests rolled away from are quarantined.
    pub quarantine_current: bool,
    /// Asked by a person or CI (`deploy now`, the hook): with nothing new to deploy, a
    /// stack that drifted (a container stopped or replaced, the compose or env files
    /// edited) is brought back to what its files and pins say.
    pub repair: bool,
}

impl Target {
    /// The followed tags.
    pub fn follow() -> Target {
        Target {
            follow: true,
            ..Target::default()
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    /// The stack already runs these digests, since this deploy.
    Unchanged { deploy: Option<i64> },
    /// The followed tags point at digests quarantined for these services (rolled back
    /// from before: `deploy` showed them bad, for `reason`); nothing was deployed.
    Quarantined {
        services: Vec<String>,
        deploy: Option<i64>,
        reason: Option<String>,
    },
    /// The stack is held on an explicit version; following waits for `resume`.
    Held {
        deploy: Option<i64>,
        actor: Option<String>,
    },
    Deployed {
        id: i64,
        /// service -> the version a person knows (`v1.4.2`), where one is known.
        versions: BTreeMap<String, String>,
    },
    /// The new version was unhealthy and the stack is back on the previous one.
    RolledBack {
        id: i64,
        rollback: i64,
        error: String,
    },
    /// Unhealthy, and there was nothing (or nothing healthy) to go back to.
    Failed { id: i64, error: String },
}

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("a deploy of {0} is running; try again when it ends")]
    Busy(String),
    #[error("{MAX_QUEUED} deploys of {0} are waiting already; try again when they end")]
    QueueFull(String),
    #[error("the agent is stopping; deploy again when it is back")]
    Stopping,
    #[error("no stack {0}")]
    UnknownStack(String),
    /// The request names something that is not there (a service, a tag, a deploy).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Deploys asked over HTTP that may wait for a stack at once; more are refused (429).
pub const MAX_QUEUED: usize = 16;

struct StackState {
    lock: tokio::sync::Mutex<()>,
    /// Deploys waiting for `lock` (see `MAX_QUEUED`).
    queued: std::sync::atomic::AtomicUsize,
    /// Wakes the stack's worker: a webhook or poll asks for a deploy of the followed
    /// tags. Asks while the worker is busy leave one permit, so a burst gives one more
    /// deploy at most, never one per ask.
    wake: tokio::sync::Notify,
    /// What asked first since the last deploy of the followed tags (`webhook`, `poll`).
    asked_by: std::sync::Mutex<Option<&'static str>>,
    /// While held: what the followed tags pointed at when last looked at.
    seen: std::sync::Mutex<Option<Pins>>,
}

pub struct Agent {
    pub config: AgentConfig,
    pub access: access::Access,
    compose: Compose,
    pub history: History,
    stacks: BTreeMap<String, StackState>,
    dir: PathBuf,
    http: reqwest::Client,
    /// Set at SIGTERM: no deploy starts any more (see `drain`).
    stopping: std::sync::atomic::AtomicBool,
    /// Stack → service → its zero-downtime proxy.
    proxies: BTreeMap<String, BTreeMap<String, Arc<proxy::Proxy>>>,
    /// Images a deploy has pulled and not yet recorded: never pruned meanwhile.
    pending: std::sync::Mutex<Vec<String>>,
}

impl Agent {
    pub async fn start(config: AgentConfig) -> anyhow::Result<Arc<Agent>> {
        std::fs::create_dir_all(&config.data)
            .with_context(|| format!("creating {}", config.data.display()))?;
        let history = History::open(&config.data.join("agent.db"))?;
        // A token that cannot be read is a mistake in the setup: said at once. A
        // registry that is away or refuses it is waited for (see `access`).
        config.registry_token()?;
        let docker_config = config.data.join("docker");
        let compose = Compose::detect(&docker_config).await?;
        let mut scopes = Vec::new();
        let mut stacks = BTreeMap::new();
        for s in &config.stacks {
            for image in s.images()?.values() {
                let scope = format!("repository:{}:pull", image.repo);
                if !scopes.contains(&scope) {
                    scopes.push(scope);
                }
            }
            std::fs::create_dir_all(config.data.join("stacks").join(&s.name))?;
            stacks.insert(
                s.name.clone(),
                StackState {
                    lock: tokio::sync::Mutex::new(()),
                    queued: std::sync::atomic::AtomicUsize::new(0),
                    wake: tokio::sync::Notify::new(),
                    asked_by: std::sync::Mutex::new(None),
                    seen: std::sync::Mutex::new(None),
                },
            );
        }
        tracing::info!("agent: compose is `{}`", compose.name());
        let access = access::Access::new(&config, scopes, &docker_config)?;
        let mut proxies = BTreeMap::new();
        for s in &config.stacks {
            let mut by_service = BTreeMap::new();
            for (svc, pc) in &s.proxy {
                by_service.insert(svc.clone(), proxy::Proxy::start(svc, pc.listen).await?);
            }
            proxies.insert(s.name.clone(), by_service);
        }
        let agent = Arc::new(Agent {
            dir: config.data.clone(),
            config,
            access,
            compose,
            history,
            stacks,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            stopping: std::sync::atomic::AtomicBool::new(false),
            proxies,
            pending: std::sync::Mutex::new(Vec::new()),
        });
        agent.attach_proxies().await;
        agent.login().await.ok();
        agent.recover().await;
        tokio::spawn(Arc::clone(&agent).watch_access());
        tokio::spawn(Arc::clone(&agent).report_every_hour());
        for name in agent.stacks.keys() {
            tokio::spawn(Arc::clone(&agent).worker(name.clone()));
        }
        Ok(agent)
    }

    /// At start: each proxy forwards to the running container of its service (the one
    /// on the last healthy pin, if several run after a stop mid-cutover).
    async fn attach_proxies(&self) {
        for s in &self.config.stacks {
            let file = self.override_file(&s.name);
            let healthy = self.history.last_healthy(&s.name).ok().flatten();
            for (svc, p) in self.proxies.get(&s.name).into_iter().flatten() {
                let pin = healthy.as_ref().and_then(|h| h.after.get(svc));
                let ids = self
                    .compose
                    .containers(s, &file, svc)
                    .await
                    .unwrap_or_default();
                let mut best = None;
                for id in ids {
                    let Ok(st) = compose::inspect(&id).await else {
                        continue;
                    };
                    if st.status != "running" {
                        continue;
                    }
                    let on_pin = pin.is_some_and(|p| *p == st.image);
                    if best.is_none() || on_pin {
                        best = Some(id);
                    }
                }
                if let Some(id) = best {
                    if let Ok(ip) = compose::container_ip(&id).await {
                        let port = s.proxy[svc].port;
                        p.switch(proxy::Backend::new((ip, port).into(), &id));
                    }
                }
            }
        }
    }

    fn proxy_of(&self, stack: &str, service: &str) -> Option<&Arc<proxy::Proxy>> {
        self.proxies.get(stack).and_then(|m| m.get(service))
    }

    /// A proxied service to `pin` without a refused request: the new container starts
    /// beside the live one, and gets requests only once it is healthy; the old one
    /// drains and is stopped. An unhealthy new container is removed, never live.
    /// `repair`: start a new one even if the live one already runs `pin`.
    async fn cutover(
        &self,
        stack: &StackConfig,
        file: &std::path::Path,
        svc: &str,
        pin: &str,
        repair: bool,
    ) -> Result<(), (String, Option<String>)> {
        let plain = |e: anyhow::Error| (format!("{e:#}"), None);
        let (Some(proxy), Some(pc)) = (self.proxy_of(&stack.name, svc), stack.proxy.get(svc))
        else {
            return Err((format!("{svc} has no proxy"), None));
        };
        let old = self
            .compose
            .containers(stack, file, svc)
            .await
            .map_err(plain)?;
        if let Some(live) = proxy.backend().filter(|b| old.contains(&b.container)) {
            let st = compose::inspect(&live.container).await.ok();
            let on_pin = st
                .as_ref()
                .is_some_and(|st| st.status == "running" && st.image == pin);
            if on_pin && !repair {
                // Already live (a rollback of a release that never went live): only
                // leftovers go.
                for id in old.iter().filter(|id| **id != live.container) {
                    let _ = compose::retire(id, 0).await;
                }
                return Ok(());
            }
        }
        let existing: std::collections::BTreeSet<String> = old.iter().cloned().collect();
        self.compose
            .scale_beside(stack, file, svc, old.len() + 1)
            .await
            .map_err(plain)?;
        let new: Vec<String> = self
            .compose
            .containers(stack, file, svc)
            .await
            .map_err(plain)?
            .into_iter()
            .filter(|id| !existing.contains(id))
            .collect();
        let Some(fresh) = new.first().cloned() else {
            return Err((format!("compose started no new container of {svc}"), None));
        };
        let healthy = self
            .wait_healthy(stack, file, &[svc.to_owned()], &existing, false, async {
                Ok(())
            })
            .await;
        if let Err(e) = healthy {
            for id in &new {
                let _ = compose::retire(id, 0).await;
            }
            return Err(e);
        }
        let ip = compose::container_ip(&fresh).await.map_err(plain)?;
        let before = proxy.switch(proxy::Backend::new((ip, pc.port).into(), &fresh));
        if let Some(b) = before {
            let left = b.drained(Duration::from_secs(pc.drain_s)).await;
            if left > 0 {
                tracing::warn!(service = %svc, "agent proxy: {left} request(s) still at the old container after {}s", pc.drain_s);
            }
        }
        for id in new.iter().skip(1).chain(old.iter()) {
            if let Err(e) = compose::retire(id, pc.stop_timeout_s).await {
                tracing::warn!(error = %e, "agent proxy: the old container of {svc} stays");
            }
        }
        Ok(())
    }

    fn stack(&self, name: &str) -> Result<(&StackConfig, &StackState), DeployError> {
        match (self.config.stack(name), self.stacks.get(name)) {
            (Some(c), Some(s)) => Ok((c, s)),
            _ => Err(DeployError::UnknownStack(name.to_owned())),
        }
    }

    fn override_file(&self, stack: &str) -> PathBuf {
        self.dir
            .join("stacks")
            .join(stack)
            .join("pinned.override.yml")
    }

    /// Each service's digest reference for `target`.
    async fn resolve(&self, stack: &StackConfig, target: &Target) -> Result<Pins, DeployError> {
        if let Some(p) = &target.pins {
            return Ok(p.clone());
        }
        let (_, host) = crate::client::endpoint(&self.config.registry)?;
        let images = stack.images()?;
        if let Some(svc) = target.services.keys().find(|s| !images.contains_key(*s)) {
            return Err(DeployError::Invalid(format!(
                "stack {} has no service {svc:?} (it has {})",
                stack.name,
                images.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        let mut pins = Pins::new();
        for (svc, image) in images {
            let tag = target
                .services
                .get(&svc)
                .or(target.tag.as_ref())
                .cloned()
                .unwrap_or_else(|| image.tag().unwrap_or("latest").to_owned());
            let reference = Reference::parse(&tag).map_err(|e| {
                DeployError::Invalid(format!("service {svc}: {tag:?} is not a tag: {e}"))
            })?;
            let client = self.client().await?;
            let found = client.manifest_digest(&image.repo, &reference).await;
            let digest = self.registry(found).await?.ok_or_else(|| {
                DeployError::Invalid(format!("{}:{tag} is not in the registry", image.repo))
            })?;
            pins.insert(svc, format!("{host}/{}@{digest}", image.repo));
        }
        Ok(pins)
    }

    /// What the followed tags point at now, while the stack is held (see `status`).
    pub fn seen_while_held(&self, stack: &str) -> Option<Pins> {
        self.stacks
            .get(stack)
            .and_then(|s| s.seen.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// With no history for a stack, what its containers run now (healthy or not, as
    /// docker reports), recorded as a deploy of its own: a first deploy that fails then
    /// goes back to what ran before the agent took the stack over. None if a service has
    /// no container with an image from the registry.
    async fn baseline(&self, stack: &StackConfig) -> anyhow::Result<Option<Deploy>> {
        let file = self.override_file(&stack.name);
        let (_, host) = crate::client::endpoint(&self.config.registry)?;
        let mut pins = Pins::new();
        for (svc, image) in stack.images()? {
            let ids = self
                .compose
                .containers(stack, &file, &svc)
                .await
                .unwrap_or_default();
            let Some(id) = ids.first() else {
                return Ok(None);
            };
            let Some(pin) = compose::repo_digest(id, &format!("{host}/{}", image.repo)).await
            else {
                return Ok(None);
            };
            pins.insert(svc, pin);
        }
        let versions = self.versions(&pins).await;
        let id = self.history.begin(NewDeploy {
            stack: &stack.name,
            kind: "deploy",
            trigger: "baseline",
            actor: Some("agent"),
            before: None,
            after: &pins,
            rollback_of: None,
            versions: &versions,
            config: None,
        })?;
        self.history.finish(id, "success", None, None)?;
        tracing::info!(stack = %stack.name, "agent: recorded what runs now as the baseline (#{id}): {}", describe(&pins, &versions));
        self.history.get(id)
    }

    /// Runs a deploy now; Busy if one is running for the stack.
    pub async fn deploy(
        &self,
        name: &str,
        trigger: &str,
        actor: Option<&str>,
        target: Target,
    ) -> Result<Outcome, DeployError> {
        let (stack, state) = self.stack(name)?;
        let Ok(_guard) = state.lock.try_lock() else {
            return Err(DeployError::Busy(name.to_owned()));
        };
        self.deploy_locked(stack, state, trigger, actor, target)
            .await
    }

    /// Whether `MAX_QUEUED` deploys wait for the stack already.
    pub fn queue_full(&self, name: &str) -> bool {
        self.stacks
            .get(name)
            .is_some_and(|s| s.queued.load(std::sync::atomic::Ordering::SeqCst) >= MAX_QUEUED)
    }

    /// Runs a deploy after the ones running or queued for the stack (in the order asked);
    /// `started` is called when its turn comes.
    pub async fn deploy_queued(
        &self,
        name: &str,
        trigger: &str,
        actor: Option<&str>,
        target: Target,
        started: impl FnOnce(),
    ) -> Result<Outcome, DeployError> {
        use std::sync::atomic::Ordering;
        let (stack, state) = self.stack(name)?;
        if state.queued.fetch_add(1, Ordering::SeqCst) >= MAX_QUEUED {
            state.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(DeployError::QueueFull(name.to_owned()));
        }
        let newest = |h: &History| h.list(name, 1).ok().and_then(|l| l.first().map(|d| d.id));
        let seen = newest(&self.history);
        let follow = target.follow;
        let _guard = state.lock.lock().await;
        state.queued.fetch_sub(1, Ordering::SeqCst);
        started();
        let outcome = self
            .deploy_locked(stack, state, trigger, actor, target)
            .await;
        // The followed tags, asked for while a deploy of them ran (the webhook's, as
        // CI pushed): that deploy's outcome is the answer, not "unchanged".
        if follow
            && matches!(
                outcome,
                Ok(Outcome::Unchanged { .. } | Outcome::Quarantined { .. })
            )
        {
            if let Some(ran) = newest(&self.history).filter(|n| Some(*n) > seen) {
                if let Some(o) = self.outcome_of(ran)? {
                    return Ok(o);
                }
            }
        }
        outcome
    }

    /// The outcome deploy `id` had, if it was a deploy of the followed tags (a webhook's,
    /// a poll's, the hook's; a rollback of one that was unhealthy: that deploy's). None
    /// for anything a person ran (a rollback, a pinned version, a recovery).
    fn outcome_of(&self, id: i64) -> anyhow::Result<Option<Outcome>> {
        let follows = |t: &str| matches!(t, "webhook" | "poll" | "hook" | "cli");
        let Some(d) = self.history.get(id)? else {
            return Ok(None);
        };
        if let (Some(orig), "unhealthy") = (d.rollback_of, d.trigger.as_str()) {
            let Some(o) = self.history.get(orig)? else {
                return Ok(None);
            };
            if !follows(&o.trigger) {
                return Ok(None);
            }
            let error = o.error.unwrap_or_default();
            return Ok(Some(match d.state.as_str() {
                "success" => Outcome::RolledBack {
                    id: orig,
                    rollback: d.id,
                    error,
                },
                _ => Outcome::Failed { id: orig, error },
            }));
        }
        if d.kind != "deploy" || !follows(&d.trigger) {
            return Ok(None);
        }
        Ok(match d.state.as_str() {
            "success" => Some(Outcome::Deployed {
                id: d.id,
                versions: d.versions,
            }),
            "failed" => Some(Outcome::Failed {
                id: d.id,
                error: d.error.unwrap_or_default(),
            }),
            _ => None,
        })
    }

    async fn deploy_locked(
        &self,
        stack: &StackConfig,
        state: &StackState,
        trigger: &str,
        actor: Option<&str>,
        target: Target,
    ) -> Result<Outcome, DeployError> {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(DeployError::Stopping);
        }
        let outcome = self
            .deploy_unpruned(stack, state, trigger, actor, target)
            .await;
        if matches!(
            outcome,
            Ok(Outcome::Deployed { .. } | Outcome::RolledBack { .. } | Outcome::Failed { .. })
        ) {
            self.prune_images().await;
            self.report_deploys(Some(&stack.name)).await;
        }
        outcome
    }

    /// What this agent calls itself in its reports: the host's name.
    fn agent_name(&self) -> String {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "wharf-agent".into())
    }

    /// Tells the registry what each stack (or just `only`) runs, and each service's last
    /// `keep_images` healthy images (its rollback targets), so that retention never
    /// deletes them. Sent at start, after each deploy, and every hour; one that fails
    /// is logged and sent again at the next of those.
    async fn report_deploys(&self, only: Option<&str>) {
        let Ok(client) = self.access.client() else {
            return;
        };
        let agent = self.agent_name();
        let keep = self.config.keep_images.max(1);
        for s in &self.config.stacks {
            if only.is_some_and(|o| o != s.name) {
                continue;
            }
            let list = match self.history.list(&s.name, 500) {
                Ok(l) => l,
                Err(e) => return tracing::warn!(error = %e, "agent: no deploy report"),
            };
            let mut services = Vec::new();
            let mut seen: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            let running = list
                .iter()
                .find(|d| d.state == "success" || d.state == "running");
            for d in running
                .into_iter()
                .chain(list.iter().filter(|d| d.state == "success"))
            {
                for (svc, image) in &d.after {
                    let images = seen.entry(svc).or_default();
                    if images.contains(&image.as_str()) || images.len() > keep {
                        continue;
                    }
                    let Ok(r) = crate::client::ImageRef::parse(image, None) else {
                        continue;
                    };
                    let crate::oci::Reference::Digest(digest) = &r.reference else {
                        continue;
                    };
                    if r.registry.as_deref().is_some_and(|h| h != client.host()) {
                        continue;
                    }
                    let state = if images.is_empty() {
                        "running"
                    } else {
                        "previous"
                    };
                    images.push(image);
                    services.push(serde_json::json!({
                        "service": svc,
                        "repository": r.repo.as_str(),
                        "digest": digest.as_str(),
                        "state": state,
                        "deployed_at": d.finished_at.unwrap_or(d.started_at),
                    }));
                }
            }
            let report =
                serde_json::json!({ "agent": agent, "stack": s.name, "services": services });
            match client.report_deploys(&report).await {
                Ok(()) => {
                    tracing::debug!(stack = %s.name, "agent: reported its deploys to the registry")
                }
                Err(e) => {
                    tracing::warn!(stack = %s.name, "agent: could not report its deploys to the registry: {e:#}")
                }
            }
        }
    }

    async fn report_every_hour(self: Arc<Self>) {
        loop {
            self.report_deploys(None).await;
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    }

    /// At SIGTERM: no deploy starts any more, and each one running ends (healthy, or
    /// rolled back) before this returns, so a stop never leaves a stack half applied.
    pub async fn drain(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for (name, state) in &self.stacks {
            if state.lock.try_lock().is_err() {
                tracing::info!(stack = %name, "agent: stopping once the running deploy has ended");
            }
            let _done = state.lock.lock().await;
        }
    }

    /// Removes the images the agent pulled that no stack needs: for each service, all
    /// but the `keep_images` it last ran healthy (the running one first); never one a
    /// deploy is running with, nor one quarantined in the last day (kept to look at).
    async fn prune_images(&self) {
        const DAY_MS: i64 = 86_400_000;
        let keep_n = self.config.keep_images;
        if keep_n == 0 {
            return;
        }
        let now = crate::time::now_ms();
        let mut keep: std::collections::BTreeSet<String> = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        let mut pulled = std::collections::BTreeSet::new();
        for s in &self.config.stacks {
            let list = match self.history.list(&s.name, u32::MAX) {
                Ok(l) => l,
                Err(e) => return tracing::warn!(error = %e, "agent: not pruning images"),
            };
            let mut recent: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for d in &list {
                if d.state == "running" {
                    keep.extend(d.after.values().cloned());
                    keep.extend(d.before.iter().flat_map(|b| b.values().cloned()));
                }
                for (svc, image) in &d.after {
                    if d.trigger != "baseline" {
                        pulled.insert(image.clone());
                    }
                    if d.state == "success" {
                        let r = recent.entry(svc).or_default();
                        if !r.contains(&image.as_str()) {
                            r.push(image);
                        }
                    }
                }
            }
            for images in recent.values() {
                keep.extend(images.iter().take(keep_n).map(|i| (*i).to_owned()));
            }
            for q in self.history.quarantined(&s.name).unwrap_or_default() {
                if now - q.since < DAY_MS {
                    keep.insert(q.image);
                }
            }
        }
        let local = match compose::local_digests().await {
            Ok(l) => l,
            Err(e) => return tracing::warn!(error = %e, "agent: not pruning images"),
        };
        let mut removed = Vec::new();
        for image in pulled.difference(&keep).filter(|i| local.contains(*i)) {
            match compose::remove_image(image).await {
                Ok(()) => removed.push(image.clone()),
                Err(e) => tracing::debug!(error = %e, "agent: image kept"),
            }
        }
        if !removed.is_empty() {
            tracing::info!(
                "agent: removed {} old image(s), keeping {keep_n} per service: {}",
                removed.len(),
                removed.join(", ")
            );
        }
    }

    async fn deploy_unpruned(
        &self,
        stack: &StackConfig,
        state: &StackState,
        trigger: &str,
        actor: Option<&str>,
        target: Target,
    ) -> Result<Outcome, DeployError> {
        let name = stack.name.as_str();
        if target.follow && !target.force {
            if let Some(h) = self.history.held(name)? {
                // Still looked at, so `status` can say how far the tags have moved.
                if let Ok(p) = self.resolve(stack, &target).await {
                    *state.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
                }
                return Ok(Outcome::Held {
                    deploy: h.deploy,
                    actor: h.actor,
                });
            }
        }
        let mut after = self.resolve(stack, &target).await?;
        let mut before = self.history.last_healthy(name)?;
        if before.is_none() && self.history.list(name, 1)?.is_empty() {
            before = self.baseline(stack).await?;
        }
        let kind = if target.pins.is_some() {
            "rollback"
        } else {
            "deploy"
        };
        let before_id = before.as_ref().map(|b| b.id);
        let before_config = before.as_ref().and_then(|b| b.config.clone());
        let before_pins = before.map(|b| b.after);
        let config = compose::config_hash(stack);
        // Following never goes to a digest the stack was rolled back from: such a service
        // stays on what it runs.
        let mut skipped = Vec::new();
        let mut why = None;
        if target.follow && !target.force {
            let quarantined = self.history.quarantined(name)?;
            for (svc, image) in after.iter_mut() {
                if let Some(q) = quarantined
                    .iter()
                    .find(|q| q.service == *svc && q.image == *image)
                {
                    why.get_or_insert_with(|| q.clone());
                    match before_pins.as_ref().and_then(|b| b.get(svc)) {
                        Some(current) => *image = current.clone(),
                        None => {
                            return Ok(Outcome::Quarantined {
                                services: vec![svc.clone()],
                                deploy: q.deploy,
                                reason: Some(q.reason.clone()),
                            });
                        }
                    }
                    skipped.push(svc.clone());
                }
            }
        }
        let mut repairing = Vec::new();
        if before_pins.as_ref() == Some(&after) && target.pins.is_none() && target.repair {
            repairing = self.drift(stack, &after, before_config.as_deref()).await;
            if !repairing.is_empty() {
                tracing::info!(stack = %name, "agent: redeploying what drifted: {}", repairing.join("; "));
            }
        }
        if before_pins.as_ref() == Some(&after) && target.pins.is_none() && repairing.is_empty() {
            return Ok(match why {
                None => Outcome::Unchanged { deploy: before_id },
                Some(q) => Outcome::Quarantined {
                    services: skipped,
                    deploy: q.deploy,
                    reason: Some(q.reason),
                },
            });
        }
        // Every new image is on this server before anything changes: a registry that is
        // away or refuses the token leaves the stack as it is, and quarantines nothing.
        let new_images: Vec<&String> = after
            .iter()
            .filter(|(svc, image)| before_pins.as_ref().and_then(|b| b.get(*svc)) != Some(*image))
            .map(|(_, image)| image)
            .collect();
        // Until the deploy's row names them, another stack's prune must not take them.
        let pending = Pending::new(self, after.values().cloned().collect());
        self.fetch_images(&new_images).await?;
        let versions = self.versions(&after).await;
        if target.quarantine_current {
            // A person says the running release is bad: what changes is quarantined.
            for (svc, image) in before_pins.iter().flatten() {
                if after.get(svc) != Some(image) {
                    self.history.quarantine(
                        name,
                        svc,
                        image,
                        &format!("rolled back by {}", actor.unwrap_or(trigger)),
                        None,
                    )?;
                }
            }
        }
        let id = self.history.begin(NewDeploy {
            stack: name,
            kind,
            trigger,
            actor,
            before: before_pins.as_ref(),
            after: &after,
            rollback_of: None,
            versions: &versions,
            config: Some(&config),
        })?;
        drop(pending);
        match self.apply(stack, before_pins.as_ref(), &after, false).await {
            Ok(()) => {
                self.history.finish(id, "success", None, None)?;
                if target.force {
                    // Deployed on purpose and healthy: no longer under suspicion.
                    for (svc, image) in &after {
                        self.history.release(name, svc, image)?;
                    }
                }
                if target.hold {
                    self.history.hold(
                        name,
                        Some(id),
                        actor,
                        &format!("{kind} #{id} of an explicit version ({trigger})"),
                    )?;
                }
                self.notify(&format!(
                    "wharf: {name} deployed ({kind} #{id}, {trigger}): {}",
                    describe(&after, &versions)
                ))
                .await;
                Ok(Outcome::Deployed { id, versions })
            }
            Err((error, logs)) => {
                self.history
                    .finish(id, "failed", Some(&error), logs.as_deref())?;
                // What was unhealthy is not deployed again by following.
                for (svc, image) in &after {
                    if before_pins.as_ref().and_then(|b| b.get(svc)) != Some(image) {
                        self.history.quarantine(
                            name,
                            svc,
                            image,
                            &format!("unhealthy in deploy #{id}: {error}"),
                            Some(id),
                        )?;
                    }
                }
                // A repair of the same digests has nothing older to go back to: the
                // stack's own files are what changed.
                let Some(previous) = before_pins.filter(|p| *p != after) else {
                    self.notify(&format!("wharf: {name} deploy #{id} of {} FAILED and has no healthy version to go back to: {error}", describe(&after, &versions)))
                        .await;
                    return Ok(Outcome::Failed { id, error });
                };
                let previous_versions = self.versions(&previous).await;
                let rb = self.history.begin(NewDeploy {
                    stack: name,
                    kind: "rollback",
                    trigger: "unhealthy",
                    actor: Some("agent"),
                    before: Some(&after),
                    after: &previous,
                    rollback_of: Some(id),
                    versions: &previous_versions,
                    config: Some(&config),
                })?;
                // Back from what was attempted: the services it changed, replaced whole.
                match self.apply(stack, Some(&after), &previous, true).await {
                    Ok(()) => {
                        self.history.finish(rb, "success", None, None)?;
                        self.notify(&format!(
                            "wharf: {name} deploy #{id} of {} was unhealthy ({error}); rolled back to {} (#{rb})",
                            describe(&after, &versions),
                            describe(&previous, &previous_versions)
                        ))
                        .await;
                        Ok(Outcome::RolledBack {
                            id,
                            rollback: rb,
                            error,
                        })
                    }
                    Err((e2, logs2)) => {
                        self.history
                            .finish(rb, "failed", Some(&e2), logs2.as_deref())?;
                        self.notify(&format!(
                            "wharf: {name} deploy #{id} was unhealthy ({error}) and the rollback failed too: {e2}"
                        ))
                        .await;
                        Ok(Outcome::Failed { id, error })
                    }
                }
            }
        }
    }

    /// Pins, pulls, brings up the services whose image changes, and waits for health.
    /// `recreate`: their containers are replaced even where they look current (the
    /// rollback of a deploy that may have stopped compose half way, leaving an old
    /// container that the engine is still stopping).
    /// Err: (what went wrong, the tail of the failing container's log).
    async fn apply(
        &self,
        stack: &StackConfig,
        before: Option<&Pins>,
        after: &Pins,
        recreate: bool,
    ) -> Result<(), (String, Option<String>)> {
        let file = self.override_file(&stack.name);
        let changed: Vec<String> = after
            .iter()
            .filter(|(svc, image)| before.and_then(|b| b.get(*svc)) != Some(*image))
            .map(|(svc, _)| svc.clone())
            .collect();
        let changed = if changed.is_empty() {
            after.keys().cloned().collect()
        } else {
            changed
        };
        let plain = |e: anyhow::Error| (format!("{e:#}"), None);
        // The images were pulled by `deploy` (a rollback's are still here from when they
        // ran; compose pulls one that is not).
        compose::write_override(&file, after).map_err(plain)?;
        // Proxied services cut over one by one with no refused request; the others are
        // replaced by compose.
        let (proxied, changed): (Vec<String>, Vec<String>) = changed
            .into_iter()
            .partition(|s| self.proxy_of(&stack.name, s).is_some());
        for svc in &proxied {
            let repair = before.and_then(|b| b.get(svc)) == after.get(svc);
            self.cutover(stack, &file, svc, &after[svc], repair).await?;
        }
        if changed.is_empty() {
            return Ok(());
        }
        // The containers before `up`: a new one is watched as soon as it exists, while
        // compose is still bringing up the others.
        let mut existing = std::collections::BTreeSet::new();
        for svc in &changed {
            existing.extend(
                self.compose
                    .containers(stack, &file, svc)
                    .await
                    .unwrap_or_default(),
            );
        }
        let up = self.compose.up(stack, &file, &changed, recreate);
        self.wait_healthy(stack, &file, &changed, &existing, true, up)
            .await
    }

    /// Waits until every service is healthy, watching each new container from the moment
    /// it exists (`up` still running): the first one that fails fails the deploy at once,
    /// and compose is stopped. A new container is unhealthy at its first restart.
    async fn wait_healthy(
        &self,
        stack: &StackConfig,
        file: &std::path::Path,
        services: &[String],
        existing: &std::collections::BTreeSet<String>,
        count_existing: bool,
        up: impl std::future::Future<Output = anyhow::Result<()>>,
    ) -> Result<(), (String, Option<String>)> {
        // `health_timeout_s` counts from when compose is done (stopping an old container
        // that ignores SIGTERM takes its stop timeout); compose itself gets a generous cap.
        let health = Duration::from_secs(stack.health_timeout_s);
        let mut deadline = Instant::now() + health + Duration::from_secs(600);
        let mut first_restarts: BTreeMap<String, u64> = BTreeMap::new();
        let mut running_since: BTreeMap<String, Instant> = BTreeMap::new();
        let mut up = std::pin::pin!(up);
        let mut up_done = false;
        loop {
            let mut all_ok = up_done;
            let mut last_problem = String::new();
            let mut last_id = None;
            for svc in services {
                let ids = match self.compose.containers(stack, file, svc).await {
                    Ok(ids) => ids,
                    // compose ps trips over a container compose up is removing.
                    Err(_) if !up_done => {
                        all_ok = false;
                        continue;
                    }
                    Err(e) => return Err((format!("{e:#}"), None)),
                };
                // Until compose is done, the containers it is replacing do not count.
                let ids: Vec<String> = ids
                    .into_iter()
                    .filter(|id| (up_done && count_existing) || !existing.contains(id))
                    .collect();
                if ids.is_empty() {
                    all_ok = false;
                    last_problem = format!("service {svc} has no container");
                    continue;
                }
                for id in ids {
                    let st = match compose::inspect(&id).await {
                        Ok(st) => st,
                        // Removed between `ps` and `inspect` (compose replacing it).
                        Err(_) if !up_done => {
                            all_ok = false;
                            continue;
                        }
                        Err(e) => return Err((format!("{e:#}"), None)),
                    };
                    last_id = Some(id.clone());
                    // A container this deploy created has restarted as often as it
                    // crashed; one from before counts from when it was first seen.
                    let base = if existing.contains(&id) {
                        *first_restarts.entry(id.clone()).or_insert(st.restarts)
                    } else {
                        0
                    };
                    let failed = st.health.as_deref() == Some("unhealthy")
                        || st.restarts > base
                        || matches!(st.status.as_str(), "exited" | "dead" | "restarting");
                    if failed {
                        let logs = compose::logs_tail(&id, 50).await;
                        let early = if up_done {
                            ""
                        } else {
                            "; seen while compose was still bringing up the others"
                        };
                        return Err((
                            format!(
                                "service {svc} is unhealthy (status {}, health {}, restarts {}){early}",
                                st.status,
                                st.health.as_deref().unwrap_or("none"),
                                st.restarts
                            ),
                            Some(logs),
                        ));
                    }
                    // The image's healthcheck and the stack's probe must both pass where
                    // both exist; with neither, running and still running a little later.
                    let probe = stack.probes.get(svc);
                    let health_ok = st.status == "running"
                        && match &st.health {
                            Some(h) => h == "healthy",
                            None if probe.is_some() => true,
                            None => {
                                let since =
                                    *running_since.entry(id.clone()).or_insert_with(Instant::now);
                                since.elapsed() >= Duration::from_secs(3)
                            }
                        };
                    // Behind the proxy, the probe asks the new container itself (its
                    // address, the service's port), not the public address.
                    let probe_url = match (probe, stack.proxy.get(svc)) {
                        (Some(url), Some(pc)) if health_ok => {
                            match compose::container_ip(&id).await {
                                Ok(ip) => Some(at_container(url, ip, pc.port)),
                                Err(_) => Some(url.clone()),
                            }
                        }
                        (Some(url), _) => Some(url.clone()),
                        _ => None,
                    };
                    let probe_failed = match probe_url {
                        Some(url) if health_ok && !self.probe(&url).await => Some(url),
                        _ => None,
                    };
                    let ok = health_ok && probe_failed.is_none();
                    if !ok {
                        all_ok = false;
                        last_problem = format!(
                            "service {svc}: status {}, health {}{}",
                            st.status,
                            st.health.as_deref().unwrap_or("none"),
                            probe_failed
                                .map(|u| format!(", probe {u} not answering 2xx"))
                                .unwrap_or_default()
                        );
                    }
                }
            }
            if all_ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let logs = match last_id {
                    Some(id) => Some(compose::logs_tail(&id, 50).await),
                    None => None,
                };
                let what = if up_done {
                    last_problem
                } else {
                    format!("compose up has not finished; {last_problem}")
                };
                return Err((
                    format!("not healthy within {}s ({what})", stack.health_timeout_s),
                    logs,
                ));
            }
            if up_done {
                tokio::time::sleep(Duration::from_millis(500)).await;
            } else {
                tokio::select! {
                    r = &mut up => {
                        r.map_err(|e| (format!("{e:#}"), None))?;
                        up_done = true;
                        deadline = Instant::now() + health;
                    }
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }

    /// How the stack differs from what it was deployed with: a service with no running
    /// container or one running another image than its pin, and the compose or env
    /// files changed since (when the deploy recorded them). Empty: no drift.
    pub async fn drift(
        &self,
        stack: &StackConfig,
        pins: &Pins,
        config: Option<&str>,
    ) -> Vec<String> {
        let mut out = Vec::new();
        if config.is_some_and(|c| c != compose::config_hash(stack)) {
            out.push("the compose or env files changed since the deploy".to_owned());
        }
        let file = self.override_file(&stack.name);
        for (svc, pin) in pins {
            let ids = match self.compose.containers(stack, &file, svc).await {
                Ok(ids) => ids,
                Err(e) => {
                    out.push(format!("{svc}: {e:#}"));
                    continue;
                }
            };
            if ids.is_empty() {
                out.push(format!("{svc} has no container"));
                continue;
            }
            let want = compose::image_id(pin).await;
            for id in ids {
                match compose::inspect(&id).await {
                    Ok(st) if st.status != "running" => {
                        out.push(format!("{svc} is {}", st.status));
                    }
                    // The same content counts, however the container names it (a stack
                    // started by hand names a tag).
                    Ok(st) if st.image != *pin && want.as_deref() != Some(st.image_id.as_str()) => {
                        out.push(format!("{svc} runs {}, not the deployed {pin}", st.image));
                    }
                    Ok(_) => {}
                    Err(e) => out.push(format!("{svc}: {e:#}")),
                }
            }
        }
        out
    }

    /// Pulls each image (`repo@sha256:...`) the engine does not hold yet.
    async fn fetch_images(&self, images: &[&String]) -> Result<(), DeployError> {
        for image in images {
            if compose::present_locally(&[*image]).await {
                continue;
            }
            self.login()
                .await
                .map_err(|e| DeployError::Other(e.context("the stack was not changed")))?;
            let pulled = compose::pull_image(&self.dir.join("docker"), image).await;
            self.access_result(access::Kind::Pull, pulled)
                .await
                .map_err(|e| {
                    DeployError::Other(
                        e.context(format!("cannot pull {image}; the stack was not changed")),
                    )
                })?;
        }
        Ok(())
    }

    /// The registry client of the current token (an error, and a failure of access, if
    /// there is none).
    async fn client(&self) -> anyhow::Result<Arc<crate::client::Client>> {
        let c = self.access.client();
        if let Err(e) = &c {
            if let Some(m) = self.access.failed(access::Kind::Api, &format!("{e:#}")) {
                self.notify(&m).await;
            }
        }
        c
    }

    /// Passes on the result of talking to the registry, and tells `access` (which
    /// notifies once when access stops working, once when it works again, and once
    /// before the token expires).
    async fn registry<T>(&self, r: anyhow::Result<T>) -> anyhow::Result<T> {
        self.access_result(access::Kind::Api, r).await
    }

    /// The engine's `docker login` with the current token, as `registry` reports it.
    async fn login(&self) -> anyhow::Result<()> {
        let r = self.access.docker_login().await;
        self.access_result(access::Kind::Login, r).await
    }

    async fn access_result<T>(
        &self,
        kind: access::Kind,
        r: anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        match &r {
            Ok(_) => {
                for m in self.access.succeeded(kind) {
                    self.notify(&m).await;
                }
            }
            Err(e) => {
                if let Some(m) = self.access.failed(kind, &format!("{e:#}")) {
                    self.notify(&m).await;
                }
            }
        }
        r
    }

    /// Every few seconds: reads the token file again (a new token is used at once),
    /// and after a failure asks the stacks to try again when the pause has passed.
    async fn watch_access(self: Arc<Self>) {
        let every = Duration::from_secs(self.config.poll_interval_s.clamp(1, 5));
        loop {
            tokio::time::sleep(every).await;
            let changed = self.access.refresh_token();
            if changed || (self.access.failing() && self.access.may_try()) {
                // A login that failed (at start, say) is tried again on its own: it
                // proves the engine can reach the registry with this token.
                if changed || !self.access.logged_in() {
                    self.login().await.ok();
                }
                for s in self.stacks.keys() {
                    self.request(s, "poll");
                }
            }
        }
    }

    /// The version of each pinned image a person knows it by, best effort: as recorded
    /// by an earlier deploy of it, else a release tag pointing at its digest on the
    /// registry, else its `org.opencontainers.image.version` label.
    async fn versions(&self, pins: &Pins) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let mut pages: BTreeMap<String, Option<serde_json::Value>> = BTreeMap::new();
        for (svc, pin) in pins {
            if let Ok(Some(v)) = self.history.version_of(pin) {
                out.insert(svc.clone(), v);
                continue;
            }
            let Some((name, digest)) = pin.rsplit_once('@') else {
                continue;
            };
            let repo = name.split_once('/').map_or(name, |(_, r)| r);
            if !pages.contains_key(repo) {
                let page = match (self.access.client(), crate::oci::RepoName::parse(repo)) {
                    (Ok(c), Ok(r)) => c.tag_page(&r, 1, 100, "last_updated").await.ok(),
                    _ => None,
                };
                pages.insert(repo.to_owned(), page);
            }
            let tags: Vec<&str> = pages[repo]
                .as_ref()
                .and_then(|p| p["results"].as_array())
                .into_iter()
                .flatten()
                .filter(|t| t["digest"] == digest)
                .filter_map(|t| t["name"].as_str())
                .collect();
            let found = match version_tag(&tags) {
                Some(t) => Some(t.to_owned()),
                None => compose::image_label(pin, "org.opencontainers.image.version").await,
            };
            if let Some(v) = found {
                out.insert(svc.clone(), v);
            }
        }
        out
    }

    async fn probe(&self, url: &str) -> bool {
        self.http
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    async fn notify(&self, text: &str) {
        tracing::info!("{text}");
        let Some(url) = &self.config.notify_url else {
            return;
        };
        let r = self
            .http
            .post(url)
            .json(&serde_json::json!({ "text": text }))
            .send()
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "agent: notification not sent");
        }
    }

    /// Asks for a deploy of the followed tags (a webhook or a poll). It runs in the
    /// stack's worker after `coalesce_ms`, so the tags one release moves give one deploy.
    pub fn request(&self, stack: &str, trigger: &'static str) {
        if let Some(state) = self.stacks.get(stack) {
            let mut asked = state.asked_by.lock().unwrap_or_else(|e| e.into_inner());
            asked.get_or_insert(trigger);
            state.wake.notify_one();
        }
    }

    /// One per stack: waits for asks, lets a burst settle, deploys the followed tags.
    /// A deploy already running (from the CLI or the hook) is waited for, not
    /// interleaved with.
    async fn worker(self: Arc<Self>, stack: String) {
        let Some(state) = self.stacks.get(&stack) else {
            return;
        };
        let settle = Duration::from_millis(self.config.coalesce_ms);
        loop {
            state.wake.notified().await;
            tokio::time::sleep(settle).await;
            if !self.access.may_try() {
                // The registry failed a moment ago: `watch_access` asks again when the
                // pause has passed.
                continue;
            }
            let trigger = state
                .asked_by
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .unwrap_or("poll");
            loop {
                match self
                    .deploy(&stack, trigger, Some(trigger), Target::follow())
                    .await
                {
                    Ok(
                        Outcome::Unchanged { .. }
                        | Outcome::Held { .. }
                        | Outcome::Quarantined { .. },
                    ) => {}
                    Ok(o) => tracing::info!(stack = %stack, "agent: {o:?}"),
                    Err(DeployError::Busy(_)) => {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                    Err(e) => tracing::warn!(stack = %stack, error = %e, "agent: deploy failed"),
                }
                break;
            }
        }
    }

    /// Stacks following `repository:tag`.
    pub fn followers(&self, repository: &str, tag: &str) -> Vec<String> {
        self.config
            .stacks
            .iter()
            .filter(|s| {
                s.images().is_ok_and(|m| {
                    m.values()
                        .any(|i| i.repo.as_str() == repository && i.tag() == Some(tag))
                })
            })
            .map(|s| s.name.clone())
            .collect()
    }

    /// Polls the followed tags forever (a missed webhook only delays a deploy).
    pub async fn poll(self: Arc<Self>) {
        if self.config.poll_interval_s == 0 {
            return;
        }
        let mut every = tokio::time::interval(Duration::from_secs(self.config.poll_interval_s));
        loop {
            every.tick().await;
            for s in self.stacks.keys() {
                self.request(s, "poll");
            }
        }
    }

    /// A deploy a restart interrupted is recorded as such at once, and the stack is put
    /// back on its last healthy digests in the background (the API answers meanwhile; a
    /// deploy asked for before the recovery runs first, and the recovery then finds
    /// the stack in a known state).
    async fn recover(self: &Arc<Self>) {
        let running = match self.history.running() {
            Ok(r) => r,
            Err(e) => return tracing::warn!(error = %e, "agent: cannot read history"),
        };
        // Each stack with an interrupted deploy, and the last of them.
        let mut stacks = BTreeMap::new();
        for d in running {
            if let Err(e) = self.history.finish(
                d.id,
                "interrupted",
                Some("the agent stopped during this deploy"),
                None,
            ) {
                tracing::warn!(error = %e, "agent: cannot record deploy #{} as interrupted", d.id);
            }
            let last = stacks.entry(d.stack).or_insert(d.id);
            *last = (*last).max(d.id);
        }
        for (stack, interrupted) in stacks {
            let agent = Arc::clone(self);
            tokio::spawn(async move {
                loop {
                    // A deploy that ran since (asked for before this task ran) left the
                    // stack in a known state: nothing to recover.
                    let latest = agent
                        .history
                        .list(&stack, 1)
                        .ok()
                        .and_then(|l| l.into_iter().next());
                    if latest.is_some_and(|l| l.id > interrupted) {
                        break;
                    }
                    let Some(h) = agent.history.last_healthy(&stack).ok().flatten() else {
                        tracing::warn!(stack = %stack, "agent: deploy #{interrupted} was interrupted and there is no healthy deploy to return to");
                        break;
                    };
                    let target = Target {
                        pins: Some(h.after),
                        ..Target::default()
                    };
                    match agent
                        .deploy(&stack, "recovery", Some("agent"), target)
                        .await
                    {
                        Err(DeployError::Busy(_)) => {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        }
                        Ok(o) => {
                            tracing::info!(stack = %stack, "agent: recovered from an interrupted deploy: {o:?}")
                        }
                        Err(e) => {
                            tracing::warn!(stack = %stack, error = %e, "agent: recovery failed")
                        }
                    }
                    break;
                }
            });
        }
    }

    /// The pins a rollback goes to: a past deploy's, or a tag's or digest's now.
    pub async fn rollback_target(
        &self,
        stack: &str,
        to: Option<i64>,
        tag: Option<String>,
        digest: Option<String>,
    ) -> Result<Target, DeployError> {
        // A version named holds the stack there; a plain rollback says the running
        // release is bad, and quarantines it instead.
        let pinned = |pins: Pins| Target {
            pins: Some(pins),
            hold: true,
            ..Target::default()
        };
        let (config, _) = self.stack(stack)?;
        if let Some(id) = to {
            let d: Deploy = self
                .history
                .get(id)?
                .filter(|d| d.stack == stack)
                .ok_or_else(|| DeployError::Invalid(format!("{stack} has no deploy {id}")))?;
            return Ok(pinned(d.after));
        }
        if let Some(tag) = tag {
            let target = Target {
                tag: Some(tag),
                ..Target::default()
            };
            return Ok(pinned(self.resolve(config, &target).await?));
        }
        if let Some(digest) = digest {
            return Ok(pinned(self.digest_pins(config, &digest).await?));
        }
        // No target: the healthy deploy before the current one.
        let list = self.history.list(stack, 1000)?;
        let mut healthy = list.iter().filter(|d| d.state == "success");
        let current = healthy
            .next()
            .ok_or_else(|| DeployError::Invalid(format!("{stack} has no healthy deploy yet")))?;
        let previous = healthy.find(|d| d.after != current.after).ok_or_else(|| {
            DeployError::Invalid(format!(
                "{stack} has no earlier healthy deploy to go back to"
            ))
        })?;
        Ok(Target {
            pins: Some(previous.after.clone()),
            quarantine_current: true,
            ..Target::default()
        })
    }

    /// A rollback to one image digest: the services whose repository holds it (at the
    /// registry, or on this server when the registry cannot be reached) take it; the
    /// others stay on what they run.
    async fn digest_pins(&self, stack: &StackConfig, digest: &str) -> Result<Pins, DeployError> {
        let d: crate::oci::Digest = digest
            .parse()
            .map_err(|e| DeployError::Invalid(format!("{digest:?} is not a digest: {e}")))?;
        let (_, host) = crate::client::endpoint(&self.config.registry)?;
        let mut pins = self
            .history
            .last_healthy(&stack.name)?
            .map(|h| h.after)
            .unwrap_or_default();
        let mut matched = 0;
        for (svc, image) in stack.images()? {
            let pin = format!("{host}/{}@{d}", image.repo);
            let found = match self.client().await {
                Ok(c) => {
                    c.manifest_digest(&image.repo, &Reference::Digest(d.clone()))
                        .await
                }
                Err(e) => Err(e),
            };
            let here = match self.registry(found).await {
                Ok(found) => found.is_some(),
                Err(_) => compose::present_locally(&[&pin]).await,
            };
            if here {
                pins.insert(svc, pin);
                matched += 1;
            }
        }
        if matched == 0 {
            return Err(DeployError::Invalid(format!(
                "no repository of {} holds {d}",
                stack.name
            )));
        }
        if let Some(svc) = stack.services.keys().find(|s| !pins.contains_key(*s)) {
            return Err(DeployError::Invalid(format!(
                "service {svc} has never been deployed and {d} is not its image; use --tag"
            )));
        }
        Ok(pins)
    }
}

/// Images a deploy is about to record, kept from pruning while it holds this.
struct Pending<'a> {
    agent: &'a Agent,
    images: Vec<String>,
}

impl<'a> Pending<'a> {
    fn new(agent: &'a Agent, images: Vec<String>) -> Pending<'a> {
        let mut p = agent.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.extend(images.iter().cloned());
        drop(p);
        Pending { agent, images }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let mut p = self.agent.pending.lock().unwrap_or_else(|e| e.into_inner());
        // One entry each: another deploy of the same image keeps its own.
        for image in &self.images {
            if let Some(i) = p.iter().position(|x| x == image) {
                p.swap_remove(i);
            }
        }
    }
}

/// `url` with the host and port of a container (`http://10.0.0.5:8080/ready`).
fn at_container(url: &str, ip: std::net::IpAddr, port: u16) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_ip_host(ip);
            let _ = u.set_port(Some(port));
            u.to_string()
        }
        Err(_) => url.to_owned(),
    }
}

/// `api=v1.4.2 (sha256:0123456789ab), web=sha256:...`: the version a person knows, and
/// the digest.
pub fn describe(p: &Pins, versions: &BTreeMap<String, String>) -> String {
    describe_with(p, versions, ", ")
}

/// `describe`, the services joined with `sep`.
pub fn describe_with(p: &Pins, versions: &BTreeMap<String, String>, sep: &str) -> String {
    p.iter()
        .map(|(s, i)| {
            let short = i.rsplit_once('@').map_or(i.as_str(), |(_, d)| d);
            let short = short.get(..19).unwrap_or(short);
            match versions.get(s) {
                Some(v) => format!("{s}={v} ({short})"),
                None => format!("{s}={short}"),
            }
        })
        .collect::<Vec<_>>()
        .join(sep)
}

/// Of the tags pointing at one digest, the one a person knows the release by: the most
/// precise version (`v1.4.2` over `v1.4`), else one naming a commit (`main-abc1234`);
/// moving tags (`prod`, `latest`) are never a version.
pub fn version_tag<'a>(tags: &[&'a str]) -> Option<&'a str> {
    let core = |t: &str| {
        let c = t.strip_prefix('v').unwrap_or(t);
        c.split(['-', '+']).next().unwrap_or("").to_owned()
    };
    let semver = |t: &str| {
        let core = core(t);
        !core.is_empty()
            && core
                .split('.')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    };
    let commit = |t: &str| {
        t.rsplit_once('-').is_some_and(|(_, h)| {
            h.len() >= 7 && h.len() <= 40 && h.bytes().all(|b| b.is_ascii_hexdigit())
        })
    };
    tags.iter()
        .copied()
        .filter(|t| semver(t))
        .max_by_key(|t| (core(t).matches('.').count(), !t.contains('-'), t.len()))
        .or_else(|| tags.iter().copied().find(|t| commit(t)))
}

/// Checks a webhook's `Wharf-Signature` over `body` and its age.
pub fn verify_signature(
    secret: &str,
    header: &str,
    body: &[u8],
    max_age_s: i64,
) -> anyhow::Result<()> {
    let mut t = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1.push(v.to_owned()),
            _ => {}
        }
    }
    let Some(t) = t else {
        bail!("the signature has no timestamp");
    };
    let age = crate::auth::now_secs() - t;
    if age > max_age_s || age < -60 {
        bail!("the signature's timestamp is {age}s old, outside the {max_age_s}s window");
    }
    let want = crate::events::signature(secret, t, body);
    let want = want.rsplit_once("v1=").map(|(_, h)| h).unwrap_or("");
    use subtle::ConstantTimeEq;
    if v1
        .iter()
        .any(|v| bool::from(v.as_bytes().ct_eq(want.as_bytes())))
    {
        Ok(())
    } else {
        bail!("the signature does not match")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_of_a_release_is_its_most_precise_tag() {
        assert_eq!(
            version_tag(&["prod", "1", "1.4", "1.4.2", "latest"]),
            Some("1.4.2")
        );
        assert_eq!(version_tag(&["v1.4.2", "v1.4", "prod"]), Some("v1.4.2"));
        assert_eq!(version_tag(&["v2.0.0-rc.1", "v2.0.0"]), Some("v2.0.0"));
        assert_eq!(version_tag(&["prod", "main-abc1234"]), Some("main-abc1234"));
        assert_eq!(version_tag(&["1", "main-abc1234"]), Some("1"));
        assert_eq!(
            version_tag(&["prod", "latest", "staging", "buildcache"]),
            None
        );
        assert_eq!(version_tag(&["feature-x", "v"]), None);
        assert_eq!(version_tag(&[]), None);
    }

    #[test]
    fn signatures_are_checked_with_a_window() {
        let body = br#"{"id":"x"}"#;
        let now = crate::auth::now_secs();
        let good = crate::events::signature("secret-secret-16", now, body);
        assert!(verify_signature("secret-secret-16", &good, body, 300).is_ok());
        assert!(verify_signature("other-secret-xx", &good, body, 300).is_err());
        assert!(verify_signature("secret-secret-16", &good, b"{}", 300).is_err());
        let old = crate::events::signature("secret-secret-16", now - 600, body);
        let e = verify_signature("secret-secret-16", &old, body, 300).unwrap_err();
        assert!(e.to_string().contains("window"), "{e}");
        assert!(verify_signature("secret-secret-16", "v1=00", body, 300).is_err());
    }
}
