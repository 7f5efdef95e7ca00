//! `AuthMeta` on SQLite.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};

use super::MetaError;
use super::auth::{AuditEntry, AuthMeta, GrantRecord, TokenRecord, UserRecord};
use super::sqlite::{SqliteMeta, now_ms};

fn user(r: &rusqlite::Row<'_>) -> rusqlite::Result<UserRecord> {
    Ok(UserRecord {
        name: r.get(0)?,
        password_hash: r.get(1)?,
        admin: r.get(2)?,
        created_at: r.get(3)?,
        generation: r.get(4)?,
    })
}

/// Moves the rights generation (see `AuthMeta::auth_state`); returns the new value.
pub(super) fn bump_auth_state(tx: &rusqlite::Transaction<'_>) -> Result<i64, MetaError> {
    Ok(tx.query_row(
        "UPDATE auth_state SET generation = generation + 1 WHERE id = 1 RETURNING generation",
        [],
        |r| r.get(0),
    )?)
}

const TOKEN_COLUMNS: &str = "id, user_name, name, kind, secret_hash, scopes, created_at, last_used_at, expires_at, revoked_at";

fn token(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRecord> {
    let scopes: String = r.get(5)?;
    Ok(TokenRecord {
        id: r.get(0)?,
        user_name: r.get(1)?,
        name: r.get(2)?,
        kind: r.get(3)?,
        secret_hash: r.get(4)?,
        scopes: serde_json::from_str(&scopes).unwrap_or_default(),
        created_at: r.get(6)?,
        last_used_at: r.get(7)?,
        expires_at: r.get(8)?,
        revoked_at: r.get(9)?,
    })
}

#[async_trait]
impl AuthMeta for SqliteMeta {
    async fn auth_state(&self) -> Result<i64, MetaError> {
        self.read(|c| {
            Ok(
                c.prepare_cached("SELECT generation FROM auth_state WHERE id = 1")?
                    .query_row([], |r| r.get(0))?,
            )
        })
        .await
    }

    async fn user_count(&self) -> Result<u64, MetaError> {
        self.read(|c| {
            Ok(c.query_row("SELECT count(*) FROM users", [], |r| r.get::<_, i64>(0))? as u64)
        })
        .await
    }

    async fn user_get(&self, name: &str) -> Result<Option<UserRecord>, MetaError> {
        let name = name.to_owned();
        self.read(move |c| {
            Ok(c.prepare_cached("SELECT name, password_hash, admin, created_at, generation FROM users WHERE name = ?1")?
                .query_row(params![name], user)
                .optional()?)
        })
        .await
    }

    async fn user_create(
        &self,
        name: &str,
        password_hash: &str,
        admin: bool,
    ) -> Result<(), MetaError> {
        let (name, hash) = (name.to_owned(), password_hash.to_owned());
        self.write(move |tx| {
            let n = tx.execute(
                "INSERT INTO users (name, password_hash, admin, created_at, generation)
                 VALUES (?1, ?2, ?3, ?4, (SELECT generation + 1 FROM auth_state WHERE id = 1))
                 ON CONFLICT (name) DO NOTHING",
                params![name, hash, admin, now_ms()],
            )?;
            bump_auth_state(tx)?;
            if n == 0 {
                return Err(MetaError::Conflict(format!("user {name}")));
            }
            Ok(())
        })
        .await
    }

    async fn user_list(&self) -> Result<Vec<UserRecord>, MetaError> {
        self.scan(|c| {
            let mut s = c.prepare("SELECT name, password_hash, admin, created_at, generation FROM users ORDER BY name")?;
            let rows = s.query_map([], user)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn user_remove(&self, name: &str) -> Result<bool, MetaError> {
        let name = name.to_owned();
        self.write(move |tx| {
            let n = tx.execute("DELETE FROM users WHERE name = ?1", params![name])?;
            bump_auth_state(tx)?;
            Ok(n > 0)
        })
        .await
    }

    async fn user_set_password(&self, name: &str, password_hash: &str) -> Result<bool, MetaError> {
        let (name, hash) = (name.to_owned(), password_hash.to_owned());
        self.write(move |tx| {
            let generation = bump_auth_state(tx)?;
            let n = tx.execute(
                "UPDATE users SET password_hash = ?2, generation = ?3 WHERE name = ?1",
                params![name, hash, generation],
            )?;
            tx.execute(
                "UPDATE access_tokens SET revoked_at = ?2 WHERE user_name = ?1 AND kind = 'refresh' AND revoked_at IS NULL",
                params![name, now_ms()],
            )?;
            Ok(n > 0)
        })
        .await
    }

    async fn token_create(&self, t: &TokenRecord) -> Result<(), MetaError> {
        let t = t.clone();
        self.write(move |tx| {
            tx.execute(
                &format!("INSERT INTO access_tokens ({TOKEN_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"),
                params![
                    t.id,
                    t.user_name,
                    t.name,
                    t.kind,
                    t.secret_hash,
                    serde_json::to_string(&t.scopes).expect("strings serialize"),
                    t.created_at,
                    t.last_used_at,
                    t.expires_at,
                    t.revoked_at
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn token_get(&self, id: &str) -> Result<Option<TokenRecord>, MetaError> {
        let id = id.to_owned();
        self.read(move |c| {
            Ok(c.prepare_cached(&format!(
                "SELECT {TOKEN_COLUMNS} FROM access_tokens WHERE id = ?1"
            ))?
            .query_row(params![id], token)
            .optional()?)
        })
        .await
    }

    async fn token_list(&self, user: Option<&str>) -> Result<Vec<TokenRecord>, MetaError> {
        let user = user.map(str::to_owned);
        self.scan(move |c| {
            let mut s = c.prepare(&format!(
                "SELECT {TOKEN_COLUMNS} FROM access_tokens WHERE ?1 IS NULL OR user_name = ?1 ORDER BY created_at, id"
            ))?;
            let rows = s.query_map(params![user], token)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn token_revoke(&self, id: &str, now: i64) -> Result<bool, MetaError> {
        let id = id.to_owned();
        self.write(move |tx| {
            let n = tx.execute(
                "UPDATE access_tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                params![id, now],
            )?;
            bump_auth_state(tx)?;
            Ok(n > 0)
        })
        .await
    }

    async fn token_touch(&self, id: &str, now: i64) -> Result<(), MetaError> {
        let id = id.to_owned();
        self.write(move |tx| {
            tx.execute(
                "UPDATE access_tokens SET last_used_at = ?2 WHERE id = ?1",
                params![id, now],
            )?;
            Ok(())
        })
        .await
    }

    async fn grant_set(&self, user: &str, pattern: &str, level: &str) -> Result<(), MetaError> {
        let (user, pattern, level) = (user.to_owned(), pattern.to_owned(), level.to_owned());
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO grants (user_name, pattern, level, created_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (user_name, pattern) DO UPDATE SET level = excluded.level",
                params![user, pattern, level, now_ms()],
            )?;
            bump_auth_state(tx)?;
            Ok(())
        })
        .await
    }

    async fn grant_remove(&self, user: &str, pattern: &str) -> Result<bool, MetaError> {
        let (user, pattern) = (user.to_owned(), pattern.to_owned());
        self.write(move |tx| {
            let n = tx.execute(
                "DELETE FROM grants WHERE user_name = ?1 AND pattern = ?2",
                params![user, pattern],
            )?;
            bump_auth_state(tx)?;
            Ok(n > 0)
        })
        .await
    }

    async fn grants_of(&self, user: &str) -> Result<Vec<GrantRecord>, MetaError> {
        let user = user.to_owned();
        self.read(move |c| {
            let mut s = c.prepare_cached("SELECT user_name, pattern, level FROM grants WHERE user_name = ?1 ORDER BY pattern")?;
            let rows = s.query_map(params![user], |r| {
                Ok(GrantRecord { user_name: r.get(0)?, pattern: r.get(1)?, level: r.get(2)? })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn visibility_set(&self, pattern: &str, public: bool) -> Result<(), MetaError> {
        let pattern = pattern.to_owned();
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO visibility (pattern, public, updated_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (pattern) DO UPDATE SET public = excluded.public, updated_at = excluded.updated_at",
                params![pattern, public, now_ms()],
            )?;
            bump_auth_state(tx)?;
            Ok(())
        })
        .await
    }

    async fn visibility_list(&self) -> Result<Vec<(String, bool)>, MetaError> {
        self.read(|c| {
            let mut s =
                c.prepare_cached("SELECT pattern, public FROM visibility ORDER BY pattern")?;
            let rows = s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn audit_add_all(&self, entries: Vec<AuditEntry>) -> Result<(), MetaError> {
        self.write(move |tx| {
            let mut s = tx.prepare_cached(
                "INSERT INTO audit_log (at, actor, action, repository, detail, client, credential) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for e in &entries {
                s.execute(params![e.at, e.actor, e.action, e.repository, e.detail, e.client, e.credential])?;
            }
            Ok(())
        })
        .await
    }

    async fn audit_add(&self, e: AuditEntry) -> Result<(), MetaError> {
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO audit_log (at, actor, action, repository, detail, client, credential) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![e.at, e.actor, e.action, e.repository, e.detail, e.client, e.credential],
            )?;
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
        let (user, client) = (user.to_owned(), client.to_owned());
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO login_trust (user_name, client, generation, at)
                 SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM users WHERE name = ?1)
                 ON CONFLICT (user_name, client) DO UPDATE SET generation = excluded.generation, at = excluded.at",
                params![user, client, generation, at],
            )?;
            Ok(())
        })
        .await
    }

    async fn trust_list(&self, since: i64) -> Result<Vec<(String, String, i64, i64)>, MetaError> {
        self.scan(move |c| {
            let mut s = c.prepare(
                "SELECT t.user_name, t.client, t.generation, t.at FROM login_trust t
                 JOIN users u ON u.name = t.user_name AND u.generation = t.generation
                 WHERE t.at >= ?1",
            )?;
            let rows = s.query_map(params![since], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn tokens_purge(&self, before: i64) -> Result<u64, MetaError> {
        self.write(move |tx| {
            let n = tx.execute(
                "DELETE FROM access_tokens WHERE revoked_at < ?1 OR expires_at < ?1",
                params![before],
            )?;
            tx.execute(
                "DELETE FROM login_trust WHERE at < ?1 OR generation <> (SELECT generation FROM users WHERE name = user_name)",
                params![before],
            )?;
            Ok(n as u64)
        })
        .await
    }

    async fn signing_key(&self, candidate: &[u8]) -> Result<Vec<u8>, MetaError> {
        let candidate = candidate.to_vec();
        if let Some(k) = self
            .read(|c| {
                Ok(c.query_row(
                    "SELECT value FROM settings WHERE name = 'jwt_key'",
                    [],
                    |r| r.get::<_, Vec<u8>>(0),
                )
                .optional()?)
            })
            .await?
        {
            return Ok(k);
        }
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO settings (name, value) VALUES ('jwt_key', ?1) ON CONFLICT (name) DO NOTHING",
                params![candidate],
            )?;
            Ok(tx.query_row(
                "SELECT value FROM settings WHERE name = 'jwt_key'",
                [],
                |r| r.get(0),
            )?)
        })
        .await
    }

    async fn login_failures(
        &self,
        keys: &[String],
        window: i64,
    ) -> Result<Vec<(String, u32)>, MetaError> {
        let keys = keys.to_vec();
        self.read(move |c| {
            let mut s = c.prepare_cached(
                "SELECT failures FROM login_failures WHERE key = ?1 AND window_start = ?2",
            )?;
            let mut out = Vec::new();
            for k in keys {
                if let Some(n) = s
                    .query_row(params![k, window], |r| r.get::<_, i64>(0))
                    .optional()?
                {
                    out.push((k, u32::try_from(n).unwrap_or(u32::MAX)));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn login_failure_add(&self, keys: &[String], window: i64) -> Result<(), MetaError> {
        let keys = keys.to_vec();
        self.write(move |tx| {
            let mut s = tx.prepare_cached(
                "INSERT INTO login_failures (key, window_start, failures) VALUES (?1, ?2, 1)
                 ON CONFLICT (key, window_start) DO UPDATE SET failures = failures + 1",
            )?;
            for k in &keys {
                s.execute(params![k, window])?;
            }
            tx.prepare_cached("DELETE FROM login_failures WHERE window_start < ?1")?
                .execute(params![window])?;
            Ok(())
        })
        .await
    }

    async fn audit_list(&self, limit: u32) -> Result<Vec<AuditEntry>, MetaError> {
        self.scan(move |c| {
            let mut s = c.prepare(
                "SELECT at, actor, action, repository, detail, client, credential FROM
                   (SELECT * FROM audit_log ORDER BY id DESC LIMIT ?1) ORDER BY id",
            )?;
            let rows = s.query_map(params![limit], |r| {
                Ok(AuditEntry {
                    at: r.get(0)?,
                    actor: r.get(1)?,
                    action: r.get(2)?,
                    repository: r.get(3)?,
                    detail: r.get(4)?,
                    client: r.get(5)?,
                    credential: r.get(6)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn sqlite_auth_passes_the_suite() {
        let dir = tempfile::tempdir().unwrap();
        let meta = super::SqliteMeta::open(&dir.path().join("meta.db")).unwrap();
        super::super::auth::tests::suite(&meta).await;
    }
}
