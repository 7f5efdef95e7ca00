//! The metadata backend for several replicas: PostgreSQL, through `tokio-postgres` and a
//! small pool of its own (ARCHITECTURE.md, "Choices").
//!
//! Every operation borrows a connection from the pool (at most [`POOL_SIZE`], each with
//! its prepared statements cached), and runs under [`QUERY_TIMEOUT`]. A database that
//! cannot be reached, or that stops answering, gives [`MetaError::Unavailable`] (503 on
//! the API), never a hang: a connection found closed is dropped and a new one made on
//! the next request, so the registry recovers by itself when the database is back.
//!
//! The schema is `migrations/postgresql/`, applied in order at open, in one transaction
//! under an advisory lock: replicas starting at once apply it once.
//!
//! This backend implements `AuthMeta` and `EventsMeta` so far; the registry's `MetaStore`
//! follows, so it is not yet selectable in the configuration.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, Row, Statement};

use super::MetaError;

mod auth;
mod events;
mod gc;
mod registry;
mod retention;
mod usage;

/// Schema migrations, applied in order; `schema_migrations` records which ran.
const MIGRATIONS: &[&str] = &[
    include_str!("../../../migrations/postgresql/0001_init.sql"),
    include_str!("../../../migrations/postgresql/0002_registry.sql"),
    include_str!("../../../migrations/postgresql/0003_upload_lease.sql"),
];

/// Connections held at most (each replica).
pub const POOL_SIZE: usize = 16;
/// How long a request waits for a free connection, for a new one to be made, or for an
/// answer, before it is refused with `Unavailable`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// The advisory lock the migrations take (any constant of our own).
const MIGRATION_LOCK: i64 = 0x7768_6172_6600_0001;

impl From<tokio_postgres::Error> for MetaError {
    fn from(e: tokio_postgres::Error) -> Self {
        classify(&e)
    }
}

/// What a driver error means for the caller.
fn classify(e: &tokio_postgres::Error) -> MetaError {
    {
        if e.is_closed() {
            return MetaError::Unavailable("the connection to the database was lost".into());
        }
        let Some(code) = e.code() else {
            // No SQLSTATE: the connection or the network failed (an I/O error), or this
            // side misused a result (a row count, a type), which is a bug, not an outage.
            let io = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
            return if io {
                MetaError::Unavailable(format!("the database cannot be reached: {e}"))
            } else {
                MetaError::Db(e.to_string())
            };
        };
        match code {
            c if *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::LOCK_NOT_AVAILABLE =>
            {
                MetaError::Busy
            }
            c if *c == SqlState::DISK_FULL => MetaError::Full,
            // Text PostgreSQL cannot store (a NUL character): the caller's input.
            c if *c == SqlState::CHARACTER_NOT_IN_REPERTOIRE
                || *c == SqlState::UNTRANSLATABLE_CHARACTER =>
            {
                MetaError::Refused("a value contains a NUL character, which is not allowed".into())
            }
            c if *c == SqlState::UNIQUE_VIOLATION => MetaError::Conflict(
                e.as_db_error()
                    .and_then(|d| d.constraint())
                    .map_or_else(|| "the row".to_owned(), |k| format!("a row of {k}")),
            ),
            c if c.code().starts_with("08")
                || *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
                || *c == SqlState::TOO_MANY_CONNECTIONS
                // A node that became a standby (a switchover): writes wait for the primary.
                || *c == SqlState::READ_ONLY_SQL_TRANSACTION
                // A statement or lock timeout.
                || *c == SqlState::QUERY_CANCELED =>
            {
                MetaError::Unavailable(format!("the database is not available: {e}"))
            }
            _ => MetaError::Db(match e.as_db_error() {
                Some(db) => db.message().to_owned(),
                None => e.to_string(),
            }),
        }
    }
}

/// One connection and its prepared statements.
pub(super) struct Conn {
    pub(super) client: Client,
    pub(super) statements: Statements,
}

