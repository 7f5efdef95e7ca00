//! Registry credentials for the CLI, found the way docker finds them.
//!
//! Order (the first that has credentials for the registry wins):
//! 1. flags (`--username` with `--password-stdin` or `--password`);
//! 2. the environment: `WHARF_USERNAME` and `WHARF_PASSWORD` (a password or access token);
//! 3. docker's config (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`): the
//!    registry's `auths` entry (base64 `auth`, or `identitytoken` as `docker login` keeps
//!    it), or a credential helper named by `credHelpers` / `credsStore`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use base64::Engine as _;
use serde::Deserialize;

use crate::auth::Secret;

/// How the client proves who it is.
#[derive(Clone, Debug)]
pub enum Credentials {
    /// A user name with a password or an access token.
    Basic { user: String, password: Secret },
    /// The refresh token `docker login` keeps (`identitytoken`).
    Identity { user: String, token: Secret },
}

impl Credentials {
    pub fn user(&self) -> &str {
        match self {
            Credentials::Basic { user, .. } | Credentials::Identity { user, .. } => user,
        }
    }
}

/// Where the credentials came from, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Flags,
    Env,
    DockerConfig,
    Helper,
}

/// Credentials given explicitly, before the environment and docker's config are read.
#[derive(Clone, Debug, Default)]
pub struct Given {
    pub username: Option<String>,
    pub password: Option<Secret>,
}

/// Finds credentials for `host` (`host[:port]`). None means anonymous.
pub fn resolve(host: &str, given: &Given) -> anyhow::Result<Option<(Credentials, Source)>> {
    match (&given.username, &given.password) {
        (Some(user), Some(password)) => {
            return Ok(Some((
                Credentials::Basic {
                    user: user.clone(),
                    password: password.clone(),
                },
                Source::Flags,
            )));
        }
        (None, Some(_)) => bail!("a password was given without --username"),
        _ => {}
    }
    let env_user = std::env::var("WHARF_USERNAME")
        .ok()
        .filter(|u| !u.is_empty());
    let env_pass = std::env::var("WHARF_PASSWORD")
        .ok()
        .filter(|p| !p.is_empty());
    match (given.username.as_ref(), env_user.as_ref(), env_pass) {
        (Some(user), _, Some(p)) | (None, Some(user), Some(p)) => {
            return Ok(Some((
                Credentials::Basic {
                    user: user.clone(),
                    password: Secret::new(p),
                },
                Source::Env,
            )));
        }
        (None, Some(_), None) => bail!("WHARF_USERNAME is set but WHARF_PASSWORD is not"),
        _ => {}
    }
    let Some(path) = docker_config_path() else {
        return Ok(None);
    };
    let found = from_docker_config(&path, host)?;
    if let (Some(want), Some((c, _))) = (&given.username, &found) {
        if c.user() != want {
            bail!(
                "--username {want} was given without a password, and {} holds credentials of {} for {host}",
                path.display(),
                c.user()
            );
        }
    }
    if found.is_none() && given.username.is_some() {
        bail!("--username needs a password: --password-stdin, or WHARF_PASSWORD");
    }
    Ok(found)
}

fn docker_config_path() -> Option<PathBuf> {
    match std::env::var_os("DOCKER_CONFIG") {
        Some(dir) if !dir.is_empty() => Some(PathBuf::from(dir).join("config.json")),
        _ => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json")),
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct DockerConfig {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, AuthEntry>,
    #[serde(default)]
    creds_store: Option<String>,
    #[serde(default)]
    cred_helpers: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// `https://host:port/v1/` and `host:port` both name `host:port`.
fn normalize(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

pub fn from_docker_config(
    path: &Path,
    host: &str,
) -> anyhow::Result<Option<(Credentials, Source)>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let config: DockerConfig = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid docker config", path.display()))?;
    if let Some(helper) = config
        .cred_helpers
        .get(host)
        .or(config.creds_store.as_ref())
    {
        if let Some(c) = from_helper(helper, host)? {
            return Ok(Some((c, Source::Helper)));
        }
    }
    let Some(entry) = config
        .auths
        .iter()
        .find(|(k, _)| normalize(k) == host)
        .map(|(_, e)| e)
    else {
        return Ok(None);
    };
    let (mut user, mut password) = (entry.username.clone(), entry.password.clone());
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .with_context(|| {
                format!(
                    "the auth entry for {host} in {} is not base64 of user:password",
                    path.display()
                )
            })?;
        let (u, p) = decoded.split_once(':').with_context(|| {
            format!(
                "the auth entry for {host} in {} is not user:password",
                path.display()
            )
        })?;
        user = Some(u.to_owned());
        password = Some(p.to_owned());
    }
    if let Some(token) = entry.identitytoken.as_deref().filter(|t| !t.is_empty()) {
        return Ok(Some((
            Credentials::Identity {
                user: user.unwrap_or_default(),
                token: Secret::new(token),
            },
            Source::DockerConfig,
        )));
    }
    Ok(match (user, password) {
        (Some(user), Some(p)) if !p.is_empty() => Some((
            Credentials::Basic {
                user,
                password: Secret::new(p),
            },
            Source::DockerConfig,
        )),
        _ => None,
    })
}

/// Asks `docker-credential-<helper> get` for `host`'s credentials.
fn from_helper(helper: &str, host: &str) -> anyhow::Result<Option<Credentials>> {
    use std::io::Write;
    let program = format!("docker-credential-{helper}");
    let mut child = match std::process::Command::new(&program)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("docker's config names the credential helper {program}, which is not installed")
        }
        Err(e) => return Err(e).with_context(|| format!("running {program}")),
    };
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(host.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Ok(None); // the helper has nothing for this host
    }
    #[derive(Deserialize)]
    struct Reply {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let r: Reply = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{program} answered something other than credentials"))?;
    Ok(Some(if r.username == "<token>" {
        Credentials::Identity {
            user: String::new(),
            token: Secret::new(r.secret),
        }
    } else {
        Credentials::Basic {
            user: r.username,
            password: Secret::new(r.secret),
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("ci:s3cret:with:colons");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths": {{
                    "https://registry.example.com/v1/": {{"auth": "{auth}"}},
                    "127.0.0.1:5000": {{"identitytoken": "refresh-me"}},
                    "bad.example.com": {{"auth": "%%%"}}
                }}}}"#
            ),
        )
        .unwrap();
        let (c, src) = from_docker_config(&path, "registry.example.com")
            .unwrap()
            .unwrap();
        assert_eq!(src, Source::DockerConfig);
        match c {
            Credentials::Basic { user, password } => {
                assert_eq!(user, "ci");
                assert_eq!(password.expose(), "s3cret:with:colons");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            from_docker_config(&path, "127.0.0.1:5000")
                .unwrap()
                .unwrap()
                .0,
            Credentials::Identity { .. }
        ));
        assert!(from_docker_config(&path, "other:5000").unwrap().is_none());
        assert!(from_docker_config(&path, "bad.example.com").is_err());
        assert!(
            from_docker_config(&dir.path().join("missing.json"), "x")
                .unwrap()
                .is_none()
        );
    }
}
