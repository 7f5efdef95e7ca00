//! The agent's HTTP side: the registry's webhook, the deploy hook for CI and people, and
//! the local API the `wharf deploy` commands use.
//!
//! - `POST /hooks/registry`: a registry webhook (wharf format), signature checked
//!   against `webhook_secret`, refused outside the time window or when its event id was
//!   seen before; deploys the stacks following the tag (coalesced).
//! - `POST /hooks/deploy/<stack>` with `Authorization: Bearer <deploy_token>`, body
//!   optional `{"tag": "v1.0.0"}` or `{"services": {"api": "v1.0.0"}}`: deploys after the
//!   deploy running (a webhook's, say) and answers with the outcome and its job id; with
//!   `?wait=false` answers 202 with the job id at once. `GET /api/deploys/<job>` (either
//!   token) says where the job is and, once done, its answer.
//! - `/api/...` with `Authorization: Bearer <api token>` (in `<data>/api.token`):
//!   `GET /api/status`, `GET /api/stacks/<s>/history`, `POST /api/stacks/<s>/deploy`,
//!   `POST /api/stacks/<s>/rollback` (`{"to": id}` | `{"tag": t}` | `{"digest": d}`).

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use super::{Agent, DeployError, Target};

pub struct ApiState {
    pub agent: Arc<Agent>,
    pub api_token: String,
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/hooks/registry", post(registry_hook))
        .route("/hooks/deploy/{stack}", post(deploy_hook))
        .route("/api/status", get(status))
        .route("/api/deploys/{job}", get(job))
        .route("/api/stacks/{stack}/history", get(history))
        .route("/api/stacks/{stack}/deploy", post(deploy_now))
        .route("/api/stacks/{stack}/rollback", post(rollback))
        .route("/api/stacks/{stack}/resume", post(resume))
        .route("/api/stacks/{stack}/pause", post(pause))
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

fn bearer_ok(h: &HeaderMap, token: &str) -> bool {
    h.get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| {
            !token.is_empty() && bool::from(t.trim().as_bytes().ct_eq(token.as_bytes()))
        })
}

/// The local API's check: its bearer token, or 401.
fn api_denied(s: &ApiState, h: &HeaderMap) -> Option<Response> {
    (!bearer_ok(h, &s.api_token))
        .then(|| error(StatusCode::UNAUTHORIZED, "the agent API needs its token"))
}

fn deploy_error(e: DeployError) -> Response {
    let (status, body) = answer(Err(e));
    (status, axum::Json(body)).into_response()
}

async fn registry_hook(State(s): State<Arc<ApiState>>, h: HeaderMap, body: Bytes) -> Response {
    let Some(secret) = s.agent.config.webhook_secret.as_deref() else {
        return error(
            StatusCode::NOT_FOUND,
            "this agent takes no registry webhooks (no webhook_secret)",
        );
    };
    let Some(sig) = h.get("wharf-signature").and_then(|v| v.to_str().ok()) else {
        return error(StatusCode::UNAUTHORIZED, "unsigned webhook");
    };
    if let Err(e) = super::verify_signature(secret, sig, &body, s.agent.config.webhook_max_age_s) {
        return error(StatusCode::UNAUTHORIZED, e.to_string());
    }
    #[derive(Deserialize)]
    struct Event {
        id: String,
        action: String,
        repository: String,
        tag: Option<String>,
    }
    let Ok(e) = serde_json::from_slice::<Event>(&body) else {
        return error(StatusCode::BAD_REQUEST, "not a wharf webhook payload");
    };
    match s.agent.history.first_sight(&e.id) {
        Ok(true) => {}
        // A retry or a second webhook with the same event: done already, and saying so
        // with 2xx keeps the registry from retrying it for a day.
        Ok(false) => {
            return (
                StatusCode::OK,
                axum::Json(json!({ "duplicate": true, "id": e.id })),
            )
                .into_response();
        }
        Err(err) => return error(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()),
    }
    let stacks = match (&e.tag, e.action.as_str()) {
        (Some(tag), "push" | "tag") => s.agent.followers(&e.repository, tag),
        _ => Vec::new(),
    };
    for stack in &stacks {
        s.agent.request(stack, "webhook");
    }
    (
        StatusCode::ACCEPTED,
        axum::Json(json!({ "deploying": stacks })),
    )
        .into_response()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DeployBody {
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    services: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    actor: Option<String>,
    /// Deploy even a quarantined digest, even while the stack is held.
    #[serde(default)]
    force: bool,
}

fn parse_body<T: for<'de> Deserialize<'de> + Default>(body: &Bytes) -> Result<T, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))
}

/// `?wait=false`: answer 202 with the job at once instead of the outcome.
fn waits(uri: &Uri) -> Result<bool, String> {
    for (k, v) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        if k == "wait" {
            return match v.as_ref() {
                "true" | "1" | "" => Ok(true),
                "false" | "0" => Ok(false),
                _ => Err(format!("wait must be true or false, not {v:?}")),
            };
        }
    }
    Ok(true)
}

