//! Users, access tokens, permissions and the Docker token flow.
//!
//! **Architecture invariant:** this layer decides *who* a caller is and *what* they may
//! do to a repository; it knows nothing of HTTP. The registry layer asks it and maps its
//! answers to 401/403.
//!
//! Rights of a user on a repository: everything for admins; everything in their own
//! namespace (`<user>/*`); the levels granted on matching patterns; and pull on public
//! repositories, for anyone. A caller using an access token gets the intersection of
//! the token's scopes with its owner's rights *at the time of use*, so a token never
//! exceeds its owner and loses what the owner loses.

pub mod jwt;
pub mod limiter;
pub mod scope;
pub mod secret;

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use scope::{Action, Actions, Level, Pattern, Requested, Scope};
pub use secret::Secret;

use crate::store::meta::MetaError;
use crate::store::meta::auth::{AuditEntry, AuthMeta, TokenRecord};

/// How long a registry JWT lives.
pub const TOKEN_TTL: Duration = Duration::from_secs(300);
pub const DEFAULT_SERVICE: &str = "wharf";
const KEY_FILE: &str = "auth.key";
/// Last-used times of tokens are written at most this often.
const TOUCH_EVERY_MS: i64 = 60_000;

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    Anonymous,
    User {
        name: String,
        admin: bool,
        generation: i64,
        /// Set when the caller used an access token: its id and scopes.
        token: Option<(String, Vec<Scope>)>,
    },
}

