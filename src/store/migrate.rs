//! `wharf migrate --to`: copies an embedded registry (SQLite and blob files) to
//! PostgreSQL and another blob store (S3, or files elsewhere), for the move to several
//! replicas.
//!
//! - **Blobs** first: every blob the source's metadata names that the destination does
//!   not hold is streamed across and re-hashed on the way; one whose bytes do not have
//!   its digest is not stored, and the run fails naming it.
//! - **Metadata** then, in one PostgreSQL transaction, from one SQLite snapshot: every
//!   table both schemas have (the PostgreSQL schema is the SQLite one with PostgreSQL's
//!   types), row by row, converted by the destination column's type. Rows the
//!   destination has that the source no longer has are deleted, so a second run leaves
//!   the destination equal to the source (what changed since, and only that, is
//!   different afterwards). Manifests are re-hashed against their digest.
//! - Not copied: open uploads (clients retry them against the new registry), the
//!   collector's lease, failed-login counters, schema bookkeeping.
//!
//! So the switch needs only a short pause of pushes: a first run while the registry
//! serves, a second one with pushes stopped (it copies only the blobs pushed since),
//! then the new configuration.

use std::collections::HashSet;

use rusqlite::types::Value as SqlValue;
use tokio_postgres::types::{ToSql, Type};

use super::blob::{BlobError, BlobStore};
use crate::oci::Digest;

/// Tables in an order in which every row's parents come before it; deletes go in reverse.
const TABLES: &[&str] = &[
    "repositories",
    "blobs",
    "repository_blobs",
    "manifests",
    "manifest_references",
    "tags",
    "users",
    "access_tokens",
    "grants",
    "visibility",
    "audit_log",
    "auth_state",
    "settings",
    "login_trust",
    "tag_policies",
    "events",
    "webhooks",
    "deliveries",
    "gc_runs",
    "retention_rules",
    "deleted_tags",
    "namespace_blobs",
    "usage",
    "quotas",
    "imports",
    "deployments",
];

/// What a run did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct MigrateReport {
    pub blobs_copied: u64,
    pub bytes_copied: u64,
    pub blobs_present: u64,
    /// Rows written (new or changed), and rows deleted, in the destination database.
    pub rows: u64,
    pub rows_deleted: u64,
    /// What could not be copied (the run fails when this is not empty).
    pub problems: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("source database: {0}")]
    Source(#[from] rusqlite::Error),
    #[error("destination database: {0}")]
    Destination(String),
    #[error("{0}")]
    Other(String),
}

impl From<tokio_postgres::Error> for MigrateError {
    fn from(e: tokio_postgres::Error) -> Self {
        MigrateError::Destination(match e.as_db_error() {
            Some(db) => db.message().to_owned(),
            None => e.to_string(),
        })
    }
}

/// A destination column: its name and type.
struct Column {
    name: String,
    ty: Type,
}