/// A connection's prepared statements, by their SQL (the lock is never held across an
/// await).
#[derive(Default)]
pub(super) struct Statements(Mutex<HashMap<&'static str, Statement>>);

impl Statements {
    fn get(&self, sql: &'static str) -> Option<Statement> {
        self.0.lock().expect("statements lock").get(sql).cloned()
    }

    fn put(&self, sql: &'static str, s: &Statement) {
        self.0
            .lock()
            .expect("statements lock")
            .insert(sql, s.clone());
    }
}

impl Conn {
    /// `sql` prepared on this connection, once.
    pub(super) async fn prep(&mut self, sql: &'static str) -> Result<Statement, MetaError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s);
        }
        let s = self.client.prepare(sql).await?;
        self.statements.put(sql, &s);
        Ok(s)
    }
}

/// A transaction with its connection's statement cache.
pub(super) struct Tx<'a> {
    pub(super) tx: tokio_postgres::Transaction<'a>,
    statements: &'a Statements,
    /// The first statement that failed, as the error it gave: PostgreSQL aborts the
    /// transaction then, and a COMMIT of it would silently roll back, so
    /// [`serializable!`] refuses to commit (even if the body went on, having taken the
    /// failure for an answer).
    failed: Mutex<Option<MetaError>>,
}

type Params<'p> = &'p [&'p (dyn tokio_postgres::types::ToSql + Sync)];

impl<'a> Tx<'a> {
    pub(super) fn new(tx: tokio_postgres::Transaction<'a>, statements: &'a Statements) -> Self {
        Tx {
            tx,
            statements,
            failed: Mutex::new(None),
        }
    }

    /// Notes `e` as the transaction's failure (the first one counts).
    fn note<T>(&self, r: Result<T, tokio_postgres::Error>) -> Result<T, MetaError> {
        r.map_err(|e| {
            let mut failed = self.failed.lock().expect("tx lock");
            if failed.is_none() {
                *failed = Some(classify(&e));
            }
            MetaError::from(e)
        })
    }

    /// Why the transaction cannot be committed, if a statement failed in it.
    pub(super) fn failure(&self) -> Option<MetaError> {
        self.failed.lock().expect("tx lock").take()
    }

    async fn prep(&self, sql: &'static str) -> Result<Statement, MetaError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s);
        }
        let s = self.note(self.tx.prepare(sql).await)?;
        self.statements.put(sql, &s);
        Ok(s)
    }

    /// Runs a statement; the rows it changed.
    pub(super) async fn exec(&self, sql: &'static str, p: Params<'_>) -> Result<u64, MetaError> {
        let s = self.prep(sql).await?;
        self.note(self.tx.execute(&s, p).await)
    }

    pub(super) async fn rows(
        &self,
        sql: &'static str,
        p: Params<'_>,
    ) -> Result<Vec<Row>, MetaError> {
        let s = self.prep(sql).await?;
        self.note(self.tx.query(&s, p).await)
    }

    pub(super) async fn opt(
        &self,
        sql: &'static str,
        p: Params<'_>,
    ) -> Result<Option<Row>, MetaError> {
        let s = self.prep(sql).await?;
        self.note(self.tx.query_opt(&s, p).await)
    }

    pub(super) async fn one(&self, sql: &'static str, p: Params<'_>) -> Result<Row, MetaError> {
        let s = self.prep(sql).await?;
        self.note(self.tx.query_one(&s, p).await)
    }

    /// Whether the query returns a row.
    pub(super) async fn exists(&self, sql: &'static str, p: Params<'_>) -> Result<bool, MetaError> {
        Ok(self.opt(sql, p).await?.is_some())
    }
}

/// Attempts of a transaction that PostgreSQL could not serialize with another, at most.
pub(super) const SERIALIZE_ATTEMPTS: u32 = 30;

