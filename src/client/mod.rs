//! A registry client for the CLI (and the deploy agent): image references, credentials,
//! Docker's token handshake, and the few registry calls wharf's commands make.

pub mod creds;

use std::fmt;

use anyhow::{Context, bail};
use bytes::Bytes;
use reqwest::{Method, RequestBuilder, Response, StatusCode, header};

pub use creds::{Credentials, Given, Source};

use crate::oci::manifest::MANIFEST_TYPES;
use crate::oci::{Reference, RepoName};

/// `[registry/]repository[:tag|@digest]`, as docker reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    /// `host[:port]` when the reference names one (its first part has a `.` or `:`, or is
    /// `localhost`).
    pub registry: Option<String>,
    pub repo: RepoName,
    pub reference: Reference,
}

impl ImageRef {
    /// Parses a reference; `default_tag` is used when it has neither tag nor digest.
    pub fn parse(s: &str, default_tag: Option<&str>) -> anyhow::Result<ImageRef> {
        let bad = |why: &str| anyhow::anyhow!("invalid image reference {s:?}: {why}");
        let (registry, rest) = match s.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (Some(first.to_owned()), rest)
            }
            _ => (None, s),
        };
        let (name, reference) = if let Some((name, digest)) = rest.split_once('@') {
            // `name:tag@digest`: the digest decides.
            let name = match name.rsplit_once(':') {
                Some((n, t)) if !t.contains('/') => n,
                _ => name,
            };
            (name, Some(digest.to_owned()))
        } else {
            match rest.rsplit_once(':') {
                Some((n, t)) if !t.contains('/') => (n, Some(t.to_owned())),
                _ => (rest, None),
            }
        };
        let repo = RepoName::parse(name).map_err(|e| bad(&e.to_string()))?;
        let reference = match reference.as_deref().or(default_tag) {
            Some(r) => Reference::parse(r).map_err(|e| bad(&e.to_string()))?,
            None => return Err(bad("it needs a tag or a digest")),
        };
        Ok(ImageRef {
            registry,
            repo,
            reference,
        })
    }

    pub fn tag(&self) -> Option<&str> {
        match &self.reference {
            Reference::Tag(t) => Some(t),
            Reference::Digest(_) => None,
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(r) = &self.registry {
            write!(f, "{r}/")?;
        }
        match &self.reference {
            Reference::Tag(t) => write!(f, "{}:{t}", self.repo),
            Reference::Digest(d) => write!(f, "{}@{d}", self.repo),
        }
    }
}

/// The registry's base URL and `host[:port]`: an explicit `http(s)://` wins; a bare
/// loopback host gets `http` (as docker treats loopback registries as insecure), any
/// other `https`.
pub fn endpoint(registry: &str) -> anyhow::Result<(String, String)> {
    let bad = || {
        anyhow::anyhow!(
            "invalid registry {registry:?}: expected host[:port], optionally with http:// or https://"
        )
    };
    let (scheme, host) = match registry.split_once("://") {
        Some((s @ ("http" | "https"), h)) => (Some(s), h.trim_end_matches('/')),
        Some((s, _)) => bail!("unsupported registry scheme {s:?}: use http:// or https://"),
        None => (None, registry.trim_end_matches('/')),
    };
    let (bare, port) = match host.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') => (h, Some(p)),
        _ => (host, None),
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
    if bare.is_empty() || host.contains('/') || host.contains('@') || !port_ok {
        return Err(bad());
    }
    let scheme = scheme.unwrap_or_else(|| {
        let loopback = bare == "localhost"
            || bare == "[::1]"
            || bare
                .parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| ip.is_loopback());
        if loopback { "http" } else { "https" }
    });
    Ok((format!("{scheme}://{host}"), host.to_owned()))
}

/// A manifest as the registry served it.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub media_type: String,
    pub digest: String,
    pub bytes: Bytes,
}

/// A client for one registry.
pub struct Client {
    http: reqwest::Client,
    base: String,
    host: String,
    creds: Option<Credentials>,
    /// Scopes asked for with every token, so one token covers a whole command.
    scopes: Vec<String>,
    token: tokio::sync::Mutex<Option<String>>,
    /// When the credential behind the last token expires (unix seconds), as the token
    /// service said.
    credential_expires_at: std::sync::Mutex<Option<i64>>,
}

fn accept_manifests() -> String {
    MANIFEST_TYPES.join(", ")
}