/// The answer to a deploy, as the job records it.
fn answer(r: Result<super::Outcome, DeployError>) -> (StatusCode, serde_json::Value) {
    match r {
        Ok(o) => (StatusCode::OK, json!(o)),
        Err(e) => {
            let status = match &e {
                DeployError::Busy(_) => StatusCode::CONFLICT,
                DeployError::QueueFull(_) => StatusCode::TOO_MANY_REQUESTS,
                DeployError::Stopping => StatusCode::SERVICE_UNAVAILABLE,
                DeployError::UnknownStack(_) => StatusCode::NOT_FOUND,
                DeployError::Invalid(_) => StatusCode::BAD_REQUEST,
                DeployError::Other(_) => StatusCode::BAD_GATEWAY,
            };
            let message = match e {
                DeployError::Other(e) => format!("{e:#}"),
                e => e.to_string(),
            };
            (status, json!({ "error": message }))
        }
    }
}

/// Queues a deploy as a job behind the one running for the stack, and answers with its
/// outcome (or at once with 202 and the job, if the client does not wait). The deploy
/// is its own task: a client that hangs up does not cut it off half-applied.
async fn detached(
    agent: &Arc<Agent>,
    stack: &str,
    trigger: &'static str,
    actor: Option<String>,
    target: Target,
    wait: bool,
) -> Response {
    if agent.config.stack(stack).is_none() {
        return error(StatusCode::NOT_FOUND, format!("no stack {stack}"));
    }
    // A full queue is refused before anything is written.
    if agent.queue_full(stack) {
        return deploy_error(DeployError::QueueFull(stack.to_owned()));
    }
    let id = match agent.history.job_create(stack, trigger) {
        Ok(id) => id,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    };
    let (agent, stack) = (Arc::clone(agent), stack.to_owned());
    let job = id.clone();
    let task = tokio::spawn(async move {
        let actor = actor.as_deref().or(Some(trigger));
        let history = &agent.history;
        let r = agent
            .deploy_queued(&stack, trigger, actor, target, || {
                if let Err(e) = history.job_running(&job) {
                    tracing::warn!(error = %e, "agent: cannot record job {job}");
                }
            })
            .await;
        let (status, mut body) = answer(r);
        body["job"] = json!(job);
        if let Err(e) = agent.history.job_done(&job, status.as_u16(), &body) {
            tracing::warn!(error = %e, "agent: cannot record job {job}");
        }
        (status, body)
    });
    if !wait {
        return (
            StatusCode::ACCEPTED,
            axum::Json(
                json!({ "job": id, "state": "queued", "url": format!("/api/deploys/{id}") }),
            ),
        )
            .into_response();
    }
    match task.await {
        Ok((status, body)) => (status, axum::Json(body)).into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the deploy stopped: {e}"),
        ),
    }
}

