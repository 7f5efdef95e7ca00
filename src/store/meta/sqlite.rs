//! The embedded metadata backend: SQLite in WAL mode, one writer connection and a small
//! pool of readers, all used from tokio's blocking pool.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::sqlite_gc as gc;
use super::sqlite_retention as retention;
use super::sqlite_usage as usage;
use super::{
    EventRecord, GcBlob, GcLink, GcManifest, GcPreview, GcRun, Link, ManifestRecord, MetaError,
    MetaStore, NewManifest, Referrer, RepoDeleted, TagOrder, TagRow, UploadRow, Who, check_size,
    to_i64, to_u64,
};
use crate::oci::keyset::KeySet;
use crate::store::policy::TagPolicy;

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    include_str!("../../../migrations/sqlite/0001_init.sql"),
    include_str!("../../../migrations/sqlite/0002_auth.sql"),
    include_str!("../../../migrations/sqlite/0003_policies.sql"),
    include_str!("../../../migrations/sqlite/0004_events.sql"),
    include_str!("../../../migrations/sqlite/0005_hardening.sql"),
    include_str!("../../../migrations/sqlite/0006_gc.sql"),
    include_str!("../../../migrations/sqlite/0007_retention.sql"),
    include_str!("../../../migrations/sqlite/0008_usage.sql"),
    include_str!("../../../migrations/sqlite/0009_deployments.sql"),
    include_str!("../../../migrations/sqlite/0010_reference_index.sql"),
    include_str!("../../../migrations/sqlite/0011_gc_lease.sql"),
    include_str!("../../../migrations/sqlite/0012_quota_events.sql"),
    include_str!("../../../migrations/sqlite/0013_settings.sql"),
    include_str!("../../../migrations/sqlite/0014_login_failures.sql"),
    include_str!("../../../migrations/sqlite/0015_imports.sql"),
    include_str!("../../../migrations/sqlite/0016_upload_lease.sql"),
];
const READERS: usize = 8;
/// The catalog lists a repository only while it holds a manifest: one emptied by deletes
/// leaves it at once (garbage collection removes its row later).
const LISTED: &str = "EXISTS (SELECT 1 FROM manifests m WHERE m.repository = repositories.name)";
/// A listing of at most this many rows (a page of tags or repositories as clients ask
/// for them) reads in tens of microseconds, like a point read, so it runs on the calling
/// thread; a larger one goes to the blocking pool.
const INLINE_ROWS: u32 = 1000;

pub struct SqliteMeta {
    path: std::path::PathBuf,
    writer: Arc<Mutex<Connection>>,
    /// Writers queue here, holding no thread, for their turn on the blocking pool: a
    /// burst of writes never parks hundreds of pool threads on the writer's lock.
    turn: Arc<tokio::sync::Mutex<()>>,
    /// Scans running at once, at most `READERS`.
    scans: Arc<tokio::sync::Semaphore>,
    readers: Mutex<Vec<Connection>>,
    /// Transactions committed by anything but the garbage collector, in this process.
    writes: Arc<std::sync::atomic::AtomicU64>,
    /// What [`MetaStore::gc_contended`] saw last: the writer's `data_version` (which moves
    /// when another process commits) and `writes`.
    seen: Mutex<(i64, u64)>,
}

pub use crate::time::now_ms;

impl From<rusqlite::Error> for MetaError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                MetaError::Busy
            }
            Some(rusqlite::ErrorCode::DiskFull) => MetaError::Full,
            _ => MetaError::Db(e.to_string()),
        }
    }
}

fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    // Waiting for another process's transaction (an admin command, `wharf gc`): SQLite's
    // own busy timeout sleeps in growing steps (up to 100 ms each), which a request
    // waiting behind a short transaction pays in full; polling every millisecond for
    // up to 10 s answers as soon as the lock is free.
    conn.busy_handler(Some(|tries: i32| {
        std::thread::sleep(std::time::Duration::from_millis(1));
        tries < 10_000
    }))?;
    // WAL with synchronous=FULL: a committed transaction survives power loss, not only a
    // process crash. Readers never block the writer.
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;",
    )?;
    Ok(conn)
}

impl SqliteMeta {
    /// Opens (creating and migrating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<SqliteMeta, MetaError> {
        // Processes opening a new database together (a server and an admin command) can
        // get SQLITE_BUSY without the busy handler running: switching to WAL needs an
        // exclusive lock. Those steps are idempotent, so they are retried for a while.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let writer = loop {
            let attempt = open_connection(path)
                .map_err(MetaError::from)
                .and_then(|mut c| migrate(&mut c).map(|()| c));
            match attempt {
                Err(MetaError::Busy) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        Ok(SqliteMeta {
            path: path.to_owned(),
            writer: Arc::new(Mutex::new(writer)),
            turn: Arc::new(tokio::sync::Mutex::new(())),
            scans: Arc::new(tokio::sync::Semaphore::new(READERS)),
            readers: Mutex::new(Vec::new()),
            writes: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            seen: Mutex::new((-1, 0)),
        })
    }

    fn take_reader(&self) -> Result<Connection, MetaError> {
        let pooled = self.readers.lock().expect("reader pool lock").pop();
        match pooled {
            Some(c) => Ok(c),
            None => Ok(open_connection(&self.path)?),
        }
    }

    fn return_reader(&self, conn: Connection) {
        let mut pool = self.readers.lock().expect("reader pool lock");
        if pool.len() < READERS {
            pool.push(conn);
        }
    }

    /// A point read (a row or a few, by key), run on the calling thread. On cached pages
    /// it takes microseconds and a WAL reader never waits for the writer, so a trip through
    /// the blocking pool would cost more than the read itself. A connection is held only
    /// while `f` runs and `f` cannot await, so at most one per thread is in use and the pool
    /// never has to open one per request.
    pub(super) async fn read<T, F>(&self, f: F) -> Result<T, MetaError>
    where
        F: FnOnce(&Connection) -> Result<T, MetaError>,
    {
        let conn = self.take_reader()?;
        let result = f(&conn);
        self.return_reader(conn);
        result
    }

    /// A listing of at most `rows` rows: inline when small (see `INLINE_ROWS`), otherwise
    /// on the blocking pool.
    async fn listing<T, F>(&self, rows: u32, f: F) -> Result<T, MetaError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, MetaError> + Send + 'static,
    {
        if rows <= INLINE_ROWS {
            self.read(f).await
        } else {
            self.scan(f).await
        }
    }

    /// A read whose size depends on the data (listings, scans): run on the blocking pool.
    pub(super) async fn scan<T, F>(&self, f: F) -> Result<T, MetaError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, MetaError> + Send + 'static,
    {
        // At most READERS scans at once: others wait here, holding no thread and no
        // database connection.
        let turn = Arc::clone(&self.scans)
            .acquire_owned()
            .await
            .map_err(|_| MetaError::Db("scans closed".into()))?;
        let conn = self.readers.lock().expect("reader pool lock").pop();
        let path = self.path.clone();
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let _turn = turn;
            let conn = match conn {
                Some(c) => c,
                None => open_connection(&path)?,
            };
            let r = f(&conn);
            Ok::<_, MetaError>((conn, r))
        })
        .await
        .map_err(|e| MetaError::Db(format!("blocking task: {e}")))??;
        self.return_reader(conn);
        result
    }

    pub(crate) async fn write<T, F>(&self, f: F) -> Result<T, MetaError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, MetaError> + Send + 'static,
    {
        self.transaction(true, f).await
    }

    /// Runs `f` in a write transaction and commits it if `commit`, else rolls it back
    /// (what a change would do, without doing it).
    async fn transaction<T, F>(&self, commit: bool, f: F) -> Result<T, MetaError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, MetaError> + Send + 'static,
    {
        self.transaction_by(commit, false, f).await
    }

    /// A transaction of the garbage collector: not counted as foreground work.
    async fn gc_transaction<T, F>(&self, commit: bool, f: F) -> Result<T, MetaError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, MetaError> + Send + 'static,
    {
        self.transaction_by(commit, true, f).await
    }

    async fn transaction_by<T, F>(
        &self,
        commit: bool,
        collector: bool,
        f: F,
    ) -> Result<T, MetaError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, MetaError> + Send + 'static,
    {
        // Held by the task, so a caller that goes away does not let the next writer in
        // while this one still runs.
        let turn = Arc::clone(&self.turn).lock_owned().await;
        let writer = Arc::clone(&self.writer);
        let writes = Arc::clone(&self.writes);
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            let mut conn = writer.lock().expect("writer lock");
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let out = f(&tx)?;
            if commit {
                tx.commit()?;
                if !collector {
                    writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            } else {
                tx.rollback()?;
            }
            Ok(out)
        })
        .await
        .map_err(|e| MetaError::Db(format!("blocking task: {e}")))?
    }
}