/// The pause before attempt `n + 1` of a transaction that could not be serialized: a
/// random time up to 1, 2, 4 ... 64 ms, so that colliding transactions spread out.
pub(super) async fn pause(n: u32) {
    let cap_us = 1000u64 << n.min(6);
    let us = u64::from(uuid::Uuid::new_v4().as_u128() as u32) % cap_us;
    tokio::time::sleep(Duration::from_micros(us)).await;
}

/// Runs `$body` (an expression of type `Result<T, MetaError>` that uses the transaction
/// `$tx: &Tx`) in a `SERIALIZABLE` transaction, committed if `$commit` is true and
/// rolled back otherwise, under the operation timeout. A transaction PostgreSQL aborts
/// because it could not be serialized with a concurrent one (or a deadlock) is run
/// again from the start, after a short random pause; past `SERIALIZE_ATTEMPTS` the
/// caller gets `Busy`. The body runs again on a retry, so it must do nothing but use
/// `$tx`. `$foreground` counts the transaction as work that the garbage collector's
/// pacing yields to (`gc_contended`).
///
/// Every change to the registry's metadata goes through here: serializable transactions
/// behave as if they ran one at a time, which is what SQLite's single writer gives the
/// embedded backend, so every invariant the SQLite code keeps by its order holds here
/// across replicas with no lock of our own (ARCHITECTURE.md, "Garbage collection").
macro_rules! serializable {
    ($meta:expr, commit = $commit:expr, foreground = $fg:expr, |$tx:ident| $body:expr) => {{
        let meta: &$crate::store::meta::postgres::PostgresMeta = $meta;
        let mut attempt = 0u32;
        loop {
            let r: Result<_, $crate::store::meta::MetaError> = meta
                .timed(async {
                    let mut c = meta.conn().await?;
                    let conn: &mut $crate::store::meta::postgres::Conn = &mut *c;
                    let t = conn
                        .client
                        .build_transaction()
                        .isolation_level(tokio_postgres::IsolationLevel::Serializable)
                        .start()
                        .await?;
                    let owned = $crate::store::meta::postgres::Tx::new(t, &conn.statements);
                    let out: Result<_, $crate::store::meta::MetaError> = {
                        let $tx = &owned;
                        async { $body }.await
                    };
                    // On an error the transaction is rolled back as it is dropped; so it is
                    // if any statement failed, whatever the body made of the failure.
                    let v = out?;
                    if let Some(e) = owned.failure() {
                        return Err(e);
                    }
                    if $commit {
                        if $fg {
                            owned
                                .exec("SELECT nextval('foreground_writes')", &[])
                                .await?;
                        }
                        owned.tx.commit().await?;
                    } else {
                        owned.tx.rollback().await?;
                    }
                    Ok(v)
                })
                .await;
            match r {
                Err($crate::store::meta::MetaError::Busy)
                    if attempt + 1 < $crate::store::meta::postgres::SERIALIZE_ATTEMPTS =>
                {
                    attempt += 1;
                    $crate::store::meta::postgres::pause(attempt).await;
                }
                other => break other,
            }
        }
    }};
}
pub(super) use serializable;

/// A connection borrowed from the pool, given back when dropped, unless it is closed or
/// an operation timed out while it was borrowed (it may still be running a statement,
/// or be dead without knowing it: it is dropped, its statement cancelled).
pub(super) struct Pooled {
    conn: Option<Conn>,
    pool: Arc<Pool>,
    /// `Pool::timeouts` when it was borrowed.
    timeouts: u64,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl std::ops::Deref for Pooled {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn.as_ref().expect("held until drop")
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("held until drop")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let Some(c) = self.conn.take() else { return };
        if c.client.is_closed() {
            return;
        }
        let timed_out = self.pool.timeouts.load(Ordering::Relaxed) != self.timeouts;
        if !timed_out {
            self.pool.idle.lock().expect("pool lock").push(c);
        } else if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let token = c.client.cancel_token();
            rt.spawn(async move {
                let _ = tokio::time::timeout(CONNECT_TIMEOUT, token.cancel_query(NoTls)).await;
            });
        }
    }
}

