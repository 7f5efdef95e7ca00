//! Garbage collection, repository deletes and referrer cleanup for [`SqliteMeta`]. Every
//! step is one short `BEGIN IMMEDIATE` transaction that re-checks its conditions, so it
//! serializes with every push, mount and delete (ARCHITECTURE.md, "Garbage collection").

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::sqlite::{Event, audit_row, check_mutable, load_policies, needed_by, record_event};
use super::{GcBlob, GcLink, GcManifest, GcPreview, GcRun, MetaError, RepoDeleted, Who};
use crate::time::now_ms;

/// A manifest given a tag: no longer untagged, nor condemned.
pub(super) fn mark_tagged(tx: &Transaction<'_>, repo: &str, digest: &str) -> Result<(), MetaError> {
    tx.prepare_cached(
        "UPDATE manifests SET untagged_at = NULL, condemned_at = NULL
          WHERE repository = ?1 AND digest = ?2 AND (untagged_at IS NOT NULL OR condemned_at IS NOT NULL)",
    )?
    .execute(params![repo, digest])?;
    Ok(())
}

/// Records when a manifest lost its last tag.
pub(super) fn mark_untagged_if_bare(
    tx: &Transaction<'_>,
    repo: &str,
    digest: &str,
    now: i64,
) -> Result<(), MetaError> {
    tx.prepare_cached(
        "UPDATE manifests SET untagged_at = ?3 WHERE repository = ?1 AND digest = ?2
            AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repository = ?1 AND t.digest = ?2)",
    )?
    .execute(params![repo, digest, now])?;
    Ok(())
}

/// Tags deleted are remembered this long (they can be restored while their manifest is
/// kept; a condemned manifest is kept for gc_delay).
const DELETED_TAGS_KEPT_MS: i64 = 90 * 86_400_000;

