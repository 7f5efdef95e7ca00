//! Garbage collection, repository deletes and referrer cleanup for [`PostgresMeta`]: the
//! steps of `sqlite_gc.rs`, each in one serializable transaction (see `registry.rs`).

use tokio_postgres::Row;

use super::super::sqlite::Event;
use super::super::{GcBlob, GcLink, GcManifest, GcPreview, GcRun, MetaError, RepoDeleted, Who};
use super::registry::{audit_row, check_mutable, load_policies, needed_by, record_event, unlink};
use super::{PostgresMeta, Tx};
use crate::time::now_ms;

/// The actor of the events garbage collection writes.
const GC_ACTOR: &str = "gc";

/// Tags deleted are remembered this long (as in `sqlite_gc.rs`).
const DELETED_TAGS_KEPT_MS: i64 = 90 * 86_400_000;

/// A manifest given a tag: no longer untagged, nor condemned.
pub(super) async fn mark_tagged(tx: &Tx<'_>, repo: &str, digest: &str) -> Result<(), MetaError> {
    tx.exec(
        "UPDATE manifests SET untagged_at = NULL, condemned_at = NULL
          WHERE repository = $1 AND digest = $2 AND (untagged_at IS NOT NULL OR condemned_at IS NOT NULL)",
        &[&repo, &digest],
    )
    .await?;
    Ok(())
}

/// Records when a manifest lost its last tag.
pub(super) async fn mark_untagged_if_bare(
    tx: &Tx<'_>,
    repo: &str,
    digest: &str,
    now: i64,
) -> Result<(), MetaError> {
    tx.exec(
        "UPDATE manifests SET untagged_at = $3 WHERE repository = $1 AND digest = $2
            AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repository = $1 AND t.digest = $2)",
        &[&repo, &digest, &now],
    )
    .await?;
    Ok(())
}

pub(super) async fn remember_deleted_tag(
    tx: &Tx<'_>,
    repo: &str,
    tag: &str,
    digest: &str,
    by: Option<&str>,
    reason: &str,
    now: i64,
) -> Result<(), MetaError> {
    tx.exec(
        "INSERT INTO deleted_tags (repository, name, digest, deleted_at, by_whom, reason) VALUES ($1, $2, $3, $4, $5, $6)",
        &[&repo, &tag, &digest, &now, &by, &reason],
    )
    .await?;
    tx.exec(
        "DELETE FROM deleted_tags WHERE deleted_at < $1",
        &[&(now - DELETED_TAGS_KEPT_MS)],
    )
    .await?;
    Ok(())
}

/// Whether the collector is deleting `digest`'s bytes.
pub(super) async fn being_collected(tx: &Tx<'_>, digest: &str) -> Result<bool, MetaError> {
    Ok(tx
        .opt(
            "SELECT deleting_at IS NOT NULL FROM blobs WHERE digest = $1",
            &[&digest],
        )
        .await?
        .is_some_and(|r| r.get::<_, bool>(0)))
}

/// Deletes manifest `digest` of `repo` (its references and tags go by cascade) and writes
/// its `delete` event; false if it was not there.
pub(super) async fn delete_manifest_row(
    tx: &Tx<'_>,
    repo: &str,
    digest: &str,
    actor: Option<&str>,
    now: i64,
) -> Result<bool, MetaError> {
    let Some(row) = tx
        .opt(
            "DELETE FROM manifests WHERE repository = $1 AND digest = $2 RETURNING media_type, size",
            &[&repo, &digest],
        )
        .await?
    else {
        return Ok(false);
    };
    let (media_type, size): (String, i64) = (row.get(0), row.get(1));
    record_event(
        tx,
        &Event {
            action: "delete",
            repository: repo,
            digest,
            media_type: Some(&media_type),
            size: Some(size),
            actor,
            at: now,
            ..Event::default()
        },
    )
    .await?;
    Ok(true)
}

/// Deletes the untagged referrers of `subject` in `repo`, and theirs, that no tag needs;
/// returns how many.
pub(super) async fn delete_referrers(
    tx: &Tx<'_>,
    repo: &str,
    subject: &str,
    actor: Option<&str>,
    now: i64,
) -> Result<u64, MetaError> {
    let mut work = vec![subject.to_owned()];
    let mut deleted = 0;
    while let Some(s) = work.pop() {
        let found: Vec<String> = tx
            .rows(
                "SELECT m.digest FROM manifests m WHERE m.repository = $1 AND m.subject = $2
                   AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repository = m.repository AND t.digest = m.digest)",
                &[&repo, &s],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for d in found {
            if needed_by(tx, repo, &d).await?.is_some() {
                continue;
            }
            if delete_manifest_row(tx, repo, &d, actor, now).await? {
                deleted += 1;
                work.push(d);
            }
        }
    }
    Ok(deleted)
}