struct Pool {
    config: tokio_postgres::Config,
    idle: Mutex<Vec<Conn>>,
    permits: Arc<tokio::sync::Semaphore>,
    /// Operations that timed out so far: connections borrowed across one are not reused.
    timeouts: AtomicU64,
}

impl Pool {
    async fn connect(&self) -> Result<Conn, MetaError> {
        let (client, connection) =
            match tokio::time::timeout(CONNECT_TIMEOUT, self.config.connect(NoTls)).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    return Err(match e.code() {
                        // Refused by the server for a reason that will not pass by itself.
                        Some(c)
                            if *c == SqlState::INVALID_PASSWORD
                                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                                || *c == SqlState::INVALID_CATALOG_NAME =>
                        {
                            MetaError::Db(format!("the database refused the connection: {e}"))
                        }
                        _ => MetaError::Unavailable(format!("the database cannot be reached: {e}")),
                    });
                }
                Err(_) => {
                    return Err(MetaError::Unavailable(format!(
                        "the database did not answer within {} s",
                        CONNECT_TIMEOUT.as_secs()
                    )));
                }
            };
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "database connection ended");
            }
        });
        Ok(Conn {
            client,
            statements: Statements::default(),
        })
    }
}

/// Metadata in PostgreSQL.
#[derive(Clone)]
pub struct PostgresMeta {
    pool: Arc<Pool>,
    /// This process's name where it holds something (a hook's sending).
    replica: String,
    /// What [`MetaStore::gc_contended`](super::MetaStore::gc_contended) saw last of the
    /// `foreground_writes` sequence.
    seen_writes: Arc<Mutex<Option<(i64, bool)>>>,
}