pub(super) fn remember_deleted_tag(
    tx: &Transaction<'_>,
    repo: &str,
    tag: &str,
    digest: &str,
    by: Option<&str>,
    reason: &str,
    now: i64,
) -> Result<(), MetaError> {
    tx.prepare_cached(
        "INSERT INTO deleted_tags (repository, name, digest, deleted_at, by_whom, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![repo, tag, digest, now, by, reason])?;
    tx.prepare_cached("DELETE FROM deleted_tags WHERE deleted_at < ?1")?
        .execute(params![now - DELETED_TAGS_KEPT_MS])?;
    Ok(())
}

/// The actor of the events garbage collection writes.
pub(super) const GC_ACTOR: &str = "gc";

/// Whether the collector is deleting `digest`'s bytes.
pub(super) fn being_collected(conn: &Connection, digest: &str) -> Result<bool, MetaError> {
    Ok(conn
        .prepare_cached("SELECT deleting_at IS NOT NULL FROM blobs WHERE digest = ?1")?
        .query_row(params![digest], |r| r.get::<_, bool>(0))
        .optional()?
        .unwrap_or(false))
}

/// Deletes manifest `digest` of `repo` (its references and tags go by cascade) and writes
/// its `delete` event; false if it was not there.
pub(super) fn delete_manifest_row(
    tx: &Transaction<'_>,
    repo: &str,
    digest: &str,
    actor: Option<&str>,
    now: i64,
) -> Result<bool, MetaError> {
    let row: Option<(String, i64)> = tx
        .prepare_cached(
            "SELECT media_type, size FROM manifests WHERE repository = ?1 AND digest = ?2",
        )?
        .query_row(params![repo, digest], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((media_type, size)) = row else {
        return Ok(false);
    };
    tx.prepare_cached("DELETE FROM manifests WHERE repository = ?1 AND digest = ?2")?
        .execute(params![repo, digest])?;
    record_event(
        tx,
        &Event {
            action: "delete",
            repository: repo,
            tag: None,
            digest,
            media_type: Some(&media_type),
            size: Some(size),
            actor,
            at: now,
            ..Event::default()
        },
    )?;
    Ok(true)
}

/// Deletes the untagged referrers of `subject` in `repo`, and theirs, that no tag needs;
/// returns how many.
pub(super) fn delete_referrers(
    tx: &Transaction<'_>,
    repo: &str,
    subject: &str,
    actor: Option<&str>,
    now: i64,
) -> Result<u64, MetaError> {
    let mut work = vec![subject.to_owned()];
    let mut deleted = 0;
    while let Some(s) = work.pop() {
        let found: Vec<String> = tx
            .prepare_cached(
                "SELECT m.digest FROM manifests m WHERE m.repository = ?1 AND m.subject = ?2
                   AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repository = m.repository AND t.digest = m.digest)",
            )?
            .query_map(params![repo, s], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        for d in found {
            if needed_by(tx, repo, &d)?.is_some() {
                continue;
            }
            if delete_manifest_row(tx, repo, &d, actor, now)? {
                deleted += 1;
                work.push(d);
            }
        }
    }
    Ok(deleted)
}

pub(super) fn repository_delete(
    tx: &Transaction<'_>,
    repo: &str,
    by: &Who,
) -> Result<Option<RepoDeleted>, MetaError> {
    let exists = tx
        .prepare_cached("SELECT 1 FROM repositories WHERE name = ?1")?
        .exists(params![repo])?;
    if !exists {
        return Ok(None);
    }
    let policies = load_policies(tx)?;
    let tags: Vec<String> = tx
        .prepare_cached("SELECT name FROM tags WHERE repository = ?1 ORDER BY name")?
        .query_map(params![repo], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for t in &tags {
        check_mutable(tx, &policies, repo, t, None)?;
    }
    let manifests: Vec<String> = tx
        .prepare_cached("SELECT digest FROM manifests WHERE repository = ?1")?
        .query_map(params![repo], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let now = now_ms();
    for d in &manifests {
        delete_manifest_row(tx, repo, d, by.actor.as_deref(), now)?;
    }
    let linked: Vec<String> = tx
        .prepare_cached("SELECT digest FROM repository_blobs WHERE repository = ?1")?
        .query_map(params![repo], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for d in &linked {
        super::sqlite::unlink(tx, repo, d)?;
    }
    let links = linked.len();
    tx.execute("DELETE FROM repositories WHERE name = ?1", params![repo])?;
    let done = RepoDeleted {
        tags: tags.len() as u64,
        manifests: manifests.len() as u64,
        links: links as u64,
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
    )?;
    Ok(Some(done))
}

/// A repository link is garbage when no manifest of its repository references the blob
/// and it was last made or used before the cutoff.
const GARBAGE_LINKS: &str = "SELECT rb.repository, rb.digest, b.size FROM repository_blobs rb
     JOIN blobs b ON b.digest = rb.digest
     WHERE (rb.repository, rb.digest) > (?1, ?2) AND rb.touched_at < ?3
       AND NOT EXISTS (SELECT 1 FROM manifest_references r
                        WHERE r.repository = rb.repository AND r.child = rb.digest)
     ORDER BY rb.repository, rb.digest";

pub(super) fn sweep_links(
    tx: &Transaction<'_>,
    cutoff: i64,
    (mut repo, mut digest): (String, String),
    limit: u32,
) -> Result<Vec<GcLink>, MetaError> {
    let mut out = Vec::new();
    loop {
        let found: Vec<GcLink> = tx
            .prepare_cached(GARBAGE_LINKS)?
            .query_map(params![repo, digest, cutoff], |r| {
                Ok(GcLink {
                    repository: r.get(0)?,
                    digest: r.get(1)?,
                    size: r.get(2)?,
                })
            })?
            .take((limit as usize - out.len()).min(super::GC_BATCH as usize))
            .collect::<Result<_, _>>()?;
        let Some(last) = found.last() else {
            return Ok(out);
        };
        (repo, digest) = (last.repository.clone(), last.digest.clone());
        for l in &found {
            super::sqlite::unlink(tx, &l.repository, &l.digest)?;
        }
        out.extend(found);
        if out.len() >= limit as usize {
            return Ok(out);
        }
    }
}

/// Untagged manifests whose subject is not in their repository, that nothing references.
const ORPHAN_REFERRERS: &str = "SELECT m.repository, m.digest, m.size FROM manifests m
     WHERE m.subject IS NOT NULL AND m.created_at < ?1
       AND NOT EXISTS (SELECT 1 FROM manifests s WHERE s.repository = m.repository AND s.digest = m.subject)
       AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repository = m.repository AND t.digest = m.digest)
       AND NOT EXISTS (SELECT 1 FROM manifest_references r WHERE r.repository = m.repository AND r.child = m.digest)
     ORDER BY m.repository, m.digest";

pub(super) fn sweep_orphan_referrers(
    tx: &Transaction<'_>,
    cutoff: i64,
    limit: u32,
) -> Result<Vec<GcManifest>, MetaError> {
    let mut out = Vec::new();
    let now = now_ms();
    // A deleted referrer can leave its own referrers orphaned: repeat until none is left.
    loop {
        let found: Vec<GcManifest> = tx
            .prepare_cached(ORPHAN_REFERRERS)?
            .query_map(params![cutoff], |r| {
                Ok(GcManifest {
                    repository: r.get(0)?,
                    digest: r.get(1)?,
                    size: r.get(2)?,
                    reason: "orphan referrer".into(),
                })
            })?
            .take((limit as usize - out.len()).min(super::GC_BATCH as usize))
            .collect::<Result<_, _>>()?;
        if found.is_empty() {
            return Ok(out);
        }
        for m in &found {
            delete_manifest_row(tx, &m.repository, &m.digest, Some(GC_ACTOR), now)?;
        }
        out.extend(found);
        if out.len() >= limit as usize {
            return Ok(out);
        }
    }
}

/// Manifests retention condemned before the cutoff, still untagged and unreferenced.
/// Not one a deploy agent reports (it may have been deployed since it was condemned),
/// nor one pulled since.
const CONDEMNED: &str = "SELECT m.repository, m.digest, m.size FROM manifests m
     WHERE m.condemned_at IS NOT NULL AND m.condemned_at < ?1
       AND (m.pulled_at IS NULL OR m.pulled_at < m.condemned_at)
       AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repository = m.repository AND t.digest = m.digest)
       AND NOT EXISTS (SELECT 1 FROM manifest_references r WHERE r.repository = m.repository AND r.child = m.digest)
       AND NOT EXISTS (SELECT 1 FROM deployments d WHERE d.repository = m.repository AND d.digest = m.digest)
     ORDER BY m.repository, m.digest";

pub(super) fn sweep_condemned(
    tx: &Transaction<'_>,
    cutoff: i64,
    limit: u32,
) -> Result<Vec<GcManifest>, MetaError> {
    let now = now_ms();
    let found: Vec<GcManifest> = tx
        .prepare_cached(CONDEMNED)?
        .query_map(params![cutoff], |r| {
            Ok(GcManifest {
                repository: r.get(0)?,
                digest: r.get(1)?,
                size: r.get(2)?,
                reason: "retention".into(),
            })
        })?
        .take(limit as usize)
        .collect::<Result<_, _>>()?;
    for m in &found {
        // The platform manifests of a condemned index go with it: condemned as of the
        // same time, so the next query of this loop finds those nothing else needs.
        let (condemned_at, children): (i64, Vec<String>) = (
            tx.prepare_cached("SELECT condemned_at FROM manifests WHERE repository = ?1 AND digest = ?2")?
                .query_row(params![m.repository, m.digest], |r| r.get(0))?,
            tx.prepare_cached(
                "SELECT child FROM manifest_references WHERE repository = ?1 AND manifest = ?2 AND kind = 'manifest'",
            )?
            .query_map(params![m.repository, m.digest], |r| r.get(0))?
            .collect::<Result<_, _>>()?,
        );
        delete_manifest_row(tx, &m.repository, &m.digest, Some(GC_ACTOR), now)?;
        for c in children {
            tx.prepare_cached(
                "UPDATE manifests SET condemned_at = ?3 WHERE repository = ?1 AND digest = ?2 AND condemned_at IS NULL
                   AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repository = ?1 AND t.digest = ?2)",
            )?
            .execute(params![m.repository, c, condemned_at])?;
        }
    }
    Ok(found)
}

/// Blobs no repository links, no manifest references and no upload claims.
const GARBAGE_BLOBS: &str = "SELECT b.digest, b.size FROM blobs b
     WHERE b.digest > ?1 AND b.deleting_at IS NULL
       AND NOT EXISTS (SELECT 1 FROM repository_blobs rb WHERE rb.digest = b.digest)
       AND NOT EXISTS (SELECT 1 FROM manifest_references r WHERE r.child = b.digest)
       AND NOT EXISTS (SELECT 1 FROM uploads u WHERE u.digest = b.digest)
     ORDER BY b.digest";

pub(super) fn mark_blobs(
    tx: &Transaction<'_>,
    after: &str,
    limit: u32,
) -> Result<Vec<GcBlob>, MetaError> {
    let found: Vec<GcBlob> = tx
        .prepare_cached(GARBAGE_BLOBS)?
        .query_map(params![after], |r| {
            Ok(GcBlob {
                digest: r.get(0)?,
                size: r.get(1)?,
            })
        })?
        .take(limit as usize)
        .collect::<Result<_, _>>()?;
    let now = now_ms();
    let mut mark = tx.prepare_cached("UPDATE blobs SET deleting_at = ?2 WHERE digest = ?1")?;
    for b in &found {
        mark.execute(params![b.digest, now])?;
    }
    Ok(found)
}

pub(super) fn orphans(
    tx: &Transaction<'_>,
    found: Vec<GcBlob>,
    mark: bool,
) -> Result<Vec<GcBlob>, MetaError> {
    let now = now_ms();
    let mut out = Vec::new();
    for b in found {
        let known = tx
            .prepare_cached("SELECT 1 FROM blobs WHERE digest = ?1")?
            .exists(params![b.digest])?;
        let claimed = tx
            .prepare_cached("SELECT 1 FROM uploads WHERE digest = ?1")?
            .exists(params![b.digest])?;
        if known || claimed {
            continue;
        }
        if mark {
            tx.prepare_cached(
                "INSERT INTO blobs (digest, size, created_at, deleting_at) VALUES (?1, ?2, ?3, ?3)",
            )?
            .execute(params![b.digest, b.size, now])?;
        }
        out.push(b);
    }
    Ok(out)
}

/// Everything a real pass would do to the metadata, done in `tx` (which the caller
/// rolls back): so the dry run lists exactly what the pass removes.
pub(super) fn preview(
    tx: &Transaction<'_>,
    cutoff: i64,
    referrers: bool,
) -> Result<GcPreview, MetaError> {
    let mut manifests = sweep_condemned(tx, cutoff, u32::MAX)?;
    if referrers {
        manifests.extend(sweep_orphan_referrers(tx, cutoff, u32::MAX)?);
    }
    let links = sweep_links(tx, cutoff, Default::default(), u32::MAX)?;
    let blobs = mark_blobs(tx, "", u32::MAX)?;
    Ok(GcPreview {
        links,
        blobs,
        manifests,
    })
}

pub(super) fn marked(conn: &Connection) -> Result<Vec<GcBlob>, MetaError> {
    Ok(conn
        .prepare_cached(
            "SELECT digest, size FROM blobs WHERE deleting_at IS NOT NULL ORDER BY digest",
        )?
        .query_map([], |r| {
            Ok(GcBlob {
                digest: r.get(0)?,
                size: r.get(1)?,
            })
        })?
        .collect::<Result<_, _>>()?)
}

pub(super) fn forget(tx: &Transaction<'_>, digests: &[String]) -> Result<(), MetaError> {
    let mut del =
        tx.prepare_cached("DELETE FROM blobs WHERE digest = ?1 AND deleting_at IS NOT NULL")?;
    for d in digests {
        del.execute(params![d])?;
    }
    Ok(())
}

const EMPTY_REPOSITORIES: &str = "SELECT name FROM repositories p
     WHERE NOT EXISTS (SELECT 1 FROM manifests m WHERE m.repository = p.name)
       AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repository = p.name)
       AND NOT EXISTS (SELECT 1 FROM repository_blobs rb WHERE rb.repository = p.name)
       AND NOT EXISTS (SELECT 1 FROM uploads u WHERE u.repository = p.name)
     ORDER BY name";

pub(super) fn sweep_repositories(
    tx: &Transaction<'_>,
    dry_run: bool,
) -> Result<Vec<String>, MetaError> {
    let names: Vec<String> = tx
        .prepare_cached(EMPTY_REPOSITORIES)?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    if !dry_run {
        let mut del = tx.prepare_cached("DELETE FROM repositories WHERE name = ?1")?;
        for n in &names {
            del.execute(params![n])?;
        }
    }
    Ok(names)
}

pub(super) fn record(tx: &Transaction<'_>, run: &GcRun) -> Result<(), MetaError> {
    tx.execute(
        "INSERT INTO gc_runs (started_at, finished_at, dry_run, by_whom, links, blobs, bytes, manifests, uploads, repositories, error)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            run.started_at,
            run.finished_at,
            run.dry_run,
            run.by,
            run.links as i64,
            run.blobs as i64,
            run.bytes as i64,
            run.manifests as i64,
            run.uploads as i64,
            run.repositories as i64,
            run.error
        ],
    )?;
    // Runs are kept for a year of hourly passes at most.
    tx.execute(
        "DELETE FROM gc_runs WHERE id <= (SELECT max(id) FROM gc_runs) - 10000",
        [],
    )?;
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
        )?;
    }
    Ok(())
}

pub(super) fn runs(conn: &Connection, limit: u32) -> Result<Vec<GcRun>, MetaError> {
    Ok(conn
        .prepare_cached(
            "SELECT started_at, finished_at, dry_run, by_whom, links, blobs, bytes, manifests, uploads, repositories, error
             FROM gc_runs ORDER BY id DESC LIMIT ?1",
        )?
        .query_map(params![limit], |r| {
            Ok(GcRun {
                started_at: r.get(0)?,
                finished_at: r.get(1)?,
                dry_run: r.get(2)?,
                by: r.get(3)?,
                links: r.get::<_, i64>(4)? as u64,
                blobs: r.get::<_, i64>(5)? as u64,
                bytes: r.get::<_, i64>(6)? as u64,
                manifests: r.get::<_, i64>(7)? as u64,
                uploads: r.get::<_, i64>(8)? as u64,
                repositories: r.get::<_, i64>(9)? as u64,
                error: r.get(10)?,
            })
        })?
        .collect::<Result<_, _>>()?)
}
