//! `MetaStore` on PostgreSQL: the same rows and rules as `sqlite.rs`, each change in one
//! `SERIALIZABLE` transaction ([`serializable!`]), so that changes from any number of
//! replicas behave as if made one at a time, as SQLite's single writer makes them.

use async_trait::async_trait;
use bytes::Bytes;
use tokio_postgres::Row;

use super::super::sqlite::Event;
use super::super::{
    DeletedTag, Deployment, EventRecord, GcBlob, GcLink, GcManifest, GcPreview, GcRun, Link,
    ManifestRecord, MetaError, MetaStore, NewManifest, Quota, Referrer, RepoContents, RepoDeleted,
    TagOrder, TagRow, UntaggedManifest, UploadRow, UsageRow, Who, now_ms,
};
use super::super::{check_size, to_i64, to_u64};
use super::{PostgresMeta, Tx, gc, retention, serializable, usage};
use crate::oci::keyset::KeySet;
use crate::store::policy::TagPolicy;
use crate::store::retention::{Deletion, RepoState, RetentionRule};

fn record(r: &Row) -> ManifestRecord {
    ManifestRecord {
        digest: r.get(0),
        media_type: r.get(1),
        content: Bytes::from(r.get::<_, Vec<u8>>(2)),
    }
}

async fn ensure_repo(tx: &Tx<'_>, repo: &str, now: i64) -> Result<(), MetaError> {
    tx.exec(
        "INSERT INTO repositories (name, created_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        &[&repo, &now],
    )
    .await?;
    Ok(())
}

/// Links `digest` into `repo` (or marks an existing link used), charging a new link to
/// the usage counters: refused with `Quota` past a quota, which rolls the link back.
async fn link(tx: &Tx<'_>, repo: &str, digest: &str, now: i64) -> Result<(), MetaError> {
    ensure_repo(tx, repo, now).await?;
    let updated = tx
        .exec(
            "UPDATE repository_blobs SET touched_at = $3 WHERE repository = $1 AND digest = $2",
            &[&repo, &digest, &now],
        )
        .await?;
    if updated == 0 {
        tx.exec(
            "INSERT INTO repository_blobs (repository, digest, created_at, touched_at) VALUES ($1, $2, $3, $3)",
            &[&repo, &digest, &now],
        )
        .await?;
        usage::charge(tx, repo, digest).await?;
    }
    Ok(())
}

/// Removes `repo`'s link to `digest`, releasing it from the usage counters.
pub(super) async fn unlink(tx: &Tx<'_>, repo: &str, digest: &str) -> Result<(), MetaError> {
    let n = tx
        .exec(
            "DELETE FROM repository_blobs WHERE repository = $1 AND digest = $2",
            &[&repo, &digest],
        )
        .await?;
    if n > 0 {
        usage::release(tx, repo, digest).await?;
    }
    Ok(())
}

async fn linked_size(tx: &Tx<'_>, repo: &str, digest: &str) -> Result<Option<i64>, MetaError> {
    Ok(tx
        .opt(
            "SELECT b.size FROM repository_blobs l JOIN blobs b ON b.digest = l.digest
             WHERE l.repository = $1 AND l.digest = $2",
            &[&repo, &digest],
        )
        .await?
        .map(|r| r.get(0)))
}

async fn manifest_size(tx: &Tx<'_>, repo: &str, digest: &str) -> Result<Option<i64>, MetaError> {
    Ok(tx
        .opt(
            "SELECT size FROM manifests WHERE repository = $1 AND digest = $2",
            &[&repo, &digest],
        )
        .await?
        .map(|r| r.get(0)))
}

/// The columns [`event_row`] reads, from `events e`.
const EVENTS_AFTER: &str = "SELECT e.id, e.uuid, e.at, e.action, e.repository, e.tag, e.digest, e.media_type, e.size, e.actor, e.quota, e.detail
     FROM events e WHERE e.id > $1 ORDER BY e.id LIMIT $2";

pub(super) async fn record_event(tx: &Tx<'_>, e: &Event<'_>) -> Result<(), MetaError> {
    let uuid = uuid::Uuid::new_v4().to_string();
    tx.exec(
        "INSERT INTO events (uuid, at, action, repository, tag, digest, media_type, size, actor, quota, detail)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        &[
            &uuid,
            &e.at,
            &e.action,
            &e.repository,
            &e.tag,
            &e.digest,
            &e.media_type,
            &e.size,
            &e.actor,
            &e.quota,
            &e.detail,
        ],
    )
    .await?;
    Ok(())
}

/// The audit row of a change, in the change's transaction.
pub(super) async fn audit_row(
    tx: &Tx<'_>,
    action: &str,
    repo: &str,
    detail: &str,
    by: &Who,
    at: i64,
) -> Result<(), MetaError> {
    tx.exec(
        "INSERT INTO audit_log (at, actor, action, repository, detail, client, credential)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &at,
            &by.actor,
            &action,
            &repo,
            &detail,
            &by.client,
            &by.credential,
        ],
    )
    .await?;
    Ok(())
}

/// A tag of `repo` that needs `digest`: one on a manifest that references it, directly
/// or through indexes. Returns the tag and the tagged manifest.
pub(super) async fn needed_by(
    tx: &Tx<'_>,
    repo: &str,
    digest: &str,
) -> Result<Option<(String, String)>, MetaError> {
    Ok(tx
        .opt(
            "WITH RECURSIVE up(d) AS (
                SELECT manifest FROM manifest_references WHERE repository = $1 AND child = $2
                UNION
                SELECT r.manifest FROM manifest_references r JOIN up ON r.child = up.d
                 WHERE r.repository = $1
             )
             SELECT t.name, t.digest FROM tags t JOIN up ON t.digest = up.d
              WHERE t.repository = $1 ORDER BY t.name LIMIT 1",
            &[&repo, &digest],
        )
        .await?
        .map(|r| (r.get(0), r.get(1))))
}

