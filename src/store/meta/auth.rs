//! Accounts, tokens, grants, visibility and the audit log: kept in the same database as
//! the registry's metadata, behind their own trait.

use async_trait::async_trait;

use super::MetaError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub name: String,
    pub password_hash: String,
    pub admin: bool,
    pub created_at: i64,
    pub generation: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    pub user_name: String,
    pub name: String,
    /// `access` (made by `wharf token create`) or `refresh` (kept by `docker login`).
    pub kind: String,
    pub secret_hash: String,
    pub scopes: Vec<String>,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRecord {
    pub user_name: String,
    pub pattern: String,
    pub level: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditEntry {
    pub at: i64,
    pub actor: Option<String>,
    pub action: String,
    pub repository: Option<String>,
    pub detail: Option<String>,
    pub client: Option<String>,
    /// The credential used: `password`, a token's id, or None.
    pub credential: Option<String>,
}

#[async_trait]
pub trait AuthMeta: Send + Sync + 'static {
    /// The rights generation: it moves with every change to users, passwords, grants,
    /// visibility or token revocation, in the transaction that makes the change, so a
    /// process holding rights in memory knows when to reload them.
    async fn auth_state(&self) -> Result<i64, MetaError>;
    async fn user_count(&self) -> Result<u64, MetaError>;
    async fn user_get(&self, name: &str) -> Result<Option<UserRecord>, MetaError>;
    /// Fails with `Conflict` if the user exists.
    async fn user_create(
        &self,
        name: &str,
        password_hash: &str,
        admin: bool,
    ) -> Result<(), MetaError>;
    async fn user_list(&self) -> Result<Vec<UserRecord>, MetaError>;
    /// Removes the user with their tokens and grants; false if there was none.
    async fn user_remove(&self, name: &str) -> Result<bool, MetaError>;
    /// Sets a new password, moves the user's generation (old JWTs stop working) and revokes
    /// the refresh tokens of earlier logins; false if there is no such user.
    async fn user_set_password(&self, name: &str, password_hash: &str) -> Result<bool, MetaError>;

    async fn token_create(&self, t: &TokenRecord) -> Result<(), MetaError>;
    async fn token_get(&self, id: &str) -> Result<Option<TokenRecord>, MetaError>;
    async fn token_list(&self, user: Option<&str>) -> Result<Vec<TokenRecord>, MetaError>;
    /// Marks a token revoked; false if it does not exist or already was.
    async fn token_revoke(&self, id: &str, now: i64) -> Result<bool, MetaError>;
    async fn token_touch(&self, id: &str, now: i64) -> Result<(), MetaError>;

    async fn grant_set(&self, user: &str, pattern: &str, level: &str) -> Result<(), MetaError>;
    async fn grant_remove(&self, user: &str, pattern: &str) -> Result<bool, MetaError>;
    async fn grants_of(&self, user: &str) -> Result<Vec<GrantRecord>, MetaError>;

    async fn visibility_set(&self, pattern: &str, public: bool) -> Result<(), MetaError>;
    async fn visibility_list(&self) -> Result<Vec<(String, bool)>, MetaError>;

    async fn audit_add(&self, e: AuditEntry) -> Result<(), MetaError>;
    /// Several entries in one transaction.
    async fn audit_add_all(&self, entries: Vec<AuditEntry>) -> Result<(), MetaError>;

    /// Remembers that `client` (a limiter key) signed in as `user` with the password of
    /// `generation` at `at` (unix milliseconds).
    async fn trust_put(
        &self,
        user: &str,
        client: &str,
        generation: i64,
        at: i64,
    ) -> Result<(), MetaError>;
    /// (user, client, generation, at) of sign-ins since `since`, of the users' current
    /// passwords.
    async fn trust_list(&self, since: i64) -> Result<Vec<(String, String, i64, i64)>, MetaError>;
    /// Deletes tokens revoked or expired before `before` (unix milliseconds); returns
    /// how many.
    async fn tokens_purge(&self, before: i64) -> Result<u64, MetaError>;
    /// The latest `limit` entries, oldest first.
    async fn audit_list(&self, limit: u32) -> Result<Vec<AuditEntry>, MetaError>;
    /// The key registry JWTs are signed with, the same for every process on this
    /// database: the one stored, or `candidate`, stored now, if there is none yet (the
    /// first of several processes starting at once wins).
    async fn signing_key(&self, candidate: &[u8]) -> Result<Vec<u8>, MetaError>;
    /// Failed logins recorded under each of `keys` in the window starting at `window`
    /// (unix ms), by any process on this database; keys without any are left out.
    async fn login_failures(
        &self,
        keys: &[String],
        window: i64,
    ) -> Result<Vec<(String, u32)>, MetaError>;
    /// Records one failed login under each of `keys` in `window`, and forgets earlier
    /// windows.
    async fn login_failure_add(&self, keys: &[String], window: i64) -> Result<(), MetaError>;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) async fn suite(m: &dyn AuthMeta) {
        // The first key offered is kept; later ones get it back.
        assert_eq!(m.signing_key(&[1; 32]).await.unwrap(), vec![1; 32]);
        assert_eq!(m.signing_key(&[2; 32]).await.unwrap(), vec![1; 32]);
        // Failed logins, per key and window; earlier windows are forgotten.
        let keys = vec!["u:alice".to_owned(), "c:1".to_owned()];
        assert!(m.login_failures(&keys, 60_000).await.unwrap().is_empty());
        m.login_failure_add(&keys, 60_000).await.unwrap();
        m.login_failure_add(&keys[..1], 60_000).await.unwrap();
        let mut got = m.login_failures(&keys, 60_000).await.unwrap();
        got.sort();
        assert_eq!(got, vec![("c:1".to_owned(), 1), ("u:alice".to_owned(), 2)]);
        m.login_failure_add(&keys[1..], 120_000).await.unwrap();
        assert!(m.login_failures(&keys, 60_000).await.unwrap().is_empty());
        assert_eq!(
            m.login_failures(&keys, 120_000).await.unwrap(),
            vec![("c:1".to_owned(), 1)]
        );
        assert_eq!(m.user_count().await.unwrap(), 0);
        let state0 = m.auth_state().await.unwrap();
        m.user_create("alice", "h1", false).await.unwrap();
        assert!(matches!(
            m.user_create("alice", "h2", true).await,
            Err(MetaError::Conflict(_))
        ));
        let u = m.user_get("alice").await.unwrap().unwrap();
        assert_eq!((u.password_hash.as_str(), u.admin), ("h1", false));
        let gen1 = u.generation;
        let state1 = m.auth_state().await.unwrap();
        assert!(
            state1 > state0,
            "creating a user moves the rights generation"
        );

        let t = TokenRecord {
            id: "tok1".into(),
            user_name: "alice".into(),
            name: "ci".into(),
            kind: "refresh".into(),
            secret_hash: "sh".into(),
            scopes: vec!["repository:alice/*:pull".into()],
            created_at: 10,
            last_used_at: None,
            expires_at: Some(100),
            revoked_at: None,
        };
        m.token_create(&t).await.unwrap();
        assert_eq!(m.token_get("tok1").await.unwrap().unwrap(), t);
        m.token_touch("tok1", 50).await.unwrap();
        assert_eq!(
            m.token_get("tok1").await.unwrap().unwrap().last_used_at,
            Some(50)
        );

        // Creating tokens and marking their use change no one's rights.
        assert_eq!(m.auth_state().await.unwrap(), state1);
        // A password change moves the generation and revokes refresh tokens.
        assert!(m.user_set_password("alice", "h3").await.unwrap());
        let u = m.user_get("alice").await.unwrap().unwrap();
        assert_eq!(u.password_hash, "h3");
        assert!(u.generation > gen1);
        let state2 = m.auth_state().await.unwrap();
        assert!(state2 > state1);
        assert!(
            m.token_get("tok1")
                .await
                .unwrap()
                .unwrap()
                .revoked_at
                .is_some()
        );
        assert!(!m.user_set_password("nobody", "h").await.unwrap());

        let mut t2 = t.clone();
        t2.id = "tok2".into();
        t2.kind = "access".into();
        m.token_create(&t2).await.unwrap();
        assert!(m.token_revoke("tok2", 60).await.unwrap());
        let state3 = m.auth_state().await.unwrap();
        assert!(state3 > state2, "a revocation moves the rights generation");
        assert!(!m.token_revoke("tok2", 61).await.unwrap());
        assert_eq!(m.token_list(Some("alice")).await.unwrap().len(), 2);

        let before = m.auth_state().await.unwrap();
        m.grant_set("alice", "team/*", "push").await.unwrap();
        m.grant_set("alice", "team/*", "pull").await.unwrap();
        assert_eq!(m.grants_of("alice").await.unwrap()[0].level, "pull");
        let after_grants = m.auth_state().await.unwrap();
        assert!(after_grants > before);
        m.visibility_set("team/*", true).await.unwrap();
        assert!(m.auth_state().await.unwrap() > after_grants);
        assert_eq!(
            m.visibility_list().await.unwrap(),
            vec![("team/*".to_owned(), true)]
        );

        m.audit_add(AuditEntry {
            at: 1,
            action: "login".into(),
            actor: Some("alice".into()),
            ..Default::default()
        })
        .await
        .unwrap();
        m.audit_add(AuditEntry {
            at: 2,
            action: "push".into(),
            credential: Some("tok2".into()),
            ..Default::default()
        })
        .await
        .unwrap();
        let log = m.audit_list(10).await.unwrap();
        assert_eq!(
            log.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
            ["login", "push"]
        );
        assert_eq!(m.audit_list(1).await.unwrap()[0].action, "push");
        assert_eq!(
            m.audit_list(1).await.unwrap()[0].credential.as_deref(),
            Some("tok2")
        );

        let old_gen = m.user_get("alice").await.unwrap().unwrap().generation;
        let before = m.auth_state().await.unwrap();
        assert!(m.user_remove("alice").await.unwrap());
        assert!(m.auth_state().await.unwrap() > before);
        assert!(m.token_get("tok1").await.unwrap().is_none());
        assert!(m.grants_of("alice").await.unwrap().is_empty());
        assert!(!m.user_remove("alice").await.unwrap());
        // A new user of the same name never has a generation the old one had.
        m.user_create("alice", "h4", false).await.unwrap();
        assert!(m.user_get("alice").await.unwrap().unwrap().generation > old_gen);
    }
}