impl PostgresMeta {
    /// Connects to `url` (`postgres://user:password@host:port/db`) and brings the schema
    /// up to date. Fails with a clear message when the database cannot be reached, the
    /// credentials are refused, or the schema is newer than this binary knows.
    pub async fn open(url: &str) -> Result<PostgresMeta, MetaError> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| MetaError::Db(format!("the database URL is not valid: {e}")))?;
        config
            .application_name("wharf")
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3);
        let meta = PostgresMeta {
            pool: Arc::new(Pool {
                config,
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(tokio::sync::Semaphore::new(POOL_SIZE)),
                timeouts: AtomicU64::new(0),
            }),
            replica: uuid::Uuid::new_v4().to_string(),
            seen_writes: Arc::new(Mutex::new(None)),
        };
        meta.migrate().await?;
        Ok(meta)
    }

    /// A connection from the pool: an idle one, or a new one.
    pub(super) async fn conn(&self) -> Result<Pooled, MetaError> {
        let permit = tokio::time::timeout(
            ACQUIRE_TIMEOUT,
            Arc::clone(&self.pool.permits).acquire_owned(),
        )
        .await
        .map_err(|_| {
            MetaError::Unavailable(format!(
                "all {POOL_SIZE} database connections stayed busy for {} s",
                ACQUIRE_TIMEOUT.as_secs()
            ))
        })?
        .expect("the pool's semaphore is never closed");
        let idle = loop {
            let c = self.pool.idle.lock().expect("pool lock").pop();
            match c {
                Some(c) if c.client.is_closed() => continue,
                other => break other,
            }
        };
        let conn = match idle {
            Some(c) => c,
            None => self.pool.connect().await?,
        };
        Ok(Pooled {
            conn: Some(conn),
            timeouts: self.pool.timeouts.load(Ordering::Relaxed),
            pool: Arc::clone(&self.pool),
            _permit: permit,
        })
    }

    /// Runs `f` with a bound on its time: a database that stops answering gives
    /// `Unavailable`, not a request that hangs.
    pub(super) async fn timed<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, MetaError>>,
    ) -> Result<T, MetaError> {
        // Pinned here so that on a timeout the operation (and the connection it holds)
        // is dropped only after the timeout is counted: the connection is then not reused.
        let mut f = std::pin::pin!(f);
        match tokio::time::timeout(QUERY_TIMEOUT, f.as_mut()).await {
            Ok(r) => r,
            Err(_) => Err({
                self.pool.timeouts.fetch_add(1, Ordering::Relaxed);
                MetaError::Unavailable(format!(
                    "the database did not answer within {} s",
                    QUERY_TIMEOUT.as_secs()
                ))
            }),
        }
    }

    /// Not under [`QUERY_TIMEOUT`]: a migration of a large database, or waiting for
    /// another replica's, may take minutes.
    async fn migrate(&self) -> Result<(), MetaError> {
        tracing::debug!("bringing the database schema up to date (waiting for other replicas)");
        async {
            let mut c = self.conn().await?;
            let tx = c.client.transaction().await?;
            // Replicas starting at once: one migrates, the others wait, then find it done.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                     version     INTEGER PRIMARY KEY,
                     applied_at  BIGINT NOT NULL
                 )",
            )
            .await?;
            let done: i32 = tx
                .query_one(
                    "SELECT coalesce(max(version), 0) FROM schema_migrations",
                    &[],
                )
                .await?
                .get(0);
            let known = MIGRATIONS.len() as i32;
            if done > known {
                return Err(MetaError::Db(format!(
                    "the database's schema is at version {done}, newer than this wharf knows ({known}): run the newer wharf"
                )));
            }
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(done as usize) {
                let version = i as i32 + 1;
                tx.batch_execute(sql).await.map_err(|e| {
                    MetaError::Db(format!("migration {version} failed: {}", describe(&e)))
                })?;
                tx.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                    &[&version, &super::now_ms()],
                )
                .await?;
            }
            // Cursors (and xids) are per cluster: after a dump restored into another
            // cluster, a cursor ahead of this cluster's transaction ids would never be
            // passed again. Such hooks start at the present, and say so.
            let reset = tx
                .execute(
                    "UPDATE webhooks SET cursor_xid = (pg_snapshot_xmin(pg_current_snapshot())::text::bigint) - 1,
                            cursor = 9223372036854775807
                     WHERE cursor_xid > (pg_current_xact_id()::text::bigint)",
                    &[],
                )
                .await?;
            if reset > 0 {
                tracing::warn!(
                    hooks = reset,
                    "webhook cursors were ahead of this database's transaction ids (restored from another cluster?): they start at the present; events recorded before are not sent"
                );
            }
            tx.commit().await?;
            Ok(())
        }
        .await
    }

    /// Runs one statement, on its own.
    async fn exec(
        &self,
        sql: &'static str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, MetaError> {
        self.timed(async {
            let mut c = self.conn().await?;
            let s = c.prep(sql).await?;
            Ok(c.client.execute(&s, params).await?)
        })
        .await
    }

    async fn rows(
        &self,
        sql: &'static str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, MetaError> {
        self.timed(async {
            let mut c = self.conn().await?;
            let s = c.prep(sql).await?;
            Ok(c.client.query(&s, params).await?)
        })
        .await
    }

    /// Whether the database answers (`/readyz`).
    pub async fn ping(&self) -> Result<(), MetaError> {
        self.timed(async {
            let mut c = self.conn().await?;
            let s = c.prep("SELECT 1").await?;
            c.client.query_one(&s, &[]).await?;
            Ok(())
        })
        .await
    }
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_owned(),
        None => e.to_string(),
    }
}