/// Refuses a delete of `digest` (described as `what`) that would leave a tagged manifest
/// of `repo` incomplete, naming the tag, and the policy if one protects it.
async fn check_unneeded(
    tx: &Tx<'_>,
    repo: &str,
    digest: &str,
    what: String,
) -> Result<(), MetaError> {
    let Some((tag, manifest)) = needed_by(tx, repo, digest).await? else {
        return Ok(());
    };
    let policy = load_policies(tx)
        .await?
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

pub(super) async fn tag_digest(
    tx: &Tx<'_>,
    repo: &str,
    tag: &str,
) -> Result<Option<String>, MetaError> {
    Ok(tx
        .opt(
            "SELECT digest FROM tags WHERE repository = $1 AND name = $2",
            &[&repo, &tag],
        )
        .await?
        .map(|r| r.get(0)))
}

const POLICIES: &str =
    "SELECT id, repositories, tags, created_at, created_by FROM tag_policies ORDER BY id";

fn policy(r: &Row) -> TagPolicy {
    TagPolicy {
        id: r.get(0),
        repositories: r.get(1),
        tags: r
            .get::<_, String>(2)
            .split(',')
            .map(str::to_owned)
            .collect(),
        created_at: r.get(3),
        created_by: r.get(4),
    }
}

pub(super) async fn load_policies(tx: &Tx<'_>) -> Result<Vec<TagPolicy>, MetaError> {
    Ok(tx.rows(POLICIES, &[]).await?.iter().map(policy).collect())
}

/// Refuses to change `tag` of `repo` if it exists, an immutability policy covers it, and
/// the change is not a no-op (`keep` is the digest a re-push would leave it at).
pub(super) async fn check_mutable(
    tx: &Tx<'_>,
    policies: &[TagPolicy],
    repo: &str,
    tag: &str,
    keep: Option<&str>,
) -> Result<(), MetaError> {
    let Some(policy) = policies.iter().find(|p| p.locks(repo, tag)) else {
        return Ok(());
    };
    match tag_digest(tx, repo, tag).await? {
        Some(d) if Some(d.as_str()) != keep => Err(MetaError::Immutable {
            repository: repo.to_owned(),
            tag: tag.to_owned(),
            policy: policy.to_string(),
        }),
        _ => Ok(()),
    }
}

async fn manifest_put(tx: &Tx<'_>, repo: &str, m: &NewManifest) -> Result<(), MetaError> {
    let now = now_ms();
    // A repository or namespace over its quota takes no more manifests.
    usage::check(tx, repo).await?;
    for (digest, declared) in &m.blobs {
        let size = linked_size(tx, repo, digest)
            .await?
            .ok_or_else(|| MetaError::MissingBlob(digest.clone()))?;
        check_size(digest, *declared, size)?;
    }
    let mut child_kinds = Vec::with_capacity(m.children.len());
    for (digest, declared) in &m.children {
        // An index lists manifests; buildx's cache index lists blobs. Either counts.
        if let Some(size) = manifest_size(tx, repo, digest).await? {
            check_size(digest, *declared, size)?;
            child_kinds.push("manifest");
        } else if let Some(size) = linked_size(tx, repo, digest).await? {
            check_size(digest, *declared, size)?;
            child_kinds.push("blob");
        } else {
            return Err(MetaError::MissingManifest(digest.clone()));
        }
    }
    ensure_repo(tx, repo, now).await?;
    let size = to_i64(m.content.len() as u64);
    let stored = tx
        .exec(
            "INSERT INTO manifests (repository, digest, media_type, artifact_type, subject, annotations, size, content, created_at, untagged_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)
             ON CONFLICT (repository, digest) DO NOTHING",
            &[
                &repo,
                &m.digest,
                &m.media_type,
                &m.artifact_type,
                &m.subject,
                &m.annotations,
                &size,
                &&m.content[..],
                &now,
            ],
        )
        .await?;
    const REF: &str = "INSERT INTO manifest_references (repository, manifest, child, kind) VALUES ($1, $2, $3, $4)
         ON CONFLICT DO NOTHING";
    for (digest, _) in &m.blobs {
        tx.exec(REF, &[&repo, &m.digest, digest, &"blob"]).await?;
    }
    for ((digest, _), kind) in m.children.iter().zip(child_kinds) {
        tx.exec(REF, &[&repo, &m.digest, digest, &kind]).await?;
    }
    let new_manifest = stored > 0;
    let policies = if m.tags.is_empty() {
        Vec::new()
    } else {
        load_policies(tx).await?
    };
    fn event<'e>(
        repo: &'e str,
        m: &'e NewManifest,
        tag: Option<&'e str>,
        action: &'e str,
        now: i64,
    ) -> Event<'e> {
        Event {
            action,
            repository: repo,
            tag,
            digest: &m.digest,
            media_type: Some(&m.media_type),
            size: Some(to_i64(m.content.len() as u64)),
            actor: m.by.actor.as_deref(),
            at: now,
            ..Event::default()
        }
    }
    if new_manifest && m.tags.is_empty() {
        record_event(tx, &event(repo, m, None, "push", now)).await?;
    }
    let mut moved_from = Vec::new();
    for t in &m.tags {
        check_mutable(tx, &policies, repo, t, Some(&m.digest)).await?;
        let previous = tag_digest(tx, repo, t).await?;
        if let Some(p) = previous.as_ref().filter(|p| **p != m.digest) {
            moved_from.push(p.clone());
        }
        if new_manifest {
            record_event(tx, &event(repo, m, Some(t), "push", now)).await?;
        } else if previous.as_deref() != Some(m.digest.as_str()) {
            record_event(tx, &event(repo, m, Some(t), "tag", now)).await?;
        }
    }
    for t in &m.tags {
        tx.exec(
            "INSERT INTO tags (repository, name, digest, updated_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (repository, name) DO UPDATE SET digest = excluded.digest, updated_at = excluded.updated_at",
            &[&repo, t, &m.digest, &now],
        )
        .await?;
    }
    if !m.tags.is_empty() {
        gc::mark_tagged(tx, repo, &m.digest).await?;
    }
    for p in &moved_from {
        gc::mark_untagged_if_bare(tx, repo, p, now).await?;
    }
    let detail = if m.tags.is_empty() {
        m.digest.clone()
    } else {
        format!("{} {}", m.tags.join(","), m.digest)
    };
    audit_row(tx, "push", repo, &detail, &m.by, now).await
}

