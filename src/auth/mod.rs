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

pub mod audit;
mod hashing;
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
use crate::store::meta::auth::{AuditEntry, AuthMeta, TokenRecord, UserRecord};

/// How long a registry JWT lives.
pub const TOKEN_TTL: Duration = Duration::from_secs(300);
pub const DEFAULT_SERVICE: &str = "wharf";
const KEY_FILE: &str = "auth.key";
/// Last-used times of tokens are written at most this often.
const TOUCH_EVERY_MS: i64 = 60_000;
/// Live refresh tokens a user keeps at most; a new login past it ends the oldest.
pub const REFRESH_PER_USER: usize = 20;
/// Callers whose current rights are kept in memory, at most.
const CURRENT_MAX: usize = 10_000;

/// The cores this process may use: how many password checks run at once.
pub fn parallelism() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
}

/// The token a caller presented (as a password, or behind a JWT).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRef {
    pub id: String,
    /// An access token's scopes; None for a refresh token, which carries its user's
    /// rights (it is made only by a password login).
    pub scopes: Option<Vec<Scope>>,
    /// When the token stops working (ms since the epoch); None if it never expires.
    pub expires_at: Option<i64>,
}

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    Anonymous,
    User {
        name: String,
        admin: bool,
        generation: i64,
        /// Set when the caller used a token: its id and scopes.
        token: Option<TokenRef>,
    },
}

impl Principal {
    pub fn name(&self) -> Option<&str> {
        match self {
            Principal::Anonymous => None,
            Principal::User { name, .. } => Some(name),
        }
    }

    /// The credential behind the call, for the audit and access logs: `password`, the
    /// token's id, or None for an anonymous caller.
    pub fn credential(&self) -> Option<&str> {
        match self {
            Principal::Anonymous => None,
            Principal::User { token: None, .. } => Some("password"),
            Principal::User { token: Some(t), .. } => Some(&t.id),
        }
    }

    /// When the credential behind the call stops working (ms since the epoch): an access
    /// or refresh token's expiry; None for a password or a token that never expires.
    pub fn credential_expires_at(&self) -> Option<i64> {
        match self {
            Principal::User { token: Some(t), .. } => t.expires_at,
            _ => None,
        }
    }