/// A job: queued, running, done (with the answer the deploy got) or interrupted.
async fn job(State(s): State<Arc<ApiState>>, Path(id): Path<String>, h: HeaderMap) -> Response {
    let hook = s.agent.config.deploy_token.as_deref().unwrap_or("");
    let api = bearer_ok(&h, &s.api_token);
    if !api && !bearer_ok(&h, hook) {
        return error(
            StatusCode::UNAUTHORIZED,
            "reading a deploy job needs the agent API token or the deploy token",
        );
    }
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return error(StatusCode::BAD_REQUEST, format!("{id:?} is not a job id"));
    }
    match s.agent.history.job(&id) {
        // The deploy token reads the hook's jobs, not what people ran with the API.
        Ok(Some(j)) if api || j.trigger == "hook" => axum::Json(json!(j)).into_response(),
        Ok(Some(_)) => error(
            StatusCode::NOT_FOUND,
            format!("no deploy job {id} (jobs are kept a week)"),
        ),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("no deploy job {id} (jobs are kept a week)"),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

async fn run_deploy(
    s: &ApiState,
    stack: &str,
    trigger: &'static str,
    body: DeployBody,
    wait: bool,
) -> Response {
    // A version named is explicit (and holds the stack there); none is the followed tags.
    let explicit = body.tag.is_some() || !body.services.is_empty();
    let target = Target {
        tag: body.tag,
        services: body.services,
        pins: None,
        follow: !explicit,
        force: body.force,
        hold: explicit,
        quarantine_current: false,
        repair: true,
    };
    detached(&s.agent, stack, trigger, body.actor, target, wait).await
}

async fn deploy_hook(
    State(s): State<Arc<ApiState>>,
    Path(stack): Path<String>,
    uri: Uri,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(token) = s.agent.config.deploy_token.as_deref() else {
        return error(
            StatusCode::NOT_FOUND,
            "the deploy hook is off (no deploy_token)",
        );
    };
    if !bearer_ok(&h, token) {
        return error(StatusCode::UNAUTHORIZED, "a valid deploy token is required");
    }
    match parse_body::<DeployBody>(&body) {
        Ok(mut b) => match waits(&uri) {
            Ok(wait) => {
                // The history says who asked: a hook caller cannot sign as a person.
                b.actor = Some(match b.actor.take() {
                    Some(a) => format!("hook:{a}"),
                    None => "hook".to_owned(),
                });
                run_deploy(&s, &stack, "hook", b, wait).await
            }
            Err(e) => error(StatusCode::BAD_REQUEST, e),
        },
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn status(State(s): State<Arc<ApiState>>, h: HeaderMap) -> Response {
    if let Some(denied) = api_denied(&s, &h) {
        return denied;
    }
    let mut stacks = Vec::new();
    for c in &s.agent.config.stacks {
        let last = s
            .agent
            .history
            .list(&c.name, 1)
            .ok()
            .and_then(|l| l.into_iter().next());
        let healthy = s.agent.history.last_healthy(&c.name).ok().flatten();
        let healthy_id = healthy.as_ref().map(|d| d.id);
        let held = s.agent.history.held(&c.name).ok().flatten();
        let quarantined = s.agent.history.quarantined(&c.name).unwrap_or_default();
        let seen = held.as_ref().and_then(|_| s.agent.seen_while_held(&c.name));
        // What docker says runs now, against what was deployed.
        let drift = match &healthy {
            Some(d) => s.agent.drift(c, &d.after, d.config.as_deref()).await,
            None => Vec::new(),
        };
        stacks.push(json!({
            "stack": c.name,
            "project": c.project(),
            "follows": c.services,
            "versions": healthy.as_ref().map(|d| d.versions.clone()),
            "running": healthy.map(|d| d.after),
            "last": last,
            "held": held,
            "followed_now": seen,
            "quarantined": quarantined,
            "state": if healthy_id.is_none() { "never deployed" } else if drift.is_empty() { "running" } else { "drifted" },
            "drift": drift,
        }));
    }
    axum::Json(json!({ "stacks": stacks, "registry": s.agent.access.status() })).into_response()
}

async fn history(
    State(s): State<Arc<ApiState>>,
    Path(stack): Path<String>,
    h: HeaderMap,
) -> Response {
    if let Some(denied) = api_denied(&s, &h) {
        return denied;
    }
    if s.agent.config.stack(&stack).is_none() {
        return error(StatusCode::NOT_FOUND, format!("no stack {stack}"));
    }
    match s.agent.history.list(&stack, 100) {
        Ok(l) => axum::Json(json!(l)).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn deploy_now(
    State(s): State<Arc<ApiState>>,
    Path(stack): Path<String>,
    uri: Uri,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(denied) = api_denied(&s, &h) {
        return denied;
    }
    match parse_body::<DeployBody>(&body) {
        Ok(b) => match waits(&uri) {
            Ok(wait) => run_deploy(&s, &stack, "cli", b, wait).await,
            Err(e) => error(StatusCode::BAD_REQUEST, e),
        },
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ActorBody {
    #[serde(default)]
    actor: Option<String>,
}

/// Ends a hold and deploys the followed tags at once (what they point at, unless it is
/// quarantined).
async fn resume(
    State(s): State<Arc<ApiState>>,
    Path(stack): Path<String>,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(denied) = api_denied(&s, &h) {
        return denied;
    }
    let b: ActorBody = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if s.agent.config.stack(&stack).is_none() {
        return error(StatusCode::NOT_FOUND, format!("no stack {stack}"));
    }
    if let Err(e) = s.agent.history.unhold(&stack) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    }
    detached(
        &s.agent,
        &stack,
        "resume",
        b.actor.or(Some("cli".into())),
        Target::follow(),
        true,
    )
    .await
}

/// Holds the stack where it is: following waits for `resume`.
async fn pause(
    State(s): State<Arc<ApiState>>,
    Path(stack): Path<String>,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(denied) = api_denied(&s, &h) {
        return denied;
    }
    let b: ActorBody = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if s.agent.config.stack(&stack).is_none() {
        return error(StatusCode::NOT_FOUND, format!("no stack {stack}"));
    }
    let last = s
        .agent
        .history
        .last_healthy(&stack)
        .ok()
        .flatten()
        .map(|d| d.id);
    let actor = b.actor.unwrap_or_else(|| "cli".into());
    match s.agent.history.hold(&stack, last, Some(&actor), "paused") {
        Ok(()) => axum::Json(json!({ "held": stack, "deploy": last })).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    #[serde(default)]
    to: Option<i64>,
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    actor: Option<String>,
}

async fn rollback(
    State(s): State<Arc<ApiState>>,
    Path(stack): Path<String>,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(denied) = api_denied(&s, &h) {
        return denied;
    }
    let b: RollbackBody = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if [b.to.is_some(), b.tag.is_some(), b.digest.is_some()]
        .iter()
        .filter(|x| **x)
        .count()
        > 1
    {
        return error(StatusCode::BAD_REQUEST, "give one of to, tag, digest");
    }
    let target = match s.agent.rollback_target(&stack, b.to, b.tag, b.digest).await {
        Ok(t) => t,
        Err(e) => return deploy_error(e),
    };
    detached(
        &s.agent,
        &stack,
        "rollback",
        b.actor.or(Some("cli".into())),
        target,
        true,
    )
    .await
}
