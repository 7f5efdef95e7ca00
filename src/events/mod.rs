//! Registry events to webhooks: at-least-once, signed, retried with backoff, logged.
//!
//! The outbox (`events`) is written in the transaction of each change. The dispatcher
//! moves new events into each webhook's deliveries (its filters applied), then sends
//! what is due, one endpoint at a time in event order, each delivery until it is
//! answered 2xx or its retry time runs out. All state is in the database: a restart
//! picks up where it left off, and memory holds one batch per endpoint at most.
//!
//! Every request carries:
//! - `Wharf-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`;
//! - `Wharf-Event-Id` (the event's uuid, the same on every retry: de-duplicate on it),
//!   `Wharf-Event` (the action) and `Wharf-Delivery` (the delivery's id).

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::json;
use sha2::Sha256;

use crate::auth::Pattern;
use crate::store::meta::EventRecord;
use crate::store::meta::events::{Attempt, DueDelivery, EventsMeta, WebhookRecord};
use crate::store::policy::glob_match;
use crate::time::rfc3339;

pub const ACTIONS: &[&str] = &["push", "tag", "untag", "delete", "quota"];
pub const FORMATS: &[&str] = &["wharf", "cncf", "dockerhub"];

/// A webhook in `wharf.toml` (`[[webhooks]]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: String,
    pub secret: String,
    #[serde(default = "all")]
    pub repositories: String,
    #[serde(default = "all_list")]
    pub tags: Vec<String>,
    #[serde(default = "default_actions")]
    pub actions: Vec<String>,
    #[serde(default = "wharf_format")]
    pub format: String,
}

fn all() -> String {
    "*".into()
}
fn all_list() -> Vec<String> {
    vec!["*".into()]
}
fn default_actions() -> Vec<String> {
    vec!["push".into(), "tag".into()]
}
fn wharf_format() -> String {
    "wharf".into()
}

/// How deliveries are retried (`[webhook_delivery]` in `wharf.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliverySettings {
    /// The first retry comes after this; each next one after twice as long (±20%).
    pub retry_initial_ms: u64,
    /// The longest wait between two attempts.
    pub retry_max_ms: u64,
    /// A delivery not answered 2xx this long after its event is given up.
    pub give_up_after_s: u64,
    /// How long one attempt may take.
    pub timeout_ms: u64,
    /// The most deliveries waiting per endpoint; past it the oldest are dropped.
    pub max_pending: u32,
    /// How often new events and due retries are looked for.
    pub poll_ms: u64,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            retry_initial_ms: 2_000,
            retry_max_ms: 600_000,
            give_up_after_s: 24 * 3600,
            timeout_ms: 10_000,
            max_pending: 10_000,
            poll_ms: 500,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WebhookError {
    #[error("webhook URL {0:?} must start with http:// or https://")]
    Url(String),
    #[error("unknown action {0:?}: use push, tag, untag, delete, quota")]
    Action(String),
    #[error("unknown format {0:?}: use wharf, cncf or dockerhub")]
    Format(String),
    #[error(transparent)]
    Pattern(#[from] crate::auth::scope::PatternError),
    #[error("invalid tag pattern {0:?}")]
    Tag(String),
    #[error("the webhook secret must be at least 16 characters")]
    Secret,
    #[error("the quota action is sent in the wharf format only")]
    QuotaFormat,
}

/// Checks a webhook's fields; returns the record to store.
pub fn validate(
    id: String,
    c: &WebhookConfig,
    source: &str,
) -> Result<WebhookRecord, WebhookError> {
    let url = c.url.trim();
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| WebhookError::Url(c.url.clone()))?;
    if rest.is_empty() || rest.starts_with('/') || url.chars().any(char::is_whitespace) {
        return Err(WebhookError::Url(c.url.clone()));
    }
    if c.secret.len() < 16 {
        return Err(WebhookError::Secret);
    }
    for a in &c.actions {
        if !ACTIONS.contains(&a.as_str()) {
            return Err(WebhookError::Action(a.clone()));
        }
    }
    if !FORMATS.contains(&c.format.as_str()) {
        return Err(WebhookError::Format(c.format.clone()));
    }
    if c.format != "wharf" && c.actions.iter().any(|a| a == "quota") {
        return Err(WebhookError::QuotaFormat);
    }
    Pattern::parse(&c.repositories)?;
    let mut tags = Vec::new();
    for t in &c.tags {
        if t != "*" {
            let parsed = crate::store::policy::parse_tag_globs(t)
                .map_err(|_| WebhookError::Tag(t.clone()))?;
            tags.extend(parsed);
        } else {
            tags.push("*".into());
        }
    }
    Ok(WebhookRecord {
        id,
        url: url.to_owned(),
        secret: c.secret.clone(),
        repositories: c.repositories.clone(),
        tags,
        actions: c.actions.clone(),
        format: c.format.clone(),
        source: source.to_owned(),
        created_at: crate::store::meta::now_ms(),
    })
}

