//! Usage counters and quotas for [`PostgresMeta`] (as `sqlite_usage.rs`): charged in the
//! transaction that makes a link, released in the one that removes it.

use super::super::namespace_of;
use super::super::sqlite::Event;
use super::super::to_u64;
use super::super::{MetaError, Quota, RepoContents, UsageRow, Who, human_bytes as human};
use super::registry::{audit_row, record_event};
use super::{PostgresMeta, Tx};

async fn add(tx: &Tx<'_>, scope: &str, bytes: i64, blobs: i64) -> Result<(), MetaError> {
    tx.exec(
        "INSERT INTO usage (scope, bytes, blobs) VALUES ($1, $2, $3)
         ON CONFLICT (scope) DO UPDATE SET bytes = usage.bytes + excluded.bytes, blobs = usage.blobs + excluded.blobs",
        &[&scope, &bytes, &blobs],
    )
    .await?;
    tx.exec(
        "DELETE FROM usage WHERE scope = $1 AND blobs = 0",
        &[&scope],
    )
    .await?;
    Ok(())
}

async fn bytes_of(tx: &Tx<'_>, scope: &str) -> Result<i64, MetaError> {
    Ok(tx
        .opt("SELECT bytes FROM usage WHERE scope = $1", &[&scope])
        .await?
        .map_or(0, |r| r.get(0)))
}

fn scope_of(target: &str) -> String {
    match target.strip_suffix("/*") {
        Some(n) => format!("ns:{n}"),
        None => format!("repo:{target}"),
    }
}

/// The quotas that apply to `repo`: its own, and its namespace's (`team/*`), with the
/// usage scope each counts.
async fn applying(tx: &Tx<'_>, repo: &str) -> Result<Vec<(String, i64, bool, String)>, MetaError> {
    let ns = format!("{}/*", namespace_of(repo));
    Ok(tx
        .rows(
            "SELECT target, bytes, warned FROM quotas WHERE target IN ($1, $2)",
            &[&repo, &ns],
        )
        .await?
        .iter()
        .map(|r| {
            let target: String = r.get(0);
            let scope = scope_of(&target);
            (target, r.get(1), r.get(2), scope)
        })
        .collect())
}

fn shown(target: &str) -> &str {
    target.strip_suffix('*').unwrap_or(target)
}

/// Refuses with `Quota` if `repo`'s repository or namespace uses more than its quota.
pub(super) async fn check(tx: &Tx<'_>, repo: &str) -> Result<(), MetaError> {
    for (target, limit, _, scope) in applying(tx, repo).await? {
        let used = bytes_of(tx, &scope).await?;
        if used > limit {
            return Err(MetaError::Quota(format!(
                "quota of {} exceeded: {} of {}",
                shown(&target),
                human(to_u64(used)),
                human(to_u64(limit))
            )));
        }
    }
    Ok(())
}

/// Warns once when a quota passes 85 %, and re-arms below it (see `sqlite_usage.rs`).
async fn warn(tx: &Tx<'_>, repo: &str) -> Result<(), MetaError> {
    for (target, limit, warned, scope) in applying(tx, repo).await? {
        let used = bytes_of(tx, &scope).await?;
        let high = used * 100 >= limit.saturating_mul(85);
        if high && !warned {
            tx.exec(
                "UPDATE quotas SET warned = TRUE WHERE target = $1",
                &[&target],
            )
            .await?;
            let detail = format!(
                "{} uses {} of its quota of {} ({}%)",
                shown(&target),
                human(to_u64(used)),
                human(to_u64(limit)),
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
            )
            .await?;
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
            )
            .await?;
        } else if !high && warned {
            tx.exec(
                "UPDATE quotas SET warned = FALSE WHERE target = $1",
                &[&target],
            )
            .await?;
        }
    }
    Ok(())
}

async fn size_of(tx: &Tx<'_>, digest: &str) -> Result<i64, MetaError> {
    Ok(tx
        .opt("SELECT size FROM blobs WHERE digest = $1", &[&digest])
        .await?
        .map_or(0, |r| r.get(0)))
}

/// Counts a link just made; refused with `Quota` (and so rolled back with the link) if
/// that takes the repository or its namespace past a quota.
pub(super) async fn charge(tx: &Tx<'_>, repo: &str, digest: &str) -> Result<(), MetaError> {
    let size = size_of(tx, digest).await?;
    let ns = namespace_of(repo);
    add(tx, &format!("repo:{repo}"), size, 1).await?;
    let n: i64 = tx
        .one(
            "INSERT INTO namespace_blobs (namespace, digest, links) VALUES ($1, $2, 1)
             ON CONFLICT (namespace, digest) DO UPDATE SET links = namespace_blobs.links + 1 RETURNING links",
            &[&ns, &digest],
        )
        .await?
        .get(0);
    if n == 1 {
        add(tx, &format!("ns:{ns}"), size, 1).await?;
    }
    check(tx, repo).await?;
    warn(tx, repo).await
}

