//! wharf's own HTTP API beside `/v2/`: tag details in one call, and `/metrics`.
//!
//! `GET /api/v1/repositories/<name>/tags?page_size=&page=&ordering=` answers in Docker
//! Hub's shape (`count`, `next`, `previous`, `results[]` with `name`, `digest`,
//! `full_size`, `images`, `last_pushed`, ...), so scripts written against Docker Hub's
//! `/v2/repositories/<name>/tags/` keep working; that path is served too.
//!
//! `GET /api/v1/cli/wharf-<os>-<arch>` serves this very binary, so a CI job installs
//! the CLI from the registry it pushes to (no other download).

use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::authz::{self, Caller, Site};
use super::{ApiError, AppState, Query, Result, json, method_not_allowed, repo, set};
use crate::auth::{Action, Principal};
use crate::store::TagOrder;
use crate::time::rfc3339;

const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;

#[derive(Debug, PartialEq, Eq)]
pub enum Api<'a> {
    Metrics,
    Deploys,
    Tags { name: &'a str },
    Cli { file: &'a str },
}

/// The name this binary is served under: `wharf-linux-x86_64`.
pub fn cli_file_name() -> String {
    format!("wharf-{}-{}", std::env::consts::OS, std::env::consts::ARCH)
}

/// Recognises wharf's API paths; None for everything else (the `/v2/` API included).
pub fn parse(path: &str) -> Option<Api<'_>> {
    if path == "/metrics" {
        return Some(Api::Metrics);
    }
    if path == "/api/v1/deploys" {
        return Some(Api::Deploys);
    }
    if let Some(file) = path.strip_prefix("/api/v1/cli/") {
        return Some(Api::Cli { file });
    }
    let rest = path
        .strip_prefix("/api/v1/repositories/")
        .or_else(|| path.strip_prefix("/v2/repositories/"))?;
    let name = rest
        .strip_suffix("/tags/")
        .or_else(|| rest.strip_suffix("/tags"))?;
    (!name.is_empty()).then_some(Api::Tags { name })
}

/// A request to wharf's own API, past authentication.
pub struct ApiRequest<'a> {
    pub method: &'a Method,
    pub q: &'a Query,
    pub client: Option<std::net::IpAddr>,
    pub body: axum::body::Body,
}

pub async fn handle(
    state: &AppState,
    site: &Site<'_>,
    caller: &Caller,
    api: Api<'_>,
    req: ApiRequest<'_>,
) -> Result<Response> {
    let ApiRequest {
        method,
        q,
        client,
        body,
    } = req;
    if method != Method::GET && method != Method::HEAD && !matches!(api, Api::Deploys) {
        return Err(method_not_allowed());
    }
    match api {
        Api::Deploys => deploys(state, site, caller, method, client, body).await,
        Api::Metrics => {
            match &caller.principal {
                Principal::Anonymous => {
                    return Err(site.unauthorized("authentication required", None, None));
                }
                p if p.is_full_admin() => {}
                Principal::User { .. } => {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        super::OciErrorCode::Denied,
                        "metrics are for administrators (signed in with a password, not a scoped token)",
                    ));
                }
            }
            let (writing, max_uploads) = state.store.uploads_writing();
            let (buffers, budget) = state.store.upload_buffers();
            let gauges = [
                (
                    "wharf_uploads_writing",
                    "Upload requests writing now.",
                    writing as u64,
                ),
                (
                    "wharf_uploads_max",
                    "Upload requests allowed to write at once.",
                    max_uploads as u64,
                ),
                (
                    "wharf_upload_buffers_in_use",
                    "Upload buffers (1 MiB each) in use now.",
                    buffers as u64,
                ),
                (
                    "wharf_upload_buffers_max",
                    "Upload buffers the memory budget allows.",
                    budget as u64,
                ),
            ];
            let mut text = state.metrics.render(&gauges);
            text.push_str(&usage_metrics(state).await?);
            let mut r = (StatusCode::OK, text).into_response();
            set(&mut r, "content-type", "text/plain; version=0.0.4");
            Ok(r)
        }
        Api::Cli { file } => {
            let own = cli_file_name();
            if file != own && file != "wharf" {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    super::OciErrorCode::NameUnknown,
                    format!("this registry serves only {own} (its own build)"),
                ));
            }
            // The running image itself, even if its file was replaced by an upgrade.
            let exe = std::fs::File::open("/proc/self/exe")
                .or_else(|_| std::env::current_exe().and_then(std::fs::File::open))
                .map(tokio::fs::File::from_std)
                .map_err(|e| {
                    crate::store::StoreError::Internal(format!("reading the wharf binary: {e}"))
                })?;
            let len = exe
                .metadata()
                .await
                .map_err(|e| crate::store::StoreError::Internal(e.to_string()))?
                .len();
            let mut r = if method == Method::HEAD {
                StatusCode::OK.into_response()
            } else {
                let stream = tokio_util::io::ReaderStream::with_capacity(exe, 256 * 1024);
                (StatusCode::OK, axum::body::Body::from_stream(stream)).into_response()
            };
            set(&mut r, "content-type", "application/octet-stream");
            set(&mut r, "content-length", &len.to_string());
            set(
                &mut r,
                "content-disposition",
                &format!("attachment; filename=\"{own}\""),
            );
            Ok(r)
        }
        Api::Tags { name } => {
            let name = repo(name)?;
            authz::require(
                &state.auth,
                site,
                caller,
                name.as_str(),
                Action::Pull,
                client,
            )
            .await?;
            // Deleted tags can name what was deliberately taken down: for those who
            // may push, like restoring them.
            if flag(q, "deleted")? {
                authz::require(
                    &state.auth,
                    site,
                    caller,
                    name.as_str(),
                    Action::Push,
                    client,
                )
                .await?;
            }
            tags(state, site, &name, q).await
        }
    }
}