/// Whether `hook` wants `e`. A quota warning goes to the hooks whose repositories cover
/// the quota's whole target, in the wharf format only (the others describe manifests).
pub fn matches(hook: &WebhookRecord, e: &EventRecord) -> bool {
    let Ok(wanted) = Pattern::parse(&hook.repositories) else {
        return false;
    };
    if e.action == "quota" {
        return hook.format == "wharf"
            && hook.actions.iter().any(|a| a == "quota")
            && Pattern::parse(&e.repository).is_ok_and(|t| wanted.covers(&t));
    }
    let repo_ok = wanted.matches(&e.repository);
    let action_ok = hook.actions.contains(&e.action);
    let tag_ok = hook.tags.iter().any(|g| match &e.tag {
        Some(t) => glob_match(g.as_bytes(), t.as_bytes()),
        None => g == "*",
    });
    // Docker Hub's payload describes pushes only.
    let format_ok = hook.format != "dockerhub" || e.action == "push" || e.action == "tag";
    repo_ok && action_ok && tag_ok && format_ok
}

/// The body and content type of `e` in the hook's format. `registry` is the URL clients
/// reach the registry by.
pub fn payload(format: &str, e: &EventRecord, registry: &str) -> (Vec<u8>, &'static str) {
    let host = registry
        .split_once("://")
        .map_or(registry, |(_, h)| h)
        .trim_end_matches('/');
    let value = match format {
        _ if e.action == "quota" => json!({
            "id": e.uuid,
            "action": "quota",
            "timestamp": rfc3339(e.at),
            "registry": host,
            "quota": e.repository,
            "used_bytes": e.size,
            "quota_bytes": e.quota,
            "percent": match (e.size, e.quota) {
                (Some(u), Some(q)) if q > 0 => Some(u * 100 / q),
                _ => None,
            },
            "message": e.detail,
        }),
        "cncf" => {
            let action = if e.action == "push" || e.action == "tag" {
                "push"
            } else {
                "delete"
            };
            let mut target = json!({
                "mediaType": e.media_type,
                "size": e.size,
                "length": e.size,
                "digest": e.digest,
                "repository": e.repository,
                "url": format!("{registry}/v2/{}/manifests/{}", e.repository, e.digest),
            });
            if let Some(t) = &e.tag {
                target["tag"] = json!(t);
            }
            json!({ "events": [{
                "id": e.uuid,
                "timestamp": rfc3339(e.at),
                "action": action,
                "target": target,
                "request": { "host": host, "useragent": "wharf" },
                "actor": { "name": e.actor },
                "source": { "addr": host, "instanceID": "wharf" },
            }]})
        }
        "dockerhub" => {
            let (namespace, name) = e
                .repository
                .rsplit_once('/')
                .unwrap_or(("", e.repository.as_str()));
            json!({
                "callback_url": "",
                "push_data": {
                    "pushed_at": e.at / 1000,
                    "pusher": e.actor,
                    "tag": e.tag,
                    "images": [],
                },
                "repository": {
                    "repo_name": format!("{host}/{}", e.repository),
                    "name": name,
                    "namespace": namespace,
                    "owner": namespace,
                    "repo_url": format!("{registry}/{}", e.repository),
                    "is_private": true,
                    "status": "Active",
                    "date_created": e.at / 1000,
                },
            })
        }
        _ => json!({
            "id": e.uuid,
            "action": e.action,
            "timestamp": rfc3339(e.at),
            "registry": host,
            "repository": e.repository,
            "tag": e.tag,
            "digest": e.digest,
            "media_type": e.media_type,
            "size": e.size,
            "actor": e.actor,
            "reference": match &e.tag {
                Some(t) => format!("{host}/{}:{t}", e.repository),
                None => format!("{host}/{}@{}", e.repository, e.digest),
            },
        }),
    };
    let content_type = if format == "cncf" {
        "application/vnd.docker.distribution.events.v1+json"
    } else {
        "application/json"
    };
    (
        serde_json::to_vec(&value).expect("payload serializes"),
        content_type,
    )
}