fn strings(rows: &[Row]) -> Vec<String> {
    rows.iter().map(|r| r.get(0)).collect()
}

pub(super) async fn repository_delete(
    tx: &Tx<'_>,
    repo: &str,
    by: &Who,
) -> Result<Option<RepoDeleted>, MetaError> {
    if !tx
        .exists("SELECT 1 FROM repositories WHERE name = $1", &[&repo])
        .await?
    {
        return Ok(None);
    }
    let policies = load_policies(tx).await?;
    let tags = strings(
        &tx.rows(
            "SELECT name FROM tags WHERE repository = $1 ORDER BY name",
            &[&repo],
        )
        .await?,
    );
    for t in &tags {
        check_mutable(tx, &policies, repo, t, None).await?;
    }
    let manifests = strings(
        &tx.rows(
            "SELECT digest FROM manifests WHERE repository = $1",
            &[&repo],
        )
        .await?,
    );
    let now = now_ms();
    for d in &manifests {
        delete_manifest_row(tx, repo, d, by.actor.as_deref(), now).await?;
    }
    let linked = strings(
        &tx.rows(
            "SELECT digest FROM repository_blobs WHERE repository = $1",
            &[&repo],
        )
        .await?,
    );
    for d in &linked {
        unlink(tx, repo, d).await?;
    }
    tx.exec("DELETE FROM repositories WHERE name = $1", &[&repo])
        .await?;
    let done = RepoDeleted {
        tags: tags.len() as u64,
        manifests: manifests.len() as u64,
        links: linked.len() as u64,
    };
    audit_row(
        tx,
        "delete.repository",
        repo,
        &format!(
            "{} tags, {} manifests, {} blob links",
            done.tags, done.manifests, done.links
        ),
        by,
        now,
    )
    .await?;
    Ok(Some(done))
}

/// A repository link is garbage when no manifest of its repository references the blob
/// and it was last made or used before the cutoff.
const GARBAGE_LINKS: &str = "SELECT rb.repository, rb.digest, b.size FROM repository_blobs rb
     JOIN blobs b ON b.digest = rb.digest
     WHERE (rb.repository, rb.digest) > ($1, $2) AND rb.touched_at < $3
       AND NOT EXISTS (SELECT 1 FROM manifest_references r
                        WHERE r.repository = rb.repository AND r.child = rb.digest)
     ORDER BY rb.repository, rb.digest LIMIT $4";

pub(super) async fn sweep_links(
    tx: &Tx<'_>,
    cutoff: i64,
    (repo, digest): (&str, &str),
    limit: u32,
) -> Result<Vec<GcLink>, MetaError> {
    let (mut repo, mut digest) = (repo.to_owned(), digest.to_owned());
    let mut out = Vec::new();
    loop {
        let want = (limit as usize - out.len()).min(super::super::GC_BATCH as usize) as i64;
        let found: Vec<GcLink> = tx
            .rows(GARBAGE_LINKS, &[&repo, &digest, &cutoff, &want])
            .await?
            .iter()
            .map(|r| GcLink {
                repository: r.get(0),
                digest: r.get(1),
                size: r.get(2),
            })
            .collect();
        let Some(last) = found.last() else {
            return Ok(out);
        };
        (repo, digest) = (last.repository.clone(), last.digest.clone());
        for l in &found {
            unlink(tx, &l.repository, &l.digest).await?;
        }
        out.extend(found);
        if out.len() >= limit as usize {
            return Ok(out);
        }
    }
}

/// Untagged manifests whose subject is not in their repository, that nothing references.
const ORPHAN_REFERRERS: &str = "SELECT m.repository, m.digest, m.size FROM manifests m
     WHERE m.subject IS NOT NULL AND m.created_at < $1
       AND NOT EXISTS (SELECT 1 FROM manifests s WHERE s.repository = m.repository AND s.digest = m.subject)
       AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repository = m.repository AND t.digest = m.digest)
       AND NOT EXISTS (SELECT 1 FROM manifest_references r WHERE r.repository = m.repository AND r.child = m.digest)
     ORDER BY m.repository, m.digest LIMIT $2";

fn manifests(rows: &[Row], reason: &str) -> Vec<GcManifest> {
    rows.iter()
        .map(|r| GcManifest {
            repository: r.get(0),
            digest: r.get(1),
            size: r.get(2),
            reason: reason.into(),
        })
        .collect()
}

