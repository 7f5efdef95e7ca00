//! `EventsMeta` on PostgreSQL, for several replicas sending the same webhooks.
//!
//! - **Fan-out in commit order.** Event ids are taken at insert and transactions commit
//!   in any order, so a cursor on the id alone could pass event 6 while the transaction
//!   holding event 5 has not committed, and never send 5. Each event carries its
//!   transaction's id (`xid`); fan-out reads in (xid, id) order only events whose
//!   transaction is older than the oldest one still running (`pg_snapshot_xmin`): those
//!   have all committed or aborted, and any event inserted later has a larger xid. The
//!   hook's row is locked for the fan-out (`FOR UPDATE`), so two replicas never fan out
//!   the same hook at once.
//! - **Each hook sent by one replica at a time.** `due` first takes the hook's sending
//!   lease (`webhooks.sender`, for [`CLAIM_MS`], renewed by every `due` of the holder):
//!   a replica that does not hold it gets nothing. So each delivery is sent by one
//!   replica, in order (a failure holds back the later ones, as on one server), and a
//!   replica that died is taken over once its lease runs out (webhooks are at least
//!   once: receivers de-duplicate on the event's uuid).

use async_trait::async_trait;
use tokio_postgres::Row;

use super::super::events::{Attempt, DeliveryRecord, DueDelivery, EventsMeta, WebhookRecord};
use super::super::{EventRecord, MetaError, now_ms};
use super::PostgresMeta;

/// How long a hook's sending stays with the replica whose `due` took it, unless renewed.
pub const CLAIM_MS: i64 = 2 * 60 * 1000;

/// The oldest transaction still running: events of older ones are all settled.
const HORIZON: &str = "(pg_snapshot_xmin(pg_current_snapshot())::text::bigint)";

fn split(s: String) -> Vec<String> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A webhook from `id, url, secret, repositories, tags, actions, format, source,
/// created_at` starting at column `at`.
fn hook(r: &Row, at: usize) -> WebhookRecord {
    WebhookRecord {
        id: r.get(at),
        url: r.get(at + 1),
        secret: r.get(at + 2),
        repositories: r.get(at + 3),
        tags: split(r.get(at + 4)),
        actions: split(r.get(at + 5)),
        format: r.get(at + 6),
        source: r.get(at + 7),
        created_at: r.get(at + 8),
    }
}

/// An event from `id, uuid, at, action, repository, tag, digest, media_type, size,
/// actor, quota, detail` starting at column `at`.
pub(super) fn event(r: &Row, at: usize) -> EventRecord {
    EventRecord {
        id: r.get(at),
        uuid: r.get(at + 1),
        at: r.get(at + 2),
        action: r.get(at + 3),
        repository: r.get(at + 4),
        tag: r.get(at + 5),
        digest: r.get(at + 6),
        media_type: r.get(at + 7),
        size: r.get(at + 8),
        actor: r.get(at + 9),
        quota: r.get(at + 10),
        detail: r.get(at + 11),
    }
}