/// `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn signature(secret: &str, unix: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(format!("{unix}.").as_bytes());
    mac.update(body);
    format!("t={unix},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Sends one request; Ok(status) for any HTTP answer, Err for no answer.
pub async fn send(
    http: &reqwest::Client,
    hook: &WebhookRecord,
    e: &EventRecord,
    delivery: i64,
    registry: &str,
) -> Result<u16, String> {
    let (body, content_type) = payload(&hook.format, e, registry);
    let now = crate::auth::now_secs();
    let r = http
        .post(&hook.url)
        .header("content-type", content_type)
        .header(
            "user-agent",
            concat!("wharf-webhook/", env!("CARGO_PKG_VERSION")),
        )
        .header("wharf-signature", signature(&hook.secret, now, &body))
        .header("wharf-event-id", &e.uuid)
        .header("wharf-event", &e.action)
        .header("wharf-delivery", delivery.to_string())
        .body(body)
        .send()
        .await
        .map_err(|err| {
            let mut msg = err.to_string();
            let mut src = std::error::Error::source(&err);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            msg
        })?;
    Ok(r.status().as_u16())
}

/// When to try again after `attempts` failed attempts, or None to give up.
pub fn next_attempt(
    s: &DeliverySettings,
    attempts: i64,
    created_at: i64,
    now: i64,
    jitter: f64,
) -> Option<i64> {
    let exp = u32::try_from(attempts.clamp(1, 30) - 1).unwrap_or(0);
    let base = s
        .retry_initial_ms
        .saturating_mul(1u64 << exp.min(20))
        .min(s.retry_max_ms);
    let wait = (base as f64 * (0.8 + 0.4 * jitter.clamp(0.0, 1.0))) as i64;
    let at = now + wait.max(1);
    let deadline = created_at + i64::try_from(s.give_up_after_s * 1000).unwrap_or(i64::MAX);
    (at <= deadline).then_some(at)
}

fn jitter() -> f64 {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX)
}

/// Delivered and failed deliveries, and events every webhook is past, are kept this long.
pub const KEEP_DAYS: i64 = 30;
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Runs delivery until the process ends.
pub async fn run_dispatcher(
    meta: Arc<dyn EventsMeta>,
    settings: DeliverySettings,
    registry: String,
) {
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_millis(settings.timeout_ms))
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(c) => c,
        Err(e) => return tracing::error!(error = %e, "webhooks disabled: no HTTP client"),
    };
    let mut tick = tokio::time::interval(Duration::from_millis(settings.poll_ms.max(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pruned_at = std::time::Instant::now() - PRUNE_EVERY;
    loop {
        tick.tick().await;
        if pruned_at.elapsed() >= PRUNE_EVERY {
            pruned_at = std::time::Instant::now();
            let before = crate::store::meta::now_ms() - KEEP_DAYS * 86_400_000;
            match meta.prune(before).await {
                Ok((0, 0)) => {}
                Ok((d, e)) => tracing::info!(deliveries = d, events = e, "webhooks: pruned"),
                Err(e) => tracing::warn!(error = %e, "webhooks: cannot prune"),
            }
        }
        let hooks = match meta.webhooks().await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "webhooks: cannot read endpoints");
                continue;
            }
        };
        // Endpoints are served side by side; within one, in event order.
        let work = hooks.into_iter().map(|hook| {
            let (meta, http, settings, registry) = (&meta, &http, &settings, &registry);
            async move {
                let filter = |e: &EventRecord| matches(&hook, e);
                loop {
                    match meta
                        .fan_out(&hook.id, 500, settings.max_pending, &filter)
                        .await
                    {
                        Ok(0) => break,
                        Ok(_) => continue,
                        Err(e) => {
                            tracing::warn!(error = %e, hook = %hook.id, "webhooks: fan-out failed");
                            break;
                        }
                    }
                }
                let due = match meta.due(&hook.id, crate::store::meta::now_ms(), 50).await {
                    Ok(d) => d,
                    Err(e) => {
                        return tracing::warn!(error = %e, "webhooks: cannot read deliveries");
                    }
                };
                for d in due {
                    if !deliver(meta.as_ref(), http, settings, registry, d).await {
                        break; // keep event order: the rest wait for this one
                    }
                }
            }
        });
        futures_util::future::join_all(work).await;
    }
}

