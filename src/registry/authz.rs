//! Who is calling and whether they may: credentials from the Authorization header,
//! decisions from [`Auth`], and the 401/403/429 answers with Docker's token challenge.

use std::net::IpAddr;

use axum::http::{HeaderMap, StatusCode, header};
use base64::Engine as _;

use super::error::{ApiError, OciErrorCode};
use crate::auth::{Action, Auth, AuthError, Principal, Secret, granted_by, jwt::Claims};

/// The caller of one request.
pub struct Caller {
    pub principal: Principal,
    /// Set when the caller presented a registry JWT: what it grants.
    pub claims: Option<Claims>,
}

/// Where clients reach this registry, for the challenge's realm.
pub struct Site<'a> {
    pub base_url: String,
    pub service: &'a str,
}

/// `s` as the content of a quoted-string (RFC 9110): `"` and `\` escaped.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

impl Site<'_> {
    /// `Bearer realm=...,service=...[,scope=...][,error=...]`, every value quoted.
    pub fn challenge(&self, scope: Option<&str>, error: Option<&str>) -> String {
        let mut c = format!(
            "Bearer realm={},service={}",
            quoted(&format!("{}/token", self.base_url)),
            quoted(self.service)
        );
        if let Some(s) = scope {
            c.push_str(&format!(",scope={}", quoted(s)));
        }
        if let Some(e) = error {
            c.push_str(&format!(",error={}", quoted(e)));
        }
        c
    }

    pub fn unauthorized(
        &self,
        message: &str,
        scope: Option<&str>,
        error: Option<&str>,
    ) -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            OciErrorCode::Unauthorized,
            message,
        )
        .with_header(header::WWW_AUTHENTICATE, &self.challenge(scope, error))
    }
}

/// Whether `host` is a `host[:port]` as a Host header may carry it: a DNS name or IPv4
/// address (letters, digits, `-`, `.`), or an IPv6 address in brackets, then an optional
/// port. Anything else (quotes, commas, slashes, spaces) could inject into the token
/// challenge or the links built from it.
pub fn valid_host(host: &str) -> bool {
    let (name, port) = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, after)) => {
                if v6.parse::<std::net::Ipv6Addr>().is_err() {
                    return false;
                }
                match after {
                    "" => return true,
                    p => match p.strip_prefix(':') {
                        Some(port) => ("x", Some(port)),
                        None => return false,
                    },
                }
            }
            None => return false,
        },
        None => match host.rsplit_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host, None),
        },
    };
    let name_ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.parse::<u16>().is_ok());
    name_ok && port_ok
}

/// The base URL clients use: the configured public URL, else the scheme and Host of
/// the request (HTTP/2's `:authority`), which must be a valid `host[:port]` (400
/// otherwise).
pub fn base_url(
    public_url: Option<&str>,
    tls: bool,
    headers: &HeaderMap,
    uri: &axum::http::Uri,
) -> Result<String, ApiError> {
    if let Some(u) = public_url {
        return Ok(u.trim_end_matches('/').to_owned());
    }
    let authority = uri.authority().map(|a| a.as_str());
    let host = match headers
        .get(header::HOST)
        .map(|h| h.to_str().ok())
        .or(authority.map(Some))
    {
        None => "localhost",
        Some(h) => h.filter(|h| valid_host(h)).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                OciErrorCode::Unsupported,
                "the Host header is not a valid host[:port]",
            )
        })?,
    };
    Ok(format!("{}://{host}", if tls { "https" } else { "http" }))
}

pub fn auth_error(site: &Site<'_>, e: AuthError) -> ApiError {
    match e {
        AuthError::BadCredentials => site.unauthorized(
            "authentication required: invalid username, password or token",
            None,
            None,
        ),
        AuthError::BadToken(why) => site.unauthorized(
            &format!("invalid token: {why}"),
            None,
            Some("invalid_token"),
        ),
        other => auth_error_plain(other),
    }
}

/// Parses `Authorization: Basic ...` into (user, secret).
pub fn basic_credentials(headers: &HeaderMap) -> Option<Result<(String, Secret), ()>> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok();
    let text = decoded.and_then(|d| String::from_utf8(d).ok());
    Some(match text.as_deref().and_then(|t| t.split_once(':')) {
        Some((u, p)) if !u.is_empty() => Ok((u.to_owned(), Secret::new(p))),
        _ => Err(()),
    })
}