impl Client {
    pub fn new(registry: &str, creds: Option<Credentials>) -> anyhow::Result<Client> {
        let (base, host) = endpoint(registry)?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("wharf/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(std::time::Duration::from_secs(10))
            .timeout(std::time::Duration::from_secs(300))
            .build()
            .context("creating the HTTP client")?;
        Ok(Client {
            http,
            base,
            host,
            creds,
            scopes: Vec::new(),
            token: tokio::sync::Mutex::new(None),
            credential_expires_at: std::sync::Mutex::new(None),
        })
    }

    /// When the credential this client logs in with expires (unix seconds), once a
    /// token has been fetched with it and the registry said; None if it never expires
    /// or nothing is known yet.
    pub fn credential_expires_at(&self) -> Option<i64> {
        *self
            .credential_expires_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Asks for `scope` (e.g. `repository:team/api:pull,push`) in every token.
    pub fn with_scope(mut self, scope: String) -> Client {
        if !self.scopes.contains(&scope) {
            self.scopes.push(scope);
        }
        self
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request, answering a 401 challenge once: a Bearer challenge with a token
    /// from the realm, a Basic one with the credentials.
    async fn send(
        &self,
        method: Method,
        path: &str,
        build: impl Fn(RequestBuilder) -> RequestBuilder,
    ) -> anyhow::Result<Response> {
        let url = format!("{}{path}", self.base);
        let attempt = |auth: Option<String>| {
            let mut rb = build(self.http.request(method.clone(), &url));
            if let Some(a) = auth {
                rb = rb.header(header::AUTHORIZATION, a);
            }
            rb.send()
        };
        let current = self.token.lock().await.clone();
        let r = attempt(current.map(|t| format!("Bearer {t}")))
            .await
            .with_context(|| format!("cannot reach the registry at {}", self.base))?;
        if r.status() != StatusCode::UNAUTHORIZED {
            return Ok(r);
        }
        if self.creds.is_none() {
            bail!(
                "the registry at {} needs credentials: run `docker login {}`, set WHARF_USERNAME and WHARF_PASSWORD, or give --username with --password-stdin",
                self.base,
                self.host
            );
        }
        let challenge = r
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let auth = if let Some(params) = challenge.strip_prefix("Bearer ") {
            let token = self.fetch_token(params).await?;
            *self.token.lock().await = Some(token.clone());
            format!("Bearer {token}")
        } else if challenge.starts_with("Basic") {
            match &self.creds {
                Some(Credentials::Basic { user, password }) => basic(user, password.expose()),
                _ => return Ok(r),
            }
        } else {
            return Ok(r);
        };
        attempt(Some(auth))
            .await
            .with_context(|| format!("cannot reach the registry at {}", self.base))
    }

    /// Docker's token flow: GET the realm with Basic credentials, or POST the refresh
    /// token `docker login` keeps.
    async fn fetch_token(&self, params: &str) -> anyhow::Result<String> {
        let p = challenge_params(params);
        let realm = p
            .iter()
            .find(|(k, _)| k == "realm")
            .map(|(_, v)| v.clone())
            .context("the registry's challenge has no realm")?;
        let service = p
            .iter()
            .find(|(k, _)| k == "service")
            .map(|(_, v)| v.clone());
        let mut scopes: Vec<String> = self.scopes.clone();
        if let Some((_, s)) = p.iter().find(|(k, _)| k == "scope") {
            for s in s.split(' ') {
                if !scopes.iter().any(|x| x == s) {
                    scopes.push(s.to_owned());
                }
            }
        }
        let r = match &self.creds {
            Some(Credentials::Identity { token, .. }) => {
                let mut form: Vec<(&str, String)> = vec![
                    ("grant_type", "refresh_token".into()),
                    ("refresh_token", token.expose().to_owned()),
                    ("client_id", "wharf-cli".into()),
                ];
                if let Some(s) = &service {
                    form.push(("service", s.clone()));
                }
                if !scopes.is_empty() {
                    form.push(("scope", scopes.join(" ")));
                }
                let body = form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(form.iter().map(|(k, v)| (*k, v.as_str())))
                    .finish();
                self.http
                    .post(&realm)
                    .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(body)
                    .send()
                    .await
            }
            creds => {
                let mut q: Vec<(&str, &str)> = Vec::new();
                if let Some(s) = &service {
                    q.push(("service", s));
                }
                for s in &scopes {
                    q.push(("scope", s));
                }
                let mut rb = self.http.get(&realm).query(&q);
                if let Some(Credentials::Basic { user, password }) = creds {
                    rb = rb.header(header::AUTHORIZATION, basic(user, password.expose()));
                }
                rb.send().await
            }
        }
        .with_context(|| format!("cannot reach the token service at {realm}"))?;
        if !r.status().is_success() {
            let who = self
                .creds
                .as_ref()
                .map_or("anonymous".to_owned(), |c| c.user().to_owned());
            bail!(
                "the registry refused to log in {who}: {}",
                error_text(r).await
            );
        }
        let v: serde_json::Value = r.json().await.context("the token answer is not JSON")?;
        *self
            .credential_expires_at
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = v
            .get("credential_expires_in")
            .and_then(|s| s.as_i64())
            .map(|s| crate::auth::now_secs() + s);
        v.get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .map(str::to_owned)
            .context("the token answer has no token")
    }

    /// A manifest by tag or digest; None if the registry does not have it.
    pub async fn manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> anyhow::Result<Option<Manifest>> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let r = self
            .send(Method::GET, &path, |rb| {
                rb.header(header::ACCEPT, accept_manifests())
            })
            .await?;
        if r.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let r = ok(r, &format!("reading {repo}:{reference}")).await?;
        let media_type = header_str(&r, header::CONTENT_TYPE.as_str()).unwrap_or_default();
        let served = header_str(&r, "docker-content-digest");
        let bytes = r.bytes().await.context("reading the manifest")?;
        let computed = crate::oci::Digest::sha256_of(&bytes).to_string();
        if let Some(d) = served.filter(|d| d.starts_with("sha256:")) {
            if d != computed {
                bail!(
                    "the registry sent {repo}:{reference} with digest {d}, but its bytes hash to {computed}"
                );
            }
        }
        Ok(Some(Manifest {
            media_type,
            digest: computed,
            bytes,
        }))
    }

    /// The digest a tag points at (HEAD); None if the tag does not exist.
    pub async fn manifest_digest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> anyhow::Result<Option<String>> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let r = self
            .send(Method::HEAD, &path, |rb| {
                rb.header(header::ACCEPT, accept_manifests())
            })
            .await?;
        if r.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let r = ok(r, &format!("looking up {repo}:{reference}")).await?;
        // What comes back names images in files and on command lines: a digest or
        // nothing.
        match header_str(&r, "docker-content-digest") {
            Some(d) => match d.parse::<crate::oci::Digest>() {
                Ok(d) => Ok(Some(d.to_string())),
                Err(e) => {
                    bail!("the registry answered {repo}:{reference} with the digest {d:?}: {e}")
                }
            },
            None => bail!("the registry answered {repo}:{reference} with no Docker-Content-Digest"),
        }
    }

    /// Stores a manifest under `reference`; returns its digest.
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        m: &Manifest,
    ) -> anyhow::Result<String> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let r = self
            .send(Method::PUT, &path, |rb| {
                rb.header(header::CONTENT_TYPE, &m.media_type)
                    .body(m.bytes.clone())
            })
            .await?;
        let r = ok(r, &format!("writing {repo}:{reference}")).await?;
        Ok(header_str(&r, "docker-content-digest").unwrap_or_else(|| m.digest.clone()))
    }

    pub async fn blob_exists(&self, repo: &RepoName, digest: &str) -> anyhow::Result<bool> {
        let r = self
            .send(Method::HEAD, &format!("/v2/{repo}/blobs/{digest}"), |rb| rb)
            .await?;
        if r.status() == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        ok(r, &format!("checking blob {digest} in {repo}")).await?;
        Ok(true)
    }

    /// Links a blob of `from` into `repo` without moving its bytes; false if the registry
    /// could not (it then opened an upload, which is cancelled).
    pub async fn mount(
        &self,
        repo: &RepoName,
        from: &RepoName,
        digest: &str,
    ) -> anyhow::Result<bool> {
        let q = form_urlencoded::Serializer::new(String::new())
            .append_pair("mount", digest)
            .append_pair("from", from.as_str())
            .finish();
        let r = self
            .send(
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/?{q}"),
                |rb| rb.header(header::CONTENT_LENGTH, "0"),
            )
            .await?;
        if r.status() == StatusCode::CREATED {
            return Ok(true);
        }
        let location = header_str(&r, header::LOCATION.as_str());
        ok(r, &format!("mounting {digest} from {from} into {repo}")).await?;
        if let Some(loc) = location {
            let path = match loc.find("/v2/") {
                Some(i) => loc[i..].to_owned(),
                None => loc,
            };
            let _ = self.send(Method::DELETE, &path, |rb| rb).await;
        }
        Ok(false)
    }

    /// One page of wharf's tag details API.
    pub async fn tag_page(
        &self,
        repo: &RepoName,
        page: u32,
        page_size: u32,
        ordering: &str,
    ) -> anyhow::Result<serde_json::Value> {
        let path = format!(
            "/api/v1/repositories/{repo}/tags?page={page}&page_size={page_size}&ordering={ordering}"
        );
        let r = self.send(Method::GET, &path, |rb| rb).await?;
        let r = ok(r, &format!("listing the tags of {repo}")).await?;
        r.json().await.context("the tags answer is not JSON")
    }
}