impl Principal {
    pub fn name(&self) -> Option<&str> {
        match self {
            Principal::Anonymous => None,
            Principal::User { name, .. } => Some(name),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid username, password or token")]
    BadCredentials,
    #[error("too many failed logins; retry in {0} s")]
    RateLimited(u64),
    #[error("invalid token: {0}")]
    BadToken(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the metadata database is busy")]
    Busy,
    #[error("auth storage: {0}")]
    Internal(String),
}

impl From<MetaError> for AuthError {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::Busy => AuthError::Busy,
            MetaError::Conflict(what) => AuthError::Invalid(format!("{what} already exists")),
            other => AuthError::Internal(other.to_string()),
        }
    }
}

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// What a token endpoint answers.
#[derive(Debug, Clone)]
pub struct Issued {
    pub token: String,
    pub expires_in: u64,
    pub issued_at: i64,
    pub access: Vec<jwt::AccessEntry>,
}

pub struct Auth {
    meta: Arc<dyn AuthMeta>,
    key: [u8; 32],
    service: String,
    limiter: limiter::Limiter,
    /// Recently verified passwords: keyed hash -> when.
    verified: std::sync::Mutex<std::collections::HashMap<[u8; 32], std::time::Instant>>,
}

/// How long a verified password is remembered.
const VERIFIED_TTL: Duration = Duration::from_secs(60);
const VERIFIED_MAX: usize = 10_000;

/// Loads the signing key from the data directory, creating it (mode 0600) on first use.
fn load_key(dir: &Path) -> std::io::Result<[u8; 32]> {
    let path = dir.join(KEY_FILE);
    match std::fs::read(&path) {
        Ok(b) if b.len() == 32 => {
            let mut k = [0u8; 32];
            k.copy_from_slice(&b);
            Ok(k)
        }
        Ok(_) => Err(std::io::Error::other(format!(
            "{} is not a 32-byte key",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let key = secret::random_key();
            // A name of its own, so concurrent first starts never write the same file.
            let tmp = dir.join(format!(
                "{KEY_FILE}.{}.{}.tmp",
                std::process::id(),
                secret::random_string(8)
            ));
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&key)?;
            f.sync_all()?;
            // Another process may have created it meanwhile: keep whichever came first.
            match std::fs::hard_link(&tmp, &path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            std::fs::remove_file(&tmp)?;
            load_key(dir)
        }
        Err(e) => Err(e),
    }
}

impl Auth {
    pub fn open(
        meta: Arc<dyn AuthMeta>,
        data_dir: &Path,
        service: &str,
    ) -> Result<Auth, AuthError> {
        let key =
            load_key(data_dir).map_err(|e| AuthError::Internal(format!("signing key: {e}")))?;
        Ok(Auth {
            meta,
            key,
            service: service.to_owned(),
            limiter: limiter::Limiter::default(),
            verified: std::sync::Mutex::default(),
        })
    }

    fn verified_key(&self, user: &str, password: &Secret, stored_hash: &str) -> [u8; 32] {
        use hmac::Mac;
        let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.key).expect("any key length");
        for part in [user, password.expose(), stored_hash] {
            m.update(&(part.len() as u64).to_be_bytes());
            m.update(part.as_bytes());
        }
        m.finalize().into_bytes().into()
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    pub fn meta(&self) -> &Arc<dyn AuthMeta> {
        &self.meta
    }

    /// On a registry with no users, creates `admin` with `password`, or a random password
    /// which is returned so the caller can show it once.
    pub async fn ensure_admin(&self, password: Option<&str>) -> Result<Option<Secret>, AuthError> {
        if self.meta.user_count().await? > 0 {
            return Ok(None);
        }
        let generated = password
            .is_none()
            .then(|| Secret::new(secret::random_string(24)));
        let pw =
            password.unwrap_or_else(|| generated.as_ref().map(Secret::expose).unwrap_or_default());
        let hash = secret::hash_password(pw);
        match self.meta.user_create("admin", &hash, true).await {
            Ok(()) => {}
            // Another process created it first: fine.
            Err(MetaError::Conflict(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        self.audit(
            Some("wharf"),
            "user.create",
            None,
            Some("admin (first start)".into()),
            None,
        )
        .await;
        Ok(generated)
    }

    pub async fn audit(
        &self,
        actor: Option<&str>,
        action: &str,
        repository: Option<&str>,
        detail: Option<String>,
        client: Option<IpAddr>,
    ) {
        let e = AuditEntry {
            at: now_ms(),
            actor: actor.map(str::to_owned),
            action: action.to_owned(),
            repository: repository.map(str::to_owned),
            detail,
            client: client.map(|c| c.to_string()),
        };
        if let Err(err) = self.meta.audit_add(e).await {
            tracing::warn!(error = %err, action, "could not write the audit log");
        }
    }

    /// Checks a username with a password or an access token (as Basic credentials carry
    /// them), under the failed-login rate limit.
    pub async fn login(
        &self,
        user: &str,
        password: &Secret,
        client: Option<IpAddr>,
    ) -> Result<Principal, AuthError> {
        if let Some(wait) = self.limiter.blocked(client, user) {
            return Err(AuthError::RateLimited(wait));
        }
        match self.check(user, password).await {
            Ok(p) => {
                self.limiter.succeeded(client, user);
                Ok(p)
            }
            Err(AuthError::BadCredentials) => {
                self.limiter.failed(client, user);
                self.audit(Some(user), "login.failed", None, None, client)
                    .await;
                Err(AuthError::BadCredentials)
            }
            Err(e) => Err(e),
        }
    }

    async fn check(&self, user: &str, password: &Secret) -> Result<Principal, AuthError> {
        if let Some((id, secret)) = secret::parse_token(password.expose()) {
            let p = self.token_principal(id, secret, None).await?;
            return match p.name() {
                Some(n) if n == user => Ok(p),
                _ => Err(AuthError::BadCredentials),
            };
        }
        let record = self.meta.user_get(user).await?;
        // A password verified recently for this very hash need not be hashed again:
        // Argon2id costs tens of milliseconds and 19 MiB, and curl-style clients send
        // Basic credentials on every request. The key is a keyed hash of the user, the
        // password and the stored hash, so a password change never hits the cache.
        let cache_key = record
            .as_ref()
            .map(|u| self.verified_key(user, password, &u.password_hash));
        if let (Some(u), Some(k)) = (&record, &cache_key) {
            if self
                .verified
                .lock()
                .expect("verified cache")
                .get(k)
                .is_some_and(|t| t.elapsed() < VERIFIED_TTL)
            {
                return Ok(Principal::User {
                    name: u.name.clone(),
                    admin: u.admin,
                    generation: u.generation,
                    token: None,
                });
            }
        }
        let hash = record
            .as_ref()
            .map_or(secret::dummy_hash(), |u| u.password_hash.as_str())
            .to_owned();
        let pw = password.clone();
        let ok = tokio::task::spawn_blocking(move || secret::verify_password(pw.expose(), &hash))
            .await
            .map_err(|e| AuthError::Internal(e.to_string()))?;
        if let (true, Some(k)) = (ok, cache_key) {
            let mut cache = self.verified.lock().expect("verified cache");
            if cache.len() >= VERIFIED_MAX {
                cache.retain(|_, t| t.elapsed() < VERIFIED_TTL);
                if cache.len() >= VERIFIED_MAX {
                    cache.clear();
                }
            }
            cache.insert(k, std::time::Instant::now());
        }
        match record {
            Some(u) if ok => Ok(Principal::User {
                name: u.name,
                admin: u.admin,
                generation: u.generation,
                token: None,
            }),
            _ => Err(AuthError::BadCredentials),
        }
    }

    /// The principal an access or refresh token stands for, if it is valid now.
    async fn token_principal(
        &self,
        id: &str,
        secret: &str,
        kind: Option<&str>,
    ) -> Result<Principal, AuthError> {
        let t = self
            .meta
            .token_get(id)
            .await?
            .ok_or(AuthError::BadCredentials)?;
        let now = now_ms();
        let usable = secret::token_secret_matches(secret, &t.secret_hash)
            && t.revoked_at.is_none()
            && t.expires_at.is_none_or(|e| e > now)
            && kind.is_none_or(|k| k == t.kind);
        if !usable {
            return Err(AuthError::BadCredentials);
        }
        let u = self
            .meta
            .user_get(&t.user_name)
            .await?
            .ok_or(AuthError::BadCredentials)?;
        if t.last_used_at.is_none_or(|l| now - l > TOUCH_EVERY_MS) {
            self.meta.token_touch(&t.id, now).await?;
        }
        let scopes = if t.kind == "refresh" {
            None // a refresh token carries its user's full rights
        } else {
            Some(
                t.scopes
                    .iter()
                    .filter_map(|s| Scope::parse(s).ok())
                    .collect(),
            )
        };
        Ok(Principal::User {
            name: u.name,
            admin: u.admin,
            generation: u.generation,
            token: scopes.map(|s| (t.id, s)),
        })
    }

    /// Exchanges a refresh token (from `docker login`) for its principal.
    pub async fn refresh(
        &self,
        token: &Secret,
        client: Option<IpAddr>,
    ) -> Result<Principal, AuthError> {
        let Some((id, secret)) = secret::parse_token(token.expose()) else {
            return Err(AuthError::BadCredentials);
        };
        if let Some(wait) = self.limiter.blocked(client, id) {
            return Err(AuthError::RateLimited(wait));
        }
        let r = self.token_principal(id, secret, Some("refresh")).await;
        if r.is_err() {
            self.limiter.failed(client, id);
        }
        r
    }

    /// A refresh token for `user`, which `docker login` keeps in place of the password.
    pub async fn new_refresh_token(&self, user: &str) -> Result<Secret, AuthError> {
        let (id, token, hash) = secret::new_token();
        self.meta
            .token_create(&TokenRecord {
                id,
                user_name: user.to_owned(),
                name: "docker login".into(),
                kind: "refresh".into(),
                secret_hash: hash,
                scopes: vec![],
                created_at: now_ms(),
                last_used_at: None,
                expires_at: None,
                revoked_at: None,
            })
            .await?;
        Ok(token)
    }

    /// Everything that decides what `p` may do, loaded once.
    pub async fn rights(&self, p: &Principal) -> Result<Rights, AuthError> {
        let visibility = self
            .meta
            .visibility_list()
            .await?
            .into_iter()
            .filter_map(|(p, public)| Pattern::parse(&p).ok().map(|p| (p, public)))
            .collect();
        let grants = match p {
            Principal::User {
                name, admin: false, ..
            } => self
                .meta
                .grants_of(name)
                .await?
                .into_iter()
                .filter_map(|g| Some((Pattern::parse(&g.pattern).ok()?, Level::parse(&g.level)?)))
                .collect(),
            _ => Vec::new(),
        };
        Ok(Rights {
            principal: p.clone(),
            visibility,
            grants,
        })
    }

    /// What `p` may do to `repo` right now.
    pub async fn allowed(&self, p: &Principal, repo: &str) -> Result<Actions, AuthError> {
        Ok(self.rights(p).await?.allowed(repo))
    }

    /// Checks that every scope is within what `user` may do, for `wharf token create`.
    pub async fn check_scopes_within(&self, user: &str, scopes: &[Scope]) -> Result<(), AuthError> {
        let u = self
            .meta
            .user_get(user)
            .await?
            .ok_or_else(|| AuthError::Invalid(format!("no user {user}")))?;
        if u.admin {
            return Ok(());
        }
        let grants = self.meta.grants_of(user).await?;
        for s in scopes {
            let mut covered = Actions::NONE;
            if Pattern::Namespace(user.to_owned()).covers(&s.pattern) {
                covered = Actions::ALL;
            }
            for g in &grants {
                if let (Ok(p), Some(l)) = (Pattern::parse(&g.pattern), Level::parse(&g.level)) {
                    if p.covers(&s.pattern) {
                        covered = covered.union(l.actions());
                    }
                }
            }
            if !covered.contains(s.actions) {
                return Err(AuthError::Invalid(format!(
                    "scope {s} exceeds what {user} may do (has {} there)",
                    if covered.is_empty() {
                        "nothing".to_owned()
                    } else {
                        covered.to_string()
                    }
                )));
            }
        }
        Ok(())
    }

    /// Issues a registry JWT for the requested scopes, each cut down to what `p` may do.
    pub async fn issue(&self, p: &Principal, requested: &[Requested]) -> Result<Issued, AuthError> {
        let mut access = Vec::new();
        for r in requested {
            match r {
                Requested::Repository { name, actions } => {
                    let granted = self.allowed(p, name.as_str()).await?.intersect(*actions);
                    access.push(jwt::AccessEntry {
                        kind: "repository".into(),
                        name: name.to_string(),
                        actions: granted
                            .list()
                            .into_iter()
                            .map(|a| a.name().to_owned())
                            .collect(),
                    });
                }
                Requested::Catalog => access.push(jwt::AccessEntry {
                    kind: "registry".into(),
                    name: "catalog".into(),
                    actions: vec!["*".into()],
                }),
            }
        }
        let now = now_secs();
        let (sub, generation, tid) = match p {
            Principal::Anonymous => (String::new(), 0, None),
            Principal::User {
                name,
                generation,
                token,
                ..
            } => (
                name.clone(),
                *generation,
                token.as_ref().map(|(id, _)| id.clone()),
            ),
        };
        let claims = jwt::Claims {
            iss: jwt::ISSUER.into(),
            sub,
            aud: self.service.clone(),
            exp: now + TOKEN_TTL.as_secs() as i64,
            nbf: now,
            iat: now,
            jti: secret::random_string(16),
            access: access.clone(),
            generation,
            tid,
        };
        Ok(Issued {
            token: jwt::sign(&self.key, &claims),
            expires_in: TOKEN_TTL.as_secs(),
            issued_at: now,
            access,
        })
    }

    /// Verifies a bearer JWT and that what it stands for still holds: the user exists
    /// with the same generation, and the access token it came from is not revoked.
    pub async fn verify(&self, token: &str) -> Result<(Principal, jwt::Claims), AuthError> {
        let claims = jwt::verify(&self.key, token, &self.service, now_secs())
            .map_err(|e| AuthError::BadToken(e.to_string()))?;
        if claims.sub.is_empty() {
            return Ok((Principal::Anonymous, claims));
        }
        let u = self
            .meta
            .user_get(&claims.sub)
            .await?
            .ok_or_else(|| AuthError::BadToken("user removed".into()))?;
        if u.generation != claims.generation {
            return Err(AuthError::BadToken(
                "issued before a password change".into(),
            ));
        }
        let token = match &claims.tid {
            None => None,
            Some(id) => {
                let t = self
                    .meta
                    .token_get(id)
                    .await?
                    .ok_or_else(|| AuthError::BadToken("token revoked".into()))?;
                if t.revoked_at.is_some() || t.expires_at.is_some_and(|e| e <= now_ms()) {
                    return Err(AuthError::BadToken("token revoked or expired".into()));
                }
                Some((
                    t.id,
                    t.scopes
                        .iter()
                        .filter_map(|s| Scope::parse(s).ok())
                        .collect(),
                ))
            }
        };
        Ok((
            Principal::User {
                name: u.name,
                admin: u.admin,
                generation: u.generation,
                token,
            },
            claims,
        ))
    }
}

/// A caller's rights, loaded once (for example to filter a whole catalog).
pub struct Rights {
    principal: Principal,
    visibility: Vec<(Pattern, bool)>,
    grants: Vec<(Pattern, Level)>,
}

impl Rights {
    /// Whether `repo` is public: the most specific visibility rule matching it decides.
    fn is_public(&self, repo: &str) -> bool {
        self.visibility
            .iter()
            .filter(|(p, _)| p.matches(repo))
            .max_by_key(|(p, _)| p.specificity())
            .is_some_and(|(_, public)| *public)
    }

    pub fn allowed(&self, repo: &str) -> Actions {
        let public = if self.is_public(repo) {
            Actions::of(&[Action::Pull])
        } else {
            Actions::NONE
        };
        let Principal::User {
            name, admin, token, ..
        } = &self.principal
        else {
            return public;
        };
        let own = *admin || Pattern::Namespace(name.clone()).matches(repo);
        let mut rights = if own { Actions::ALL } else { Actions::NONE };
        for (p, level) in &self.grants {
            if p.matches(repo) {
                rights = rights.union(level.actions());
            }
        }
        rights = rights.union(public);
        match token {
            // An access token gets its owner's rights cut down to its scopes.
            Some((_, scopes)) => {
                let scoped = scopes
                    .iter()
                    .filter(|s| s.pattern.matches(repo))
                    .fold(Actions::NONE, |a, s| a.union(s.actions));
                rights.intersect(scoped)
            }
            None => rights,
        }
    }
}

/// The actions a verified JWT grants on `repo`.
pub fn granted_by(claims: &jwt::Claims, repo: &str) -> Actions {
    claims
        .access
        .iter()
        .filter(|a| a.kind == "repository" && a.name == repo)
        .flat_map(|a| a.actions.iter().filter_map(|x| Action::parse(x)))
        .fold(Actions::NONE, |acc, a| acc.union(Actions::of(&[a])))
}

#[cfg(test)]
mod tests {
    #[test]
    fn concurrent_key_creation_agrees_on_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let d = dir.path().to_owned();
                std::thread::spawn(move || super::load_key(&d).unwrap())
            })
            .collect();
        let keys: Vec<[u8; 32]> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(keys.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temp files left behind"
        );
    }
}