/// Identifies the caller from the request's Authorization header.
pub async fn authenticate(
    auth: &Auth,
    site: &Site<'_>,
    headers: &HeaderMap,
    client: Option<IpAddr>,
) -> Result<Caller, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(Caller {
            principal: Principal::Anonymous,
            claims: None,
        });
    };
    let text = value
        .to_str()
        .map_err(|_| site.unauthorized("malformed Authorization header", None, None))?;
    let bearer = text
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"));
    if let Some((_, token)) = bearer {
        let (principal, claims) = auth
            .verify(token.trim(), client)
            .await
            .map_err(|e| auth_error(site, e))?;
        return Ok(Caller {
            principal,
            claims: Some(claims),
        });
    }
    match basic_credentials(headers) {
        Some(Ok((user, secret))) => {
            let principal = auth
                .login(&user, &secret, client)
                .await
                .map_err(|e| auth_error(site, e))?;
            Ok(Caller {
                principal,
                claims: None,
            })
        }
        _ => Err(site.unauthorized("unsupported or malformed Authorization header", None, None)),
    }
}

/// Whether the caller may do `action` on `repo` now: what its credentials allow at
/// this moment (grants, visibility, the token's scopes), and for a registry JWT also
/// what the JWT grants. A right taken away is gone at the next request.
pub async fn permits(
    auth: &Auth,
    caller: &Caller,
    repo: &str,
    action: Action,
) -> Result<bool, ApiError> {
    let now = auth
        .allowed(&caller.principal, repo)
        .await
        .map_err(auth_error_plain)?;
    Ok(match &caller.claims {
        Some(claims) => granted_by(claims, repo).intersect(now).has(action),
        None => now.has(action),
    })
}

/// An error of the auth layer that is not about the caller's credentials.
pub fn auth_error_plain(e: AuthError) -> ApiError {
    match e {
        AuthError::Overloaded(secs) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            OciErrorCode::Toomanyrequests,
            format!("too many sign-ins at once; retry in {secs} s (access tokens and registry tokens are not affected)"),
        )
        .with_header(header::RETRY_AFTER, &secs.to_string()),
        AuthError::RateLimited(secs) => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            OciErrorCode::Toomanyrequests,
            format!("too many failed logins; retry in {secs} s"),
        )
        .with_header(header::RETRY_AFTER, &secs.to_string()),
        AuthError::Invalid(m) => {
            ApiError::new(StatusCode::BAD_REQUEST, OciErrorCode::Unsupported, m)
        }
        AuthError::Busy => crate::store::StoreError::Busy.into(),
        AuthError::StorageFull => crate::store::StoreError::StorageFull.into(),
        AuthError::Unavailable(why) => crate::store::StoreError::Unavailable(why).into(),
        other => crate::store::StoreError::Internal(other.to_string()).into(),
    }
}

fn scope_for(repo: &str, action: Action) -> String {
    let actions = match action {
        Action::Pull => "pull",
        Action::Push => "pull,push",
        Action::Delete => "delete",
    };
    format!("repository:{repo}:{actions}")
}

/// Ok if the caller may do `action` on `repo`; else 401 with a challenge for the scope
/// (anonymous, or a token that lacks a scope its user has) or 403 DENIED.
pub async fn require(
    auth: &Auth,
    site: &Site<'_>,
    caller: &Caller,
    repo: &str,
    action: Action,
    client: Option<IpAddr>,
) -> Result<(), ApiError> {
    if permits(auth, caller, repo, action).await? {
        return Ok(());
    }
    let scope = scope_for(repo, action);
    if caller.principal == Principal::Anonymous {
        return Err(site.unauthorized("authentication required", Some(&scope), None));
    }
    if caller.claims.is_some()
        && auth
            .allowed(&caller.principal, repo)
            .await
            .map_err(auth_error_plain)?
            .has(action)
    {
        return Err(site.unauthorized(
            "the token does not cover this request",
            Some(&scope),
            Some("insufficient_scope"),
        ));
    }
    let who = caller.principal.name().unwrap_or("anonymous");
    auth.failure(
        "access.denied",
        caller.principal.name(),
        client,
        &format!(
            "{} {repo} with {}",
            action.name(),
            caller.principal.credential().unwrap_or("-")
        ),
    )
    .await;
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        OciErrorCode::Denied,
        format!(
            "requested access to the resource is denied: {who} may not {} {repo}",
            action.name()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        for ok in [
            "localhost",
            "127.0.0.1:5000",
            "registry.example.com",
            "[::1]",
            "[::1]:5000",
            "a-b.c:1",
        ] {
            assert!(valid_host(ok), "{ok}");
        }
        for bad in [
            "",
            "a\"b,realm=\"http://evil",
            "a b",
            "a/b",
            "x:",
            "x:99999",
            "x:5000:1",
            "[::1",
            "[zz]:1",
            "[::1]x",
            "a,b",
            "évil",
        ] {
            assert!(!valid_host(bad), "{bad}");
        }
        let site = Site {
            base_url: "http://h".into(),
            service: "svc\"x",
        };
        assert_eq!(
            site.challenge(Some("repository:a:pull"), None),
            "Bearer realm=\"http://h/token\",service=\"svc\\\"x\",scope=\"repository:a:pull\""
        );
    }
}