fn migrate(conn: &mut Connection) -> Result<(), MetaError> {
    // Foreign keys are off while migrating, as SQLite's table-rebuild procedure needs,
    // and each migration is checked against them before it commits.
    conn.execute_batch("PRAGMA foreign_keys = OFF")?;
    let done = migrate_steps(conn);
    conn.execute_batch("PRAGMA foreign_keys = ON")?;
    done
}

fn migrate_steps(conn: &mut Connection) -> Result<(), MetaError> {
    // Each step reads the version and applies the next migration in one IMMEDIATE
    // transaction, so processes opening the database at the same time (a server and an
    // admin command) serialize instead of applying a migration twice.
    loop {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let version =
            usize::try_from(tx.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))?)
                .unwrap_or(0);
        if version > MIGRATIONS.len() {
            return Err(MetaError::Db(format!(
                "database schema version {version} is newer than this wharf knows ({})",
                MIGRATIONS.len()
            )));
        }
        if version == MIGRATIONS.len() {
            return Ok(tx.commit()?);
        }
        tx.execute_batch(MIGRATIONS[version])?;
        let broken: Option<String> = tx
            .query_row("PRAGMA foreign_key_check", [], |r| r.get(0))
            .optional()?;
        if let Some(table) = broken {
            return Err(MetaError::Db(format!(
                "migration {} leaves rows of {table} pointing at nothing",
                version + 1
            )));
        }
        tx.execute_batch(&format!("PRAGMA user_version = {}", version + 1))?;
        tx.commit()?;
    }
}

fn ensure_repo(tx: &Transaction<'_>, repo: &str, now: i64) -> Result<(), MetaError> {
    tx.execute(
        "INSERT INTO repositories (name, created_at) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING",
        params![repo, now],
    )?;
    Ok(())
}

/// Links `digest` into `repo` (or marks an existing link used), charging a new link to
/// the usage counters: refused with `Quota` past a quota, which rolls the link back.
fn link(tx: &Transaction<'_>, repo: &str, digest: &str, now: i64) -> Result<(), MetaError> {
    ensure_repo(tx, repo, now)?;
    let updated = tx
        .prepare_cached(
            "UPDATE repository_blobs SET touched_at = ?3 WHERE repository = ?1 AND digest = ?2",
        )?
        .execute(params![repo, digest, now])?;
    if updated == 0 {
        tx.prepare_cached(
            "INSERT INTO repository_blobs (repository, digest, created_at, touched_at) VALUES (?1, ?2, ?3, ?3)",
        )?
        .execute(params![repo, digest, now])?;
        usage::charge(tx, repo, digest)?;
    }
    Ok(())
}

/// Removes `repo`'s link to `digest`, releasing it from the usage counters.
pub(super) fn unlink(tx: &Transaction<'_>, repo: &str, digest: &str) -> Result<(), MetaError> {
    let n = tx
        .prepare_cached("DELETE FROM repository_blobs WHERE repository = ?1 AND digest = ?2")?
        .execute(params![repo, digest])?;
    if n > 0 {
        usage::release(tx, repo, digest)?;
    }
    Ok(())
}

fn linked_size(conn: &Connection, repo: &str, digest: &str) -> Result<Option<i64>, MetaError> {
    Ok(conn
        .query_row(
            "SELECT b.size FROM repository_blobs l JOIN blobs b ON b.digest = l.digest
             WHERE l.repository = ?1 AND l.digest = ?2",
            params![repo, digest],
            |r| r.get(0),
        )
        .optional()?)
}

fn manifest_size(conn: &Connection, repo: &str, digest: &str) -> Result<Option<i64>, MetaError> {
    Ok(conn
        .query_row(
            "SELECT size FROM manifests WHERE repository = ?1 AND digest = ?2",
            params![repo, digest],
            |r| r.get(0),
        )
        .optional()?)
}

fn record(r: &rusqlite::Row<'_>) -> rusqlite::Result<ManifestRecord> {
    Ok(ManifestRecord {
        digest: r.get(0)?,
        media_type: r.get(1)?,
        content: Bytes::from(r.get::<_, Vec<u8>>(2)?),
    })
}

/// The columns [`event_row`] reads, from `events e`.
pub(super) const EVENT_COLUMNS: &str = "e.id, e.uuid, e.at, e.action, e.repository, e.tag, e.digest, e.media_type, e.size, e.actor, e.quota, e.detail";

/// An event from [`EVENT_COLUMNS`] starting at column `at`.
pub(super) fn event_row(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<EventRecord> {
    Ok(EventRecord {
        id: r.get(at)?,
        uuid: r.get(at + 1)?,
        at: r.get(at + 2)?,
        action: r.get(at + 3)?,
        repository: r.get(at + 4)?,
        tag: r.get(at + 5)?,
        digest: r.get(at + 6)?,
        media_type: r.get(at + 7)?,
        size: r.get(at + 8)?,
        actor: r.get(at + 9)?,
        quota: r.get(at + 10)?,
        detail: r.get(at + 11)?,
    })
}

/// An event to record in the outbox.
#[derive(Default)]
pub(super) struct Event<'a> {
    pub action: &'a str,
    pub repository: &'a str,
    pub tag: Option<&'a str>,
    pub digest: &'a str,
    pub media_type: Option<&'a str>,
    pub size: Option<i64>,
    pub actor: Option<&'a str>,
    pub at: i64,
    pub quota: Option<i64>,
    pub detail: Option<&'a str>,
}

pub(super) fn record_event(tx: &Transaction<'_>, e: &Event<'_>) -> Result<(), MetaError> {
    tx.prepare_cached(
        "INSERT INTO events (uuid, at, action, repository, tag, digest, media_type, size, actor, quota, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        uuid::Uuid::new_v4().to_string(),
        e.at,
        e.action,
        e.repository,
        e.tag,
        e.digest,
        e.media_type,
        e.size,
        e.actor,
        e.quota,
        e.detail
    ])?;
    Ok(())
}

/// The audit row of a change, in the change's transaction.
pub(super) fn audit_row(
    tx: &Transaction<'_>,
    action: &str,
    repo: &str,
    detail: &str,
    by: &Who,
    at: i64,
) -> Result<(), MetaError> {
    tx.prepare_cached(
        "INSERT INTO audit_log (at, actor, action, repository, detail, client, credential)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        at,
        by.actor,
        action,
        repo,
        detail,
        by.client,
        by.credential
    ])?;
    Ok(())
}