/// One attempt of `d`; true if it was delivered.
async fn deliver(
    meta: &dyn EventsMeta,
    http: &reqwest::Client,
    settings: &DeliverySettings,
    registry: &str,
    d: DueDelivery,
) -> bool {
    let result = send(http, &d.webhook, &d.event, d.id, registry).await;
    let now = crate::store::meta::now_ms();
    let attempt = match result {
        Ok(code) if (200..300).contains(&code) => Attempt::Delivered { code },
        other => {
            let (code, error) = match other {
                Ok(code) => (Some(code), format!("the endpoint answered {code}")),
                Err(e) => (None, e),
            };
            let retry_at = next_attempt(settings, d.attempts + 1, d.created_at, now, jitter());
            if retry_at.is_none() {
                tracing::warn!(hook = %d.webhook.id, event = %d.event.uuid, "webhook delivery given up: {error}");
            }
            Attempt::Failed {
                code,
                error,
                retry_at,
            }
        }
    };
    let delivered = matches!(attempt, Attempt::Delivered { .. });
    if let Err(e) = meta.record_attempt(d.id, attempt).await {
        tracing::warn!(error = %e, "webhooks: cannot record a delivery");
    }
    delivered
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(action: &str, tag: Option<&str>) -> EventRecord {
        EventRecord {
            id: 1,
            uuid: "u-1".into(),
            at: 1_790_000_000_000,
            action: action.into(),
            repository: "team/api".into(),
            tag: tag.map(str::to_owned),
            digest: "sha256:aa".into(),
            media_type: Some("application/vnd.oci.image.manifest.v1+json".into()),
            size: Some(500),
            actor: Some("ci".into()),
            quota: None,
            detail: None,
        }
    }

    fn quota_event(target: &str) -> EventRecord {
        EventRecord {
            action: "quota".into(),
            repository: target.into(),
            tag: None,
            digest: String::new(),
            media_type: None,
            size: Some(900),
            quota: Some(1000),
            detail: Some("team/ uses 900 B of its quota of 1000 B (90%)".into()),
            ..event("quota", None)
        }
    }

    #[test]
    fn quota_warnings_reach_hooks_covering_their_target_in_the_wharf_format() {
        let h = hook(&["prod"], &["push", "quota"], "wharf");
        assert!(
            matches(&h, &quota_event("team/*")),
            "tag filters do not apply"
        );
        assert!(matches(&h, &quota_event("team/api")));
        assert!(!matches(&h, &quota_event("other/*")));
        let narrow = WebhookRecord {
            repositories: "team/api".into(),
            ..h.clone()
        };
        assert!(!matches(&narrow, &quota_event("team/*")), "a narrower hook");
        assert!(matches(&narrow, &quota_event("team/api")));
        let no_action = hook(&["*"], &["push"], "wharf");
        assert!(!matches(&no_action, &quota_event("team/*")));
        let (body, _) = payload("wharf", &quota_event("team/*"), "http://r.example:5000");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["action"], "quota");
        assert_eq!(v["quota"], "team/*");
        assert_eq!(v["used_bytes"], 900);
        assert_eq!(v["quota_bytes"], 1000);
        assert_eq!(v["percent"], 90);
        assert_eq!(v["registry"], "r.example:5000");
        // Only the wharf format describes quotas; others are refused when added.
        let c = WebhookConfig {
            url: "http://127.0.0.1:9/hook".into(),
            secret: "0123456789abcdef".into(),
            repositories: "*".into(),
            tags: vec!["*".into()],
            actions: vec!["quota".into()],
            format: "cncf".into(),
        };
        assert_eq!(
            validate("h".into(), &c, "cli").unwrap_err(),
            WebhookError::QuotaFormat
        );
    }

    fn hook(tags: &[&str], actions: &[&str], format: &str) -> WebhookRecord {
        validate(
            "h".into(),
            &WebhookConfig {
                url: "http://127.0.0.1:9/hook".into(),
                secret: "0123456789abcdef".into(),
                repositories: "team/*".into(),
                tags: tags.iter().map(|t| t.to_string()).collect(),
                actions: actions.iter().map(|t| t.to_string()).collect(),
                format: format.into(),
            },
            "cli",
        )
        .unwrap()
    }

    #[test]
    fn filters() {
        let h = hook(&["prod,staging"], &["push", "tag"], "wharf");
        assert!(matches(&h, &event("push", Some("prod"))));
        assert!(matches(&h, &event("tag", Some("staging"))));
        assert!(!matches(&h, &event("push", Some("dev"))));
        assert!(!matches(&h, &event("untag", Some("prod"))));
        let mut other = event("push", Some("prod"));
        other.repository = "other/api".into();
        assert!(!matches(&h, &other));
        let all = hook(&["*"], &["push", "delete"], "wharf");
        assert!(matches(&all, &event("delete", None)));
        let hub = hook(&["*"], &["push", "delete"], "dockerhub");
        assert!(!matches(&hub, &event("delete", None)));
    }

    #[test]
    fn bad_webhooks() {
        let ok = WebhookConfig {
            url: "https://deploy.example.com/hook".into(),
            secret: "0123456789abcdef".into(),
            repositories: "*".into(),
            tags: vec!["*".into()],
            actions: vec!["push".into()],
            format: "cncf".into(),
        };
        assert!(validate("x".into(), &ok, "cli").is_ok());
        let cases = [
            WebhookConfig {
                url: "ftp://x".into(),
                ..ok.clone()
            },
            WebhookConfig {
                url: "http://".into(),
                ..ok.clone()
            },
            WebhookConfig {
                secret: "short".into(),
                ..ok.clone()
            },
            WebhookConfig {
                actions: vec!["pull".into()],
                ..ok.clone()
            },
            WebhookConfig {
                format: "slack".into(),
                ..ok.clone()
            },
            WebhookConfig {
                repositories: "Team/*".into(),
                ..ok.clone()
            },
            WebhookConfig {
                tags: vec!["a/b".into()],
                ..ok.clone()
            },
        ];
        for c in cases {
            assert!(validate("x".into(), &c, "cli").is_err(), "{c:?}");
        }
    }

    #[test]
    fn signatures_cover_time_and_body() {
        let s = signature("secret", 1_790_000_000, b"{}");
        assert!(s.starts_with("t=1790000000,v1="));
        assert_eq!(s.len(), "t=1790000000,v1=".len() + 64);
        assert_ne!(s, signature("secret", 1_790_000_001, b"{}"));
        assert_ne!(s, signature("secret", 1_790_000_000, b"{ }"));
        assert_ne!(s, signature("other", 1_790_000_000, b"{}"));
    }

    #[test]
    fn backoff_doubles_is_capped_and_gives_up() {
        let s = DeliverySettings {
            retry_initial_ms: 1000,
            retry_max_ms: 8000,
            give_up_after_s: 60,
            ..DeliverySettings::default()
        };
        let at = |n| next_attempt(&s, n, 0, 0, 0.5);
        assert_eq!(at(1), Some(1000));
        assert_eq!(at(2), Some(2000));
        assert_eq!(at(3), Some(4000));
        assert_eq!(at(5), Some(8000));
        assert_eq!(at(30), Some(8000));
        assert_eq!(next_attempt(&s, 1, 0, 0, 0.0), Some(800));
        assert_eq!(next_attempt(&s, 1, 0, 0, 1.0), Some(1200));
        assert_eq!(next_attempt(&s, 1, 0, 59_500, 0.5), None);
    }

    #[test]
    fn payload_formats() {
        let e = event("tag", Some("prod"));
        let (b, ct) = payload("wharf", &e, "https://registry.example.com");
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(ct, "application/json");
        assert_eq!(v["reference"], "registry.example.com/team/api:prod");
        assert_eq!(v["id"], "u-1");
        let (b, ct) = payload("cncf", &e, "https://registry.example.com");
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(ct, "application/vnd.docker.distribution.events.v1+json");
        assert_eq!(v["events"][0]["action"], "push");
        assert_eq!(v["events"][0]["target"]["tag"], "prod");
        assert_eq!(
            v["events"][0]["target"]["url"],
            "https://registry.example.com/v2/team/api/manifests/sha256:aa"
        );
        let (b, _) = payload("dockerhub", &e, "https://registry.example.com");
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["push_data"]["tag"], "prod");
        assert_eq!(
            v["repository"]["repo_name"],
            "registry.example.com/team/api"
        );
        assert_eq!(v["repository"]["namespace"], "team");
        assert_eq!(v["repository"]["name"], "api");
    }
}
