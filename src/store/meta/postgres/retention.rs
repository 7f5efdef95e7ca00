//! Retention rules, the planner's view of a repository, applying a plan, deleted tags
//! and their restore, and pull times, for [`PostgresMeta`] (as `sqlite_retention.rs`).

use super::super::sqlite::Event;
use super::super::{DeletedTag, MetaError, UntaggedManifest, Who};
use super::gc::{mark_tagged, mark_untagged_if_bare, remember_deleted_tag};
use super::registry::{audit_row, check_mutable, load_policies, record_event, tag_digest};
use super::{PostgresMeta, Tx};
use crate::store::retention::{Deletion, ManifestState, RepoState, RetentionRule, RuleAction};
use crate::time::now_ms;

pub(super) async fn rule_add(
    tx: &Tx<'_>,
    rule: &RetentionRule,
    by: Option<&str>,
) -> Result<i64, MetaError> {
    let (kind, tags, count, age) = rule.action.to_row();
    Ok(tx
        .one(
            "INSERT INTO retention_rules (repositories, kind, tags, count, age_ms, created_at, created_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
            &[
                &rule.repositories,
                &kind,
                &tags,
                &i64::from(count),
                &age,
                &now_ms(),
                &by,
            ],
        )
        .await?
        .get(0))
}

pub(super) async fn rules(meta: &PostgresMeta) -> Result<Vec<RetentionRule>, MetaError> {
    let rows = meta
        .rows(
            "SELECT id, repositories, kind, tags, count, age_ms FROM retention_rules ORDER BY id",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let count = u32::try_from(r.get::<_, i64>(4)).unwrap_or(u32::MAX);
            let action = RuleAction::from_row(r.get(2), r.get(3), count, r.get(5));
            RetentionRule {
                id: r.get(0),
                repositories: r.get(1),
                action,
                source: "cli".into(),
            }
        })
        .collect())
}

pub(super) async fn state(meta: &PostgresMeta, repo: &str) -> Result<RepoState, MetaError> {
    let tags = meta
        .rows(
            "SELECT name, digest, updated_at FROM tags WHERE repository = $1",
            &[&repo],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let manifests = meta
        .rows(
            "SELECT m.digest, m.untagged_at, m.pulled_at, m.condemned_at IS NOT NULL,
                    EXISTS (SELECT 1 FROM manifest_references r WHERE r.repository = m.repository AND r.child = m.digest)
                    OR (m.subject IS NOT NULL
                        AND EXISTS (SELECT 1 FROM manifests s WHERE s.repository = m.repository AND s.digest = m.subject))
               FROM manifests m WHERE m.repository = $1",
            &[&repo],
        )
        .await?
        .iter()
        .map(|r| ManifestState {
            digest: r.get(0),
            untagged_at: r.get(1),
            pulled_at: r.get(2),
            condemned: r.get(3),
            referenced: r.get(4),
        })
        .collect();
    Ok(RepoState { tags, manifests })
}

pub(super) async fn apply(
    tx: &Tx<'_>,
    repo: &str,
    tags: &[Deletion],
    condemn: &[Deletion],
    by: &Who,
) -> Result<(u64, u64), MetaError> {
    let now = now_ms();
    let policies = load_policies(tx).await?;
    let mut deleted = 0;
    for d in tags {
        let Some(tag) = &d.tag else { continue };
        let current = tag_digest(tx, repo, tag).await?;
        // Moved or gone since the plan, or protected now: left alone.
        if current.as_deref() != Some(d.digest.as_str()) {
            continue;
        }
        match check_mutable(tx, &policies, repo, tag, None).await {
            Ok(()) => {}
            Err(MetaError::Immutable { .. }) => continue,
            Err(e) => return Err(e),
        }
        tx.exec(
            "DELETE FROM tags WHERE repository = $1 AND name = $2",
            &[&repo, tag],
        )
        .await?;
        mark_untagged_if_bare(tx, repo, &d.digest, now).await?;
        remember_deleted_tag(tx, repo, tag, &d.digest, by.actor.as_deref(), &d.rule, now).await?;
        audit_row(
            tx,
            "retention.delete.tag",
            repo,
            &format!("{tag} {} by {}", d.digest, d.rule),
            by,
            now,
        )
        .await?;
        record_event(
            tx,
            &Event {
                action: "untag",
                repository: repo,
                tag: Some(tag),
                digest: &d.digest,
                actor: by.actor.as_deref(),
                at: now,
                ..Event::default()
            },
        )
        .await?;
        deleted += 1;
    }
    let mut condemned = 0;
    for d in condemn {
        let n = tx
            .exec(
                "UPDATE manifests SET condemned_at = $3 WHERE repository = $1 AND digest = $2
                   AND condemned_at IS NULL
                   AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repository = $1 AND t.digest = $2)
                   AND NOT EXISTS (SELECT 1 FROM manifest_references r WHERE r.repository = $1 AND r.child = $2)
                   AND NOT EXISTS (SELECT 1 FROM deployments x WHERE x.repository = $1 AND x.digest = $2)",
                &[&repo, &d.digest, &now],
            )
            .await?;
        if n > 0 {
            audit_row(
                tx,
                "retention.condemn",
                repo,
                &format!("{} by {}", d.digest, d.rule),
                by,
                now,
            )
            .await?;
            condemned += 1;
        }
    }
    Ok((deleted, condemned))
}

