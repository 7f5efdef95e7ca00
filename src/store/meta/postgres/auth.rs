//! `AuthMeta` on PostgreSQL: the same rows and rules as `sqlite_auth.rs`. Every change to
//! rights moves `auth_state` in its own transaction; the row's lock orders such changes
//! across replicas.

use async_trait::async_trait;
use tokio_postgres::Row;

use super::super::MetaError;
use super::super::auth::{AuditEntry, AuthMeta, GrantRecord, TokenRecord, UserRecord};
use super::super::now_ms;
use super::PostgresMeta;

const BUMP: &str =
    "UPDATE auth_state SET generation = generation + 1 WHERE id = 1 RETURNING generation";
const AUDIT_INSERT: &str = "INSERT INTO audit_log (at, actor, action, repository, detail, client, credential) VALUES ($1, $2, $3, $4, $5, $6, $7)";

fn user(r: &Row) -> UserRecord {
    UserRecord {
        name: r.get(0),
        password_hash: r.get(1),
        admin: r.get(2),
        created_at: r.get(3),
        generation: r.get(4),
    }
}

fn token(r: &Row) -> TokenRecord {
    let scopes: String = r.get(5);
    TokenRecord {
        id: r.get(0),
        user_name: r.get(1),
        name: r.get(2),
        kind: r.get(3),
        secret_hash: r.get(4),
        scopes: serde_json::from_str(&scopes).unwrap_or_default(),
        created_at: r.get(6),
        last_used_at: r.get(7),
        expires_at: r.get(8),
        revoked_at: r.get(9),
    }
}

impl PostgresMeta {
    /// Runs one statement that changes rights, and moves the rights generation, in one
    /// transaction; returns the rows the statement changed.
    async fn rights_change(
        &self,
        sql: &'static str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, MetaError> {
        self.timed(async {
            let mut c = self.conn().await?;
            let (s, bump) = (c.prep(sql).await?, c.prep(BUMP).await?);
            let tx = c.client.transaction().await?;
            let n = tx.execute(&s, params).await?;
            tx.query_one(&bump, &[]).await?;
            tx.commit().await?;
            Ok(n)
        })
        .await
    }
}

#[async_trait]
impl AuthMeta for PostgresMeta {
    async fn auth_state(&self) -> Result<i64, MetaError> {
        let rows = self
            .rows("SELECT generation FROM auth_state WHERE id = 1", &[])
            .await?;
        Ok(rows.first().map_or(0, |r| r.get(0)))
    }

    async fn user_count(&self) -> Result<u64, MetaError> {
        let rows = self.rows("SELECT count(*) FROM users", &[]).await?;
        Ok(rows[0].get::<_, i64>(0) as u64)
    }

    async fn user_get(&self, name: &str) -> Result<Option<UserRecord>, MetaError> {
        const SQL: &str =
            "SELECT name, password_hash, admin, created_at, generation FROM users WHERE name = $1";
        Ok(self.rows(SQL, &[&name]).await?.first().map(user))
    }