/// A `key=true|false` parameter (absent: false).
fn flag(q: &Query, key: &str) -> Result<bool> {
    match q.get(key) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            super::OciErrorCode::Unsupported,
            format!("{key}={other:?}: use {key}=true"),
        )),
    }
}

fn number(q: &Query, key: &str, default: u32, max: u32) -> Result<u32> {
    match q.get(key) {
        None | Some("") => Ok(default),
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|n| *n >= 1)
            .map(|n| n.min(max))
            .ok_or_else(|| {
                ApiError::unsupported(
                    StatusCode::BAD_REQUEST,
                    format!("{key} must be a positive integer, not {v:?}"),
                )
            }),
    }
}

fn order(q: &Query) -> Result<(TagOrder, &'static str)> {
    Ok(match q.get("ordering").unwrap_or("") {
        "" | "-last_updated" | "-last_pushed" => (TagOrder::NewestFirst, "-last_updated"),
        "last_updated" | "last_pushed" => (TagOrder::OldestFirst, "last_updated"),
        "name" => (TagOrder::Name, "name"),
        "-name" => (TagOrder::NameDesc, "-name"),
        other => {
            return Err(ApiError::unsupported(
                StatusCode::BAD_REQUEST,
                format!(
                    "ordering must be -last_updated (newest first, the default), last_updated, name or -name, not {other:?}"
                ),
            ));
        }
    })
}

/// A deploy agent's report of one stack: what each service runs and its last rollback
/// targets (`POST`), and what agents report (`GET`, the repositories the caller may
/// pull). Reporting needs pull on every repository named, which an agent's read token
/// has.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployReport {
    agent: String,
    stack: String,
    services: Vec<ReportedService>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportedService {
    service: String,
    repository: String,
    digest: String,
    state: String,
    /// Unix ms.
    deployed_at: i64,
}

/// Services one report may list, at most (a stack's services times their rollback
/// targets).
const MAX_REPORTED: usize = 1000;