pub(super) async fn bytes_freed(
    meta: &PostgresMeta,
    items: &[(String, String)],
) -> Result<Vec<u64>, MetaError> {
    use std::collections::{HashMap, HashSet};
    let mut children: Vec<Vec<(String, i64)>> = Vec::with_capacity(items.len());
    let mut in_set: HashMap<String, i64> = HashMap::new();
    for (repo, digest) in items {
        let c: Vec<(String, i64)> = meta
            .rows(
                "SELECT r.child, b.size FROM manifest_references r JOIN blobs b ON b.digest = r.child
                  WHERE r.repository = $1 AND r.manifest = $2 AND r.kind = 'blob'",
                &[repo, digest],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
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
            let total: i64 = meta
                .rows(
                    "SELECT count(*) FROM manifest_references WHERE child = $1",
                    &[&b],
                )
                .await?[0]
                .get(0);
            if total == in_set.get(&b).copied().unwrap_or(0) {
                bytes += u64::try_from(size).unwrap_or(0);
            }
            counted.insert(b);
        }
        out.push(bytes);
    }
    Ok(out)
}

pub(super) async fn deleted_tags(
    meta: &PostgresMeta,
    repo: &str,
) -> Result<Vec<DeletedTag>, MetaError> {
    Ok(meta
        .rows(
            "SELECT d.name, d.digest, d.deleted_at, d.by_whom, d.reason, m.condemned_at
               FROM deleted_tags d JOIN manifests m ON m.repository = d.repository AND m.digest = d.digest
              WHERE d.repository = $1 ORDER BY d.deleted_at DESC, d.id DESC",
            &[&repo],
        )
        .await?
        .iter()
        .map(|r| DeletedTag {
            tag: r.get(0),
            digest: r.get(1),
            deleted_at: r.get(2),
            by: r.get(3),
            reason: r.get(4),
            condemned_at: r.get(5),
        })
        .collect())
}