    async fn user_create(
        &self,
        name: &str,
        password_hash: &str,
        admin: bool,
    ) -> Result<(), MetaError> {
        // The rights generation moves first, under its row's lock, and the new user takes
        // the new value: past every generation ever handed out, so a user created again
        // under an old name never accepts the old one's JWTs, however changes interleave.
        const INSERT: &str =
            "INSERT INTO users (name, password_hash, admin, created_at, generation)
             VALUES ($1, $2, $3, $4, $5)";
        self.timed(async {
            let mut c = self.conn().await?;
            let (bump, insert) = (c.prep(BUMP).await?, c.prep(INSERT).await?);
            let tx = c.client.transaction().await?;
            let generation: i64 = tx.query_one(&bump, &[]).await?.get(0);
            match tx
                .execute(
                    &insert,
                    &[&name, &password_hash, &admin, &now_ms(), &generation],
                )
                .await
            {
                Ok(_) => {}
                Err(e) => {
                    return Err(match MetaError::from(e) {
                        MetaError::Conflict(_) => MetaError::Conflict(format!("user {name}")),
                        other => other,
                    });
                }
            }
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    async fn user_list(&self) -> Result<Vec<UserRecord>, MetaError> {
        const SQL: &str =
            "SELECT name, password_hash, admin, created_at, generation FROM users ORDER BY name";
        Ok(self.rows(SQL, &[]).await?.iter().map(user).collect())
    }

    async fn user_remove(&self, name: &str) -> Result<bool, MetaError> {
        Ok(self
            .rights_change("DELETE FROM users WHERE name = $1", &[&name])
            .await?
            > 0)
    }

    async fn user_set_password(&self, name: &str, password_hash: &str) -> Result<bool, MetaError> {
        self.timed(async {
            let mut c = self.conn().await?;
            let bump = c.prep(BUMP).await?;
            let set = c
                .prep("UPDATE users SET password_hash = $2, generation = $3 WHERE name = $1")
                .await?;
            let revoke = c
                .prep("UPDATE access_tokens SET revoked_at = $2 WHERE user_name = $1 AND kind = 'refresh' AND revoked_at IS NULL")
                .await?;
            let tx = c.client.transaction().await?;
            let generation: i64 = tx.query_one(&bump, &[]).await?.get(0);
            let n = tx.execute(&set, &[&name, &password_hash, &generation]).await?;
            tx.execute(&revoke, &[&name, &now_ms()]).await?;
            tx.commit().await?;
            Ok(n > 0)
        })
        .await
    }

    async fn token_create(&self, t: &TokenRecord) -> Result<(), MetaError> {
        const SQL: &str = "INSERT INTO access_tokens (id, user_name, name, kind, secret_hash, scopes, created_at, last_used_at, expires_at, revoked_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";
        let scopes = serde_json::to_string(&t.scopes).expect("strings serialize");
        let r = self
            .timed(async {
                let mut c = self.conn().await?;
                let s = c.prep(SQL).await?;
                Ok(c.client
                    .execute(
                        &s,
                        &[
                            &t.id,
                            &t.user_name,
                            &t.name,
                            &t.kind,
                            &t.secret_hash,
                            &scopes,
                            &t.created_at,
                            &t.last_used_at,
                            &t.expires_at,
                            &t.revoked_at,
                        ],
                    )
                    .await?)
            })
            .await?;
        debug_assert_eq!(r, 1);
        Ok(())
    }

    async fn token_get(&self, id: &str) -> Result<Option<TokenRecord>, MetaError> {
        const SQL: &str = "SELECT id, user_name, name, kind, secret_hash, scopes, created_at, last_used_at, expires_at, revoked_at FROM access_tokens WHERE id = $1";
        Ok(self.rows(SQL, &[&id]).await?.first().map(token))
    }

    async fn token_list(&self, user: Option<&str>) -> Result<Vec<TokenRecord>, MetaError> {
        const SQL: &str = "SELECT id, user_name, name, kind, secret_hash, scopes, created_at, last_used_at, expires_at, revoked_at FROM access_tokens
             WHERE $1::TEXT IS NULL OR user_name = $1 ORDER BY created_at, id";
        Ok(self.rows(SQL, &[&user]).await?.iter().map(token).collect())
    }

    async fn token_revoke(&self, id: &str, now: i64) -> Result<bool, MetaError> {
        const SQL: &str =
            "UPDATE access_tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL";
        Ok(self.rights_change(SQL, &[&id, &now]).await? > 0)
    }

    async fn token_touch(&self, id: &str, now: i64) -> Result<(), MetaError> {
        self.exec(
            "UPDATE access_tokens SET last_used_at = $2 WHERE id = $1",
            &[&id, &now],
        )
        .await?;
        Ok(())
    }

    async fn grant_set(&self, user: &str, pattern: &str, level: &str) -> Result<(), MetaError> {
        const SQL: &str =
            "INSERT INTO grants (user_name, pattern, level, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (user_name, pattern) DO UPDATE SET level = excluded.level";
        self.rights_change(SQL, &[&user, &pattern, &level, &now_ms()])
            .await?;
        Ok(())
    }

    async fn grant_remove(&self, user: &str, pattern: &str) -> Result<bool, MetaError> {
        const SQL: &str = "DELETE FROM grants WHERE user_name = $1 AND pattern = $2";
        Ok(self.rights_change(SQL, &[&user, &pattern]).await? > 0)
    }

    async fn grants_of(&self, user: &str) -> Result<Vec<GrantRecord>, MetaError> {
        const SQL: &str =
            "SELECT user_name, pattern, level FROM grants WHERE user_name = $1 ORDER BY pattern";
        Ok(self
            .rows(SQL, &[&user])
            .await?
            .iter()
            .map(|r| GrantRecord {
                user_name: r.get(0),
                pattern: r.get(1),
                level: r.get(2),
            })
            .collect())
    }

    async fn visibility_set(&self, pattern: &str, public: bool) -> Result<(), MetaError> {
        const SQL: &str = "INSERT INTO visibility (pattern, public, updated_at) VALUES ($1, $2, $3)
             ON CONFLICT (pattern) DO UPDATE SET public = excluded.public, updated_at = excluded.updated_at";
        self.rights_change(SQL, &[&pattern, &public, &now_ms()])
            .await?;
        Ok(())
    }

    async fn visibility_list(&self) -> Result<Vec<(String, bool)>, MetaError> {
        const SQL: &str = "SELECT pattern, public FROM visibility ORDER BY pattern";
        Ok(self
            .rows(SQL, &[])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    async fn audit_add(&self, e: AuditEntry) -> Result<(), MetaError> {
        self.audit_add_all(vec![e]).await
    }

    async fn audit_add_all(&self, entries: Vec<AuditEntry>) -> Result<(), MetaError> {
        self.timed(async {
            let mut c = self.conn().await?;
            let s = c.prep(AUDIT_INSERT).await?;
            let tx = c.client.transaction().await?;
            for e in &entries {
                tx.execute(
                    &s,
                    &[
                        &e.at,
                        &e.actor,
                        &e.action,
                        &e.repository,
                        &e.detail,
                        &e.client,
                        &e.credential,
                    ],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    async fn trust_put(
        &self,
        user: &str,
        client: &str,
        generation: i64,
        at: i64,
    ) -> Result<(), MetaError> {
        const SQL: &str = "INSERT INTO login_trust (user_name, client, generation, at)
             SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM users WHERE name = $1)
             ON CONFLICT (user_name, client) DO UPDATE SET generation = excluded.generation, at = excluded.at";
        match self.exec(SQL, &[&user, &client, &generation, &at]).await {
            // The user was removed meanwhile (its row's foreign key): nothing to trust.
            Err(MetaError::Db(_)) if self.user_get(user).await?.is_none() => Ok(()),
            other => other.map(|_| ()),
        }
    }

    async fn trust_list(&self, since: i64) -> Result<Vec<(String, String, i64, i64)>, MetaError> {
        const SQL: &str = "SELECT t.user_name, t.client, t.generation, t.at FROM login_trust t
             JOIN users u ON u.name = t.user_name AND u.generation = t.generation
             WHERE t.at >= $1";
        Ok(self
            .rows(SQL, &[&since])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
    }

    async fn tokens_purge(&self, before: i64) -> Result<u64, MetaError> {
        self.timed(async {
            let mut c = self.conn().await?;
            let tokens = c
                .prep("DELETE FROM access_tokens WHERE revoked_at < $1 OR expires_at < $1")
                .await?;
            let trust = c
                .prep("DELETE FROM login_trust t WHERE t.at < $1 OR t.generation <> (SELECT u.generation FROM users u WHERE u.name = t.user_name)")
                .await?;
            let tx = c.client.transaction().await?;
            let n = tx.execute(&tokens, &[&before]).await?;
            tx.execute(&trust, &[&before]).await?;
            tx.commit().await?;
            Ok(n)
        })
        .await
    }

    async fn signing_key(&self, candidate: &[u8]) -> Result<Vec<u8>, MetaError> {
        const INSERT: &str = "INSERT INTO settings (name, value) VALUES ('jwt_key', $1) ON CONFLICT (name) DO NOTHING";
        const SELECT: &str = "SELECT value FROM settings WHERE name = 'jwt_key'";
        // Read first: the key is sent to the server (where statement logging could
        // keep it) only the one time it is stored.
        if let Some(r) = self.rows(SELECT, &[]).await?.first() {
            return Ok(r.get(0));
        }
        self.exec(INSERT, &[&candidate]).await?;
        let rows = self.rows(SELECT, &[]).await?;
        rows.first()
            .map(|r| r.get(0))
            .ok_or_else(|| MetaError::Db("the signing key was not stored".into()))
    }

    async fn login_failures(
        &self,
        keys: &[String],
        window: i64,
    ) -> Result<Vec<(String, u32)>, MetaError> {
        const SQL: &str =
            "SELECT key, failures FROM login_failures WHERE key = ANY($1) AND window_start = $2";
        let keys = keys.to_vec();
        Ok(self
            .rows(SQL, &[&keys, &window])
            .await?
            .iter()
            .map(|r| {
                let n: i64 = r.get(1);
                (r.get(0), u32::try_from(n).unwrap_or(u32::MAX))
            })
            .collect())
    }

    async fn login_failure_add(&self, keys: &[String], window: i64) -> Result<(), MetaError> {
        const ADD: &str = "INSERT INTO login_failures (key, window_start, failures)
             SELECT k, $2, 1 FROM unnest($1::TEXT[]) AS k
             ON CONFLICT (key, window_start) DO UPDATE SET failures = login_failures.failures + 1";
        const FORGET: &str = "DELETE FROM login_failures WHERE window_start < $1";
        let keys = keys.to_vec();
        self.timed(async {
            let mut c = self.conn().await?;
            let (add, forget) = (c.prep(ADD).await?, c.prep(FORGET).await?);
            let tx = c.client.transaction().await?;
            tx.execute(&add, &[&keys, &window]).await?;
            tx.execute(&forget, &[&window]).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    async fn audit_list(&self, limit: u32) -> Result<Vec<AuditEntry>, MetaError> {
        const SQL: &str = "SELECT at, actor, action, repository, detail, client, credential FROM
               (SELECT * FROM audit_log ORDER BY id DESC LIMIT $1) last ORDER BY id";
        Ok(self
            .rows(SQL, &[&i64::from(limit)])
            .await?
            .iter()
            .map(|r| AuditEntry {
                at: r.get(0),
                actor: r.get(1),
                action: r.get(2),
                repository: r.get(3),
                detail: r.get(4),
                client: r.get(5),
                credential: r.get(6),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn postgres_auth_passes_the_suite() {
        let url = super::super::testdb::database().await;
        let meta = super::PostgresMeta::open(&url).await.unwrap();
        super::super::super::auth::tests::suite(&meta).await;
    }
}
