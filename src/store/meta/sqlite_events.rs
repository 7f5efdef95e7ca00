//! [`EventsMeta`] for SQLite.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};

use super::events::{Attempt, DeliveryRecord, DueDelivery, EventsMeta, WebhookRecord};
use super::sqlite::{EVENT_COLUMNS, SqliteMeta, event_row, now_ms};
use super::{EventRecord, MetaError};

const HOOK_COLUMNS: &str =
    "id, url, secret, repositories, tags, actions, format, source, created_at";

fn split(s: String) -> Vec<String> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect()
}

fn hook_row(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<WebhookRecord> {
    Ok(WebhookRecord {
        id: r.get(at)?,
        url: r.get(at + 1)?,
        secret: r.get(at + 2)?,
        repositories: r.get(at + 3)?,
        tags: split(r.get(at + 4)?),
        actions: split(r.get(at + 5)?),
        format: r.get(at + 6)?,
        source: r.get(at + 7)?,
        created_at: r.get(at + 8)?,
    })
}

#[async_trait]
impl EventsMeta for SqliteMeta {
    async fn webhook_put(&self, hook: &WebhookRecord) -> Result<(), MetaError> {
        let h = hook.clone();
        self.write(move |tx| {
            let newest: i64 =
                tx.query_row("SELECT coalesce(max(id), 0) FROM events", [], |r| r.get(0))?;
            tx.execute(
                "INSERT INTO webhooks (id, url, secret, repositories, tags, actions, format, source, created_at, cursor)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT (id) DO UPDATE SET url = excluded.url, secret = excluded.secret,
                   repositories = excluded.repositories, tags = excluded.tags,
                   actions = excluded.actions, format = excluded.format, source = excluded.source",
                params![
                    h.id,
                    h.url,
                    h.secret,
                    h.repositories,
                    h.tags.join(","),
                    h.actions.join(","),
                    h.format,
                    h.source,
                    h.created_at,
                    newest
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn webhooks(&self) -> Result<Vec<WebhookRecord>, MetaError> {
        self.scan(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {HOOK_COLUMNS} FROM webhooks ORDER BY created_at, id"
            ))?;
            let rows = stmt.query_map([], |r| hook_row(r, 0))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn webhook_remove(&self, id: &str) -> Result<bool, MetaError> {
        let id = id.to_owned();
        self.write(move |tx| {
            tx.execute("DELETE FROM deliveries WHERE webhook = ?1", params![id])?;
            Ok(tx.execute("DELETE FROM webhooks WHERE id = ?1", params![id])? > 0)
        })
        .await
    }

    async fn webhooks_retain(&self, source: &str, keep: &[String]) -> Result<usize, MetaError> {
        let (source, keep) = (source.to_owned(), keep.to_vec());
        self.write(move |tx| {
            let ids: Vec<String> = tx
                .prepare("SELECT id FROM webhooks WHERE source = ?1")?
                .query_map(params![source], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let mut removed = 0;
            for id in ids.iter().filter(|id| !keep.contains(id)) {
                tx.execute("DELETE FROM deliveries WHERE webhook = ?1", params![id])?;
                removed += tx.execute("DELETE FROM webhooks WHERE id = ?1", params![id])?;
            }
            Ok(removed)
        })
        .await
    }

    async fn fan_out(
        &self,
        hook: &str,
        batch: u32,
        max_pending: u32,
        matches: &(dyn for<'e> Fn(&'e EventRecord) -> bool + Sync),
    ) -> Result<usize, MetaError> {
        // Read the events first (a reader never blocks the writer), then claim them in a
        // write transaction that checks the cursor did not move meanwhile.
        let hook = hook.to_owned();
        let cursor: Option<i64> = {
            let h = hook.clone();
            self.read(move |c| {
                Ok(c.query_row(
                    "SELECT cursor FROM webhooks WHERE id = ?1",
                    params![h],
                    |r| r.get(0),
                )
                .optional()?)
            })
            .await?
        };
        let Some(cursor) = cursor else {
            return Ok(0);
        };
        let events = super::MetaStore::events_after(self, cursor, batch).await?;
        let Some(last) = events.last().map(|e| e.id) else {
            return Ok(0);
        };
        let chosen: Vec<i64> = events.iter().filter(|e| matches(e)).map(|e| e.id).collect();
        self.write(move |tx| {
            let now = now_ms();
            let moved = tx.execute(
                "UPDATE webhooks SET cursor = ?3 WHERE id = ?1 AND cursor = ?2",
                params![hook, cursor, last],
            )?;
            if moved == 0 {
                return Ok(0); // another process fanned these out
            }
            let mut insert = tx.prepare_cached(
                "INSERT INTO deliveries (webhook, event, status, attempts, next_attempt_at, created_at, updated_at)
                 VALUES (?1, ?2, 'pending', 0, ?3, ?3, ?3) ON CONFLICT DO NOTHING",
            )?;
            for id in &chosen {
                insert.execute(params![hook, id, now])?;
            }
            let pending: i64 = tx.query_row(
                "SELECT count(*) FROM deliveries WHERE webhook = ?1 AND status = 'pending'",
                params![hook],
                |r| r.get(0),
            )?;
            let excess = pending - i64::from(max_pending);
            if excess > 0 {
                tx.execute(
                    "UPDATE deliveries SET status = 'failed', updated_at = ?3,
                       last_error = 'dropped: the endpoint fell too far behind (queue full)'
                     WHERE id IN (SELECT id FROM deliveries WHERE webhook = ?1 AND status = 'pending'
                                  ORDER BY id LIMIT ?2)",
                    params![hook, excess, now],
                )?;
            }
            Ok(chosen.len())
        })
        .await
    }

    async fn due(&self, hook: &str, now: i64, limit: u32) -> Result<Vec<DueDelivery>, MetaError> {
        let hook = hook.to_owned();
        self.scan(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT d.id, d.attempts, d.created_at, {}, {EVENT_COLUMNS}
                 FROM deliveries d JOIN webhooks w ON w.id = d.webhook JOIN events e ON e.id = d.event
                 WHERE d.webhook = ?1 AND d.status = 'pending' AND d.next_attempt_at <= ?2
                 ORDER BY d.id LIMIT ?3",
                HOOK_COLUMNS
                    .split(", ")
                    .map(|c| format!("w.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))?;
            let rows = stmt.query_map(params![hook, now, limit], |r| {
                Ok(DueDelivery {
                    id: r.get(0)?,
                    attempts: r.get(1)?,
                    created_at: r.get(2)?,
                    webhook: hook_row(r, 3)?,
                    event: event_row(r, 12)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn record_attempt(&self, delivery: i64, attempt: Attempt) -> Result<(), MetaError> {
        self.write(move |tx| {
            let now = now_ms();
            match attempt {
                Attempt::Delivered { code } => tx.execute(
                    "UPDATE deliveries SET status = 'delivered', attempts = attempts + 1,
                       response_code = ?2, last_error = NULL, updated_at = ?3 WHERE id = ?1",
                    params![delivery, code, now],
                )?,
                Attempt::Failed {
                    code,
                    error,
                    retry_at,
                } => tx.execute(
                    "UPDATE deliveries SET status = ?2, attempts = attempts + 1, response_code = ?3,
                       last_error = ?4, next_attempt_at = ?5, updated_at = ?6 WHERE id = ?1",
                    params![
                        delivery,
                        if retry_at.is_some() { "pending" } else { "failed" },
                        code,
                        error,
                        retry_at.unwrap_or(now),
                        now
                    ],
                )?,
            };
            Ok(())
        })
        .await
    }

    async fn deliveries(&self, hook: &str, limit: u32) -> Result<Vec<DeliveryRecord>, MetaError> {
        let hook = hook.to_owned();
        self.scan(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT d.id, d.webhook, e.uuid, e.action, e.repository, e.tag, e.digest, d.status,
                        d.attempts, d.next_attempt_at, d.last_error, d.response_code, d.created_at, d.updated_at
                 FROM deliveries d JOIN events e ON e.id = d.event
                 WHERE d.webhook = ?1 ORDER BY d.id DESC LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![hook, limit], |r| {
                Ok(DeliveryRecord {
                    id: r.get(0)?,
                    webhook: r.get(1)?,
                    event_uuid: r.get(2)?,
                    action: r.get(3)?,
                    repository: r.get(4)?,
                    tag: r.get(5)?,
                    digest: r.get(6)?,
                    status: r.get(7)?,
                    attempts: r.get(8)?,
                    next_attempt_at: r.get(9)?,
                    last_error: r.get(10)?,
                    response_code: r.get(11)?,
                    created_at: r.get(12)?,
                    updated_at: r.get(13)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn prune(&self, before: i64) -> Result<(u64, u64), MetaError> {
        self.write(move |tx| {
            let deliveries = tx.execute(
                "DELETE FROM deliveries WHERE status IN ('delivered', 'failed') AND updated_at < ?1",
                params![before],
            )?;
            let events = tx.execute(
                "DELETE FROM events WHERE at < ?1
                   AND id <= (SELECT coalesce(min(cursor), (SELECT max(id) FROM events)) FROM webhooks)
                   AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event = events.id)",
                params![before],
            )?;
            Ok((deliveries as u64, events as u64))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::meta::MetaStore;

    #[tokio::test]
    async fn pruning_keeps_what_is_recent_pending_or_not_yet_fanned_out() {
        let dir = tempfile::tempdir().unwrap();
        let m = SqliteMeta::open(&dir.path().join("meta.db")).unwrap();
        m.write(|tx| {
            tx.execute_batch(
                "INSERT INTO events (id, uuid, at, action, repository, digest) VALUES
                   (1, 'old-delivered', 10, 'push', 'a', 'd'), (2, 'old-pending', 10, 'push', 'a', 'd'),
                   (3, 'old-no-hook', 10, 'push', 'a', 'd'), (4, 'old-past-cursor', 10, 'push', 'a', 'd'),
                   (5, 'new', 5000, 'push', 'a', 'd');
                 INSERT INTO webhooks VALUES ('h', 'http://x', 's', '*', '*', 'push', 'wharf', 'cli', 0, 3);
                 INSERT INTO deliveries (webhook, event, status, next_attempt_at, created_at, updated_at) VALUES
                   ('h', 1, 'delivered', 0, 10, 10), ('h', 2, 'pending', 0, 10, 10),
                   ('h', 5, 'failed', 0, 5000, 5000);",
            )?;
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(m.prune(1000).await.unwrap(), (1, 2));
        let left: Vec<String> = m
            .events_after(0, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.uuid)
            .collect();
        // 2 waits for its delivery, 4 for the webhook's fan-out, 5 is recent.
        assert_eq!(left, ["old-pending", "old-past-cursor", "new"]);
        assert_eq!(m.deliveries("h", 10).await.unwrap().len(), 2);
        assert_eq!(m.prune(1000).await.unwrap(), (0, 0));
    }
}