/// A throwaway PostgreSQL cluster for the tests (also used by `tests/it`).
#[cfg(test)]
pub(crate) mod testdb;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replicas_opening_at_once_migrate_once() {
        let url = testdb::database().await;
        let opens: Vec<_> = (0..6)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { PostgresMeta::open(&url).await })
            })
            .collect();
        for o in opens {
            o.await.unwrap().unwrap();
        }
        let m = PostgresMeta::open(&url).await.unwrap();
        let c = m.conn().await.unwrap();
        let n: i64 = c
            .client
            .query_one("SELECT count(*) FROM schema_migrations", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, MIGRATIONS.len() as i64);
    }

    #[tokio::test]
    async fn a_schema_newer_than_the_binary_is_refused() {
        let url = testdb::database().await;
        let m = PostgresMeta::open(&url).await.unwrap();
        m.conn()
            .await
            .unwrap()
            .client
            .execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (999, 0)",
                &[],
            )
            .await
            .unwrap();
        let err = PostgresMeta::open(&url).await.err().unwrap().to_string();
        assert!(err.contains("newer than this wharf knows"), "{err}");
    }

    /// The database drops every connection (a restart, a failover): the next request
    /// may be refused as unavailable, and the one after works, with no restart of ours.
    #[tokio::test]
    async fn connections_the_database_dropped_are_replaced_by_themselves() {
        use crate::store::meta::auth::AuthMeta;
        let url = testdb::database().await;
        let m = PostgresMeta::open(&url).await.unwrap();
        // Several connections in the pool.
        let held: Vec<_> = futures_util::future::join_all((0..4).map(|_| m.conn())).await;
        drop(held);
        let before = m.auth_state().await.unwrap();
        let other = PostgresMeta::open(&url).await.unwrap();
        other
            .conn()
            .await
            .unwrap()
            .client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE application_name = 'wharf' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut refused = 0;
        let after = loop {
            match m.auth_state().await {
                Ok(v) => break v,
                Err(MetaError::Unavailable(_)) if refused < 4 => refused += 1,
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(after, before);
        // Every dropped connection has been discarded: four at once all work again.
        for r in futures_util::future::join_all((0..4).map(|_| m.auth_state())).await {
            assert_eq!(r.unwrap(), before);
        }
    }

    /// A statement that does not end in time: the caller gets `Unavailable`, the
    /// statement is cancelled on the server, and its connection is not lent again.
    #[tokio::test]
    async fn a_statement_past_the_timeout_is_cancelled_and_its_connection_dropped() {
        let url = testdb::database().await;
        let m = PostgresMeta::open(&url).await.unwrap();
        let r = m
            .timed(async {
                let c = m.conn().await?;
                c.client.query("SELECT pg_sleep(60)", &[]).await?;
                Ok(())
            })
            .await;
        assert!(matches!(r, Err(MetaError::Unavailable(_))), "{r:?}");
        assert!(
            m.pool.idle.lock().unwrap().is_empty(),
            "the connection is not back in the pool"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let running: i64 = m
                .conn()
                .await
                .unwrap()
                .client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if running == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the statement still runs"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test]
    async fn an_unreachable_database_is_unavailable_not_a_hang() {
        // Nothing listens on this port.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = PostgresMeta::open(&format!("postgres://wharf@127.0.0.1:{port}/wharf"))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, MetaError::Unavailable(_)), "{err}");
        let err = PostgresMeta::open("mysql://x").await.err().unwrap();
        assert!(err.to_string().contains("not valid"), "{err}");
    }
}

#[cfg(test)]
mod transaction_tests {
    use super::*;

    /// A statement fails and the body carries on as if that were an answer: the
    /// transaction is refused, not "committed" (which PostgreSQL would turn into a
    /// rollback while the caller believed its change made).
    #[tokio::test]
    async fn a_failed_statement_the_body_swallows_is_never_taken_for_a_commit() {
        let m = PostgresMeta::open(&testdb::database().await).await.unwrap();
        let r: Result<(), MetaError> = serializable!(&m, commit = true, foreground = false, |tx| {
            tx.exec(
                "INSERT INTO repositories (name, created_at) VALUES ('kept', 0)",
                &[],
            )
            .await?;
            let _ = tx.exec("SELECT 1 / 0", &[]).await;
            Ok(())
        });
        assert!(r.is_err(), "{r:?}");
        let rows = m
            .rows("SELECT 1 FROM repositories WHERE name = 'kept'", &[])
            .await
            .unwrap();
        assert!(rows.is_empty());
    }
}