pub(super) async fn sweep_orphan_referrers(
    tx: &Tx<'_>,
    cutoff: i64,
    limit: u32,
) -> Result<Vec<GcManifest>, MetaError> {
    let mut out = Vec::new();
    let now = now_ms();
    // A deleted referrer can leave its own referrers orphaned: repeat until none is left.
    loop {
        let want = (limit as usize - out.len()).min(super::super::GC_BATCH as usize) as i64;
        let found = manifests(
            &tx.rows(ORPHAN_REFERRERS, &[&cutoff, &want]).await?,
            "orphan referrer",
        );
        if found.is_empty() {
            return Ok(out);
        }
        for m in &found {
            delete_manifest_row(tx, &m.repository, &m.digest, Some(GC_ACTOR), now).await?;
        }
        out.extend(found);
        if out.len() >= limit as usize {
            return Ok(out);
        }
    }
}

/// Manifests retention condemned before the cutoff, still untagged and unreferenced, not
/// reported deployed, and not pulled since.
const CONDEMNED: &str = "SELECT m.repository, m.digest, m.size FROM manifests m
     WHERE m.condemned_at IS NOT NULL AND m.condemned_at < $1
       AND (m.pulled_at IS NULL OR m.pulled_at < m.condemned_at)
       AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repository = m.repository AND t.digest = m.digest)
       AND NOT EXISTS (SELECT 1 FROM manifest_references r WHERE r.repository = m.repository AND r.child = m.digest)
       AND NOT EXISTS (SELECT 1 FROM deployments d WHERE d.repository = m.repository AND d.digest = m.digest)
     ORDER BY m.repository, m.digest LIMIT $2";

pub(super) async fn sweep_condemned(
    tx: &Tx<'_>,
    cutoff: i64,
    limit: u32,
) -> Result<Vec<GcManifest>, MetaError> {
    let now = now_ms();
    let found = manifests(
        &tx.rows(CONDEMNED, &[&cutoff, &i64::from(limit)]).await?,
        "retention",
    );
    for m in &found {
        // The platform manifests of a condemned index go with it (see `sqlite_gc.rs`).
        let condemned_at: i64 = tx
            .one(
                "SELECT condemned_at FROM manifests WHERE repository = $1 AND digest = $2",
                &[&m.repository, &m.digest],
            )
            .await?
            .get(0);
        let children = strings(
            &tx.rows(
                "SELECT child FROM manifest_references WHERE repository = $1 AND manifest = $2 AND kind = 'manifest'",
                &[&m.repository, &m.digest],
            )
            .await?,
        );
        delete_manifest_row(tx, &m.repository, &m.digest, Some(GC_ACTOR), now).await?;
        for c in children {
            tx.exec(
                "UPDATE manifests SET condemned_at = $3 WHERE repository = $1 AND digest = $2 AND condemned_at IS NULL
                   AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repository = $1 AND t.digest = $2)",
                &[&m.repository, &c, &condemned_at],
            )
            .await?;
        }
    }
    Ok(found)
}

/// Blobs no repository links, no manifest references and no upload claims.
const GARBAGE_BLOBS: &str = "SELECT b.digest, b.size FROM blobs b
     WHERE b.digest > $1 AND b.deleting_at IS NULL
       AND NOT EXISTS (SELECT 1 FROM repository_blobs rb WHERE rb.digest = b.digest)
       AND NOT EXISTS (SELECT 1 FROM manifest_references r WHERE r.child = b.digest)
       AND NOT EXISTS (SELECT 1 FROM uploads u WHERE u.digest = b.digest)
     ORDER BY b.digest LIMIT $2";

fn blobs(rows: &[Row]) -> Vec<GcBlob> {
    rows.iter()
        .map(|r| GcBlob {
            digest: r.get(0),
            size: r.get(1),
        })
        .collect()
}

pub(super) async fn mark_blobs(
    tx: &Tx<'_>,
    after: &str,
    limit: u32,
) -> Result<Vec<GcBlob>, MetaError> {
    let found = blobs(&tx.rows(GARBAGE_BLOBS, &[&after, &i64::from(limit)]).await?);
    let digests: Vec<&str> = found.iter().map(|b| b.digest.as_str()).collect();
    tx.exec(
        "UPDATE blobs SET deleting_at = $2 WHERE digest = ANY($1)",
        &[&digests, &now_ms()],
    )
    .await?;
    Ok(found)
}