impl Client {
    /// A deploy agent's report of what a stack runs (`POST /api/v1/deploys`).
    pub async fn report_deploys(&self, report: &serde_json::Value) -> anyhow::Result<()> {
        let r = self
            .send(Method::POST, "/api/v1/deploys", |rb| rb.json(report))
            .await?;
        ok(r, "reporting deploys").await?;
        Ok(())
    }

    /// The deleted tags of `repo` that can still be restored (`what` = `deleted`), or
    /// its manifests with no tag (`untagged`).
    pub async fn tags_listing(
        &self,
        repo: &RepoName,
        what: &str,
    ) -> anyhow::Result<serde_json::Value> {
        let path = format!("/api/v1/repositories/{repo}/tags?{what}=true");
        let r = self.send(Method::GET, &path, |rb| rb).await?;
        let r = ok(r, &format!("listing the {what} tags of {repo}")).await?;
        r.json().await.context("the tags answer is not JSON")
    }
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

fn header_str(r: &Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// `key="value",key2="value2"` of a challenge.
fn challenge_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key.trim().trim_start_matches(',').trim().to_owned();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        out.push((key, value.to_owned()));
        rest = next.trim_start_matches(',').trim();
    }
    out
}

/// The OCI error of a failed answer as one line: `403 DENIED: message`.
async fn error_text(r: Response) -> String {
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    let parsed: Option<serde_json::Value> = serde_json::from_str(&body).ok();
    let first = parsed
        .as_ref()
        .and_then(|v| v.get("errors"))
        .and_then(|e| e.get(0))
        .map(|e| {
            format!(
                "{}: {}",
                e.get("code").and_then(|c| c.as_str()).unwrap_or("ERROR"),
                e.get("message").and_then(|c| c.as_str()).unwrap_or("")
            )
        });
    match first {
        Some(e) => format!("{} {e}", status.as_u16()),
        None if body.trim().is_empty() => status.to_string(),
        None => format!(
            "{status}: {}",
            body.trim().chars().take(200).collect::<String>()
        ),
    }
}