async fn deploys(
    state: &AppState,
    site: &Site<'_>,
    caller: &Caller,
    method: &Method,
    client: Option<std::net::IpAddr>,
    body: axum::body::Body,
) -> Result<Response> {
    if caller.principal == Principal::Anonymous {
        return Err(site.unauthorized("authentication required", None, None));
    }
    let bad = |m: String| ApiError::unsupported(StatusCode::BAD_REQUEST, m);
    if method == Method::GET || method == Method::HEAD {
        let mut allowed: std::collections::HashMap<String, bool> = Default::default();
        let mut rows = Vec::new();
        for d in state.store.deployments().await? {
            let ok = match allowed.get(&d.repository) {
                Some(ok) => *ok,
                None => {
                    let ok = authz::require(
                        &state.auth,
                        site,
                        caller,
                        &d.repository,
                        Action::Pull,
                        client,
                    )
                    .await
                    .is_ok();
                    allowed.insert(d.repository.clone(), ok);
                    ok
                }
            };
            if ok {
                rows.push(d);
            }
        }
        return Ok(json(StatusCode::OK, &json!({ "deployments": rows })));
    }
    if method != Method::POST {
        return Err(method_not_allowed());
    }
    let bytes = super::read_limited(body, 1024 * 1024)
        .await
        .map_err(|seen| match seen {
            Some(_) => bad("a deploy report is at most 1 MiB".into()),
            None => ApiError::from(crate::store::StoreError::Body(std::io::Error::other(
                "request body failed",
            ))),
        })?;
    let report: DeployReport = serde_json::from_slice(&bytes)
        .map_err(|e| bad(format!("the deploy report is not valid: {e}")))?;
    let label = |what: &str, v: &str| {
        let odd = |c: char| {
            c.is_control()
                || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
        };
        if v.is_empty() || v.len() > 128 || v.chars().any(odd) {
            Err(bad(format!("{what} {v:?}: 1 to 128 printable characters")))
        } else {
            Ok(())
        }
    };
    label("agent", &report.agent)?;
    label("stack", &report.stack)?;
    if report.services.len() > MAX_REPORTED {
        return Err(bad(format!(
            "a report lists at most {MAX_REPORTED} services"
        )));
    }
    let mut rows = Vec::with_capacity(report.services.len());
    for s in &report.services {
        label("service", &s.service)?;
        let name = repo(&s.repository)?;
        let digest: crate::oci::Digest = s.digest.parse()?;
        if s.state != "running" && s.state != "previous" {
            return Err(bad(format!("state {:?}: running or previous", s.state)));
        }
        authz::require(
            &state.auth,
            site,
            caller,
            name.as_str(),
            Action::Pull,
            client,
        )
        .await?;
        rows.push(crate::store::meta::Deployment {
            agent: report.agent.clone(),
            stack: report.stack.clone(),
            service: s.service.clone(),
            repository: name.to_string(),
            digest: digest.to_string(),
            state: s.state.clone(),
            deployed_at: s.deployed_at,
            reported_at: 0,
            reported_by: None,
        });
    }
    let by = crate::store::Who {
        actor: caller.principal.name().map(str::to_owned),
        credential: caller.principal.credential().map(str::to_owned),
        client: client.map(|c| c.to_string()),
    };
    state
        .store
        .deployments_report(&report.agent, &report.stack, rows, &by)
        .await?;
    Ok(json(
        StatusCode::OK,
        &json!({ "recorded": report.services.len() }),
    ))
}

/// Stored bytes and blobs per namespace and repository (blobs counted once per
/// namespace), and the quotas.
async fn usage_metrics(state: &AppState) -> Result<String> {
    use std::fmt::Write as _;
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let mut out = String::new();
    let rows = state.store.usage_counters().await?;
    type Value = fn(&crate::store::meta::UsageRow) -> u64;
    let gauges: [(&str, &str, Value); 2] = [
        (
            "wharf_storage_bytes",
            "Bytes of blobs stored, deduplicated per namespace.",
            |r| r.bytes,
        ),
        (
            "wharf_storage_blobs",
            "Blobs stored, deduplicated per namespace.",
            |r| r.blobs,
        ),
    ];
    for (metric, help, value) in gauges {
        let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} gauge");
        for r in &rows {
            if let Some((kind, name)) = r.scope.split_once(':') {
                let label = if kind == "ns" {
                    "namespace"
                } else {
                    "repository"
                };
                let _ = writeln!(out, "{metric}{{{label}=\"{}\"}} {}", esc(name), value(r));
            }
        }
    }
    let contents = state.store.usage_contents().await?;
    type Count = fn(&crate::store::meta::RepoContents) -> Option<i64>;
    let counts: [(&str, &str, Count); 3] = [
        ("wharf_repository_tags", "Tags per repository.", |c| {
            i64::try_from(c.tags).ok()
        }),
        (
            "wharf_repository_manifests",
            "Manifests per repository.",
            |c| i64::try_from(c.manifests).ok(),
        ),
        (
            "wharf_repository_last_push_seconds",
            "When a tag of the repository was last pushed or moved (unix seconds).",
            |c| c.last_push.map(|ms| ms / 1000),
        ),
    ];
    for (metric, help, value) in counts {
        let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} gauge");
        for c in &contents {
            if let Some(v) = value(c) {
                let _ = writeln!(out, "{metric}{{repository=\"{}\"}} {v}", esc(&c.repository));
            }
        }
    }
    out.push_str("# HELP wharf_quota_bytes Quota per namespace (team/*) or repository.\n# TYPE wharf_quota_bytes gauge\n");
    for q in state.store.quotas().await? {
        let _ = writeln!(
            out,
            "wharf_quota_bytes{{target=\"{}\"}} {}",
            esc(&q.target),
            q.bytes
        );
    }
    Ok(out)
}