async fn tag_delete(tx: &Tx<'_>, repo: &str, tag: &str, by: &Who) -> Result<bool, MetaError> {
    check_mutable(tx, &load_policies(tx).await?, repo, tag, None).await?;
    let Some(digest) = tag_digest(tx, repo, tag).await? else {
        return Ok(false);
    };
    tx.exec(
        "DELETE FROM tags WHERE repository = $1 AND name = $2",
        &[&repo, &tag],
    )
    .await?;
    let now = now_ms();
    gc::mark_untagged_if_bare(tx, repo, &digest, now).await?;
    gc::remember_deleted_tag(tx, repo, tag, &digest, by.actor.as_deref(), "deleted", now).await?;
    audit_row(tx, "delete.tag", repo, &format!("{tag} {digest}"), by, now).await?;
    record_event(
        tx,
        &Event {
            action: "untag",
            repository: repo,
            tag: Some(tag),
            digest: &digest,
            actor: by.actor.as_deref(),
            at: now,
            ..Event::default()
        },
    )
    .await?;
    Ok(true)
}

async fn manifest_delete(
    tx: &Tx<'_>,
    repo: &str,
    digest: &str,
    by: &Who,
    referrers: bool,
) -> Result<bool, MetaError> {
    let policies = load_policies(tx).await?;
    if !policies.is_empty() {
        let tags: Vec<String> = tx
            .rows(
                "SELECT name FROM tags WHERE repository = $1 AND digest = $2",
                &[&repo, &digest],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for t in &tags {
            check_mutable(tx, &policies, repo, t, None).await?;
        }
    }
    if manifest_size(tx, repo, digest).await?.is_none() {
        return Ok(false);
    }
    check_unneeded(tx, repo, digest, format!("manifest {digest}")).await?;
    let now = now_ms();
    gc::delete_manifest_row(tx, repo, digest, by.actor.as_deref(), now).await?;
    let mut detail = digest.to_owned();
    if referrers {
        let n = gc::delete_referrers(tx, repo, digest, by.actor.as_deref(), now).await?;
        if n > 0 {
            detail = format!("{digest} and {n} referrers");
        }
    }
    audit_row(tx, "delete.manifest", repo, &detail, by, now).await?;
    Ok(true)
}

async fn deployments_report(
    tx: &Tx<'_>,
    agent: &str,
    stack: &str,
    rows: &[Deployment],
    by: &Who,
) -> Result<(), MetaError> {
    let now = now_ms();
    let reporter = by.actor.clone().unwrap_or_default();
    tx.exec(
        "DELETE FROM deployments WHERE agent = $1 AND stack = $2 AND reported_by = $3",
        &[&agent, &stack, &reporter],
    )
    .await?;
    // Reports of an agent that went quiet for 30 days (it reports hourly) are
    // forgotten; and one user's reports are bounded.
    tx.exec(
        "DELETE FROM deployments WHERE reported_at < $1",
        &[&(now - 30 * 86_400_000)],
    )
    .await?;
    let held: i64 = tx
        .one(
            "SELECT count(*) FROM deployments WHERE reported_by = $1",
            &[&reporter],
        )
        .await?
        .get(0);
    if held + rows.len() as i64 > super::super::MAX_DEPLOYMENTS_PER_REPORTER {
        return Err(MetaError::Limit(format!(
            "{reporter} already reports {held} deployments, the most one user may; forget old agents with `wharf deploys --forget`"
        )));
    }
    for r in rows {
        tx.exec(
            "INSERT INTO deployments (agent, stack, service, repository, digest, state, deployed_at, reported_at, reported_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (reported_by, agent, stack, service, digest) DO UPDATE SET state = excluded.state",
            &[
                &agent,
                &stack,
                &r.service,
                &r.repository,
                &r.digest,
                &r.state,
                &r.deployed_at,
                &now,
                &reporter,
            ],
        )
        .await?;
    }
    Ok(())
}

/// The catalog lists a repository only while it holds a manifest (see `sqlite.rs`).
const REPOSITORIES: &str = "SELECT name FROM repositories WHERE name > $1
       AND EXISTS (SELECT 1 FROM manifests m WHERE m.repository = repositories.name)
     ORDER BY name LIMIT $2";
/// Names in `[$1, $2)`, or `($1, ...` if `$4`, or `..., $2]` if `$5` (see [`bound`]).
const REPOSITORIES_RANGE: &str = "SELECT name FROM repositories
     WHERE name >= $1 AND (name > $1 OR NOT $4) AND name <= $2 AND (name < $2 OR $5)
       AND EXISTS (SELECT 1 FROM manifests m WHERE m.repository = repositories.name)
     ORDER BY name LIMIT $3";
const REPOSITORIES_FROM: &str = "SELECT name FROM repositories
     WHERE name >= $1 AND (name > $1 OR NOT $3)
       AND EXISTS (SELECT 1 FROM manifests m WHERE m.repository = repositories.name)
     ORDER BY name LIMIT $2";

/// A bound of a range of names, as PostgreSQL can take it. Its text cannot hold a NUL,
/// but bounds do: `a/b\0` is the first key after `a/b` (`oci::keyset`), and a client's
/// `last` may be anything. No name holds a NUL, so against names a bound `s\0...` (NUL
/// and anything after) compares as `s` with the bound made strict: `name >= s\0...`
/// is `name > s`, `name < s\0...` is `name <= s`, `name > s\0...` is `name > s`.
/// Returns the text before the first NUL, and whether one was cut.
fn bound(s: &str) -> (&str, bool) {
    match s.find('\0') {
        Some(i) => (&s[..i], true),
        None => (s, false),
    }
}

fn names(rows: Vec<Row>) -> Vec<String> {
    rows.iter().map(|r| r.get(0)).collect()
}

#[async_trait]
impl MetaStore for PostgresMeta {
    async fn link(&self, repo: &str, digest: &str) -> Result<Option<Link>, MetaError> {
        let rows = self
            .rows(
                "SELECT b.size, l.touched_at FROM repository_blobs l JOIN blobs b ON b.digest = l.digest
                 WHERE l.repository = $1 AND l.digest = $2",
                &[&repo, &digest],
            )
            .await?;
        Ok(rows.first().map(|r| Link {
            size: to_u64(r.get(0)),
            touched_at: r.get(1),
        }))
    }

    async fn touch_link(&self, repo: &str, digest: &str) -> Result<bool, MetaError> {
        serializable!(self, commit = true, foreground = true, |tx| {
            Ok(tx
                .exec(
                    "UPDATE repository_blobs SET touched_at = $3 WHERE repository = $1 AND digest = $2",
                    &[&repo, &digest, &now_ms()],
                )
                .await?
                > 0)
        })
    }

    async fn mount_blob(
        &self,
        repo: &str,
        from: &str,
        digest: &str,
        by: &Who,
    ) -> Result<Option<u64>, MetaError> {
        serializable!(self, commit = true, foreground = true, |tx| {
            let Some(size) = linked_size(tx, from, digest).await? else {
                return Ok(None);
            };
            let now = now_ms();
            if linked_size(tx, repo, digest).await?.is_none() {
                link(tx, repo, digest, now).await?;
                audit_row(tx, "mount", repo, &format!("{digest} from {from}"), by, now).await?;
            }
            Ok(Some(to_u64(size)))
        })
    }

    async fn unlink_blob(&self, repo: &str, digest: &str, by: &Who) -> Result<bool, MetaError> {
        serializable!(self, commit = true, foreground = true, |tx| {
            if linked_size(tx, repo, digest).await?.is_none() {
                return Ok(false);
            }
            check_unneeded(tx, repo, digest, format!("blob {digest}")).await?;
            unlink(tx, repo, digest).await?;
            audit_row(tx, "delete.blob", repo, digest, by, now_ms()).await?;
            Ok(true)
        })
    }

    async fn upload_create(&self, id: &str, repo: &str, monolithic: bool) -> Result<(), MetaError> {
        serializable!(self, commit = true, foreground = true, |tx| {
            let now = now_ms();
            let open: i64 = tx
                .one(
                    "SELECT count(*) FROM uploads WHERE repository = $1",
                    &[&repo],
                )
                .await?
                .get(0);
            if open >= super::super::MAX_OPEN_UPLOADS {
                return Err(MetaError::Limit(format!(
                    "{repo} has {open} uploads open, the most one repository may; finish or cancel some (idle ones end after 24 h)"
                )));
            }
            tx.exec(
                "INSERT INTO uploads (id, repository, size, created_at, updated_at, monolithic) VALUES ($1, $2, 0, $3, $3, $4)",
                &[&id, &repo, &now, &monolithic],
            )
            .await?;
            Ok(())
        })
    }

    async fn upload_get(&self, id: &str) -> Result<Option<UploadRow>, MetaError> {
        let rows = self
            .rows(
                "SELECT repository, size, digest FROM uploads WHERE id = $1",
                &[&id],
            )
            .await?;
        Ok(rows.first().map(|r| UploadRow {
            repository: r.get(0),
            size: to_u64(r.get(1)),
            digest: r.get(2),
        }))
    }

    async fn upload_set_size(&self, id: &str, from: u64, size: u64) -> Result<(), MetaError> {
        serializable!(self, commit = true, foreground = true, |tx| {
            let n = tx
                .exec(
                    "UPDATE uploads SET size = $3, updated_at = $4 WHERE id = $1 AND size = $2",
                    &[&id, &to_i64(from), &to_i64(size), &now_ms()],
                )
                .await?;
            if n == 0 {
                return Err(MetaError::Refused(format!(
                    "upload {id} changed while this write ran (or is gone); ask its status and resume"
                )));
            }
            Ok(())
        })
    }

    async fn upload_verified(&self, id: &str, digest: &str) -> Result<(), MetaError> {
        serializable!(self, commit = true, foreground = true, |tx| {
            if gc::being_collected(tx, digest).await? {
                return Err(MetaError::Collecting(digest.to_owned()));
            }
            let n = tx
                .exec(
                    "UPDATE uploads SET digest = $2, updated_at = $3 WHERE id = $1",
                    &[&id, &digest, &now_ms()],
                )
                .await?;
            // No row, no claim: the upload was cancelled or expired meanwhile, and its
            // bytes must not be put in place unclaimed.
            if n == 0 {
                return Err(MetaError::Refused(format!("upload {id} is gone")));
            }
            Ok(())
        })
    }

    async fn upload_lease(&self, id: &str, owner: &str, ms: i64) -> Result<bool, MetaError> {
        // Not foreground work for the collector's pacing: a slow upload renews its
        // lease every few seconds.
        serializable!(self, commit = true, foreground = false, |tx| {
            let now = now_ms();
            Ok(tx
                .exec(
                    "UPDATE uploads SET writer = $2, writer_until = $3
                      WHERE id = $1 AND (writer IS NULL OR writer = $2 OR writer_until < $4)",
                    &[&id, &owner, &now.saturating_add(ms), &now],
                )
                .await?
                > 0)
        })
    }

    async fn upload_release(&self, id: &str, owner: &str) -> Result<(), MetaError> {
        serializable!(self, commit = true, foreground = false, |tx| {
            tx.exec(
                "UPDATE uploads SET writer = NULL, writer_until = 0 WHERE id = $1 AND writer = $2",
                &[&id, &owner],
            )
            .await?;
            Ok(())
        })
    }

    async fn upload_delete(&self, id: &str) -> Result<bool, MetaError> {
        serializable!(self, commit = true, foreground = true, |tx| {
            Ok(tx.exec("DELETE FROM uploads WHERE id = $1", &[&id]).await? > 0)
        })
    }

    async fn uploads_idle_since(
        &self,
        before_ms: i64,
        monolithic_only: bool,
    ) -> Result<Vec<String>, MetaError> {
        Ok(names(
            self.rows(
                "SELECT id FROM uploads WHERE updated_at < $1 AND (monolithic OR NOT $2::boolean) AND writer_until < $3",
                &[&before_ms, &monolithic_only, &now_ms()],
            )
            .await?,
        ))
    }

    async fn upload_complete(
        &self,
        id: &str,
        repo: &str,
        digest: &str,
        size: u64,
    ) -> Result<(), MetaError> {
        serializable!(self, commit = true, foreground = true, |tx| {
            let now = now_ms();
            if gc::being_collected(tx, digest).await? {
                return Err(MetaError::Collecting(digest.to_owned()));
            }
            tx.exec(
                "INSERT INTO blobs (digest, size, created_at) VALUES ($1, $2, $3) ON CONFLICT (digest) DO NOTHING",
                &[&digest, &to_i64(size), &now],
            )
            .await?;
            link(tx, repo, digest, now).await?;
            tx.exec("DELETE FROM uploads WHERE id = $1", &[&id]).await?;
            Ok(())
        })
    }

    async fn manifest_put(&self, repo: &str, m: NewManifest) -> Result<(), MetaError> {
        serializable!(self, commit = true, foreground = true, |tx| {
            manifest_put(tx, repo, &m).await
        })
    }

    async fn manifest_by_digest(
        &self,
        repo: &str,
        digest: &str,
    ) -> Result<Option<ManifestRecord>, MetaError> {
        let rows = self
            .rows(
                "SELECT digest, media_type, content FROM manifests WHERE repository = $1 AND digest = $2",
                &[&repo, &digest],
            )
            .await?;
        Ok(rows.first().map(record))
    }

    async fn manifest_by_tag(
        &self,
        repo: &str,
        tag: &str,
    ) -> Result<Option<ManifestRecord>, MetaError> {
        let rows = self
            .rows(
                "SELECT m.digest, m.media_type, m.content FROM tags t
                 JOIN manifests m ON m.repository = t.repository AND m.digest = t.digest
                 WHERE t.repository = $1 AND t.name = $2",
                &[&repo, &tag],
            )
            .await?;
        Ok(rows.first().map(record))
    }

    async fn manifest_delete(
        &self,
        repo: &str,
        digest: &str,
        by: &Who,
        referrers: bool,
    ) -> Result<bool, MetaError> {
        serializable!(self, commit = true, foreground = true, |tx| {
            manifest_delete(tx, repo, digest, by, referrers).await
        })
    }

    async fn repository_delete(
        &self,
        repo: &str,
        by: &Who,
    ) -> Result<Option<RepoDeleted>, MetaError> {
        serializable!(self, commit = true, foreground = true, |tx| {
            gc::repository_delete(tx, repo, by).await
        })
    }

    async fn ready(&self) -> Result<(), MetaError> {
        self.ping().await
    }

    async fn gc_contended(&self) -> Result<bool, MetaError> {
        let row = self
            .rows("SELECT last_value, is_called FROM foreground_writes", &[])
            .await?;
        let now: (i64, bool) = row.first().map_or((0, false), |r| (r.get(0), r.get(1)));
        let mut seen = self.seen_writes.lock().expect("gc contention lock");
        let contended = *seen != Some(now);
        *seen = Some(now);
        Ok(contended)
    }

    async fn gc_preview(&self, cutoff_ms: i64, referrers: bool) -> Result<GcPreview, MetaError> {
        serializable!(self, commit = false, foreground = false, |tx| {
            gc::preview(tx, cutoff_ms, referrers).await
        })
    }

    async fn gc_sweep_links(
        &self,
        cutoff_ms: i64,
        after: (&str, &str),
        limit: u32,
    ) -> Result<Vec<GcLink>, MetaError> {
        serializable!(self, commit = true, foreground = false, |tx| {
            gc::sweep_links(tx, cutoff_ms, after, limit).await
        })
    }

    async fn gc_sweep_orphan_referrers(
        &self,
        cutoff_ms: i64,
        limit: u32,
    ) -> Result<Vec<GcManifest>, MetaError> {
        serializable!(self, commit = true, foreground = false, |tx| {
            gc::sweep_orphan_referrers(tx, cutoff_ms, limit).await
        })
    }

    async fn gc_mark_blobs(&self, after: &str, limit: u32) -> Result<Vec<GcBlob>, MetaError> {
        serializable!(self, commit = true, foreground = false, |tx| {
            gc::mark_blobs(tx, after, limit).await
        })
    }

    async fn gc_lease(&self, owner: &str, ms: i64) -> Result<bool, MetaError> {
        serializable!(self, commit = true, foreground = false, |tx| {
            let now = now_ms();
            let n = tx
                .exec(
                    "INSERT INTO gc_lease (id, owner, until) VALUES (1, $1, $2)
                     ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, until = excluded.until
                       WHERE gc_lease.owner = excluded.owner OR gc_lease.until < $3",
                    &[&owner, &now.saturating_add(ms), &now],
                )
                .await?;
            Ok(n > 0)
        })
    }

    async fn gc_release(&self, owner: &str) -> Result<(), MetaError> {
        serializable!(self, commit = true, foreground = false, |tx| {
            tx.exec("DELETE FROM gc_lease WHERE owner = $1", &[&owner])
                .await?;
            Ok(())
        })
    }

    async fn gc_unmark(&self, digests: Vec<String>) -> Result<(), MetaError> {
        serializable!(self, commit = true, foreground = false, |tx| {
            tx.exec(
                "UPDATE blobs SET deleting_at = NULL WHERE digest = ANY($1)",
                &[&digests],
            )
            .await?;
            Ok(())
        })
    }

    async fn gc_orphans(&self, found: Vec<GcBlob>, mark: bool) -> Result<Vec<GcBlob>, MetaError> {
        serializable!(self, commit = mark, foreground = false, |tx| {
            gc::orphans(tx, &found, mark).await
        })
    }

    async fn gc_marked(&self) -> Result<Vec<GcBlob>, MetaError> {
        Ok(self
            .rows(
                "SELECT digest, size FROM blobs WHERE deleting_at IS NOT NULL ORDER BY digest",
                &[],
            )
            .await?
            .iter()
            .map(|r| GcBlob {
                digest: r.get(0),
                size: r.get(1),
            })
            .collect())
    }

    async fn gc_forget(&self, digests: Vec<String>) -> Result<(), MetaError> {
        serializable!(self, commit = true, foreground = false, |tx| {
            tx.exec(
                "DELETE FROM blobs WHERE digest = ANY($1) AND deleting_at IS NOT NULL",
                &[&digests],
            )
            .await?;
            Ok(())
        })
    }

    async fn gc_sweep_repositories(&self, dry_run: bool) -> Result<Vec<String>, MetaError> {
        serializable!(self, commit = !dry_run, foreground = false, |tx| {
            gc::sweep_repositories(tx, dry_run).await
        })
    }

    async fn gc_sweep_condemned(
        &self,
        cutoff_ms: i64,
        limit: u32,
    ) -> Result<Vec<GcManifest>, MetaError> {
        serializable!(self, commit = true, foreground = false, |tx| {
            gc::sweep_condemned(tx, cutoff_ms, limit).await
        })
    }

    async fn gc_record(&self, run: &GcRun) -> Result<(), MetaError> {
        serializable!(self, commit = true, foreground = false, |tx| {
            gc::record(tx, run).await
        })
    }

    async fn retention_rule_add(
        &self,
        rule: &RetentionRule,
        by: Option<&str>,
    ) -> Result<i64, MetaError> {
        serializable!(self, commit = true, foreground = true, |tx| {
            retention::rule_add(tx, rule, by).await
        })
    }

    async fn retention_rules(&self) -> Result<Vec<RetentionRule>, MetaError> {
        retention::rules(self).await
    }

    async fn retention_rule_remove(&self, id: i64) -> Result<bool, MetaError> {
        serializable!(self, commit = true, foreground = true, |tx| {
            Ok(tx
                .exec("DELETE FROM retention_rules WHERE id = $1", &[&id])
                .await?
                > 0)
        })
    }

    async fn retention_state(&self, repo: &str) -> Result<RepoState, MetaError> {
        retention::state(self, repo).await
    }

    async fn retention_apply(
        &self,
        repo: &str,
        tags: Vec<Deletion>,
        condemn: Vec<Deletion>,
        by: &Who,
    ) -> Result<(u64, u64), MetaError> {
        serializable!(self, commit = true, foreground = true, |tx| {
            retention::apply(tx, repo, &tags, &condemn, by).await
        })
    }

    async fn bytes_freed(&self, items: Vec<(String, String)>) -> Result<Vec<u64>, MetaError> {
        retention::bytes_freed(self, &items).await
    }

    async fn deleted_tags(&self, repo: &str) -> Result<Vec<DeletedTag>, MetaError> {
        retention::deleted_tags(self, repo).await
    }

    async fn tag_restore(
        &self,
        repo: &str,
        tag: &str,
        digest: Option<&str>,
        by: &Who,
    ) -> Result<String, MetaError> {
        serializable!(self, commit = true, foreground = true, |tx| {
            retention::restore(tx, repo, tag, digest, by).await
        })
    }

    async fn untagged_manifests(&self, repo: &str) -> Result<Vec<UntaggedManifest>, MetaError> {
        retention::untagged(self, repo).await
    }

    async fn deployments_report(
        &self,
        agent: &str,
        stack: &str,
        rows: Vec<Deployment>,
        by: &Who,
    ) -> Result<(), MetaError> {
        serializable!(self, commit = true, foreground = true, |tx| {
            deployments_report(tx, agent, stack, &rows, by).await
        })
    }

    async fn deployments(&self) -> Result<Vec<Deployment>, MetaError> {
        Ok(self
            .rows(
                "SELECT agent, stack, service, repository, digest, state, deployed_at, reported_at, reported_by
                   FROM deployments ORDER BY agent, stack, service, state DESC, deployed_at DESC",
                &[],
            )
            .await?
            .iter()
            .map(|r| Deployment {
                agent: r.get(0),
                stack: r.get(1),
                service: r.get(2),
                repository: r.get(3),
                digest: r.get(4),
                state: r.get(5),
                deployed_at: r.get(6),
                reported_at: r.get(7),
                reported_by: r.get(8),
            })
            .collect())
    }

    async fn deployments_forget(&self, agent: &str, by: &Who) -> Result<u64, MetaError> {
        serializable!(self, commit = true, foreground = true, |tx| {
            let n = tx
                .exec("DELETE FROM deployments WHERE agent = $1", &[&agent])
                .await?;
            audit_row(
                tx,
                "deploys.forget",
                "",
                &format!("{agent}: {n} rows"),
                by,
                now_ms(),
            )
            .await?;
            Ok(n)
        })
    }

    async fn deployed_digests(&self, repo: &str) -> Result<Vec<String>, MetaError> {
        Ok(names(
            self.rows(
                "SELECT DISTINCT digest FROM deployments WHERE repository = $1",
                &[&repo],
            )
            .await?,
        ))
    }

    async fn quota_set(&self, target: &str, bytes: u64, by: Option<&str>) -> Result<(), MetaError> {
        serializable!(self, commit = true, foreground = true, |tx| {
            usage::quota_set(tx, target, bytes, by).await
        })
    }

    async fn quota_remove(&self, target: &str) -> Result<bool, MetaError> {
        serializable!(self, commit = true, foreground = true, |tx| {
            Ok(tx
                .exec("DELETE FROM quotas WHERE target = $1", &[&target])
                .await?
                > 0)
        })
    }

    async fn quotas(&self) -> Result<Vec<Quota>, MetaError> {
        usage::quotas(self).await
    }

    async fn usage(&self, recompute: bool) -> Result<Vec<UsageRow>, MetaError> {
        usage::usage(self, recompute).await
    }

    async fn usage_contents(&self) -> Result<Vec<RepoContents>, MetaError> {
        usage::contents(self).await
    }

    async fn record_pulls(&self, pulls: Vec<(String, String, i64)>) -> Result<(), MetaError> {
        serializable!(self, commit = true, foreground = true, |tx| {
            retention::record_pulls(tx, &pulls).await
        })
    }

    async fn gc_runs(&self, limit: u32) -> Result<Vec<GcRun>, MetaError> {
        gc::runs(self, limit).await
    }

    async fn tag_delete(&self, repo: &str, tag: &str, by: &Who) -> Result<bool, MetaError> {
        serializable!(self, commit = true, foreground = true, |tx| {
            tag_delete(tx, repo, tag, by).await
        })
    }

    async fn tags(
        &self,
        repo: &str,
        last: Option<&str>,
        limit: u32,
    ) -> Result<Option<Vec<String>>, MetaError> {
        // One statement, so one snapshot: a repository deleted meanwhile lists as absent.
        let rows = self
            .rows(
                "SELECT EXISTS (SELECT 1 FROM repositories WHERE name = $1),
                        ARRAY(SELECT name FROM tags WHERE repository = $1 AND name > $2 ORDER BY name LIMIT $3)",
                &[&repo, &bound(last.unwrap_or_default()).0, &i64::from(limit)],
            )
            .await?;
        let r = &rows[0];
        Ok(r.get::<_, bool>(0).then(|| r.get(1)))
    }

    async fn repositories(&self, last: Option<&str>, limit: u32) -> Result<Vec<String>, MetaError> {
        Ok(names(
            self.rows(
                REPOSITORIES,
                &[&bound(last.unwrap_or_default()).0, &i64::from(limit)],
            )
            .await?,
        ))
    }

    async fn repositories_in(
        &self,
        keys: &KeySet,
        last: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>, MetaError> {
        // As in sqlite.rs: one index range scan per range, each bounded by the page.
        let ranges = keys.ranges_after(last);
        let mut out = Vec::new();
        for (from, to) in &ranges {
            let want = i64::from(limit) - out.len() as i64;
            if want <= 0 {
                break;
            }
            let (from, after) = bound(from);
            let rows = match to.as_deref().map(bound) {
                Some((to, through)) => {
                    self.rows(REPOSITORIES_RANGE, &[&from, &to, &want, &after, &through])
                        .await?
                }
                None => {
                    self.rows(REPOSITORIES_FROM, &[&from, &want, &after])
                        .await?
                }
            };
            out.extend(names(rows));
        }
        Ok(out)
    }

    async fn referrers(&self, repo: &str, subject: &str) -> Result<Vec<Referrer>, MetaError> {
        Ok(self
            .rows(
                "SELECT digest, media_type, artifact_type, annotations, size FROM manifests
                 WHERE repository = $1 AND subject = $2 ORDER BY digest",
                &[&repo, &subject],
            )
            .await?
            .iter()
            .map(|r| Referrer {
                digest: r.get(0),
                media_type: r.get(1),
                artifact_type: r.get(2),
                annotations: r.get(3),
                size: r.get(4),
            })
            .collect())
    }

    async fn tag_page(
        &self,
        repo: &str,
        order: TagOrder,
        offset: u64,
        limit: u32,
    ) -> Result<Option<(u64, Vec<TagRow>)>, MetaError> {
        const PAGE: [&str; 4] = [
            "SELECT t.name, t.digest, m.media_type, m.content, t.updated_at FROM tags t
             JOIN manifests m ON m.repository = t.repository AND m.digest = t.digest
             WHERE t.repository = $1 ORDER BY t.updated_at DESC, t.name LIMIT $2 OFFSET $3",
            "SELECT t.name, t.digest, m.media_type, m.content, t.updated_at FROM tags t
             JOIN manifests m ON m.repository = t.repository AND m.digest = t.digest
             WHERE t.repository = $1 ORDER BY t.updated_at, t.name LIMIT $2 OFFSET $3",
            "SELECT t.name, t.digest, m.media_type, m.content, t.updated_at FROM tags t
             JOIN manifests m ON m.repository = t.repository AND m.digest = t.digest
             WHERE t.repository = $1 ORDER BY t.name LIMIT $2 OFFSET $3",
            "SELECT t.name, t.digest, m.media_type, m.content, t.updated_at FROM tags t
             JOIN manifests m ON m.repository = t.repository AND m.digest = t.digest
             WHERE t.repository = $1 ORDER BY t.name DESC LIMIT $2 OFFSET $3",
        ];
        let sql = PAGE[match order {
            TagOrder::NewestFirst => 0,
            TagOrder::OldestFirst => 1,
            TagOrder::Name => 2,
            TagOrder::NameDesc => 3,
        }];
        let head = self
            .rows(
                "SELECT EXISTS (SELECT 1 FROM repositories WHERE name = $1),
                        (SELECT count(*) FROM tags WHERE repository = $1)",
                &[&repo],
            )
            .await?;
        if !head[0].get::<_, bool>(0) {
            return Ok(None);
        }
        let count: i64 = head[0].get(1);
        let rows = self
            .rows(sql, &[&repo, &i64::from(limit), &to_i64(offset)])
            .await?;
        let page = rows
            .iter()
            .map(|r| TagRow {
                name: r.get(0),
                digest: r.get(1),
                media_type: r.get(2),
                content: Bytes::from(r.get::<_, Vec<u8>>(3)),
                updated_at: r.get(4),
            })
            .collect();
        Ok(Some((to_u64(count), page)))
    }

    async fn events_after(&self, after: i64, limit: u32) -> Result<Vec<EventRecord>, MetaError> {
        Ok(self
            .rows(EVENTS_AFTER, &[&after, &i64::from(limit)])
            .await?
            .iter()
            .map(|r| super::events::event(r, 0))
            .collect())
    }

    async fn policy_add(
        &self,
        repositories: &str,
        tags: &[String],
        by: Option<&str>,
    ) -> Result<i64, MetaError> {
        let tags = tags.join(",");
        serializable!(self, commit = true, foreground = true, |tx| {
            Ok(tx
                .one(
                    "INSERT INTO tag_policies (repositories, tags, created_at, created_by) VALUES ($1, $2, $3, $4) RETURNING id",
                    &[&repositories, &tags, &now_ms(), &by],
                )
                .await?
                .get(0))
        })
    }

    async fn policies(&self) -> Result<Vec<TagPolicy>, MetaError> {
        Ok(self.rows(POLICIES, &[]).await?.iter().map(policy).collect())
    }

    async fn policy_remove(&self, id: i64) -> Result<bool, MetaError> {
        serializable!(self, commit = true, foreground = true, |tx| {
            Ok(tx
                .exec("DELETE FROM tag_policies WHERE id = $1", &[&id])
                .await?
                > 0)
        })
    }

    async fn imported(
        &self,
        source: &str,
        repo: &str,
    ) -> Result<std::collections::HashMap<String, String>, MetaError> {
        Ok(self
            .rows(
                "SELECT item, digest FROM imports WHERE source = $1 AND repository = $2",
                &[&source, &repo],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    async fn imported_record(
        &self,
        source: &str,
        repo: &str,
        item: &str,
        digest: &str,
    ) -> Result<(), MetaError> {
        serializable!(self, commit = true, foreground = true, |tx| {
            tx.exec(
                "INSERT INTO imports (source, repository, item, digest, at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (source, repository, item) DO UPDATE SET digest = excluded.digest, at = excluded.at",
                &[&source, &repo, &item, &digest, &now_ms()],
            )
            .await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testdb;
    use super::*;

    async fn fresh() -> PostgresMeta {
        PostgresMeta::open(&testdb::database().await).await.unwrap()
    }

    #[tokio::test]
    async fn postgres_backend_passes_the_suite() {
        super::super::super::tests::suite(&fresh().await).await;
    }

    #[tokio::test]
    async fn postgres_backend_passes_the_gc_suite() {
        super::super::super::tests::gc_suite(&fresh().await).await;
    }

    #[tokio::test]
    async fn postgres_backend_passes_the_retention_suite() {
        super::super::super::tests::retention_suite(&fresh().await).await;
    }

    #[tokio::test]
    async fn postgres_backend_passes_the_usage_suite() {
        super::super::super::tests::usage_suite(&fresh().await).await;
    }

    #[tokio::test]
    async fn postgres_backend_passes_the_review_suite() {
        super::super::super::tests::review_suite(&fresh().await).await;
    }

    #[tokio::test]
    async fn postgres_backend_passes_the_gc_pacing_suite() {
        super::super::super::tests::gc_pacing_suite(&fresh().await).await;
    }
}