pub(super) async fn restore(
    tx: &Tx<'_>,
    repo: &str,
    tag: &str,
    digest: Option<&str>,
    by: &Who,
) -> Result<String, MetaError> {
    if let Some(now_at) = tag_digest(tx, repo, tag).await? {
        return Err(MetaError::Refused(format!(
            "{repo}:{tag} exists (at {now_at}); delete it first to restore the old one"
        )));
    }
    let known: Option<String> = tx
        .opt(
            "SELECT digest FROM deleted_tags WHERE repository = $1 AND name = $2 AND ($3::text IS NULL OR digest = $3)
              ORDER BY deleted_at DESC, id DESC LIMIT 1",
            &[&repo, &tag, &digest],
        )
        .await?
        .map(|r| r.get(0));
    let Some(found) = known else {
        return Err(MetaError::Refused(match digest {
            Some(d) => format!("{repo}:{tag} was never deleted from {d}"),
            None => format!("no deleted tag {repo}:{tag} is known"),
        }));
    };
    let digest = found;
    if !tx
        .exists(
            "SELECT 1 FROM manifests WHERE repository = $1 AND digest = $2",
            &[&repo, &digest],
        )
        .await?
    {
        return Err(MetaError::Refused(format!(
            "the manifest {digest} of {repo}:{tag} was garbage collected; it can no longer be restored"
        )));
    }
    // A tag stands only on a whole manifest (see `sqlite_retention.rs`).
    let missing: Option<String> = tx
        .opt(
            "SELECT r.child FROM manifest_references r WHERE r.repository = $1 AND r.manifest = $2
               AND ((r.kind = 'blob' AND NOT EXISTS (SELECT 1 FROM repository_blobs l WHERE l.repository = $1 AND l.digest = r.child))
                 OR (r.kind = 'manifest' AND NOT EXISTS (SELECT 1 FROM manifests c WHERE c.repository = $1 AND c.digest = r.child)))
             LIMIT 1",
            &[&repo, &digest],
        )
        .await?
        .map(|r| r.get(0));
    if let Some(m) = missing {
        return Err(MetaError::Refused(format!(
            "{repo}:{tag} cannot be restored: {m}, which its manifest {digest} needs, was deleted since"
        )));
    }
    let now = now_ms();
    tx.exec(
        "INSERT INTO tags (repository, name, digest, updated_at) VALUES ($1, $2, $3, $4)",
        &[&repo, &tag, &digest, &now],
    )
    .await?;
    mark_tagged(tx, repo, &digest).await?;
    tx.exec(
        "DELETE FROM deleted_tags WHERE repository = $1 AND name = $2 AND digest = $3",
        &[&repo, &tag, &digest],
    )
    .await?;
    audit_row(tx, "tag.restore", repo, &format!("{tag} {digest}"), by, now).await?;
    record_event(
        tx,
        &Event {
            action: "tag",
            repository: repo,
            tag: Some(tag),
            digest: &digest,
            actor: by.actor.as_deref(),
            at: now,
            ..Event::default()
        },
    )
    .await?;
    Ok(digest)
}

pub(super) async fn record_pulls(
    tx: &Tx<'_>,
    pulls: &[(String, String, i64)],
) -> Result<(), MetaError> {
    for (repo, digest, at) in pulls {
        tx.exec(
            "UPDATE manifests SET pulled_at = $3 WHERE repository = $1 AND digest = $2
               AND (pulled_at IS NULL OR pulled_at < $3)",
            &[repo, digest, at],
        )
        .await?;
    }
    Ok(())
}

pub(super) async fn untagged(
    meta: &PostgresMeta,
    repo: &str,
) -> Result<Vec<UntaggedManifest>, MetaError> {
    Ok(meta
        .rows(
            "SELECT m.digest, m.media_type, m.size, m.created_at, m.untagged_at, m.pulled_at,
                    EXISTS (SELECT 1 FROM manifest_references r WHERE r.repository = m.repository AND r.child = m.digest),
                    m.condemned_at, m.subject
               FROM manifests m WHERE m.repository = $1
                AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repository = m.repository AND t.digest = m.digest)
              ORDER BY m.created_at, m.digest",
            &[&repo],
        )
        .await?
        .iter()
        .map(|r| UntaggedManifest {
            digest: r.get(0),
            media_type: r.get(1),
            size: r.get(2),
            created_at: r.get(3),
            untagged_at: r.get(4),
            pulled_at: r.get(5),
            referenced: r.get(6),
            condemned_at: r.get(7),
            subject: r.get(8),
        })
        .collect())
}