/// Manifests with no tag: index children, referrers, builds whose tag moved on.
async fn untagged(state: &AppState, name: &crate::oci::RepoName) -> Result<Response> {
    let rows = state.store.untagged_manifests(name).await?;
    let delay = i64::try_from(state.store.gc_settings().delay.as_millis()).unwrap_or(i64::MAX);
    let results: Vec<_> = rows
        .iter()
        .map(|m| {
            json!({
                "digest": m.digest,
                "media_type": m.media_type,
                "size": m.size,
                "pushed_at": rfc3339(m.created_at),
                "untagged_at": m.untagged_at.map(rfc3339),
                "last_pulled": m.pulled_at.map(rfc3339),
                "in_index": m.referenced,
                "subject": m.subject,
                "collected_after": m.condemned_at.map(|c| rfc3339(c.saturating_add(delay))),
            })
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &json!({ "count": results.len(), "results": results, "next": null }),
    ))
}

/// Tags deleted (by hand or by retention) whose manifest is still stored: they can be
/// restored with `wharf tag restore` until garbage collection takes the manifest.
async fn deleted_tags(state: &AppState, name: &crate::oci::RepoName) -> Result<Response> {
    let rows = state.store.deleted_tags(name).await?;
    let delay = i64::try_from(state.store.gc_settings().delay.as_millis()).unwrap_or(i64::MAX);
    let results: Vec<_> = rows
        .iter()
        .map(|d| {
            json!({
                "name": d.tag,
                "digest": d.digest,
                "deleted_at": rfc3339(d.deleted_at),
                "deleted_by": d.by,
                "reason": d.reason,
                "collected_after": d.condemned_at.map(|c| rfc3339(c.saturating_add(delay))),
            })
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &json!({ "count": results.len(), "results": results, "next": null }),
    ))
}

async fn tags(
    state: &AppState,
    site: &Site<'_>,
    name: &crate::oci::RepoName,
    q: &Query,
) -> Result<Response> {
    if flag(q, "untagged")? {
        return untagged(state, name).await;
    }
    if flag(q, "deleted")? {
        return deleted_tags(state, name).await;
    }
    let page_size = number(q, "page_size", DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)?;
    let page = number(q, "page", 1, u32::MAX)?;
    let (order, ordering) = order(q)?;
    let offset = u64::from(page - 1) * u64::from(page_size);
    let (count, details) = state
        .store
        .tag_details(name, order, offset, page_size)
        .await?;
    let link = |p: u32| {
        format!(
            "{}/api/v1/repositories/{name}/tags?page={p}&page_size={page_size}&ordering={ordering}",
            site.base_url
        )
    };
    let next = (offset + u64::from(page_size) < count).then(|| link(page + 1));
    let previous = (page > 1).then(|| link(page - 1));
    let results: Vec<_> = details
        .iter()
        .map(|t| {
            let pushed = rfc3339(t.pushed_at_ms);
            let platforms: Vec<String> = t
                .images
                .iter()
                .filter_map(|i| i.platform.as_ref().map(ToString::to_string))
                .collect();
            let images: Vec<_> = t
                .images
                .iter()
                .map(|i| {
                    json!({
                        "digest": i.digest,
                        "os": i.platform.as_ref().map(|p| p.os.as_str()),
                        "architecture": i.platform.as_ref().map(|p| p.architecture.as_str()),
                        "variant": i.platform.as_ref().and_then(|p| p.variant.as_deref()),
                        "size": i.size,
                    })
                })
                .collect();
            json!({
                "name": t.name,
                "repository": name.as_str(),
                "digest": t.digest,
                "media_type": t.media_type,
                "size": t.size,
                "full_size": t.size,
                "platforms": platforms,
                "images": images,
                "last_pushed": pushed,
                "last_updated": pushed,
                "tag_last_pushed": pushed,
            })
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &json!({
            "count": count,
            "page": page,
            "page_size": page_size,
            "next": next,
            "previous": previous,
            "results": results,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(parse("/metrics"), Some(Api::Metrics));
        assert_eq!(
            parse("/api/v1/repositories/team/api/tags"),
            Some(Api::Tags { name: "team/api" })
        );
        assert_eq!(
            parse("/v2/repositories/team/api/tags/"),
            Some(Api::Tags { name: "team/api" })
        );
        // The OCI tags list of a repository named `repositories/x` stays OCI.
        assert_eq!(parse("/v2/repositories/x/tags/list"), None);
        assert_eq!(parse("/api/v1/repositories//tags"), None);
        assert_eq!(parse("/api/v1/repositories/tags"), None);
        assert_eq!(parse("/v2/team/api/tags/list"), None);
        assert_eq!(
            parse("/api/v1/cli/wharf-linux-x86_64"),
            Some(Api::Cli {
                file: "wharf-linux-x86_64"
            })
        );
    }
}