/// Releases a link about to be removed.
pub(super) async fn release(tx: &Tx<'_>, repo: &str, digest: &str) -> Result<(), MetaError> {
    let size = size_of(tx, digest).await?;
    let ns = namespace_of(repo);
    add(tx, &format!("repo:{repo}"), -size, -1).await?;
    let left: Option<i64> = tx
        .opt(
            "UPDATE namespace_blobs SET links = links - 1 WHERE namespace = $1 AND digest = $2 RETURNING links",
            &[&ns, &digest],
        )
        .await?
        .map(|r| r.get(0));
    if left == Some(0) {
        tx.exec(
            "DELETE FROM namespace_blobs WHERE namespace = $1 AND digest = $2",
            &[&ns, &digest],
        )
        .await?;
        add(tx, &format!("ns:{ns}"), -size, -1).await?;
    }
    warn(tx, repo).await
}

pub(super) async fn quota_set(
    tx: &Tx<'_>,
    target: &str,
    bytes: u64,
    by: Option<&str>,
) -> Result<(), MetaError> {
    tx.exec(
        "INSERT INTO quotas (target, bytes, created_at, created_by) VALUES ($1, $2, $3, $4)
         ON CONFLICT (target) DO UPDATE SET bytes = excluded.bytes, warned = FALSE",
        &[
            &target,
            &i64::try_from(bytes).unwrap_or(i64::MAX),
            &crate::time::now_ms(),
            &by,
        ],
    )
    .await?;
    Ok(())
}

pub(super) async fn quotas(meta: &PostgresMeta) -> Result<Vec<Quota>, MetaError> {
    Ok(meta
        .rows(
            "SELECT q.target, q.bytes, coalesce(u.bytes, 0) FROM quotas q
               LEFT JOIN usage u ON u.scope = CASE WHEN q.target LIKE '%/*'
                                                   THEN 'ns:' || left(q.target, -2)
                                                   ELSE 'repo:' || q.target END
              ORDER BY q.target",
            &[],
        )
        .await?
        .iter()
        .map(|r| Quota {
            target: r.get(0),
            bytes: to_u64(r.get(1)),
            used: to_u64(r.get(2)),
        })
        .collect())
}

/// The counters as kept, or recomputed from the links.
pub(super) async fn usage(
    meta: &PostgresMeta,
    recompute: bool,
) -> Result<Vec<UsageRow>, MetaError> {
    const KEPT: &str = "SELECT scope, bytes, blobs FROM usage WHERE blobs > 0 ORDER BY scope";
    const RECOMPUTED: &str = "SELECT scope, bytes, blobs FROM (
            SELECT 'ns:' || ns AS scope, sum(size)::bigint AS bytes, count(*) AS blobs FROM (
                SELECT DISTINCT split_part(l.repository, '/', 1) AS ns, b.digest, b.size
                  FROM repository_blobs l JOIN blobs b ON b.digest = l.digest) per_namespace
             GROUP BY ns
            UNION ALL
            SELECT 'repo:' || l.repository, sum(b.size)::bigint, count(*) FROM repository_blobs l
              JOIN blobs b ON b.digest = l.digest
             GROUP BY l.repository) counted
          ORDER BY scope";
    let rows = meta
        .rows(if recompute { RECOMPUTED } else { KEPT }, &[])
        .await?;
    let mut out: Vec<UsageRow> = rows
        .iter()
        .map(|r| UsageRow {
            scope: r.get(0),
            bytes: to_u64(r.get(1)),
            blobs: to_u64(r.get(2)),
        })
        .collect();
    // Both in byte order, whatever the database's collation (`usage.scope` has its own).
    out.sort_by(|a, b| a.scope.cmp(&b.scope));
    Ok(out)
}

/// Tags, manifests and the last push per repository.
pub(super) async fn contents(meta: &PostgresMeta) -> Result<Vec<RepoContents>, MetaError> {
    Ok(meta
        .rows(
            "SELECT p.name,
                    (SELECT count(*) FROM tags t WHERE t.repository = p.name),
                    (SELECT count(*) FROM manifests m WHERE m.repository = p.name),
                    (SELECT max(t.updated_at) FROM tags t WHERE t.repository = p.name)
               FROM repositories p ORDER BY p.name",
            &[],
        )
        .await?
        .iter()
        .map(|r| RepoContents {
            repository: r.get(0),
            tags: to_u64(r.get(1)),
            manifests: to_u64(r.get(2)),
            last_push: r.get(3),
        })
        .collect())
}
