//! Usage counters and quotas for [`SqliteMeta`]: charged in the transaction that makes a
//! link, released in the one that removes it, so they always equal a recomputation.

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::sqlite::{Event, audit_row, record_event};
use super::{MetaError, Quota, RepoContents, UsageRow, Who};

/// A repository's namespace: its first component (`team` for `team/api`).
pub fn namespace_of(repo: &str) -> &str {
    repo.split_once('/').map_or(repo, |(ns, _)| ns)
}

/// `50.2 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn add(tx: &Transaction<'_>, scope: &str, bytes: i64, blobs: i64) -> Result<(), MetaError> {
    tx.prepare_cached(
        "INSERT INTO usage (scope, bytes, blobs) VALUES (?1, ?2, ?3)
         ON CONFLICT (scope) DO UPDATE SET bytes = bytes + excluded.bytes, blobs = blobs + excluded.blobs",
    )?
    .execute(params![scope, bytes, blobs])?;
    tx.prepare_cached("DELETE FROM usage WHERE scope = ?1 AND blobs = 0")?
        .execute(params![scope])?;
    Ok(())
}

fn bytes_of(conn: &Connection, scope: &str) -> Result<i64, MetaError> {
    Ok(conn
        .prepare_cached("SELECT bytes FROM usage WHERE scope = ?1")?
        .query_row(params![scope], |r| r.get(0))
        .optional()?
        .unwrap_or(0))
}

/// The quotas that apply to `repo`: its own, and its namespace's (`team/*`), with the
/// usage scope each counts.
fn applying(conn: &Connection, repo: &str) -> Result<Vec<(String, i64, bool, String)>, MetaError> {
    let ns = format!("{}/*", namespace_of(repo));
    Ok(conn
        .prepare_cached("SELECT target, bytes, warned FROM quotas WHERE target IN (?1, ?2)")?
        .query_map(params![repo, ns], |r| {
            let target: String = r.get(0)?;
            let scope = match target.strip_suffix("/*") {
                Some(n) => format!("ns:{n}"),
                None => format!("repo:{target}"),
            };
            Ok((target, r.get(1)?, r.get::<_, bool>(2)?, scope))
        })?
        .collect::<Result<_, _>>()?)
}

fn shown(target: &str) -> &str {
    target.strip_suffix('*').unwrap_or(target)
}

/// Refuses with `Quota` if `repo`'s repository or namespace uses more than its quota.
pub(super) fn check(conn: &Connection, repo: &str) -> Result<(), MetaError> {
    for (target, limit, _, scope) in applying(conn, repo)? {
        let used = bytes_of(conn, &scope)?;
        if used > limit {
            return Err(MetaError::Quota(format!(
                "quota of {} exceeded: {} of {}",
                shown(&target),
                human(u64::try_from(used).unwrap_or(0)),
                human(u64::try_from(limit).unwrap_or(0))
            )));
        }
    }
    Ok(())
}

/// Warns once when a quota passes 85 % (a log line, an audit row and a `quota` event
/// for webhooks, in the transaction that crossed it), and re-arms below it.
fn warn(tx: &Transaction<'_>, repo: &str) -> Result<(), MetaError> {
    for (target, limit, warned, scope) in applying(tx, repo)? {
        let used = bytes_of(tx, &scope)?;
        let high = used * 100 >= limit.saturating_mul(85);
        if high && !warned {
            tx.prepare_cached("UPDATE quotas SET warned = 1 WHERE target = ?1")?
                .execute(params![target])?;
            let detail = format!(
                "{} uses {} of its quota of {} ({}%)",
                shown(&target),
                human(u64::try_from(used).unwrap_or(0)),
                human(u64::try_from(limit).unwrap_or(0)),
                used * 100 / limit.max(1)
            );
            tracing::warn!("{detail}");
            let now = crate::time::now_ms();
            audit_row(
                tx,
                "quota.warning",
                shown(&target),
                &detail,
                &Who::default(),
                now,
            )?;
            record_event(
                tx,
                &Event {
                    action: "quota",
                    repository: &target,
                    size: Some(used),
                    quota: Some(limit),
                    detail: Some(&detail),
                    at: now,
                    ..Event::default()
                },
            )?;
        } else if !high && warned {
            tx.prepare_cached("UPDATE quotas SET warned = 0 WHERE target = ?1")?
                .execute(params![target])?;
        }
    }
    Ok(())
}

fn size_of(tx: &Transaction<'_>, digest: &str) -> Result<i64, MetaError> {
    Ok(tx
        .prepare_cached("SELECT size FROM blobs WHERE digest = ?1")?
        .query_row(params![digest], |r| r.get(0))
        .optional()?
        .unwrap_or(0))
}

