//! The token endpoint of Docker's token authentication: `GET /token` with Basic
//! credentials (or none, for public repositories), and the OAuth2 `POST /token` form
//! that `docker login` uses (`grant_type=password` and `refresh_token`).

use std::net::IpAddr;

use axum::body::Body;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use serde_json::json;

use super::authz::{Site, auth_error, basic_credentials};
use super::error::{ApiError, OciErrorCode};
use super::{Query, json as json_response};
use crate::auth::{Auth, Issued, Principal, Requested, Secret};

const MAX_FORM: usize = 64 * 1024;

fn requested(scopes: impl Iterator<Item = String>) -> Vec<Requested> {
    scopes
        .flat_map(|s| {
            s.split(' ')
                .filter_map(Requested::parse)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn rfc3339(secs: i64) -> String {
    crate::time::rfc3339(secs * 1000)
}

fn check_service(auth: &Auth, service: Option<&str>) -> Result<(), ApiError> {
    match service {
        Some(s) if !s.is_empty() && s != auth.service() => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            OciErrorCode::Unsupported,
            format!("this token service is {:?}, not {s:?}", auth.service()),
        )),
        _ => Ok(()),
    }
}

pub async fn handle(
    auth: &Auth,
    site: &Site<'_>,
    method: &Method,
    q: &Query,
    headers: &HeaderMap,
    body: Body,
    client: Option<IpAddr>,
) -> Result<Response, ApiError> {
    match *method {
        Method::GET => get(auth, site, q, headers, client).await,
        Method::POST => post(auth, site, body, client).await,
        _ => Err(ApiError::unsupported(
            StatusCode::METHOD_NOT_ALLOWED,
            "use GET or POST on /token",
        )),
    }
}

async fn get(
    auth: &Auth,
    site: &Site<'_>,
    q: &Query,
    headers: &HeaderMap,
    client: Option<IpAddr>,
) -> Result<Response, ApiError> {
    check_service(auth, q.get("service"))?;
    let principal = match basic_credentials(headers) {
        None if headers.contains_key(axum::http::header::AUTHORIZATION) => {
            return Err(site.unauthorized(
                "the token endpoint takes Basic credentials",
                None,
                None,
            ));
        }
        None => Principal::Anonymous,
        Some(Err(())) => return Err(site.unauthorized("malformed Basic credentials", None, None)),
        Some(Ok((user, secret))) => {
            let p = auth
                .login(&user, &secret, client)
                .await
                .map_err(|e| auth_error(site, e))?;
            // No token without its audit row.
            auth.audit_by(&p, "login", None, Some("token endpoint".into()), client)
                .await
                .map_err(|e| auth_error(site, e))?;
            p
        }
    };
    let scopes = requested(q.all("scope").map(str::to_owned));
    let issued = auth
        .issue(&principal, &scopes)
        .await
        .map_err(|e| auth_error(site, e))?;
    let mut answer = json!({
        "token": issued.token,
        "access_token": issued.token,
        "expires_in": issued.expires_in,
        "issued_at": rfc3339(issued.issued_at),
    });
    credential_expiry(&mut answer, &principal);
    Ok(json_response(StatusCode::OK, &answer))
}

/// Tells the caller when the credential it logged in with (an access or refresh token)
/// stops working, so a deploy agent can warn before its token expires: two fields
/// beside the standard ones, which other clients ignore.
fn credential_expiry(answer: &mut serde_json::Value, p: &Principal) {
    if let Some(at) = p.credential_expires_at() {
        let now = crate::time::now_ms();
        answer["credential_expires_at"] = json!(rfc3339(at));
        answer["credential_expires_in"] = json!((at - now).max(0) / 1000);
    }
}

async fn post(
    auth: &Auth,
    site: &Site<'_>,
    body: Body,
    client: Option<IpAddr>,
) -> Result<Response, ApiError> {
    let bytes = axum::body::to_bytes(body, MAX_FORM).await.map_err(|e| {
        if super::incoming::timed_out(&e) {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                OciErrorCode::Unsupported,
                e.to_string(),
            )
            .with_header(axum::http::header::CONNECTION, "close")
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                OciErrorCode::Unsupported,
                "form too large or unreadable",
            )
        }
    })?;
    let form = Query(form_urlencoded::parse(&bytes).into_owned().collect());
    check_service(auth, form.get("service"))?;
    let field = |k: &str| {
        form.get(k).filter(|v| !v.is_empty()).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                OciErrorCode::Unsupported,
                format!("missing form field {k}"),
            )
        })
    };
    let mut refresh_token = None;
    let principal = match form.get("grant_type") {
        Some("password") => {
            let user = field("username")?;
            let p = auth
                .login(user, &Secret::new(field("password")?), client)
                .await
                .map_err(|e| auth_error(site, e))?;
            auth.audit_by(&p, "login", None, Some("docker login".into()), client)
                .await
                .map_err(|e| auth_error(site, e))?;
            // A refresh token only for a password: a client that signed in with an
            // access token gets none and keeps using that token, scopes and all.
            if form.get("access_type") == Some("offline") {
                refresh_token = auth
                    .new_refresh_token(&p, client)
                    .await
                    .map_err(|e| auth_error(site, e))?;
            }
            p
        }
        Some("refresh_token") => {
            let token = Secret::new(field("refresh_token")?);
            let p = auth
                .refresh(&token, client)
                .await
                .map_err(|e| auth_error(site, e))?;
            auth.audit_by(&p, "login", None, Some("refresh token".into()), client)
                .await
                .map_err(|e| auth_error(site, e))?;
            refresh_token = Some(token);
            p
        }
        other => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                OciErrorCode::Unsupported,
                format!(
                    "unsupported grant_type {:?}; use password or refresh_token",
                    other.unwrap_or("")
                ),
            ));
        }
    };
    let scopes = requested(form.all("scope").map(str::to_owned));
    let Issued {
        token,
        expires_in,
        issued_at,
        ..
    } = auth
        .issue(&principal, &scopes)
        .await
        .map_err(|e| auth_error(site, e))?;
    let mut answer = json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": expires_in,
        "issued_at": rfc3339(issued_at),
        "scope": form.all("scope").collect::<Vec<_>>().join(" "),
    });
    if let Some(r) = refresh_token {
        answer["refresh_token"] = json!(r.expose());
    }
    credential_expiry(&mut answer, &principal);
    Ok(json_response(StatusCode::OK, &answer))
}
