//! Retention rules, the planner's view of a repository, applying a plan, deleted tags
//! and their restore, and pull times, for [`SqliteMeta`].

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::sqlite::{Event, audit_row, check_mutable, load_policies, record_event};
use super::sqlite_gc::{mark_tagged, mark_untagged_if_bare, remember_deleted_tag};
use super::{DeletedTag, MetaError, Who};
use crate::store::retention::{Deletion, ManifestState, RepoState, RetentionRule, RuleAction};
use crate::time::now_ms;

pub(super) fn rule_add(
    tx: &Transaction<'_>,
    rule: &RetentionRule,
    by: Option<&str>,
) -> Result<i64, MetaError> {
    let (kind, tags, count, age) = rule.action.to_row();
    tx.execute(
        "INSERT INTO retention_rules (repositories, kind, tags, count, age_ms, created_at, created_by)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![rule.repositories, kind, tags, count, age, now_ms(), by],
    )?;
    Ok(tx.last_insert_rowid())
}

pub(super) fn rules(conn: &Connection) -> Result<Vec<RetentionRule>, MetaError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, repositories, kind, tags, count, age_ms FROM retention_rules ORDER BY id",
    )?;
    let rows = stmt.query_map([], |r| {
        let action = RuleAction::from_row(
            &r.get::<_, String>(2)?,
            &r.get::<_, String>(3)?,
            r.get(4)?,
            r.get(5)?,
        );
        Ok(RetentionRule {
            id: r.get(0)?,
            repositories: r.get(1)?,
            action,
            source: "cli".into(),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn state(conn: &Connection, repo: &str) -> Result<RepoState, MetaError> {
    let tags = conn
        .prepare_cached("SELECT name, digest, updated_at FROM tags WHERE repository = ?1")?
        .query_map(params![repo], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let manifests = conn
        .prepare_cached(
            "SELECT m.digest, m.untagged_at, m.pulled_at, m.condemned_at IS NOT NULL,
                    EXISTS (SELECT 1 FROM manifest_references r WHERE r.repository = m.repository AND r.child = m.digest)
                    OR (m.subject IS NOT NULL
                        AND EXISTS (SELECT 1 FROM manifests s WHERE s.repository = m.repository AND s.digest = m.subject))
               FROM manifests m WHERE m.repository = ?1",
        )?
        .query_map(params![repo], |r| {
            Ok(ManifestState {
                digest: r.get(0)?,
                untagged_at: r.get(1)?,
                pulled_at: r.get(2)?,
                condemned: r.get(3)?,
                referenced: r.get(4)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(RepoState { tags, manifests })
}

pub(super) fn apply(
    tx: &Transaction<'_>,
    repo: &str,
    tags: &[Deletion],
    condemn: &[Deletion],
    by: &Who,
) -> Result<(u64, u64), MetaError> {
    let now = now_ms();
    let policies = load_policies(tx)?;
    let mut deleted = 0;
    for d in tags {
        let Some(tag) = &d.tag else { continue };
        let current: Option<String> = tx
            .prepare_cached("SELECT digest FROM tags WHERE repository = ?1 AND name = ?2")?
            .query_row(params![repo, tag], |r| r.get(0))
            .optional()?;
        // Moved or gone since the plan, or protected now: left alone.
        if current.as_deref() != Some(d.digest.as_str())
            || check_mutable(tx, &policies, repo, tag, None).is_err()
        {
            continue;
        }
        tx.execute(
            "DELETE FROM tags WHERE repository = ?1 AND name = ?2",
            params![repo, tag],
        )?;
        mark_untagged_if_bare(tx, repo, &d.digest, now)?;
        remember_deleted_tag(tx, repo, tag, &d.digest, by.actor.as_deref(), &d.rule, now)?;
        audit_row(
            tx,
            "retention.delete.tag",
            repo,
            &format!("{tag} {} by {}", d.digest, d.rule),
            by,
            now,
        )?;
        record_event(
            tx,
            &Event {
                action: "untag",
                repository: repo,
                tag: Some(tag),
                digest: &d.digest,
                media_type: None,
                size: None,
                actor: by.actor.as_deref(),
                at: now,
                ..Event::default()
            },
        )?;
        deleted += 1;
    }
    let mut condemned = 0;
    for d in condemn {
        let n = tx
            .prepare_cached(
                "UPDATE manifests SET condemned_at = ?3 WHERE repository = ?1 AND digest = ?2
                   AND condemned_at IS NULL
                   AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repository = ?1 AND t.digest = ?2)
                   AND NOT EXISTS (SELECT 1 FROM manifest_references r WHERE r.repository = ?1 AND r.child = ?2)
                   AND NOT EXISTS (SELECT 1 FROM deployments x WHERE x.repository = ?1 AND x.digest = ?2)",
            )?
            .execute(params![repo, d.digest, now])?;
        if n > 0 {
            audit_row(
                tx,
                "retention.condemn",
                repo,
                &format!("{} by {}", d.digest, d.rule),
                by,
                now,
            )?;
            condemned += 1;
        }
    }
    Ok((deleted, condemned))
}

pub(super) fn bytes_freed(
    conn: &Connection,
    items: &[(String, String)],
) -> Result<Vec<u64>, MetaError> {
    use std::collections::{HashMap, HashSet};
    let mut children: Vec<Vec<(String, i64)>> = Vec::with_capacity(items.len());
    let mut in_set: HashMap<String, i64> = HashMap::new();
    for (repo, digest) in items {
        let c: Vec<(String, i64)> = conn
            .prepare_cached(
                "SELECT r.child, b.size FROM manifest_references r JOIN blobs b ON b.digest = r.child
                  WHERE r.repository = ?1 AND r.manifest = ?2 AND r.kind = 'blob'",
            )?
            .query_map(params![repo, digest], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        for (b, _) in &c {
            *in_set.entry(b.clone()).or_default() += 1;
        }
        children.push(c);
    }
    let mut counted: HashSet<String> = HashSet::new();
    let mut out = Vec::with_capacity(items.len());
    for c in children {
        let mut bytes = 0u64;
        for (b, size) in c {
            if counted.contains(&b) {
                continue;
            }
            let total: i64 = conn
                .prepare_cached("SELECT count(*) FROM manifest_references WHERE child = ?1")?
                .query_row(params![b], |r| r.get(0))?;
            if total == in_set.get(&b).copied().unwrap_or(0) {
                bytes += u64::try_from(size).unwrap_or(0);
            }
            counted.insert(b);
        }
        out.push(bytes);
    }
    Ok(out)
}

pub(super) fn deleted_tags(conn: &Connection, repo: &str) -> Result<Vec<DeletedTag>, MetaError> {
    Ok(conn
        .prepare_cached(
            "SELECT d.name, d.digest, d.deleted_at, d.by_whom, d.reason, m.condemned_at
               FROM deleted_tags d JOIN manifests m ON m.repository = d.repository AND m.digest = d.digest
              WHERE d.repository = ?1 ORDER BY d.deleted_at DESC, d.id DESC",
        )?
        .query_map(params![repo], |r| {
            Ok(DeletedTag {
                tag: r.get(0)?,
                digest: r.get(1)?,
                deleted_at: r.get(2)?,
                by: r.get(3)?,
                reason: r.get(4)?,
                condemned_at: r.get(5)?,
            })
        })?
        .collect::<Result<_, _>>()?)
}

pub(super) fn restore(
    tx: &Transaction<'_>,
    repo: &str,
    tag: &str,
    digest: Option<&str>,
    by: &Who,
) -> Result<String, MetaError> {
    if let Some(now_at) = tx
        .prepare_cached("SELECT digest FROM tags WHERE repository = ?1 AND name = ?2")?
        .query_row(params![repo, tag], |r| r.get::<_, String>(0))
        .optional()?
    {
        return Err(MetaError::Refused(format!(
            "{repo}:{tag} exists (at {now_at}); delete it first to restore the old one"
        )));
    }
    let known: Option<String> = tx
        .prepare_cached(
            "SELECT digest FROM deleted_tags WHERE repository = ?1 AND name = ?2 AND (?3 IS NULL OR digest = ?3)
              ORDER BY deleted_at DESC, id DESC LIMIT 1",
        )?
        .query_row(params![repo, tag, digest], |r| r.get(0))
        .optional()?;
    let Some(digest) = known else {
        return Err(MetaError::Refused(match digest {
            Some(d) => format!("{repo}:{tag} was never deleted from {d}"),
            None => format!("no deleted tag {repo}:{tag} is known"),
        }));
    };
    let stored = tx
        .prepare_cached("SELECT 1 FROM manifests WHERE repository = ?1 AND digest = ?2")?
        .exists(params![repo, digest])?;
    if !stored {
        return Err(MetaError::Refused(format!(
            "the manifest {digest} of {repo}:{tag} was garbage collected; it can no longer be restored"
        )));
    }
    // A tag stands only on a whole manifest: a layer or child deleted since the tag went
    // would make it an image that cannot be pulled.
    let missing: Option<String> = tx
        .prepare_cached(
            "SELECT r.child FROM manifest_references r WHERE r.repository = ?1 AND r.manifest = ?2
               AND ((r.kind = 'blob' AND NOT EXISTS (SELECT 1 FROM repository_blobs l WHERE l.repository = ?1 AND l.digest = r.child))
                 OR (r.kind = 'manifest' AND NOT EXISTS (SELECT 1 FROM manifests c WHERE c.repository = ?1 AND c.digest = r.child)))
             LIMIT 1",
        )?
        .query_row(params![repo, digest], |r| r.get(0))
        .optional()?;
    if let Some(m) = missing {
        return Err(MetaError::Refused(format!(
            "{repo}:{tag} cannot be restored: {m}, which its manifest {digest} needs, was deleted since"
        )));
    }
    let now = now_ms();
    tx.execute(
        "INSERT INTO tags (repository, name, digest, updated_at) VALUES (?1, ?2, ?3, ?4)",
        params![repo, tag, digest, now],
    )?;
    mark_tagged(tx, repo, &digest)?;
    tx.execute(
        "DELETE FROM deleted_tags WHERE repository = ?1 AND name = ?2 AND digest = ?3",
        params![repo, tag, digest],
    )?;
    audit_row(tx, "tag.restore", repo, &format!("{tag} {digest}"), by, now)?;
    record_event(
        tx,
        &Event {
            action: "tag",
            repository: repo,
            tag: Some(tag),
            digest: &digest,
            media_type: None,
            size: None,
            actor: by.actor.as_deref(),
            at: now,
            ..Event::default()
        },
    )?;
    Ok(digest)
}

pub(super) fn record_pulls(
    tx: &Transaction<'_>,
    pulls: &[(String, String, i64)],
) -> Result<(), MetaError> {
    let mut stmt = tx.prepare_cached(
        "UPDATE manifests SET pulled_at = ?3 WHERE repository = ?1 AND digest = ?2
           AND (pulled_at IS NULL OR pulled_at < ?3)",
    )?;
    for (repo, digest, at) in pulls {
        stmt.execute(params![repo, digest, at])?;
    }
    Ok(())
}

pub(super) fn untagged(
    conn: &Connection,
    repo: &str,
) -> Result<Vec<super::UntaggedManifest>, MetaError> {
    Ok(conn
        .prepare_cached(
            "SELECT m.digest, m.media_type, m.size, m.created_at, m.untagged_at, m.pulled_at,
                    EXISTS (SELECT 1 FROM manifest_references r WHERE r.repository = m.repository AND r.child = m.digest),
                    m.condemned_at, m.subject
               FROM manifests m WHERE m.repository = ?1
                AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repository = m.repository AND t.digest = m.digest)
              ORDER BY m.created_at, m.digest",
        )?
        .query_map(params![repo], |r| {
            Ok(super::UntaggedManifest {
                digest: r.get(0)?,
                media_type: r.get(1)?,
                size: r.get(2)?,
                created_at: r.get(3)?,
                untagged_at: r.get(4)?,
                pulled_at: r.get(5)?,
                referenced: r.get(6)?,
                condemned_at: r.get(7)?,
                subject: r.get(8)?,
            })
        })?
        .collect::<Result<_, _>>()?)
}