/// One value of the source, as the destination column's type wants it.
fn convert(v: SqlValue, ty: &Type) -> Result<Box<dyn ToSql + Sync + Send>, String> {
    Ok(match (v, ty) {
        (SqlValue::Null, t) if *t == Type::BOOL => Box::new(None::<bool>),
        (SqlValue::Null, t) if *t == Type::INT4 => Box::new(None::<i32>),
        (SqlValue::Null, t) if *t == Type::INT8 => Box::new(None::<i64>),
        (SqlValue::Null, t) if *t == Type::BYTEA => Box::new(None::<Vec<u8>>),
        (SqlValue::Null, _) => Box::new(None::<String>),
        (SqlValue::Integer(i), t) if *t == Type::BOOL => Box::new(i != 0),
        (SqlValue::Integer(i), t) if *t == Type::INT4 => {
            Box::new(i32::try_from(i).map_err(|e| e.to_string())?)
        }
        (SqlValue::Integer(i), t) if *t == Type::INT8 => Box::new(i),
        (SqlValue::Integer(i), _) => Box::new(i.to_string()),
        (SqlValue::Text(s), t) if *t == Type::BYTEA => Box::new(s.into_bytes()),
        (SqlValue::Text(s), t) if *t == Type::INT8 => {
            Box::new(s.parse::<i64>().map_err(|e| e.to_string())?)
        }
        (SqlValue::Text(s), _) if s.contains('\0') => {
            return Err("text with a NUL character, which PostgreSQL cannot hold".into());
        }
        (SqlValue::Text(s), _) => Box::new(s),
        (SqlValue::Blob(b), t) if *t == Type::BYTEA => Box::new(b),
        (SqlValue::Blob(b), _) => {
            let s = String::from_utf8(b).map_err(|_| "binary data in a text column")?;
            if s.contains('\0') {
                return Err("text with a NUL character, which PostgreSQL cannot hold".into());
            }
            Box::new(s)
        }
        (SqlValue::Real(_), _) => return Err("a real number, which no column holds".into()),
    })
}

/// Streams blob `digest` from `from` into `to`, verifying it on the way.
async fn copy_blob(
    from: &dyn BlobStore,
    to: &dyn BlobStore,
    digest: &Digest,
    size: u64,
) -> Result<(), String> {
    let id = format!("migrate-{}", &digest.hex()[..32]);
    let data = from
        .read(digest, 0..size)
        .await
        .map_err(|e| format!("{digest}: reading it: {e}; not copied"))?;
    let (written, hasher) = to
        .upload_write(&id, 0, data, Some(digest.algorithm().hasher()))
        .await
        .map_err(|e| format!("{digest}: copying it: {e}; not copied"))?;
    let computed = hasher.expect("given").finish();
    if written != size || computed != *digest {
        let _ = to.upload_delete(&id).await;
        return Err(format!(
            "{digest}: the source's bytes ({written} of {size}) have digest {computed}; not copied"
        ));
    }
    to.upload_commit(&id, size, digest)
        .await
        .map_err(|e| format!("{digest}: storing it: {e}; not copied"))
}