/// A tag of `repo` that needs `digest`: one on a manifest that references it, directly
/// or through indexes (found by walking the references upwards from `digest`). Returns
/// the tag and the tagged manifest.
pub(super) fn needed_by(
    conn: &Connection,
    repo: &str,
    digest: &str,
) -> Result<Option<(String, String)>, MetaError> {
    Ok(conn
        .prepare_cached(
            "WITH RECURSIVE up(d) AS (
                SELECT manifest FROM manifest_references WHERE repository = ?1 AND child = ?2
                UNION
                SELECT r.manifest FROM manifest_references r JOIN up ON r.child = up.d
                 WHERE r.repository = ?1
             )
             SELECT t.name, t.digest FROM tags t JOIN up ON t.digest = up.d
              WHERE t.repository = ?1 ORDER BY t.name LIMIT 1",
        )?
        .query_row(params![repo, digest], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

/// Refuses a delete of `digest` (described as `what`) that would leave a tagged manifest
/// of `repo` incomplete, naming the tag, and the policy if one protects it.
fn check_unneeded(
    tx: &Transaction<'_>,
    repo: &str,
    digest: &str,
    what: String,
) -> Result<(), MetaError> {
    let Some((tag, manifest)) = needed_by(tx, repo, digest)? else {
        return Ok(());
    };
    let policy = load_policies(tx)?
        .into_iter()
        .find(|p| p.locks(repo, &tag))
        .map(|p| p.to_string());
    Err(MetaError::InUse {
        what,
        tag,
        manifest,
        policy,
    })
}

fn tag_digest(conn: &Connection, repo: &str, tag: &str) -> Result<Option<String>, MetaError> {
    Ok(conn
        .prepare_cached("SELECT digest FROM tags WHERE repository = ?1 AND name = ?2")?
        .query_row(params![repo, tag], |r| r.get(0))
        .optional()?)
}

pub(super) fn load_policies(conn: &Connection) -> Result<Vec<TagPolicy>, MetaError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, repositories, tags, created_at, created_by FROM tag_policies ORDER BY id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(TagPolicy {
            id: r.get(0)?,
            repositories: r.get(1)?,
            tags: r
                .get::<_, String>(2)?
                .split(',')
                .map(str::to_owned)
                .collect(),
            created_at: r.get(3)?,
            created_by: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// Refuses to change `tag` of `repo` if it exists, an immutability policy covers it, and
/// the change is not a no-op (`keep` is the digest a re-push would leave it at).
pub(super) fn check_mutable(
    tx: &Transaction<'_>,
    policies: &[TagPolicy],
    repo: &str,
    tag: &str,
    keep: Option<&str>,
) -> Result<(), MetaError> {
    let Some(policy) = policies.iter().find(|p| p.locks(repo, tag)) else {
        return Ok(());
    };
    let current: Option<String> = tx
        .prepare_cached("SELECT digest FROM tags WHERE repository = ?1 AND name = ?2")?
        .query_row(params![repo, tag], |r| r.get(0))
        .optional()?;
    match current {
        Some(d) if Some(d.as_str()) != keep => Err(MetaError::Immutable {
            repository: repo.to_owned(),
            tag: tag.to_owned(),
            policy: policy.to_string(),
        }),
        _ => Ok(()),
    }
}

#[async_trait]
impl MetaStore for SqliteMeta {
    async fn link(&self, repo: &str, digest: &str) -> Result<Option<Link>, MetaError> {
        let (repo, digest) = (repo.to_owned(), digest.to_owned());
        self.read(move |c| {
            Ok(c.prepare_cached(
                "SELECT b.size, l.touched_at FROM repository_blobs l JOIN blobs b ON b.digest = l.digest
                 WHERE l.repository = ?1 AND l.digest = ?2",
            )?
            .query_row(params![repo, digest], |r| {
                Ok(Link {
                    size: to_u64(r.get(0)?),
                    touched_at: r.get(1)?,
                })
            })
            .optional()?)
        })
        .await
    }

    async fn touch_link(&self, repo: &str, digest: &str) -> Result<bool, MetaError> {
        let (repo, digest) = (repo.to_owned(), digest.to_owned());
        self.write(move |tx| {
            Ok(tx.execute(
                "UPDATE repository_blobs SET touched_at = ?3 WHERE repository = ?1 AND digest = ?2",
                params![repo, digest, now_ms()],
            )? > 0)
        })
        .await
    }

    async fn mount_blob(
        &self,
        repo: &str,
        from: &str,
        digest: &str,
        by: &Who,
    ) -> Result<Option<u64>, MetaError> {
        let (repo, from, digest, by) = (
            repo.to_owned(),
            from.to_owned(),
            digest.to_owned(),
            by.clone(),
        );
        self.write(move |tx| {
            let Some(size) = linked_size(tx, &from, &digest)? else {
                return Ok(None);
            };
            let now = now_ms();
            if linked_size(tx, &repo, &digest)?.is_none() {
                link(tx, &repo, &digest, now)?;
                audit_row(
                    tx,
                    "mount",
                    &repo,
                    &format!("{digest} from {from}"),
                    &by,
                    now,
                )?;
            }
            Ok(Some(to_u64(size)))
        })
        .await
    }

    async fn unlink_blob(&self, repo: &str, digest: &str, by: &Who) -> Result<bool, MetaError> {
        let (repo, digest, by) = (repo.to_owned(), digest.to_owned(), by.clone());
        self.write(move |tx| {
            if linked_size(tx, &repo, &digest)?.is_none() {
                return Ok(false);
            }
            check_unneeded(tx, &repo, &digest, format!("blob {digest}"))?;
            unlink(tx, &repo, &digest)?;
            audit_row(tx, "delete.blob", &repo, &digest, &by, now_ms())?;
            Ok(true)
        })
        .await
    }

    async fn upload_create(&self, id: &str, repo: &str, monolithic: bool) -> Result<(), MetaError> {
        let (id, repo) = (id.to_owned(), repo.to_owned());
        self.write(move |tx| {
            let now = now_ms();
            let open: i64 = tx
                .prepare_cached("SELECT count(*) FROM uploads WHERE repository = ?1")?
                .query_row(params![repo], |r| r.get(0))?;
            if open >= super::MAX_OPEN_UPLOADS {
                return Err(MetaError::Limit(format!(
                    "{repo} has {open} uploads open, the most one repository may; finish or cancel some (idle ones end after 24 h)"
                )));
            }
            tx.execute(
                "INSERT INTO uploads (id, repository, size, created_at, updated_at, monolithic) VALUES (?1, ?2, 0, ?3, ?3, ?4)",
                params![id, repo, now, monolithic],
            )?;
            Ok(())
        })
        .await
    }

    async fn upload_get(&self, id: &str) -> Result<Option<UploadRow>, MetaError> {
        let id = id.to_owned();
        self.read(move |c| {
            Ok(c.query_row(
                "SELECT repository, size, digest FROM uploads WHERE id = ?1",
                params![id],
                |r| {
                    Ok(UploadRow {
                        repository: r.get(0)?,
                        size: to_u64(r.get(1)?),
                        digest: r.get(2)?,
                    })
                },
            )
            .optional()?)
        })
        .await
    }

    async fn upload_set_size(&self, id: &str, from: u64, size: u64) -> Result<(), MetaError> {
        let id = id.to_owned();
        self.write(move |tx| {
            let n = tx.execute(
                "UPDATE uploads SET size = ?3, updated_at = ?4 WHERE id = ?1 AND size = ?2",
                params![id, to_i64(from), to_i64(size), now_ms()],
            )?;
            if n == 0 {
                return Err(MetaError::Refused(format!(
                    "upload {id} changed while this write ran (or is gone); ask its status and resume"
                )));
            }
            Ok(())
        })
        .await
    }

    async fn upload_verified(&self, id: &str, digest: &str) -> Result<(), MetaError> {
        let (id, digest) = (id.to_owned(), digest.to_owned());
        self.write(move |tx| {
            if gc::being_collected(tx, &digest)? {
                return Err(MetaError::Collecting(digest));
            }
            let n = tx.execute(
                "UPDATE uploads SET digest = ?2, updated_at = ?3 WHERE id = ?1",
                params![id, digest, now_ms()],
            )?;
            // No row, no claim: the upload was cancelled or expired meanwhile, and its
            // bytes must not be put in place unclaimed.
            if n == 0 {
                return Err(MetaError::Refused(format!("upload {id} is gone")));
            }
            Ok(())
        })
        .await
    }

    async fn upload_lease(&self, id: &str, owner: &str, ms: i64) -> Result<bool, MetaError> {
        let (id, owner) = (id.to_owned(), owner.to_owned());
        self.write(move |tx| {
            let now = now_ms();
            Ok(tx.execute(
                "UPDATE uploads SET writer = ?2, writer_until = ?3
                  WHERE id = ?1 AND (writer IS NULL OR writer = ?2 OR writer_until < ?4)",
                params![id, owner, now.saturating_add(ms), now],
            )? > 0)
        })
        .await
    }

    async fn upload_release(&self, id: &str, owner: &str) -> Result<(), MetaError> {
        let (id, owner) = (id.to_owned(), owner.to_owned());
        self.write(move |tx| {
            tx.execute(
                "UPDATE uploads SET writer = NULL, writer_until = 0 WHERE id = ?1 AND writer = ?2",
                params![id, owner],
            )?;
            Ok(())
        })
        .await
    }

    async fn upload_delete(&self, id: &str) -> Result<bool, MetaError> {
        let id = id.to_owned();
        self.write(move |tx| Ok(tx.execute("DELETE FROM uploads WHERE id = ?1", params![id])? > 0))
            .await
    }

    async fn uploads_idle_since(
        &self,
        before_ms: i64,
        monolithic_only: bool,
    ) -> Result<Vec<String>, MetaError> {
        self.scan(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id FROM uploads WHERE updated_at < ?1 AND (monolithic = 1 OR NOT ?2) AND writer_until < ?3",
            )?;
            let rows = stmt.query_map(params![before_ms, monolithic_only, now_ms()], |r| r.get(0))?;
            Ok(rows.collect::<Result<Vec<String>, _>>()?)
        })
        .await
    }

    async fn upload_complete(
        &self,
        id: &str,
        repo: &str,
        digest: &str,
        size: u64,
    ) -> Result<(), MetaError> {
        let (id, repo, digest) = (id.to_owned(), repo.to_owned(), digest.to_owned());
        self.write(move |tx| {
            let now = now_ms();
            // The upload claimed the digest before its bytes were put in place, and the
            // collector never marks a claimed digest: this holds by construction.
            if gc::being_collected(tx, &digest)? {
                return Err(MetaError::Collecting(digest));
            }
            tx.execute(
                "INSERT INTO blobs (digest, size, created_at) VALUES (?1, ?2, ?3) ON CONFLICT (digest) DO NOTHING",
                params![digest, to_i64(size), now],
            )?;
            link(tx, &repo, &digest, now)?;
            tx.execute("DELETE FROM uploads WHERE id = ?1", params![id])?;
            Ok(())
        })
        .await
    }

    async fn manifest_put(&self, repo: &str, m: NewManifest) -> Result<(), MetaError> {
        let repo = repo.to_owned();
        self.write(move |tx| {
            let now = now_ms();
            // A repository or namespace over its quota takes no more manifests.
            usage::check(tx, &repo)?;
            for (digest, declared) in &m.blobs {
                let size = linked_size(tx, &repo, digest)?.ok_or_else(|| MetaError::MissingBlob(digest.clone()))?;
                check_size(digest, *declared, size)?;
            }
            let mut child_kinds = Vec::with_capacity(m.children.len());
            for (digest, declared) in &m.children {
                // An index lists manifests; buildx's cache index lists blobs. Either counts.
                if let Some(size) = manifest_size(tx, &repo, digest)? {
                    check_size(digest, *declared, size)?;
                    child_kinds.push("manifest");
                } else if let Some(size) = linked_size(tx, &repo, digest)? {
                    check_size(digest, *declared, size)?;
                    child_kinds.push("blob");
                } else {
                    return Err(MetaError::MissingManifest(digest.clone()));
                }
            }
            ensure_repo(tx, &repo, now)?;
            let stored = tx.execute(
                "INSERT INTO manifests (repository, digest, media_type, artifact_type, subject, annotations, size, content, created_at, untagged_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)
                 ON CONFLICT (repository, digest) DO NOTHING",
                params![
                    repo,
                    m.digest,
                    m.media_type,
                    m.artifact_type,
                    m.subject,
                    m.annotations,
                    to_i64(m.content.len() as u64),
                    &m.content[..],
                    now
                ],
            )?;
            let mut refs = tx.prepare_cached(
                "INSERT INTO manifest_references (repository, manifest, child, kind) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT DO NOTHING",
            )?;
            for (digest, _) in &m.blobs {
                refs.execute(params![repo, m.digest, digest, "blob"])?;
            }
            for ((digest, _), kind) in m.children.iter().zip(child_kinds) {
                refs.execute(params![repo, m.digest, digest, kind])?;
            }
            let new_manifest = stored > 0;
            let policies = if m.tags.is_empty() { Vec::new() } else { load_policies(tx)? };
            let size = to_i64(m.content.len() as u64);
            let event = |tag: Option<&str>, action: &str| {
                record_event(tx, &Event {
                    action,
                    repository: &repo,
                    tag,
                    digest: &m.digest,
                    media_type: Some(&m.media_type),
                    size: Some(size),
                    actor: m.by.actor.as_deref(),
                    at: now,
                    ..Event::default()
                })
            };
            if new_manifest && m.tags.is_empty() {
                event(None, "push")?;
            }
            let mut moved_from = Vec::new();
            for t in &m.tags {
                check_mutable(tx, &policies, &repo, t, Some(&m.digest))?;
                let previous = tag_digest(tx, &repo, t)?;
                if let Some(p) = previous.as_ref().filter(|p| **p != m.digest) {
                    moved_from.push(p.clone());
                }
                if new_manifest {
                    event(Some(t), "push")?;
                } else if previous.as_deref() != Some(m.digest.as_str()) {
                    event(Some(t), "tag")?;
                }
            }
            let mut tag = tx.prepare_cached(
                "INSERT INTO tags (repository, name, digest, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (repository, name) DO UPDATE SET digest = excluded.digest, updated_at = excluded.updated_at",
            )?;
            for t in &m.tags {
                tag.execute(params![repo, t, m.digest, now])?;
            }
            if !m.tags.is_empty() {
                gc::mark_tagged(tx, &repo, &m.digest)?;
            }
            for p in &moved_from {
                gc::mark_untagged_if_bare(tx, &repo, p, now)?;
            }
            let detail = if m.tags.is_empty() {
                m.digest.clone()
            } else {
                format!("{} {}", m.tags.join(","), m.digest)
            };
            audit_row(tx, "push", &repo, &detail, &m.by, now)?;
            Ok(())
        })
        .await
    }

    async fn manifest_by_digest(
        &self,
        repo: &str,
        digest: &str,
    ) -> Result<Option<ManifestRecord>, MetaError> {
        let (repo, digest) = (repo.to_owned(), digest.to_owned());
        self.read(move |c| {
            Ok(c.prepare_cached(
                "SELECT digest, media_type, content FROM manifests WHERE repository = ?1 AND digest = ?2",
            )?
            .query_row(params![repo, digest], record)
            .optional()?)
        })
        .await
    }

    async fn manifest_by_tag(
        &self,
        repo: &str,
        tag: &str,
    ) -> Result<Option<ManifestRecord>, MetaError> {
        let (repo, tag) = (repo.to_owned(), tag.to_owned());
        self.read(move |c| {
            Ok(c.prepare_cached(
                "SELECT m.digest, m.media_type, m.content FROM tags t
                 JOIN manifests m ON m.repository = t.repository AND m.digest = t.digest
                 WHERE t.repository = ?1 AND t.name = ?2",
            )?
            .query_row(params![repo, tag], record)
            .optional()?)
        })
        .await
    }

    async fn manifest_delete(
        &self,
        repo: &str,
        digest: &str,
        by: &Who,
        referrers: bool,
    ) -> Result<bool, MetaError> {
        let (repo, digest, by) = (repo.to_owned(), digest.to_owned(), by.clone());
        self.write(move |tx| {
            let policies = load_policies(tx)?;
            if !policies.is_empty() {
                let tags: Vec<String> = tx
                    .prepare_cached("SELECT name FROM tags WHERE repository = ?1 AND digest = ?2")?
                    .query_map(params![repo, digest], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                for t in &tags {
                    check_mutable(tx, &policies, &repo, t, None)?;
                }
            }
            if manifest_size(tx, &repo, &digest)?.is_none() {
                return Ok(false);
            }
            check_unneeded(tx, &repo, &digest, format!("manifest {digest}"))?;
            let now = now_ms();
            gc::delete_manifest_row(tx, &repo, &digest, by.actor.as_deref(), now)?;
            let mut detail = digest.clone();
            if referrers {
                let n = gc::delete_referrers(tx, &repo, &digest, by.actor.as_deref(), now)?;
                if n > 0 {
                    detail = format!("{digest} and {n} referrers");
                }
            }
            audit_row(tx, "delete.manifest", &repo, &detail, &by, now)?;
            Ok(true)
        })
        .await
    }

    async fn repository_delete(
        &self,
        repo: &str,
        by: &Who,
    ) -> Result<Option<RepoDeleted>, MetaError> {
        let (repo, by) = (repo.to_owned(), by.clone());
        self.write(move |tx| gc::repository_delete(tx, &repo, &by))
            .await
    }

    async fn gc_preview(&self, cutoff_ms: i64, referrers: bool) -> Result<GcPreview, MetaError> {
        self.transaction(false, move |tx| gc::preview(tx, cutoff_ms, referrers))
            .await
    }

    async fn gc_sweep_links(
        &self,
        cutoff_ms: i64,
        after: (&str, &str),
        limit: u32,
    ) -> Result<Vec<GcLink>, MetaError> {
        let after = (after.0.to_owned(), after.1.to_owned());
        self.gc_transaction(true, move |tx| gc::sweep_links(tx, cutoff_ms, after, limit))
            .await
    }

    async fn gc_sweep_orphan_referrers(
        &self,
        cutoff_ms: i64,
        limit: u32,
    ) -> Result<Vec<GcManifest>, MetaError> {
        self.gc_transaction(true, move |tx| {
            gc::sweep_orphan_referrers(tx, cutoff_ms, limit)
        })
        .await
    }

    async fn gc_mark_blobs(&self, after: &str, limit: u32) -> Result<Vec<GcBlob>, MetaError> {
        let after = after.to_owned();
        self.gc_transaction(true, move |tx| gc::mark_blobs(tx, &after, limit))
            .await
    }

    async fn gc_lease(&self, owner: &str, ms: i64) -> Result<bool, MetaError> {
        let owner = owner.to_owned();
        self.gc_transaction(true, move |tx| {
            let now = now_ms();
            let n = tx.execute(
                "INSERT INTO gc_lease (id, owner, until) VALUES (1, ?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, until = excluded.until
                   WHERE gc_lease.owner = excluded.owner OR gc_lease.until < ?3",
                params![owner, now.saturating_add(ms), now],
            )?;
            Ok(n > 0)
        })
        .await
    }

    async fn gc_release(&self, owner: &str) -> Result<(), MetaError> {
        let owner = owner.to_owned();
        self.gc_transaction(true, move |tx| {
            tx.execute("DELETE FROM gc_lease WHERE owner = ?1", params![owner])?;
            Ok(())
        })
        .await
    }

    async fn gc_unmark(&self, digests: Vec<String>) -> Result<(), MetaError> {
        self.gc_transaction(true, move |tx| {
            let mut st =
                tx.prepare_cached("UPDATE blobs SET deleting_at = NULL WHERE digest = ?1")?;
            for d in &digests {
                st.execute(params![d])?;
            }
            Ok(())
        })
        .await
    }

    async fn gc_orphans(&self, found: Vec<GcBlob>, mark: bool) -> Result<Vec<GcBlob>, MetaError> {
        self.gc_transaction(mark, move |tx| gc::orphans(tx, found, mark))
            .await
    }

    async fn gc_marked(&self) -> Result<Vec<GcBlob>, MetaError> {
        self.scan(gc::marked).await
    }

    async fn gc_forget(&self, digests: Vec<String>) -> Result<(), MetaError> {
        self.gc_transaction(true, move |tx| gc::forget(tx, &digests))
            .await
    }

    async fn gc_sweep_repositories(&self, dry_run: bool) -> Result<Vec<String>, MetaError> {
        self.gc_transaction(!dry_run, move |tx| gc::sweep_repositories(tx, dry_run))
            .await
    }

    async fn gc_sweep_condemned(
        &self,
        cutoff_ms: i64,
        limit: u32,
    ) -> Result<Vec<GcManifest>, MetaError> {
        self.gc_transaction(true, move |tx| gc::sweep_condemned(tx, cutoff_ms, limit))
            .await
    }

    async fn retention_rule_add(
        &self,
        rule: &crate::store::retention::RetentionRule,
        by: Option<&str>,
    ) -> Result<i64, MetaError> {
        let (rule, by) = (rule.clone(), by.map(str::to_owned));
        self.write(move |tx| retention::rule_add(tx, &rule, by.as_deref()))
            .await
    }

    async fn retention_rules(
        &self,
    ) -> Result<Vec<crate::store::retention::RetentionRule>, MetaError> {
        self.scan(retention::rules).await
    }

    async fn retention_rule_remove(&self, id: i64) -> Result<bool, MetaError> {
        self.write(move |tx| {
            Ok(tx.execute("DELETE FROM retention_rules WHERE id = ?1", params![id])? > 0)
        })
        .await
    }

    async fn retention_state(
        &self,
        repo: &str,
    ) -> Result<crate::store::retention::RepoState, MetaError> {
        let repo = repo.to_owned();
        self.scan(move |c| retention::state(c, &repo)).await
    }

    async fn retention_apply(
        &self,
        repo: &str,
        tags: Vec<crate::store::retention::Deletion>,
        condemn: Vec<crate::store::retention::Deletion>,
        by: &Who,
    ) -> Result<(u64, u64), MetaError> {
        let (repo, by) = (repo.to_owned(), by.clone());
        self.write(move |tx| retention::apply(tx, &repo, &tags, &condemn, &by))
            .await
    }

    async fn bytes_freed(&self, items: Vec<(String, String)>) -> Result<Vec<u64>, MetaError> {
        self.scan(move |c| retention::bytes_freed(c, &items)).await
    }

    async fn deleted_tags(&self, repo: &str) -> Result<Vec<super::DeletedTag>, MetaError> {
        let repo = repo.to_owned();
        self.scan(move |c| retention::deleted_tags(c, &repo)).await
    }

    async fn tag_restore(
        &self,
        repo: &str,
        tag: &str,
        digest: Option<&str>,
        by: &Who,
    ) -> Result<String, MetaError> {
        let (repo, tag, digest, by) = (
            repo.to_owned(),
            tag.to_owned(),
            digest.map(str::to_owned),
            by.clone(),
        );
        self.write(move |tx| retention::restore(tx, &repo, &tag, digest.as_deref(), &by))
            .await
    }

    async fn untagged_manifests(
        &self,
        repo: &str,
    ) -> Result<Vec<super::UntaggedManifest>, MetaError> {
        let repo = repo.to_owned();
        self.scan(move |c| retention::untagged(c, &repo)).await
    }

    async fn deployments_report(
        &self,
        agent: &str,
        stack: &str,
        rows: Vec<super::Deployment>,
        by: &Who,
    ) -> Result<(), MetaError> {
        let (agent, stack, by) = (agent.to_owned(), stack.to_owned(), by.clone());
        self.write(move |tx| {
            let now = now_ms();
            let reporter = by.actor.clone().unwrap_or_default();
            tx.execute(
                "DELETE FROM deployments WHERE agent = ?1 AND stack = ?2 AND reported_by = ?3",
                params![agent, stack, reporter],
            )?;
            // Reports of an agent that went quiet for 30 days (it reports hourly) are
            // forgotten; and one user's reports are bounded.
            tx.execute(
                "DELETE FROM deployments WHERE reported_at < ?1",
                params![now - 30 * 86_400_000],
            )?;
            let held: i64 = tx
                .prepare_cached("SELECT count(*) FROM deployments WHERE reported_by = ?1")?
                .query_row(params![reporter], |r| r.get(0))?;
            if held + rows.len() as i64 > super::MAX_DEPLOYMENTS_PER_REPORTER {
                return Err(MetaError::Limit(format!(
                    "{reporter} already reports {held} deployments, the most one user may; forget old agents with `wharf deploys --forget`"
                )));
            }
            let mut ins = tx.prepare_cached(
                "INSERT INTO deployments (agent, stack, service, repository, digest, state, deployed_at, reported_at, reported_by)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (reported_by, agent, stack, service, digest) DO UPDATE SET state = excluded.state",
            )?;
            for r in &rows {
                ins.execute(params![
                    agent,
                    stack,
                    r.service,
                    r.repository,
                    r.digest,
                    r.state,
                    r.deployed_at,
                    now,
                    reporter
                ])?;
            }
            Ok(())
        })
        .await
    }

    async fn deployments(&self) -> Result<Vec<super::Deployment>, MetaError> {
        self.scan(|c| {
            Ok(c.prepare_cached(
                "SELECT agent, stack, service, repository, digest, state, deployed_at, reported_at, reported_by
                   FROM deployments ORDER BY agent, stack, service, state DESC, deployed_at DESC",
            )?
            .query_map([], |r| {
                Ok(super::Deployment {
                    agent: r.get(0)?,
                    stack: r.get(1)?,
                    service: r.get(2)?,
                    repository: r.get(3)?,
                    digest: r.get(4)?,
                    state: r.get(5)?,
                    deployed_at: r.get(6)?,
                    reported_at: r.get(7)?,
                    reported_by: r.get(8)?,
                })
            })?
            .collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn deployments_forget(&self, agent: &str, by: &Who) -> Result<u64, MetaError> {
        let (agent, by) = (agent.to_owned(), by.clone());
        self.write(move |tx| {
            let n = tx.execute("DELETE FROM deployments WHERE agent = ?1", params![agent])?;
            audit_row(
                tx,
                "deploys.forget",
                "",
                &format!("{agent}: {n} rows"),
                &by,
                now_ms(),
            )?;
            Ok(n as u64)
        })
        .await
    }

    async fn deployed_digests(&self, repo: &str) -> Result<Vec<String>, MetaError> {
        let repo = repo.to_owned();
        self.read(move |c| {
            Ok(
                c.prepare_cached("SELECT DISTINCT digest FROM deployments WHERE repository = ?1")?
                    .query_map(params![repo], |r| r.get(0))?
                    .collect::<Result<_, _>>()?,
            )
        })
        .await
    }

    async fn quota_set(&self, target: &str, bytes: u64, by: Option<&str>) -> Result<(), MetaError> {
        let (target, by) = (target.to_owned(), by.map(str::to_owned));
        self.write(move |tx| usage::quota_set(tx, &target, bytes, by.as_deref()))
            .await
    }

    async fn quota_remove(&self, target: &str) -> Result<bool, MetaError> {
        let target = target.to_owned();
        self.write(move |tx| {
            Ok(tx.execute("DELETE FROM quotas WHERE target = ?1", params![target])? > 0)
        })
        .await
    }

    async fn quotas(&self) -> Result<Vec<super::Quota>, MetaError> {
        self.scan(usage::quotas).await
    }

    async fn usage(&self, recompute: bool) -> Result<Vec<super::UsageRow>, MetaError> {
        if recompute {
            self.scan(usage::recompute).await
        } else {
            self.scan(usage::counters).await
        }
    }

    async fn usage_contents(&self) -> Result<Vec<super::RepoContents>, MetaError> {
        self.scan(usage::contents).await
    }

    async fn record_pulls(&self, pulls: Vec<(String, String, i64)>) -> Result<(), MetaError> {
        self.write(move |tx| retention::record_pulls(tx, &pulls))
            .await
    }

    async fn gc_record(&self, run: &GcRun) -> Result<(), MetaError> {
        let run = run.clone();
        self.gc_transaction(true, move |tx| gc::record(tx, &run))
            .await
    }

    async fn ready(&self) -> Result<(), MetaError> {
        // A read, as a pull would do (the writer may be busy with a long batch, and that
        // is not unreadiness), on the blocking pool among the bounded scans, so a hung
        // disk holds at most those threads and the caller's timeout can fire.
        self.scan(|conn| {
            conn.query_row(
                "SELECT count(*) FROM repositories WHERE name = ''",
                [],
                |_| Ok(()),
            )?;
            Ok(())
        })
        .await
    }

    async fn gc_contended(&self) -> Result<bool, MetaError> {
        let writer = Arc::clone(&self.writer);
        let version = tokio::task::spawn_blocking(move || {
            let conn = writer.lock().expect("writer lock");
            conn.query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0))
        })
        .await
        .map_err(|e| MetaError::Db(format!("blocking task: {e}")))??;
        let writes = self.writes.load(std::sync::atomic::Ordering::Relaxed);
        let mut seen = self.seen.lock().expect("gc contention lock");
        let contended = *seen != (version, writes);
        *seen = (version, writes);
        Ok(contended)
    }

    async fn gc_checkpoint(&self) -> Result<(), MetaError> {
        let turn = Arc::clone(&self.turn).lock_owned().await;
        let writer = Arc::clone(&self.writer);
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            let conn = writer.lock().expect("writer lock");
            // PASSIVE: copies what no reader needs, never waits for readers or writers.
            conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
            Ok(())
        })
        .await
        .map_err(|e| MetaError::Db(format!("blocking task: {e}")))?
    }

    async fn gc_runs(&self, limit: u32) -> Result<Vec<GcRun>, MetaError> {
        self.scan(move |c| gc::runs(c, limit)).await
    }

    async fn tag_delete(&self, repo: &str, tag: &str, by: &Who) -> Result<bool, MetaError> {
        let (repo, tag, by) = (repo.to_owned(), tag.to_owned(), by.clone());
        self.write(move |tx| {
            check_mutable(tx, &load_policies(tx)?, &repo, &tag, None)?;
            let Some(digest) = tag_digest(tx, &repo, &tag)? else {
                return Ok(false);
            };
            tx.execute(
                "DELETE FROM tags WHERE repository = ?1 AND name = ?2",
                params![repo, tag],
            )?;
            let now = now_ms();
            gc::mark_untagged_if_bare(tx, &repo, &digest, now)?;
            gc::remember_deleted_tag(
                tx,
                &repo,
                &tag,
                &digest,
                by.actor.as_deref(),
                "deleted",
                now,
            )?;
            audit_row(
                tx,
                "delete.tag",
                &repo,
                &format!("{tag} {digest}"),
                &by,
                now,
            )?;
            record_event(
                tx,
                &Event {
                    action: "untag",
                    repository: &repo,
                    tag: Some(&tag),
                    digest: &digest,
                    media_type: None,
                    size: None,
                    actor: by.actor.as_deref(),
                    at: now,
                    ..Event::default()
                },
            )?;
            Ok(true)
        })
        .await
    }

    async fn tags(
        &self,
        repo: &str,
        last: Option<&str>,
        limit: u32,
    ) -> Result<Option<Vec<String>>, MetaError> {
        let (repo, last) = (repo.to_owned(), last.map(str::to_owned));
        self.listing(limit, move |c| {
            let exists = c
                .prepare_cached("SELECT 1 FROM repositories WHERE name = ?1")?
                .exists(params![repo])?;
            if !exists {
                return Ok(None);
            }
            // No `LIMIT ?`: SQLite re-prepares a statement whose LIMIT is a bound
            // parameter at each run, which cost more than the page itself. The rows come
            // in index order, so stepping stops after `limit` of them.
            let mut stmt = c.prepare_cached(
                "SELECT name FROM tags WHERE repository = ?1 AND name > ?2 ORDER BY name",
            )?;
            let rows = stmt.query_map(params![repo, last.unwrap_or_default()], |r| r.get(0))?;
            Ok(Some(
                rows.take(limit as usize)
                    .collect::<Result<Vec<String>, _>>()?,
            ))
        })
        .await
    }

    async fn repositories(&self, last: Option<&str>, limit: u32) -> Result<Vec<String>, MetaError> {
        let last = last.map(str::to_owned);
        self.listing(limit, move |c| {
            // No `LIMIT ?`: see `tags`.
            let mut stmt = c.prepare_cached(&format!(
                "SELECT name FROM repositories WHERE name > ?1 AND {LISTED} ORDER BY name"
            ))?;
            let rows = stmt.query_map(params![last.unwrap_or_default()], |r| r.get(0))?;
            Ok(rows
                .take(limit as usize)
                .collect::<Result<Vec<String>, _>>()?)
        })
        .await
    }

    async fn repositories_in(
        &self,
        keys: &KeySet,
        last: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>, MetaError> {
        // Each range is one scan of the primary key from its start; the scan stops at
        // the range's end or when `limit` names are found, so the work is bounded by the
        // page and the number of ranges, however many repositories there are.
        let ranges = keys.ranges_after(last);
        self.listing(limit, move |c| {
            let mut out = Vec::new();
            for (from, to) in &ranges {
                let want = limit as usize - out.len();
                if want == 0 {
                    break;
                }
                let found: Vec<String> = match to {
                    Some(to) => c
                        .prepare_cached(&format!(
                            "SELECT name FROM repositories WHERE name >= ?1 AND name < ?2 AND {LISTED} ORDER BY name",
                        ))?
                        .query_map(params![from, to], |r| r.get(0))?
                        .take(want)
                        .collect::<Result<_, _>>()?,
                    None => c
                        .prepare_cached(&format!(
                            "SELECT name FROM repositories WHERE name >= ?1 AND {LISTED} ORDER BY name",
                        ))?
                        .query_map(params![from], |r| r.get(0))?
                        .take(want)
                        .collect::<Result<_, _>>()?,
                };
                out.extend(found);
            }
            Ok(out)
        })
        .await
    }

    async fn referrers(&self, repo: &str, subject: &str) -> Result<Vec<Referrer>, MetaError> {
        let (repo, subject) = (repo.to_owned(), subject.to_owned());
        self.scan(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT digest, media_type, artifact_type, annotations, size FROM manifests
                 WHERE repository = ?1 AND subject = ?2 ORDER BY digest",
            )?;
            let rows = stmt.query_map(params![repo, subject], |r| {
                Ok(Referrer {
                    digest: r.get(0)?,
                    media_type: r.get(1)?,
                    artifact_type: r.get(2)?,
                    annotations: r.get(3)?,
                    size: r.get(4)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn tag_page(
        &self,
        repo: &str,
        order: TagOrder,
        offset: u64,
        limit: u32,
    ) -> Result<Option<(u64, Vec<TagRow>)>, MetaError> {
        let repo = repo.to_owned();
        self.scan(move |c| {
            let exists = c
                .prepare_cached("SELECT 1 FROM repositories WHERE name = ?1")?
                .exists(params![repo])?;
            if !exists {
                return Ok(None);
            }
            let count: i64 = c
                .prepare_cached("SELECT count(*) FROM tags WHERE repository = ?1")?
                .query_row(params![repo], |r| r.get(0))?;
            let order_by = match order {
                TagOrder::NewestFirst => "t.updated_at DESC, t.name",
                TagOrder::OldestFirst => "t.updated_at, t.name",
                TagOrder::Name => "t.name",
                TagOrder::NameDesc => "t.name DESC",
            };
            let mut stmt = c.prepare_cached(&format!(
                "SELECT t.name, t.digest, m.media_type, m.content, t.updated_at FROM tags t
                 JOIN manifests m ON m.repository = t.repository AND m.digest = t.digest
                 WHERE t.repository = ?1 ORDER BY {order_by} LIMIT ?2 OFFSET ?3"
            ))?;
            let rows = stmt.query_map(params![repo, limit, to_i64(offset)], |r| {
                Ok(TagRow {
                    name: r.get(0)?,
                    digest: r.get(1)?,
                    media_type: r.get(2)?,
                    content: Bytes::from(r.get::<_, Vec<u8>>(3)?),
                    updated_at: r.get(4)?,
                })
            })?;
            Ok(Some((to_u64(count), rows.collect::<Result<Vec<_>, _>>()?)))
        })
        .await
    }

    async fn events_after(&self, after: i64, limit: u32) -> Result<Vec<EventRecord>, MetaError> {
        self.scan(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {EVENT_COLUMNS} FROM events e WHERE e.id > ?1 ORDER BY e.id LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![after, limit], |r| event_row(r, 0))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn policy_add(
        &self,
        repositories: &str,
        tags: &[String],
        by: Option<&str>,
    ) -> Result<i64, MetaError> {
        let (repositories, tags, by) = (
            repositories.to_owned(),
            tags.join(","),
            by.map(str::to_owned),
        );
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO tag_policies (repositories, tags, created_at, created_by) VALUES (?1, ?2, ?3, ?4)",
                params![repositories, tags, now_ms(), by],
            )?;
            Ok(tx.last_insert_rowid())
        })
        .await
    }

    async fn policies(&self) -> Result<Vec<TagPolicy>, MetaError> {
        self.scan(load_policies).await
    }

    async fn policy_remove(&self, id: i64) -> Result<bool, MetaError> {
        self.write(move |tx| {
            Ok(tx.execute("DELETE FROM tag_policies WHERE id = ?1", params![id])? > 0)
        })
        .await
    }

    async fn imported(
        &self,
        source: &str,
        repo: &str,
    ) -> Result<std::collections::HashMap<String, String>, MetaError> {
        let (source, repo) = (source.to_owned(), repo.to_owned());
        self.scan(move |c| {
            let mut s = c.prepare_cached(
                "SELECT item, digest FROM imports WHERE source = ?1 AND repository = ?2",
            )?;
            let rows = s.query_map(params![source, repo], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn imported_record(
        &self,
        source: &str,
        repo: &str,
        item: &str,
        digest: &str,
    ) -> Result<(), MetaError> {
        let (source, repo, item, digest) = (
            source.to_owned(),
            repo.to_owned(),
            item.to_owned(),
            digest.to_owned(),
        );
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO imports (source, repository, item, digest, at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (source, repository, item) DO UPDATE SET digest = excluded.digest, at = excluded.at",
                params![source, repo, item, digest, now_ms()],
            )?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sqlite_backend_passes_the_suite() {
        let dir = tempfile::tempdir().unwrap();
        let meta = SqliteMeta::open(&dir.path().join("meta.db")).unwrap();
        super::super::tests::suite(&meta).await;
        let dir = tempfile::tempdir().unwrap();
        let meta = SqliteMeta::open(&dir.path().join("meta.db")).unwrap();
        super::super::tests::gc_suite(&meta).await;
        let dir = tempfile::tempdir().unwrap();
        let meta = SqliteMeta::open(&dir.path().join("meta.db")).unwrap();
        super::super::tests::retention_suite(&meta).await;
        let dir = tempfile::tempdir().unwrap();
        let meta = SqliteMeta::open(&dir.path().join("meta.db")).unwrap();
        super::super::tests::usage_suite(&meta).await;
        let dir = tempfile::tempdir().unwrap();
        let meta = SqliteMeta::open(&dir.path().join("meta.db")).unwrap();
        super::super::tests::review_suite(&meta).await;
        let dir = tempfile::tempdir().unwrap();
        let meta = SqliteMeta::open(&dir.path().join("meta.db")).unwrap();
        super::super::tests::gc_pacing_suite(&meta).await;
    }

    /// `wharf gc` or another admin command writing from a second process (here: a second
    /// handle on the same file) is contention for the server's pass, and the reverse.
    #[tokio::test]
    async fn another_processs_writes_are_contention() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        let server = SqliteMeta::open(&path).unwrap();
        let admin = SqliteMeta::open(&path).unwrap();
        server.gc_contended().await.unwrap();
        assert!(!server.gc_contended().await.unwrap());
        admin.upload_create("u1", "x/y", false).await.unwrap();
        assert!(
            server.gc_contended().await.unwrap(),
            "the other handle wrote"
        );
        assert!(!server.gc_contended().await.unwrap());
        // The server's own collector writes are not contention for itself, but they are
        // for the other handle (it cannot tell them apart, and need not).
        admin.gc_contended().await.unwrap();
        assert!(server.gc_lease("p", 1000).await.unwrap());
        assert!(!server.gc_contended().await.unwrap());
        assert!(admin.gc_contended().await.unwrap());
    }

    /// Random sequences of pushes, mounts, manifest and tag deletes, blob deletes,
    /// repository deletes and collection passes: the usage counters always equal a
    /// recomputation from the links.
    #[test]
    fn usage_counters_always_equal_a_recomputation() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        #[derive(Debug, Clone)]
        enum Op {
            Push(u8, u8),
            Mount(u8, u8, u8),
            Manifest(u8, u8, u8),
            DeleteManifest(u8, u8),
            DeleteTag(u8),
            Unlink(u8, u8),
            DeleteRepo(u8),
            Gc,
        }
        let op = prop_oneof![
            (0..4u8, 0..5u8).prop_map(|(r, b)| Op::Push(r, b)),
            (0..4u8, 0..4u8, 0..5u8).prop_map(|(r, f, b)| Op::Mount(r, f, b)),
            (0..4u8, 0..5u8, 0..3u8).prop_map(|(r, b, t)| Op::Manifest(r, b, t)),
            (0..4u8, 0..5u8).prop_map(|(r, b)| Op::DeleteManifest(r, b)),
            (0..4u8).prop_map(Op::DeleteTag),
            (0..4u8, 0..5u8).prop_map(|(r, b)| Op::Unlink(r, b)),
            (0..4u8).prop_map(Op::DeleteRepo),
            Just(Op::Gc),
        ];
        let repo = |r: u8| ["a/x", "a/y", "b/x", "c"][r as usize].to_owned();
        let blob = |b: u8| format!("sha256:{}", format!("{:02x}", b + 1).repeat(32));
        let mdig =
            |r: u8, b: u8| format!("sha256:{}", format!("{:02x}", 0x80 + r * 8 + b).repeat(32));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut runner = TestRunner::new(Config {
            cases: 48,
            ..Config::default()
        });
        runner
            .run(&proptest::collection::vec(op, 1..40), |ops| {
                rt.block_on(async {
                    let dir = tempfile::tempdir().unwrap();
                    let m = SqliteMeta::open(&dir.path().join("meta.db")).unwrap();
                    let who = Who::default();
                    for (i, op) in ops.iter().enumerate() {
                        match op.clone() {
                            Op::Push(r, b) => {
                                let id = format!("u{i}");
                                m.upload_create(&id, &repo(r), false).await.unwrap();
                                m.upload_verified(&id, &blob(b)).await.unwrap();
                                m.upload_complete(&id, &repo(r), &blob(b), 10 + u64::from(b))
                                    .await
                                    .unwrap();
                            }
                            Op::Mount(r, f, b) => {
                                m.mount_blob(&repo(r), &repo(f), &blob(b), &who)
                                    .await
                                    .unwrap();
                            }
                            Op::Manifest(r, b, t) => {
                                let mut nm = super::super::tests::tests_manifest(
                                    mdig(r, b),
                                    vec![(blob(b), 10 + i64::from(b))],
                                );
                                nm.tags = vec![format!("t{t}")];
                                let _ = m.manifest_put(&repo(r), nm).await;
                            }
                            Op::DeleteManifest(r, b) => {
                                let _ = m.manifest_delete(&repo(r), &mdig(r, b), &who, true).await;
                            }
                            Op::DeleteTag(r) => {
                                let _ = m.tag_delete(&repo(r), "t0", &who).await;
                            }
                            Op::Unlink(r, b) => {
                                let _ = m.unlink_blob(&repo(r), &blob(b), &who).await;
                            }
                            Op::DeleteRepo(r) => {
                                let _ = m.repository_delete(&repo(r), &who).await;
                            }
                            Op::Gc => {
                                m.gc_sweep_links(now_ms() + 60_000, ("", ""), 100)
                                    .await
                                    .unwrap();
                                let marked = m.gc_mark_blobs("", 100).await.unwrap();
                                m.gc_forget(marked.into_iter().map(|b| b.digest).collect())
                                    .await
                                    .unwrap();
                            }
                        }
                        let kept = m.usage(false).await.unwrap();
                        let fresh = m.usage(true).await.unwrap();
                        prop_assert_eq!(kept, fresh, "after {:?}", &ops[..=i]);
                    }
                    Ok(())
                })
            })
            .unwrap();
    }

    #[tokio::test]
    async fn reopening_keeps_data_and_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        SqliteMeta::open(&path)
            .unwrap()
            .upload_create("u", "r", false)
            .await
            .unwrap();
        let again = SqliteMeta::open(&path).unwrap();
        assert_eq!(
            again.upload_get("u").await.unwrap().unwrap().repository,
            "r"
        );
    }
}

#[cfg(test)]
mod migration_tests {
    use super::*;

    #[test]
    fn concurrent_openers_migrate_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let p = path.clone();
                std::thread::spawn(move || SqliteMeta::open(&p).map(|_| ()))
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
    }

    #[test]
    fn the_events_rebuild_keeps_ids_deliveries_and_the_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        {
            let c = open_connection(&path).unwrap();
            for (i, m) in MIGRATIONS[..11].iter().enumerate() {
                c.execute_batch(m).unwrap();
                c.execute_batch(&format!("PRAGMA user_version = {}", i + 1))
                    .unwrap();
            }
            c.execute_batch(
                "INSERT INTO events (id, uuid, at, action, repository, digest) VALUES
                   (7, 'u7', 1, 'push', 'a', 'sha256:x'), (9, 'u9', 2, 'tag', 'a', 'sha256:x');
                 DELETE FROM events WHERE id = 9;
                 INSERT INTO webhooks VALUES ('h', 'http://x', 's', '*', '*', 'push', 'wharf', 'cli', 0, 7);
                 INSERT INTO deliveries (webhook, event, status, next_attempt_at, created_at, updated_at)
                   VALUES ('h', 7, 'pending', 0, 0, 0);",
            )
            .unwrap();
        }
        let m = SqliteMeta::open(&path).unwrap();
        let c = m.writer.lock().unwrap();
        let delivery_event: i64 = c
            .query_row(
                "SELECT e.id FROM deliveries d JOIN events e ON e.id = d.event",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(delivery_event, 7);
        c.execute(
            "INSERT INTO events (uuid, at, action, repository, digest, quota) VALUES ('n', 3, 'quota', 'team/*', '', 10)",
            [],
        )
        .unwrap();
        let id: i64 = c
            .query_row("SELECT id FROM events WHERE uuid = 'n'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(id, 10, "an id once used is never given again");
        assert!(
            c.query_row("PRAGMA foreign_key_check", [], |_| Ok(()))
                .is_err()
        );
    }
}