async fn ok(r: Response, doing: &str) -> anyhow::Result<Response> {
    if r.status().is_success() {
        Ok(r)
    } else {
        bail!("{doing}: the registry answered {}", error_text(r).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> (Option<String>, String, String) {
        let r = ImageRef::parse(s, None).unwrap();
        (r.registry, r.repo.to_string(), r.reference.to_string())
    }

    #[test]
    fn image_references() {
        assert_eq!(
            parse("team/api:prod"),
            (None, "team/api".into(), "prod".into())
        );
        assert_eq!(
            parse("127.0.0.1:5000/team/api:1.0"),
            (
                Some("127.0.0.1:5000".into()),
                "team/api".into(),
                "1.0".into()
            )
        );
        assert_eq!(
            parse("registry.example.com/api:staging"),
            (
                Some("registry.example.com".into()),
                "api".into(),
                "staging".into()
            )
        );
        assert_eq!(
            parse("localhost/a/b:c"),
            (Some("localhost".into()), "a/b".into(), "c".into())
        );
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(parse(&format!("team/api:prod@{d}")).2, d);
        assert_eq!(parse(&format!("team/api@{d}")).2, d);
        assert_eq!(
            ImageRef::parse("team/api", Some("latest"))
                .unwrap()
                .to_string(),
            "team/api:latest"
        );
        for bad in [
            "team/api",
            "Team/api:x",
            "team/api:bad tag",
            "team/api@sha256:zz",
            "",
        ] {
            assert!(ImageRef::parse(bad, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            endpoint("127.0.0.1:5000").unwrap().0,
            "http://127.0.0.1:5000"
        );
        assert_eq!(
            endpoint("localhost:5000").unwrap().0,
            "http://localhost:5000"
        );
        assert_eq!(
            endpoint("registry.example.com").unwrap().0,
            "https://registry.example.com"
        );
        assert_eq!(
            endpoint("http://10.0.0.5:5000/").unwrap(),
            ("http://10.0.0.5:5000".into(), "10.0.0.5:5000".into())
        );
        assert!(endpoint("ftp://x").is_err());
        assert!(endpoint("https://").is_err());
        assert!(endpoint("host:port").is_err());
        assert!(endpoint("user@host").is_err());
    }

    #[test]
    fn challenges() {
        let p = challenge_params(
            r#"realm="http://127.0.0.1:5000/token",service="wharf",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(p[0], ("realm".into(), "http://127.0.0.1:5000/token".into()));
        assert_eq!(p[1], ("service".into(), "wharf".into()));
        assert_eq!(p[2], ("scope".into(), "repository:a/b:pull,push".into()));
    }
}