/// Copies the registry whose metadata is the SQLite database at `source_db` and whose
/// blobs are `source_blobs` into PostgreSQL at `dest_url` and `dest_blobs`.
pub async fn migrate(
    source_db: &std::path::Path,
    source_blobs: &dyn BlobStore,
    dest_url: &str,
    dest_blobs: &dyn BlobStore,
) -> Result<MigrateReport, MigrateError> {
    // The destination's schema first (made or brought up to date as a server would).
    super::meta::postgres::PostgresMeta::open(dest_url)
        .await
        .map_err(|e| MigrateError::Destination(e.to_string()))?;
    let (mut pg, conn) = tokio_postgres::connect(dest_url, tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(conn);
    let mut src = rusqlite::Connection::open_with_flags(
        source_db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    src.busy_timeout(std::time::Duration::from_secs(10))?;
    // One snapshot of the source for the whole run (WAL readers never block writers).
    let snapshot = src.transaction_with_behavior(rusqlite::TransactionBehavior::Deferred)?;
    let mut report = MigrateReport::default();

    let blobs: Vec<(String, i64)> = snapshot
        .prepare("SELECT digest, size FROM blobs WHERE deleting_at IS NULL ORDER BY digest")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut missing: HashSet<String> = HashSet::new();
    for (d, size) in &blobs {
        let Ok(digest) = d.parse::<Digest>() else {
            report.problems.push(format!("{d}: not a digest"));
            missing.insert(d.clone());
            continue;
        };
        let size = u64::try_from(*size).unwrap_or(0);
        match dest_blobs.stat(&digest).await {
            Ok(Some(s)) if s == size => {
                report.blobs_present += 1;
                continue;
            }
            Ok(_) | Err(BlobError::NotFound) => {}
            Err(e) => return Err(MigrateError::Other(format!("destination storage: {e}"))),
        }
        match copy_blob(source_blobs, dest_blobs, &digest, size).await {
            Ok(()) => {
                report.blobs_copied += 1;
                report.bytes_copied += size;
            }
            Err(e) => {
                report.problems.push(e);
                missing.insert(d.clone());
            }
        }
    }

    let tx = pg.transaction().await?;
    for table in TABLES {
        let columns: Vec<Column> = tx
            .query(
                "SELECT a.attname, a.atttypid FROM pg_attribute a
                  WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
                  ORDER BY a.attnum",
                &[table],
            )
            .await?
            .iter()
            .map(|r| Column {
                name: r.get(0),
                ty: Type::from_oid(r.get(1)).unwrap_or(Type::TEXT),
            })
            .collect();
        let source_columns: HashSet<String> = snapshot
            .prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let shared: Vec<&Column> = columns
            .iter()
            .filter(|c| source_columns.contains(&c.name))
            .collect();
        let key: Vec<String> = tx
            .query(
                "SELECT a.attname FROM pg_index i
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                  WHERE i.indrelid = $1::text::regclass AND i.indisprimary",
                &[table],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        // Every key column must come from the source: a table whose rows cannot be told
        // apart is not copied (nor, below, emptied).
        let key_at: Vec<usize> = key
            .iter()
            .filter_map(|k| shared.iter().position(|c| c.name == *k))
            .collect();
        if shared.is_empty() || key.is_empty() || key_at.len() != key.len() {
            continue;
        }
        // What the destination has that the source does not, goes (children first:
        // this table's rows are deleted after the tables that come later, below).
        let names: Vec<&str> = shared.iter().map(|c| c.name.as_str()).collect();
        let list = names.join(", ");
        let placeholders: Vec<String> = (1..=shared.len()).map(|i| format!("${i}")).collect();
        let updates: Vec<String> = names
            .iter()
            .filter(|n| !key.iter().any(|k| k == *n))
            .map(|n| format!("{n} = excluded.{n}"))
            .collect();
        let conflict = if updates.is_empty() {
            "DO NOTHING".to_owned()
        } else {
            format!(
                "DO UPDATE SET {} WHERE ({}) IS DISTINCT FROM ({})",
                updates.join(", "),
                names
                    .iter()
                    .filter(|n| !key.iter().any(|k| k == *n))
                    .map(|n| format!("{table}.{n}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                names
                    .iter()
                    .filter(|n| !key.iter().any(|k| k == *n))
                    .map(|n| format!("excluded.{n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        // Webhook cursors count in this cluster's transaction ids: the events copied
        // now carry this transaction's, so a hook resumes exactly after the event its
        // cursor names.
        let (extra_cols, extra_vals) = if *table == "webhooks" {
            (
                ", cursor_xid",
                ", pg_current_xact_id()::text::bigint".to_owned(),
            )
        } else {
            ("", String::new())
        };
        let insert = tx
            .prepare(&format!(
                "INSERT INTO {table} ({list}{extra_cols}) VALUES ({}{extra_vals}) ON CONFLICT ({}) {conflict}",
                placeholders.join(", "),
                key.join(", ")
            ))
            .await?;
        tx.execute(
            &format!(
                "CREATE TEMP TABLE IF NOT EXISTS migrate_keep_{table} AS SELECT {} FROM {table} WITH NO DATA",
                key.join(", ")
            ),
            &[],
        )
        .await?;
        tx.execute(&format!("TRUNCATE migrate_keep_{table}"), &[])
            .await?;
        let keep = tx
            .prepare(&format!(
                "INSERT INTO migrate_keep_{table} ({}) VALUES ({})",
                key.join(", "),
                (1..=key.len())
                    .map(|i| format!("${i}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .await?;
        let mut stmt = snapshot.prepare(&format!("SELECT {list} FROM {table}"))?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let mut values = Vec::with_capacity(shared.len());
            let mut bad = None;
            for (i, c) in shared.iter().enumerate() {
                let v: SqlValue = row.get(i)?;
                match convert(v, &c.ty) {
                    Ok(v) => values.push(v),
                    Err(e) => {
                        bad = Some(format!("{table}.{}: {e}", c.name));
                        break;
                    }
                }
            }
            if let Some(why) = bad {
                let key: Vec<String> = key_at
                    .iter()
                    .map(|&i| format!("{:?}", row.get::<_, SqlValue>(i).ok()))
                    .collect();
                report
                    .problems
                    .push(format!("{why} (row {}); not copied", key.join(", ")));
                continue;
            }
            if *table == "manifests" {
                let digest_at = shared.iter().position(|c| c.name == "digest");
                let content_at = shared.iter().position(|c| c.name == "content");
                if let (Some(digest_at), Some(at)) = (digest_at, content_at) {
                    let digest: String = row.get(digest_at)?;
                    let content: Vec<u8> = row.get(at)?;
                    let ok = digest
                        .parse::<Digest>()
                        .is_ok_and(|d| Digest::of(d.algorithm(), &content) == d);
                    if !ok {
                        report.problems.push(format!(
                            "manifest {digest}: its content has another digest; not copied"
                        ));
                        continue;
                    }
                }
            }
            let params: Vec<&(dyn ToSql + Sync)> = values
                .iter()
                .map(|v| v.as_ref() as &(dyn ToSql + Sync))
                .collect();
            report.rows += tx.execute(&insert, &params).await?;
            let key_params: Vec<&(dyn ToSql + Sync)> = key_at.iter().map(|&i| params[i]).collect();
            tx.execute(&keep, &key_params).await?;
        }
    }
    for table in TABLES.iter().rev() {
        let exists: bool = tx
            .query_one(
                "SELECT to_regclass($1) IS NOT NULL",
                &[&format!("pg_temp.migrate_keep_{table}")],
            )
            .await?
            .get(0);
        if !exists {
            continue;
        }
        let key: Vec<String> = tx
            .query(
                "SELECT a.attname FROM pg_index i
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                  WHERE i.indrelid = $1::text::regclass AND i.indisprimary",
                &[table],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let on: Vec<String> = key.iter().map(|k| format!("k.{k} = t.{k}")).collect();
        report.rows_deleted += tx
            .execute(
                &format!(
                    "DELETE FROM {table} t WHERE NOT EXISTS (SELECT 1 FROM migrate_keep_{table} k WHERE {})",
                    on.join(" AND ")
                ),
                &[],
            )
            .await?;
    }
    // Ids the source handed out are taken: the sequences go on after them.
    for table in TABLES {
        // (Asked only of tables with an `id`: for others PostgreSQL raises an error,
        // which would abort the transaction.)
        let seq: Option<String> = tx
            .query_opt(
                "SELECT pg_get_serial_sequence(c.table_name::text, 'id') FROM information_schema.columns c
                  WHERE c.table_schema = current_schema() AND c.table_name = $1 AND c.column_name = 'id'",
                &[table],
            )
            .await?
            .and_then(|r| r.get(0));
        if let Some(seq) = seq {
            tx.execute(
                &format!(
                    "SELECT setval($1::text::regclass, greatest((SELECT coalesce(max(id), 0) FROM {table}), 1))"
                ),
                &[&seq],
            )
            .await?;
        }
    }
    if !missing.is_empty() {
        report.problems.push(format!(
            "{} blobs could not be copied: the metadata was not switched; run again",
            missing.len()
        ));
    }
    if report.problems.is_empty() {
        tx.commit().await?;
    } else {
        // All or nothing: a destination with part of the source is no registry to
        // switch to.
        tx.rollback().await?;
    }
    drop(pg);
    let _ = driver.await;
    drop(snapshot);
    Ok(report)
}
