//! Webhook endpoints and deliveries: kept beside the event outbox, behind their own trait.

use async_trait::async_trait;

use super::{EventRecord, MetaError};

/// A webhook endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookRecord {
    pub id: String,
    pub url: String,
    pub secret: String,
    /// A repository pattern: a name, `namespace/*` or `*`.
    pub repositories: String,
    /// Tag globs; `*` matches every tag (and events without one).
    pub tags: Vec<String>,
    /// `push`, `tag`, `untag`, `delete`.
    pub actions: Vec<String>,
    /// `wharf`, `cncf` or `dockerhub`.
    pub format: String,
    /// `cli` or `config`.
    pub source: String,
    pub created_at: i64,
}

/// A delivery due now, with what to send.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    pub id: i64,
    pub attempts: i64,
    pub created_at: i64,
    pub webhook: WebhookRecord,
    pub event: EventRecord,
}

/// A delivery as the log shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRecord {
    pub id: i64,
    pub webhook: String,
    pub event_uuid: String,
    pub action: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: String,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub response_code: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Delivered {
        code: u16,
    },
    /// Try again at `retry_at` (unix ms), or give up when it is None.
    Failed {
        code: Option<u16>,
        error: String,
        retry_at: Option<i64>,
    },
}

#[async_trait]
pub trait EventsMeta: Send + Sync + 'static {
    /// Adds or replaces a webhook. A new one starts after the newest event: it is not
    /// sent the past.
    async fn webhook_put(&self, hook: &WebhookRecord) -> Result<(), MetaError>;
    async fn webhooks(&self) -> Result<Vec<WebhookRecord>, MetaError>;
    async fn webhook_remove(&self, id: &str) -> Result<bool, MetaError>;
    /// Removes the webhooks from `source` whose ids are not in `keep`.
    async fn webhooks_retain(&self, source: &str, keep: &[String]) -> Result<usize, MetaError>;
    /// Moves up to `batch` new events into `hook`'s deliveries (those `matches` accepts)
    /// and advances its cursor, in one transaction. Past `max_pending` waiting
    /// deliveries, the oldest are failed so a dead receiver cannot grow the queue.
    async fn fan_out(
        &self,
        hook: &str,
        batch: u32,
        max_pending: u32,
        matches: &(dyn for<'e> Fn(&'e EventRecord) -> bool + Sync),
    ) -> Result<usize, MetaError>;
    /// Deliveries of `hook` due at `now`, oldest first.
    async fn due(&self, hook: &str, now: i64, limit: u32) -> Result<Vec<DueDelivery>, MetaError>;
    async fn record_attempt(&self, delivery: i64, attempt: Attempt) -> Result<(), MetaError>;
    /// The newest deliveries of `hook`.
    async fn deliveries(&self, hook: &str, limit: u32) -> Result<Vec<DeliveryRecord>, MetaError>;
    /// Forgets delivered and failed deliveries last changed before `before` (unix ms),
    /// then events older than that which every webhook's cursor is past and no delivery
    /// names. Returns (deliveries, events) removed.
    async fn prune(&self, before: i64) -> Result<(u64, u64), MetaError>;
}