#[async_trait]
impl EventsMeta for PostgresMeta {
    async fn webhook_put(&self, h: &WebhookRecord) -> Result<(), MetaError> {
        // A new hook starts after every settled event (transactions still running when
        // it is made may still reach it: they commit after it exists).
        const SQL: &str = "INSERT INTO webhooks (id, url, secret, repositories, tags, actions, format, source, created_at, cursor_xid, cursor)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9,
                     (pg_snapshot_xmin(pg_current_snapshot())::text::bigint) - 1, 9223372036854775807)
             ON CONFLICT (id) DO UPDATE SET url = excluded.url, secret = excluded.secret,
               repositories = excluded.repositories, tags = excluded.tags,
               actions = excluded.actions, format = excluded.format, source = excluded.source";
        let (tags, actions) = (h.tags.join(","), h.actions.join(","));
        self.exec(
            SQL,
            &[
                &h.id,
                &h.url,
                &h.secret,
                &h.repositories,
                &tags,
                &actions,
                &h.format,
                &h.source,
                &h.created_at,
            ],
        )
        .await?;
        Ok(())
    }

    async fn webhooks(&self) -> Result<Vec<WebhookRecord>, MetaError> {
        const SQL: &str =
            "SELECT id, url, secret, repositories, tags, actions, format, source, created_at
             FROM webhooks ORDER BY created_at, id";
        Ok(self
            .rows(SQL, &[])
            .await?
            .iter()
            .map(|r| hook(r, 0))
            .collect())
    }

    async fn webhook_remove(&self, id: &str) -> Result<bool, MetaError> {
        // Deliveries go with it (ON DELETE CASCADE).
        Ok(self
            .exec("DELETE FROM webhooks WHERE id = $1", &[&id])
            .await?
            > 0)
    }

    async fn webhooks_retain(&self, source: &str, keep: &[String]) -> Result<usize, MetaError> {
        const SQL: &str = "DELETE FROM webhooks WHERE source = $1 AND NOT (id = ANY($2))";
        let keep = keep.to_vec();
        Ok(self.exec(SQL, &[&source, &keep]).await? as usize)
    }

    async fn fan_out(
        &self,
        hook_id: &str,
        batch: u32,
        max_pending: u32,
        matches: &(dyn for<'e> Fn(&'e EventRecord) -> bool + Sync),
    ) -> Result<usize, MetaError> {
        const CURSOR: &str = "SELECT cursor_xid, cursor FROM webhooks WHERE id = $1 FOR UPDATE";
        const EVENTS: &str = "SELECT xid, id, uuid, at, action, repository, tag, digest, media_type, size, actor, quota, detail
             FROM events WHERE (xid, id) > ($1, $2)
               AND xid < (pg_snapshot_xmin(pg_current_snapshot())::text::bigint)
             ORDER BY xid, id LIMIT $3";
        const MOVE: &str = "UPDATE webhooks SET cursor_xid = $2, cursor = $3 WHERE id = $1";
        const INSERT: &str = "INSERT INTO deliveries (webhook, event, status, attempts, next_attempt_at, created_at, updated_at)
             VALUES ($1, $2, 'pending', 0, $3, $3, $3) ON CONFLICT DO NOTHING";
        const PENDING: &str =
            "SELECT count(*) FROM deliveries WHERE webhook = $1 AND status = 'pending'";
        const DROP: &str = "UPDATE deliveries SET status = 'failed', updated_at = $3,
               last_error = 'dropped: the endpoint fell too far behind (queue full)'
             WHERE id IN (SELECT id FROM deliveries WHERE webhook = $1 AND status = 'pending'
                          ORDER BY id LIMIT $2)";
        debug_assert!(EVENTS.contains(HORIZON));
        self.timed(async {
            let mut c = self.conn().await?;
            let cursor = c.prep(CURSOR).await?;
            let events = c.prep(EVENTS).await?;
            let moved = c.prep(MOVE).await?;
            let insert = c.prep(INSERT).await?;
            let pending = c.prep(PENDING).await?;
            let drop_oldest = c.prep(DROP).await?;
            let tx = c.client.transaction().await?;
            let Some(at) = tx.query_opt(&cursor, &[&hook_id]).await? else {
                return Ok(0);
            };
            let (xid, id): (i64, i64) = (at.get(0), at.get(1));
            let rows = tx.query(&events, &[&xid, &id, &i64::from(batch)]).await?;
            let Some(last) = rows.last() else {
                return Ok(0);
            };
            let (last_xid, last_id): (i64, i64) = (last.get(0), last.get(1));
            let now = now_ms();
            let mut chosen = 0;
            for r in &rows {
                let e = event(r, 1);
                if matches(&e) {
                    tx.execute(&insert, &[&hook_id, &e.id, &now]).await?;
                    chosen += 1;
                }
            }
            tx.execute(&moved, &[&hook_id, &last_xid, &last_id]).await?;
            let waiting: i64 = tx.query_one(&pending, &[&hook_id]).await?.get(0);
            let excess = waiting - i64::from(max_pending);
            if excess > 0 {
                tx.execute(&drop_oldest, &[&hook_id, &excess, &now]).await?;
            }
            tx.commit().await?;
            Ok(chosen)
        })
        .await
    }

    async fn due(
        &self,
        hook_id: &str,
        now: i64,
        limit: u32,
    ) -> Result<Vec<DueDelivery>, MetaError> {
        const TAKE: &str = "UPDATE webhooks SET sender = $2, sender_until = $3
             WHERE id = $1 AND (sender IS NULL OR sender = $2 OR sender_until < $4)";
        const DUE: &str = "SELECT d.id, d.attempts, d.created_at,
                    w.id, w.url, w.secret, w.repositories, w.tags, w.actions, w.format, w.source, w.created_at,
                    e.id, e.uuid, e.at, e.action, e.repository, e.tag, e.digest, e.media_type, e.size, e.actor, e.quota, e.detail
             FROM deliveries d JOIN webhooks w ON w.id = d.webhook JOIN events e ON e.id = d.event
             WHERE d.webhook = $1 AND d.status = 'pending' AND d.next_attempt_at <= $2
             ORDER BY d.id LIMIT $3";
        let until = now + CLAIM_MS;
        if self
            .exec(TAKE, &[&hook_id, &self.replica, &until, &now])
            .await?
            == 0
        {
            return Ok(Vec::new()); // another replica sends this hook's deliveries
        }
        Ok(self
            .rows(DUE, &[&hook_id, &now, &i64::from(limit)])
            .await?
            .iter()
            .map(|r| DueDelivery {
                id: r.get(0),
                attempts: r.get(1),
                created_at: r.get(2),
                webhook: hook(r, 3),
                event: event(r, 12),
            })
            .collect())
    }

    async fn record_attempt(&self, delivery: i64, attempt: Attempt) -> Result<(), MetaError> {
        const DELIVERED: &str =
            "UPDATE deliveries SET status = 'delivered', attempts = attempts + 1,
               response_code = $2, last_error = NULL, updated_at = $3 WHERE id = $1";
        const FAILED: &str =
            "UPDATE deliveries SET status = $2, attempts = attempts + 1, response_code = $3,
               last_error = $4, next_attempt_at = $5, updated_at = $6 WHERE id = $1";
        let now = now_ms();
        match attempt {
            Attempt::Delivered { code } => {
                self.exec(DELIVERED, &[&delivery, &i64::from(code), &now])
                    .await?
            }
            Attempt::Failed {
                code,
                error,
                retry_at,
            } => {
                let status = if retry_at.is_some() {
                    "pending"
                } else {
                    "failed"
                };
                let code = code.map(i64::from);
                self.exec(
                    FAILED,
                    &[
                        &delivery,
                        &status,
                        &code,
                        &error,
                        &retry_at.unwrap_or(now),
                        &now,
                    ],
                )
                .await?
            }
        };
        Ok(())
    }

    async fn deliveries(
        &self,
        hook_id: &str,
        limit: u32,
    ) -> Result<Vec<DeliveryRecord>, MetaError> {
        const SQL: &str = "SELECT d.id, d.webhook, e.uuid, e.action, e.repository, e.tag, e.digest, d.status,
                    d.attempts, d.next_attempt_at, d.last_error, d.response_code, d.created_at, d.updated_at
             FROM deliveries d JOIN events e ON e.id = d.event
             WHERE d.webhook = $1 ORDER BY d.id DESC LIMIT $2";
        Ok(self
            .rows(SQL, &[&hook_id, &i64::from(limit)])
            .await?
            .iter()
            .map(|r| DeliveryRecord {
                id: r.get(0),
                webhook: r.get(1),
                event_uuid: r.get(2),
                action: r.get(3),
                repository: r.get(4),
                tag: r.get(5),
                digest: r.get(6),
                status: r.get(7),
                attempts: r.get(8),
                next_attempt_at: r.get(9),
                last_error: r.get(10),
                response_code: r.get(11),
                created_at: r.get(12),
                updated_at: r.get(13),
            })
            .collect())
    }

    async fn prune(&self, before: i64) -> Result<(u64, u64), MetaError> {
        const DELIVERIES: &str =
            "DELETE FROM deliveries WHERE status IN ('delivered', 'failed') AND updated_at < $1";
        const EVENTS: &str = "DELETE FROM events e WHERE e.at < $1
               AND e.xid < (pg_snapshot_xmin(pg_current_snapshot())::text::bigint)
               AND NOT EXISTS (SELECT 1 FROM webhooks w WHERE (e.xid, e.id) > (w.cursor_xid, w.cursor))
               AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event = e.id)";
        self.timed(async {
            let mut c = self.conn().await?;
            let deliveries = c.prep(DELIVERIES).await?;
            let events = c.prep(EVENTS).await?;
            let tx = c.client.transaction().await?;
            let d = tx.execute(&deliveries, &[&before]).await?;
            let e = tx.execute(&events, &[&before]).await?;
            tx.commit().await?;
            Ok((d, e))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn add_event(m: &PostgresMeta, uuid: &str, at: i64, repository: &str) {
        m.exec(
            "INSERT INTO events (uuid, at, action, repository, digest) VALUES ($1, $2, 'push', $3, 'sha256:x')",
            &[&uuid, &at, &repository],
        )
        .await
        .unwrap();
    }

    fn webhook(id: &str) -> WebhookRecord {
        WebhookRecord {
            id: id.into(),
            url: "http://127.0.0.1:9/hook".into(),
            secret: "s".into(),
            repositories: "*".into(),
            tags: vec!["*".into()],
            actions: vec!["push".into()],
            format: "wharf".into(),
            source: "cli".into(),
            created_at: 1,
        }
    }

    fn uuids(d: &[DueDelivery]) -> Vec<String> {
        d.iter().map(|d| d.event.uuid.clone()).collect()
    }

    #[tokio::test]
    async fn deliveries_fan_out_once_in_commit_order_and_go_to_one_replica() {
        let url = super::super::testdb::database().await;
        let (a, b) = (
            PostgresMeta::open(&url).await.unwrap(),
            PostgresMeta::open(&url).await.unwrap(),
        );
        add_event(&a, "before", 1, "team/api").await;
        a.webhook_put(&webhook("h")).await.unwrap();
        assert_eq!(a.webhooks().await.unwrap(), vec![webhook("h")]);
        let all = |_: &EventRecord| true;
        assert_eq!(
            a.fan_out("h", 100, 1000, &all).await.unwrap(),
            0,
            "not the past"
        );

        // A transaction that took an event id, still open while a later one commits.
        let mut slow = a.conn().await.unwrap();
        let tx = slow.client.transaction().await.unwrap();
        tx.execute(
            "INSERT INTO events (uuid, at, action, repository, digest) VALUES ('first', 2, 'push', 'team/api', 'sha256:x')",
            &[],
        )
        .await
        .unwrap();
        add_event(&b, "second", 3, "team/api").await;
        assert_eq!(
            b.fan_out("h", 100, 1000, &all).await.unwrap(),
            0,
            "nothing past a transaction still running"
        );
        tx.commit().await.unwrap();
        drop(slow);
        // Replicas fan out at once: each event once.
        let (x, y) = tokio::join!(
            a.fan_out("h", 100, 1000, &all),
            b.fan_out("h", 100, 1000, &all)
        );
        assert_eq!(x.unwrap() + y.unwrap(), 2);
        assert_eq!(a.fan_out("h", 100, 1000, &all).await.unwrap(), 0);

        // Two replicas polling at once: one sends the hook's deliveries, in order; the
        // other gets none while the first holds the hook.
        add_event(&a, "third", 4, "team/api").await;
        assert_eq!(a.fan_out("h", 100, 1000, &all).await.unwrap(), 1);
        let now = now_ms();
        let (x, y) = tokio::join!(a.due("h", now, 10), b.due("h", now, 10));
        let (x, y) = (x.unwrap(), y.unwrap());
        let (holder, other) = if x.is_empty() { (&b, &a) } else { (&a, &b) };
        assert!(
            x.is_empty() != y.is_empty(),
            "one replica only: {x:?} {y:?}"
        );
        let sent = if x.is_empty() { y } else { x };
        assert_eq!(
            uuids(&sent),
            ["first", "second", "third"],
            "all, oldest first"
        );
        assert!(other.due("h", now, 10).await.unwrap().is_empty());
        // The holder's first attempt fails and holds back the rest; retried, all are
        // due again to the holder at once (nothing waits for a hold to run out).
        holder
            .record_attempt(
                sent[0].id,
                Attempt::Failed {
                    code: Some(503),
                    error: "busy".into(),
                    retry_at: Some(now + 10),
                },
            )
            .await
            .unwrap();
        assert_eq!(holder.due("h", now + 20, 10).await.unwrap().len(), 3);
        // A holder that died: another replica takes over once its hold runs out.
        assert!(other.due("h", now + 20, 10).await.unwrap().is_empty());
        let again = other.due("h", now + 20 + CLAIM_MS + 1, 10).await.unwrap();
        assert_eq!(uuids(&again), ["first", "second", "third"]);
        let a = other.clone();

        let first = again[0].id;
        a.record_attempt(first, Attempt::Delivered { code: 204 })
            .await
            .unwrap();
        a.record_attempt(
            again[1].id,
            Attempt::Failed {
                code: Some(500),
                error: "boom".into(),
                retry_at: None,
            },
        )
        .await
        .unwrap();
        let log = a.deliveries("h", 10).await.unwrap();
        let status: Vec<(&str, &str)> = log
            .iter()
            .map(|d| (d.event_uuid.as_str(), d.status.as_str()))
            .collect();
        assert_eq!(
            status,
            [
                ("third", "pending"),
                ("second", "failed"),
                ("first", "delivered")
            ]
        );
        assert_eq!(log[2].response_code, Some(204));

        // Pruning: finished deliveries, then events every cursor passed and nothing
        // names; the pending one and its event stay.
        let (d, e) = a.prune(now_ms() + 1000).await.unwrap();
        assert_eq!(
            (d, e),
            (2, 3),
            "deliveries, then events (before, first, second)"
        );
        assert_eq!(a.deliveries("h", 10).await.unwrap().len(), 1);

        // A full queue drops the oldest pending deliveries.
        for i in 0..3 {
            add_event(&a, &format!("more{i}"), 10, "team/api").await;
        }
        assert_eq!(a.fan_out("h", 100, 2, &all).await.unwrap(), 3);
        let log = a.deliveries("h", 10).await.unwrap();
        let pending = log.iter().filter(|d| d.status == "pending").count();
        assert_eq!(pending, 2, "{log:?}");

        // Filters; removal takes the hook's deliveries with it.
        a.webhook_put(&webhook("other")).await.unwrap();
        add_event(&a, "elsewhere", 11, "other/x").await;
        let only_team = |e: &EventRecord| e.repository.starts_with("team/");
        assert_eq!(a.fan_out("other", 100, 10, &only_team).await.unwrap(), 0);
        assert_eq!(a.webhooks_retain("cli", &["h".into()]).await.unwrap(), 1);
        assert!(a.webhook_remove("h").await.unwrap());
        assert!(!a.webhook_remove("h").await.unwrap());
        assert!(a.webhooks().await.unwrap().is_empty());
        assert_eq!(
            a.prune(now_ms() + 1000).await.unwrap().1,
            5,
            "with no hook left, every old event goes"
        );
    }

    /// A database dumped and restored into another cluster carries cursors ahead of the
    /// new cluster's transaction ids: at open they start at the present, and new events
    /// reach the hook again.
    #[tokio::test]
    async fn cursors_from_another_cluster_start_at_the_present() {
        let url = super::super::testdb::database().await;
        let m = PostgresMeta::open(&url).await.unwrap();
        m.webhook_put(&webhook("h")).await.unwrap();
        m.exec("UPDATE webhooks SET cursor_xid = 9000000000000", &[])
            .await
            .unwrap();
        let m = PostgresMeta::open(&url).await.unwrap();
        m.exec(
            "INSERT INTO events (uuid, at, action, repository, digest) VALUES ('new', 1, 'push', 'a/b', 'sha256:x')",
            &[],
        )
        .await
        .unwrap();
        assert_eq!(m.fan_out("h", 10, 10, &|_| true).await.unwrap(), 1);
    }
}