/// Counts a link just made; refused with `Quota` (and so rolled back with the link) if
/// that takes the repository or its namespace past a quota.
pub(super) fn charge(tx: &Transaction<'_>, repo: &str, digest: &str) -> Result<(), MetaError> {
    let size = size_of(tx, digest)?;
    let ns = namespace_of(repo);
    add(tx, &format!("repo:{repo}"), size, 1)?;
    let n = tx
        .prepare_cached(
            "INSERT INTO namespace_blobs (namespace, digest, links) VALUES (?1, ?2, 1)
             ON CONFLICT (namespace, digest) DO UPDATE SET links = links + 1 RETURNING links",
        )?
        .query_row(params![ns, digest], |r| r.get::<_, i64>(0))?;
    if n == 1 {
        add(tx, &format!("ns:{ns}"), size, 1)?;
    }
    check(tx, repo)?;
    warn(tx, repo)
}

/// Releases a link about to be removed.
pub(super) fn release(tx: &Transaction<'_>, repo: &str, digest: &str) -> Result<(), MetaError> {
    let size = size_of(tx, digest)?;
    let ns = namespace_of(repo);
    add(tx, &format!("repo:{repo}"), -size, -1)?;
    let left = tx
        .prepare_cached(
            "UPDATE namespace_blobs SET links = links - 1 WHERE namespace = ?1 AND digest = ?2 RETURNING links",
        )?
        .query_row(params![ns, digest], |r| r.get::<_, i64>(0))
        .optional()?;
    if left == Some(0) {
        tx.prepare_cached("DELETE FROM namespace_blobs WHERE namespace = ?1 AND digest = ?2")?
            .execute(params![ns, digest])?;
        add(tx, &format!("ns:{ns}"), -size, -1)?;
    }
    warn(tx, repo)
}

pub(super) fn quota_set(
    tx: &Transaction<'_>,
    target: &str,
    bytes: u64,
    by: Option<&str>,
) -> Result<(), MetaError> {
    tx.execute(
        "INSERT INTO quotas (target, bytes, created_at, created_by) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (target) DO UPDATE SET bytes = excluded.bytes, warned = 0",
        params![
            target,
            i64::try_from(bytes).unwrap_or(i64::MAX),
            crate::time::now_ms(),
            by
        ],
    )?;
    Ok(())
}

pub(super) fn quotas(conn: &Connection) -> Result<Vec<Quota>, MetaError> {
    let rows: Vec<(String, i64)> = conn
        .prepare_cached("SELECT target, bytes FROM quotas ORDER BY target")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    rows.into_iter()
        .map(|(target, bytes)| {
            let scope = match target.strip_suffix("/*") {
                Some(n) => format!("ns:{n}"),
                None => format!("repo:{target}"),
            };
            Ok(Quota {
                used: u64::try_from(bytes_of(conn, &scope)?).unwrap_or(0),
                bytes: u64::try_from(bytes).unwrap_or(0),
                target,
            })
        })
        .collect()
}

fn rows(conn: &Connection, sql: &str) -> Result<Vec<UsageRow>, MetaError> {
    Ok(conn
        .prepare(sql)?
        .query_map([], |r| {
            Ok(UsageRow {
                scope: r.get(0)?,
                bytes: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                blobs: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
            })
        })?
        .collect::<Result<_, _>>()?)
}

/// The counters as kept.
pub(super) fn counters(conn: &Connection) -> Result<Vec<UsageRow>, MetaError> {
    rows(
        conn,
        "SELECT scope, bytes, blobs FROM usage WHERE blobs > 0 ORDER BY scope",
    )
}

/// The same figures recomputed from the links.
pub(super) fn recompute(conn: &Connection) -> Result<Vec<UsageRow>, MetaError> {
    rows(
        conn,
        "SELECT scope, bytes, blobs FROM (
            SELECT 'ns:' || ns AS scope, sum(size) AS bytes, count(*) AS blobs FROM (
                SELECT DISTINCT CASE WHEN instr(l.repository, '/') > 0 THEN substr(l.repository, 1, instr(l.repository, '/') - 1) ELSE l.repository END AS ns,
                       b.digest, b.size
                  FROM repository_blobs l JOIN blobs b ON b.digest = l.digest)
             GROUP BY ns
            UNION ALL
            SELECT 'repo:' || l.repository, sum(b.size), count(*) FROM repository_blobs l JOIN blobs b ON b.digest = l.digest
             GROUP BY l.repository)
          ORDER BY scope",
    )
}

/// Tags, manifests and the last push per repository.
pub(super) fn contents(conn: &Connection) -> Result<Vec<RepoContents>, MetaError> {
    Ok(conn
        .prepare(
            "SELECT p.name,
                    (SELECT count(*) FROM tags t WHERE t.repository = p.name),
                    (SELECT count(*) FROM manifests m WHERE m.repository = p.name),
                    (SELECT max(t.updated_at) FROM tags t WHERE t.repository = p.name)
               FROM repositories p ORDER BY p.name",
        )?
        .query_map([], |r| {
            Ok(RepoContents {
                repository: r.get(0)?,
                tags: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                manifests: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
                last_push: r.get(3)?,
            })
        })?
        .collect::<Result<_, _>>()?)
}