pub(super) async fn orphans(
    tx: &Tx<'_>,
    found: &[GcBlob],
    mark: bool,
) -> Result<Vec<GcBlob>, MetaError> {
    let now = now_ms();
    let mut out = Vec::new();
    for b in found {
        let known = tx
            .exists("SELECT 1 FROM blobs WHERE digest = $1", &[&b.digest])
            .await?;
        let claimed = tx
            .exists("SELECT 1 FROM uploads WHERE digest = $1", &[&b.digest])
            .await?;
        if known || claimed {
            continue;
        }
        if mark {
            tx.exec(
                "INSERT INTO blobs (digest, size, created_at, deleting_at) VALUES ($1, $2, $3, $3)",
                &[&b.digest, &b.size, &now],
            )
            .await?;
        }
        out.push(b.clone());
    }
    Ok(out)
}

/// Everything a real pass would do to the metadata, done in `tx` (which the caller
/// rolls back): so the dry run lists exactly what the pass removes.
pub(super) async fn preview(
    tx: &Tx<'_>,
    cutoff: i64,
    referrers: bool,
) -> Result<GcPreview, MetaError> {
    let mut manifests = sweep_condemned(tx, cutoff, u32::MAX).await?;
    if referrers {
        manifests.extend(sweep_orphan_referrers(tx, cutoff, u32::MAX).await?);
    }
    let links = sweep_links(tx, cutoff, ("", ""), u32::MAX).await?;
    let blobs = mark_blobs(tx, "", u32::MAX).await?;
    Ok(GcPreview {
        links,
        blobs,
        manifests,
    })
}

const EMPTY_REPOSITORIES: &str = "SELECT name FROM repositories p
     WHERE NOT EXISTS (SELECT 1 FROM manifests m WHERE m.repository = p.name)
       AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repository = p.name)
       AND NOT EXISTS (SELECT 1 FROM repository_blobs rb WHERE rb.repository = p.name)
       AND NOT EXISTS (SELECT 1 FROM uploads u WHERE u.repository = p.name)
     ORDER BY name";

pub(super) async fn sweep_repositories(
    tx: &Tx<'_>,
    dry_run: bool,
) -> Result<Vec<String>, MetaError> {
    let names = strings(&tx.rows(EMPTY_REPOSITORIES, &[]).await?);
    if !dry_run {
        tx.exec("DELETE FROM repositories WHERE name = ANY($1)", &[&names])
            .await?;
    }
    Ok(names)
}

pub(super) async fn record(tx: &Tx<'_>, run: &GcRun) -> Result<(), MetaError> {
    tx.exec(
        "INSERT INTO gc_runs (started_at, finished_at, dry_run, by_whom, links, blobs, bytes, manifests, uploads, repositories, error)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        &[
            &run.started_at,
            &run.finished_at,
            &run.dry_run,
            &run.by,
            &(run.links as i64),
            &(run.blobs as i64),
            &(run.bytes as i64),
            &(run.manifests as i64),
            &(run.uploads as i64),
            &(run.repositories as i64),
            &run.error,
        ],
    )
    .await?;
    // Runs are kept for a year of hourly passes at most.
    tx.exec(
        "DELETE FROM gc_runs WHERE id <= (SELECT max(id) FROM gc_runs) - 10000",
        &[],
    )
    .await?;
    if !run.dry_run {
        audit_row(
            tx,
            "gc",
            "",
            &format!(
                "{} blobs ({} bytes), {} links, {} manifests, {} uploads, {} repositories{}",
                run.blobs,
                run.bytes,
                run.links,
                run.manifests,
                run.uploads,
                run.repositories,
                run.error
                    .as_ref()
                    .map(|e| format!("; failed: {e}"))
                    .unwrap_or_default()
            ),
            &Who {
                actor: Some(run.by.clone()),
                ..Who::default()
            },
            run.finished_at,
        )
        .await?;
    }
    Ok(())
}

pub(super) async fn runs(meta: &PostgresMeta, limit: u32) -> Result<Vec<GcRun>, MetaError> {
    Ok(meta
        .rows(
            "SELECT started_at, finished_at, dry_run, by_whom, links, blobs, bytes, manifests, uploads, repositories, error
             FROM gc_runs ORDER BY id DESC LIMIT $1",
            &[&i64::from(limit)],
        )
        .await?
        .iter()
        .map(|r| GcRun {
            started_at: r.get(0),
            finished_at: r.get(1),
            dry_run: r.get(2),
            by: r.get(3),
            links: r.get::<_, i64>(4) as u64,
            blobs: r.get::<_, i64>(5) as u64,
            bytes: r.get::<_, i64>(6) as u64,
            manifests: r.get::<_, i64>(7) as u64,
            uploads: r.get::<_, i64>(8) as u64,
            repositories: r.get::<_, i64>(9) as u64,
            error: r.get(10),
        })
        .collect())
}