    /// An administrator calling with their password or a refresh token (not a scoped
    /// access token).
    pub fn is_full_admin(&self) -> bool {
        matches!(self, Principal::User { admin: true, token, .. }
            if token.as_ref().is_none_or(|t| t.scopes.is_none()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid username, password or token")]
    BadCredentials,
    #[error("too many failed logins; retry in {0} s")]
    RateLimited(u64),
    /// Too many password checks are waiting for a core.
    #[error("too many sign-ins at once; retry in {0} s")]
    Overloaded(u64),
    #[error("invalid token: {0}")]
    BadToken(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the metadata database is busy")]
    Busy,
    #[error("the registry's storage is full")]
    StorageFull,
    /// The database cannot be reached now.
    #[error("{0}")]
    Unavailable(String),
    #[error("auth storage: {0}")]
    Internal(String),
}

impl From<MetaError> for AuthError {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::Busy => AuthError::Busy,
            MetaError::Full => AuthError::StorageFull,
            MetaError::Unavailable(why) => AuthError::Unavailable(why),
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

use crate::time::now_ms;

/// Whether `name` could be a user's name (as `wharf user add` allows them): short,
/// lowercase letters, digits and `.`, `_`, `-`.
fn plausible_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

/// What a token endpoint answers.
#[derive(Debug, Clone)]
pub struct Issued {
    pub token: String,
    pub expires_in: u64,
    pub issued_at: i64,
    pub access: Vec<jwt::AccessEntry>,
}

/// Limits of the credentials the server hands out and checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSettings {
    /// A refresh token (what `docker login` keeps) unused for this long stops working.
    pub refresh_idle: Duration,
    /// A refresh token stops working this long after it was made, used or not.
    pub refresh_lifetime: Duration,
    /// Password checks waiting for a core, at most; past it a sign-in is answered 503.
    pub password_queue: usize,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            refresh_idle: Duration::from_secs(30 * 86_400),
            refresh_lifetime: Duration::from_secs(90 * 86_400),
            password_queue: 16,
        }
    }
}

/// Admission to the password hash: one check per password thread at a time, a bounded queue
/// behind them, and the rest turned away at once. Waiting holds no thread.
struct PasswordGate {
    running: Arc<tokio::sync::Semaphore>,
    waiting: std::sync::atomic::AtomicUsize,
    max_waiting: usize,
}

struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl PasswordGate {
    /// A core for one password check. A client trusted for the user it signs in as may
    /// queue four times deeper, so a flood of strangers' guesses does not turn away a
    /// user at their usual address.
    async fn enter(&self, trusted: bool) -> Result<tokio::sync::OwnedSemaphorePermit, AuthError> {
        use std::sync::atomic::Ordering;
        if let Ok(p) = Arc::clone(&self.running).try_acquire_owned() {
            return Ok(p);
        }
        let queued = Waiting(&self.waiting);
        let bound = if trusted {
            self.max_waiting * 4
        } else {
            self.max_waiting
        };
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= bound {
            return Err(AuthError::Overloaded(1));
        }
        let permit = Arc::clone(&self.running)
            .acquire_owned()
            .await
            .map_err(|_| AuthError::Internal("password checks closed".into()))?;
        drop(queued);
        Ok(permit)
    }
}

/// A caller as the rights cache knows it: (user or "", token id).
type CallerKey = (String, Option<String>);

/// What a caller may do now, as of the rights generation `state`.
struct Current {
    state: i64,
    principal: Principal,
    rights: Arc<Rights>,
    /// When the token the caller used expires (unix milliseconds).
    expires_at: Option<i64>,
}

pub struct Auth {
    meta: Arc<dyn AuthMeta>,
    key: [u8; 32],
    service: String,
    settings: AuthSettings,
    limiter: Arc<limiter::Limiter>,
    gate: PasswordGate,
    /// Recently verified passwords: keyed hash -> when.
    verified: std::sync::Mutex<std::collections::HashMap<[u8; 32], std::time::Instant>>,
    /// Callers' current rights by (user, token id); "" is the anonymous caller. Valid
    /// while the database's rights generation is the one they were loaded at.
    current: std::sync::Mutex<std::collections::HashMap<CallerKey, Arc<Current>>>,
    pub(crate) failures: Arc<audit::Failures>,
}

/// How long a verified password is remembered.
const VERIFIED_TTL: Duration = Duration::from_secs(60);
const VERIFIED_MAX: usize = 10_000;

/// The signing key of an earlier version, kept in the data directory: offered to the
/// database on first start so the JWTs it issued stay valid. None if there is none.
fn legacy_key(dir: &Path) -> std::io::Result<Option<[u8; 32]>> {
    let path = dir.join(KEY_FILE);
    match std::fs::read(&path) {
        Ok(b) => <[u8; 32]>::try_from(b.as_slice())
            .map(Some)
            .map_err(|_| std::io::Error::other(format!("{} is not a 32-byte key", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn token_scopes(t: &TokenRecord) -> Option<Vec<Scope>> {
    (t.kind != "refresh").then(|| {
        t.scopes
            .iter()
            .filter_map(|s| Scope::parse(s).ok())
            .collect()
    })
}

impl Auth {
    pub async fn open(
        meta: Arc<dyn AuthMeta>,
        data_dir: &Path,
        service: &str,
    ) -> Result<Auth, AuthError> {
        Auth::with_settings(meta, data_dir, service, AuthSettings::default()).await
    }

    /// The signing key comes from the database, so every process on it (replicas, the
    /// admin commands) signs and verifies with the same one.
    pub async fn with_settings(
        meta: Arc<dyn AuthMeta>,
        data_dir: &Path,
        service: &str,
        settings: AuthSettings,
    ) -> Result<Auth, AuthError> {
        let candidate = legacy_key(data_dir)
            .map_err(|e| AuthError::Internal(format!("signing key: {e}")))?
            .unwrap_or_else(secret::random_key);
        let stored = meta.signing_key(&candidate).await?;
        let key = <[u8; 32]>::try_from(stored.as_slice()).map_err(|_| {
            AuthError::Internal(format!(
                "the stored signing key has {} bytes, not 32",
                stored.len()
            ))
        })?;
        Ok(Auth {
            meta,
            key,
            service: service.to_owned(),
            gate: PasswordGate {
                running: Arc::new(tokio::sync::Semaphore::new(hashing::threads())),
                waiting: std::sync::atomic::AtomicUsize::new(0),
                max_waiting: settings.password_queue,
            },
            settings,
            limiter: Arc::default(),
            verified: std::sync::Mutex::default(),
            current: std::sync::Mutex::default(),
            failures: Arc::default(),
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
        .await?;
        Ok(generated)
    }

    /// Writes an audit entry; an error means it is not recorded, and what it records
    /// must not happen (or be answered as done).
    pub async fn audit(
        &self,
        actor: Option<&str>,
        action: &str,
        repository: Option<&str>,
        detail: Option<String>,
        client: Option<IpAddr>,
    ) -> Result<(), AuthError> {
        self.audit_entry(AuditEntry {
            at: now_ms(),
            actor: actor.map(str::to_owned),
            action: action.to_owned(),
            repository: repository.map(str::to_owned),
            detail,
            client: client.map(|c| c.to_string()),
            credential: None,
        })
        .await
    }

    /// Writes an audit entry made by `p` (its name and credential).
    pub async fn audit_by(
        &self,
        p: &Principal,
        action: &str,
        repository: Option<&str>,
        detail: Option<String>,
        client: Option<IpAddr>,
    ) -> Result<(), AuthError> {
        self.audit_entry(AuditEntry {
            at: now_ms(),
            actor: p.name().map(str::to_owned),
            action: action.to_owned(),
            repository: repository.map(str::to_owned),
            detail,
            client: client.map(|c| c.to_string()),
            credential: p.credential().map(str::to_owned),
        })
        .await
    }

    async fn audit_entry(&self, e: AuditEntry) -> Result<(), AuthError> {
        let action = e.action.clone();
        self.meta.audit_add(e).await.map_err(|err| {
            tracing::error!(error = %err, action, "could not write the audit log");
            AuthError::from(err)
        })
    }

    /// Records a refused request (a failed login, a refused token, a denial, a rate
    /// limit) in the audit log, repeats aggregated (see `audit`). Best effort: the
    /// request is refused whether or not the row is written.
    pub async fn failure(
        &self,
        action: &str,
        user: Option<&str>,
        client: Option<IpAddr>,
        detail: &str,
    ) {
        // Written with the others once a second (see `audit`).
        self.failures.record(action, user, client, detail, now_ms());
    }

    /// Writes the summaries of refused requests whose minute has ended, and forgets
    /// failed-login windows that have ended.
    pub async fn flush_failures(&self) {
        self.limiter.sweep();
        let rows = self.failures.drain(now_ms());
        if rows.is_empty() {
            return;
        }
        let n = rows.len();
        if let Err(err) = self.meta.audit_add_all(rows).await {
            tracing::warn!(error = %err, "could not write {n} rows of refused requests to the audit log");
        }
    }

    /// Checks a username with a password or an access token (as Basic credentials carry
    /// them). Passwords are under the failed-login limit and the password gate; access
    /// tokens are neither (see `limiter`).
    pub async fn login(
        &self,
        user: &str,
        password: &Secret,
        client: Option<IpAddr>,
    ) -> Result<Principal, AuthError> {
        // A name no user can have is refused before any work: nothing is hashed,
        // counted or kept for it, and the audit log gets no attacker-sized strings.
        if !plausible_user_name(user) {
            self.failure("login.failed", None, client, "not a valid user name")
                .await;
            return Err(AuthError::BadCredentials);
        }
        if let Some((id, secret)) = secret::parse_token(password.expose()) {
            let p = self.token_principal(id, secret, "access").await;
            return match p {
                Ok(p) if p.name() == Some(user) => Ok(p),
                Ok(_) | Err(AuthError::BadCredentials) => {
                    // The user named may not exist: the name goes in the detail, and
                    // the failures of one address are counted together.
                    let detail = format!("access token, as {user}");
                    self.failure("login.failed", None, client, &detail).await;
                    Err(AuthError::BadCredentials)
                }
                Err(e) => Err(e),
            };
        }
        self.check_password(user, password, client).await
    }

    async fn check_password(
        &self,
        user: &str,
        password: &Secret,
        client: Option<IpAddr>,
    ) -> Result<Principal, AuthError> {
        let record = self.meta.user_get(user).await?;
        // What every process on this database recorded in the current shared window.
        let now = now_ms();
        let window = limiter::shared_window(now);
        let shared = limiter::Shared {
            failures: self
                .meta
                .login_failures(&limiter::shared_keys(client, user), window)
                .await?
                .into_iter()
                .collect(),
            left_secs: u64::try_from((window + limiter::SHARED_WINDOW_MS - now + 999) / 1000)
                .unwrap_or(1),
        };
        let reservation = match self
            .limiter
            .reserve_shared(client, user, record.as_ref().map(|u| u.generation), &shared)
            .await
        {
            Ok(r) => r,
            Err(wait) => {
                self.failure(
                    "login.rate_limited",
                    record.as_ref().map(|u| u.name.as_str()),
                    client,
                    "password",
                )
                .await;
                return Err(AuthError::RateLimited(wait));
            }
        };
        let principal = |u: &UserRecord| Principal::User {
            name: u.name.clone(),
            admin: u.admin,
            generation: u.generation,
            token: None,
        };
        // A password verified recently for this very hash need not be hashed again:
        // Argon2id costs tens of milliseconds and 7 MiB, and curl-style clients send
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
                if let Some(c) = reservation.succeeded(u.generation) {
                    self.keep_trust(&u.name, c, u.generation).await;
                }
                return Ok(principal(u));
            }
        }
        let hash = record
            .as_ref()
            .map_or(secret::dummy_hash(), |u| u.password_hash.as_str())
            .to_owned();
        let pw = password.clone();
        let permit = match self.gate.enter(reservation.trusted).await {
            Ok(p) => p,
            Err(e) => {
                reservation.abandon();
                return Err(e);
            }
        };
        // The check runs to its end and decides its reservation even if the client
        // hangs up meanwhile: dropping the request gives back neither the core nor the
        // failed-login place, and the failure is still recorded.
        let generation = record.as_ref().map(|u| u.generation);
        let known = record.as_ref().map(|u| u.name.clone());
        let failures = Arc::clone(&self.failures);
        let counted = reservation.shared_keys();
        let job = hashing::run(move || {
            let _permit = permit;
            let ok = secret::verify_password(pw.expose(), &hash);
            match (ok, generation) {
                (true, Some(g)) => reservation.succeeded(g),
                _ => {
                    reservation.failed();
                    failures.record(
                        "login.failed",
                        known.as_deref(),
                        client,
                        if known.is_some() {
                            "password"
                        } else {
                            "unknown user"
                        },
                        now_ms(),
                    );
                    None
                }
            }
            .map_or((ok, None), |c| (ok, Some(c)))
        });
        // A failure is shared through the database by a task of its own, so a client
        // hanging up meanwhile does not keep it from the other processes.
        let meta = Arc::clone(&self.meta);
        let (ok, news) = tokio::spawn(async move {
            let out = job.await;
            if matches!(out, Some((false, _))) {
                if let Err(e) = meta.login_failure_add(&counted, window).await {
                    tracing::warn!(error = %e, "a failed login could not be shared");
                }
            }
            out
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| AuthError::Internal("the password check stopped".into()))?;
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
            Some(u) if ok => {
                if let Some(c) = news {
                    self.keep_trust(&u.name, c, u.generation).await;
                }
                Ok(principal(&u))
            }
            _ => Err(AuthError::BadCredentials),
        }
    }

    /// Remembers in the database that `client` signed in as `user`, so a restart keeps
    /// the trust (best effort).
    async fn keep_trust(&self, user: &str, client: limiter::ClientKey, generation: i64) {
        if let Err(e) = self
            .meta
            .trust_put(user, &client.to_text(), generation, now_ms())
            .await
        {
            tracing::debug!(error = %e, "could not keep a trusted address");
        }
    }

    /// Loads the addresses users signed in from (see `limiter`), at start.
    pub async fn load_trust(&self) -> Result<(), AuthError> {
        let now = now_ms();
        let since = now - limiter::TRUST_FOR.as_millis() as i64;
        for (user, client, generation, at) in self.meta.trust_list(since).await? {
            let Some(c) = limiter::ClientKey::from_text(&client) else {
                continue;
            };
            let age = Duration::from_millis(u64::try_from(now - at).unwrap_or(0));
            let when = std::time::Instant::now()
                .checked_sub(age)
                .unwrap_or_else(std::time::Instant::now);
            self.limiter.trust(c, &user, generation, when);
        }
        Ok(())
    }

    /// Whether a token record is usable now: not revoked, not expired, and for a
    /// refresh token not idle past its limit.
    pub fn token_live(&self, t: &TokenRecord, now: i64) -> bool {
        let idle_ms = i64::try_from(self.settings.refresh_idle.as_millis()).unwrap_or(i64::MAX);
        t.revoked_at.is_none()
            && t.expires_at.is_none_or(|e| e > now)
            && (t.kind != "refresh"
                || now.saturating_sub(t.last_used_at.unwrap_or(t.created_at)) < idle_ms)
    }

    /// The principal a token of `kind` stands for, if it is valid now.
    async fn token_principal(
        &self,
        id: &str,
        secret: &str,
        kind: &str,
    ) -> Result<Principal, AuthError> {
        let t = self
            .meta
            .token_get(id)
            .await?
            .ok_or(AuthError::BadCredentials)?;
        let now = now_ms();
        let usable = secret::token_secret_matches(secret, &t.secret_hash)
            && t.kind == kind
            && self.token_live(&t, now);
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
        let scopes = token_scopes(&t);
        Ok(Principal::User {
            name: u.name,
            admin: u.admin,
            generation: u.generation,
            token: Some(TokenRef {
                id: t.id,
                scopes,
                expires_at: t.expires_at,
            }),
        })
    }

    /// Exchanges a refresh token (from `docker login`) for its principal.
    pub async fn refresh(
        &self,
        token: &Secret,
        client: Option<IpAddr>,
    ) -> Result<Principal, AuthError> {
        let r = match secret::parse_token(token.expose()) {
            Some((id, secret)) => self.token_principal(id, secret, "refresh").await,
            None => Err(AuthError::BadCredentials),
        };
        if matches!(r, Err(AuthError::BadCredentials)) {
            self.failure("login.failed", None, client, "refresh token")
                .await;
        }
        r
    }

    /// A refresh token for `p`, which `docker login` keeps in place of the password. Made
    /// only for a password login: a token login keeps its own token, whose scopes,
    /// expiry and revocation a refresh token would escape. The audit log records it.
    pub async fn new_refresh_token(
        &self,
        p: &Principal,
        client: Option<IpAddr>,
    ) -> Result<Option<Secret>, AuthError> {
        let Principal::User {
            name, token: None, ..
        } = p
        else {
            return Ok(None);
        };
        let (id, token, hash) = secret::new_token();
        let now = now_ms();
        let lifetime =
            i64::try_from(self.settings.refresh_lifetime.as_millis()).unwrap_or(i64::MAX);
        let record = TokenRecord {
            id: id.clone(),
            user_name: name.clone(),
            name: "docker login".into(),
            kind: "refresh".into(),
            secret_hash: hash,
            scopes: vec![],
            created_at: now,
            last_used_at: None,
            expires_at: Some(now.saturating_add(lifetime)),
            revoked_at: None,
        };
        self.meta.token_create(&record).await?;
        // No token without its audit row: if the row cannot be written, the token goes.
        if let Err(e) = self
            .audit_by(
                p,
                "token.create",
                None,
                Some(format!("refresh token {id} for {name} (docker login)")),
                client,
            )
            .await
        {
            let _ = self.meta.token_revoke(&id, now).await;
            return Err(e);
        }
        // Each user keeps at most REFRESH_PER_USER live refresh tokens: a loop of logins
        // cannot grow the table without bound. The oldest go first.
        let mut live: Vec<TokenRecord> = self
            .meta
            .token_list(Some(name))
            .await?
            .into_iter()
            .filter(|t| t.kind == "refresh" && self.token_live(t, now))
            .collect();
        if live.len() > REFRESH_PER_USER {
            live.sort_by_key(|t| (t.last_used_at.unwrap_or(t.created_at), t.created_at));
            for t in &live[..live.len() - REFRESH_PER_USER] {
                self.meta.token_revoke(&t.id, now).await?;
            }
        }
        Ok(Some(token))
    }

    /// What `user` (with token `tid`, or "" for anonymous) may do now. Served from memory
    /// while the database's rights generation is unchanged; any change to users, grants,
    /// visibility or tokens moves it, so a change takes effect at the next request.
    async fn current(&self, user: &str, tid: Option<&str>) -> Result<Arc<Current>, AuthError> {
        let state = self.meta.auth_state().await?;
        let key = (user.to_owned(), tid.map(str::to_owned));
        let cached = self
            .current
            .lock()
            .expect("rights cache")
            .get(&key)
            .filter(|c| c.state == state)
            .cloned();
        let c = match cached {
            Some(c) => c,
            None => {
                let c = Arc::new(self.load_current(user, tid, state).await?);
                let mut map = self.current.lock().expect("rights cache");
                if map.len() >= CURRENT_MAX {
                    map.retain(|_, v| v.state == state);
                    if map.len() >= CURRENT_MAX {
                        map.clear();
                    }
                }
                map.insert(key, Arc::clone(&c));
                c
            }
        };
        if c.expires_at.is_some_and(|e| e <= now_ms()) {
            return Err(AuthError::BadToken("token expired".into()));
        }
        Ok(c)
    }

    async fn load_current(
        &self,
        user: &str,
        tid: Option<&str>,
        state: i64,
    ) -> Result<Current, AuthError> {
        let visibility = self
            .meta
            .visibility_list()
            .await?
            .into_iter()
            .filter_map(|(p, public)| Pattern::parse(&p).ok().map(|p| (p, public)))
            .collect();
        if user.is_empty() {
            return Ok(Current {
                state,
                principal: Principal::Anonymous,
                rights: Arc::new(Rights {
                    principal: Principal::Anonymous,
                    visibility,
                    grants: Vec::new(),
                }),
                expires_at: None,
            });
        }
        let u = self
            .meta
            .user_get(user)
            .await?
            .ok_or_else(|| AuthError::BadToken("user removed".into()))?;
        let (token, expires_at) = match tid {
            None => (None, None),
            Some(id) => {
                let t = self
                    .meta
                    .token_get(id)
                    .await?
                    .filter(|t| t.user_name == u.name)
                    .ok_or_else(|| AuthError::BadToken("token revoked".into()))?;
                if !self.token_live(&t, now_ms()) {
                    return Err(AuthError::BadToken("token revoked or expired".into()));
                }
                let scopes = token_scopes(&t);
                (
                    Some(TokenRef {
                        id: t.id.clone(),
                        scopes,
                        expires_at: t.expires_at,
                    }),
                    t.expires_at,
                )
            }
        };
        let grants = if u.admin {
            Vec::new()
        } else {
            self.meta
                .grants_of(&u.name)
                .await?
                .into_iter()
                .filter_map(|g| Some((Pattern::parse(&g.pattern).ok()?, Level::parse(&g.level)?)))
                .collect()
        };
        let principal = Principal::User {
            name: u.name,
            admin: u.admin,
            generation: u.generation,
            token,
        };
        Ok(Current {
            state,
            rights: Arc::new(Rights {
                principal: principal.clone(),
                visibility,
                grants,
            }),
            principal,
            expires_at,
        })
    }

    /// Everything that decides what `p` may do now.
    pub async fn rights(&self, p: &Principal) -> Result<Arc<Rights>, AuthError> {
        let (user, tid) = match p {
            Principal::Anonymous => ("", None),
            Principal::User { name, token, .. } => {
                (name.as_str(), token.as_ref().map(|t| t.id.as_str()))
            }
        };
        let c = self.current(user, tid).await.map_err(|e| match e {
            // The caller was valid when it authenticated; if it is gone now, it may do
            // nothing (the next request is refused outright).
            AuthError::BadToken(_) => AuthError::BadCredentials,
            other => other,
        })?;
        Ok(Arc::clone(&c.rights))
    }

    /// What `p` may do to `repo` right now.
    pub async fn allowed(&self, p: &Principal, repo: &str) -> Result<Actions, AuthError> {
        match self.rights(p).await {
            Ok(r) => Ok(r.allowed(repo)),
            Err(AuthError::BadCredentials) => Ok(Actions::NONE),
            Err(e) => Err(e),
        }
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
        let rights = match self.rights(p).await {
            Ok(r) => Some(r),
            Err(AuthError::BadCredentials) => None,
            Err(e) => return Err(e),
        };
        let mut access = Vec::new();
        for r in requested {
            match r {
                Requested::Repository { name, actions } => {
                    let granted = rights
                        .as_ref()
                        .map_or(Actions::NONE, |r| r.allowed(name.as_str()))
                        .intersect(*actions);
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
                token.as_ref().map(|t| t.id.clone()),
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

    /// Verifies a bearer JWT and that what it stands for still holds now: the user exists
    /// with the same generation, and the token it came from is neither revoked nor
    /// expired. What it may do is its grant cut down to the caller's current rights
    /// (see `registry::authz::permits`).
    pub async fn verify(
        &self,
        token: &str,
        client: Option<IpAddr>,
    ) -> Result<(Principal, jwt::Claims), AuthError> {
        let claims = match jwt::verify(&self.key, token, &self.service, now_secs()) {
            Ok(c) => c,
            Err(e) => {
                self.failure("token.refused", None, client, &e.to_string())
                    .await;
                return Err(AuthError::BadToken(e.to_string()));
            }
        };
        let c = match self.current(&claims.sub, claims.tid.as_deref()).await {
            Ok(c) => c,
            Err(AuthError::BadToken(why)) => {
                self.failure("token.refused", Some(&claims.sub), client, &why)
                    .await;
                return Err(AuthError::BadToken(why));
            }
            Err(e) => return Err(e),
        };
        if let Principal::User { generation, .. } = &c.principal {
            if *generation != claims.generation {
                let why = "issued before a password change or to a removed user";
                self.failure("token.refused", Some(&claims.sub), client, why)
                    .await;
                return Err(AuthError::BadToken(why.into()));
            }
        }
        Ok((c.principal.clone(), claims))
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

    /// Every repository name the caller may pull, as key ranges: what the catalog lists,
    /// found with range scans instead of a check of every repository. It agrees with
    /// [`Rights::allowed`] on every name.
    pub fn pullable(&self) -> crate::oci::keyset::KeySet {
        use crate::oci::keyset::KeySet;
        // Public: rules from least to most specific, each overriding the ones before
        // where it matches, is "the most specific matching rule decides".
        let mut rules: Vec<&(Pattern, bool)> = self.visibility.iter().collect();
        rules.sort_by_key(|(p, _)| p.specificity());
        let public = rules.into_iter().fold(KeySet::empty(), |set, (p, public)| {
            if *public {
                set.union(&p.keys())
            } else {
                set.minus(&p.keys())
            }
        });
        let Principal::User {
            name, admin, token, ..
        } = &self.principal
        else {
            return public;
        };
        let mine = if *admin {
            KeySet::all()
        } else {
            self.grants
                .iter()
                .filter(|(_, level)| level.actions().has(Action::Pull))
                .fold(Pattern::Namespace(name.clone()).keys(), |set, (p, _)| {
                    set.union(&p.keys())
                })
        };
        let mine = mine.union(&public);
        match token.as_ref().and_then(|t| t.scopes.as_ref()) {
            Some(scopes) => mine.intersect(
                &scopes
                    .iter()
                    .filter(|s| s.actions.has(Action::Pull))
                    .fold(KeySet::empty(), |set, s| set.union(&s.pattern.keys())),
            ),
            None => mine,
        }
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
        match token.as_ref().and_then(|t| t.scopes.as_ref()) {
            // An access token gets its owner's rights cut down to its scopes.
            Some(scopes) => {
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
    /// Processes opening one database at once (replicas, admin commands) agree on one
    /// signing key, kept in the database; the key file of an earlier version is carried
    /// over, so JWTs it signed stay valid.
    #[tokio::test]
    async fn every_process_on_a_database_signs_with_one_key() {
        use crate::store::meta::SqliteMeta;
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("meta.db");
        let opens = (0..6).map(|_| {
            let meta = Arc::new(SqliteMeta::open(&db).unwrap());
            let dir = dir.path().to_owned();
            tokio::spawn(async move { super::Auth::open(meta, &dir, "wharf").await.unwrap().key })
        });
        let keys: Vec<[u8; 32]> = futures_util::future::join_all(opens)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert!(keys.windows(2).all(|w| w[0] == w[1]), "{keys:?}");
        assert_eq!(
            std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("auth.key"))
                .count(),
            0,
            "no key file is written any more"
        );

        // An upgrade: the old key file's key becomes the database's.
        let old = tempfile::tempdir().unwrap();
        std::fs::write(old.path().join("auth.key"), [7u8; 32]).unwrap();
        let meta = Arc::new(SqliteMeta::open(&old.path().join("meta.db")).unwrap());
        let auth = super::Auth::open(meta, old.path(), "wharf").await.unwrap();
        assert_eq!(auth.key, [7u8; 32]);
        let bad = tempfile::tempdir().unwrap();
        std::fs::write(bad.path().join("auth.key"), b"short").unwrap();
        let meta = Arc::new(SqliteMeta::open(&bad.path().join("meta.db")).unwrap());
        let err = super::Auth::open(meta, bad.path(), "wharf")
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not a 32-byte key"), "{err}");
    }

    mod pullable {
        use super::super::*;
        use proptest::prelude::*;

        fn name() -> impl Strategy<Value = String> {
            proptest::collection::vec(proptest::sample::select(vec!["a", "b", "ab", "a-b"]), 1..4)
                .prop_map(|segs| segs.join("/"))
        }

        fn pattern() -> impl Strategy<Value = Pattern> {
            prop_oneof![
                Just(Pattern::All),
                name().prop_map(Pattern::Namespace),
                name().prop_map(Pattern::Exact),
            ]
        }

        fn level() -> impl Strategy<Value = Level> {
            proptest::sample::select(vec![Level::Pull, Level::Push, Level::Delete, Level::Admin])
        }

        fn actions() -> impl Strategy<Value = Actions> {
            (1u8..8).prop_map(|bits| {
                let mut v = Vec::new();
                if bits & 1 != 0 {
                    v.push(Action::Pull);
                }
                if bits & 2 != 0 {
                    v.push(Action::Push);
                }
                if bits & 4 != 0 {
                    v.push(Action::Delete);
                }
                Actions::of(&v)
            })
        }

        fn principal() -> impl Strategy<Value = Principal> {
            let scopes = proptest::option::of(proptest::collection::vec(
                (pattern(), actions()).prop_map(|(pattern, actions)| Scope { pattern, actions }),
                0..3,
            ));
            prop_oneof![
                Just(Principal::Anonymous),
                ("[ab]{1,2}", any::<bool>(), proptest::option::of(scopes)).prop_map(
                    |(name, admin, token)| Principal::User {
                        name,
                        admin,
                        generation: 1,
                        token: token.map(|scopes| TokenRef {
                            id: "t".into(),
                            scopes,
                            expires_at: None,
                        }),
                    }
                ),
            ]
        }

        proptest! {
            #[test]
            fn the_catalog_ranges_agree_with_the_rights_check(
                principal in principal(),
                visibility in proptest::collection::vec((pattern(), any::<bool>()), 0..5),
                grants in proptest::collection::vec((pattern(), level()), 0..4),
                names in proptest::collection::vec(name(), 1..20),
            ) {
                // One rule per pattern, as the database keeps them.
                let mut seen = std::collections::HashSet::new();
                let visibility: Vec<_> = visibility.into_iter().filter(|(p, _)| seen.insert(p.clone())).collect();
                let rights = Rights { principal, visibility, grants };
                let keys = rights.pullable();
                for n in &names {
                    prop_assert_eq!(keys.contains(n), rights.allowed(n).has(Action::Pull), "{}", n);
                }
            }
        }
    }
}
