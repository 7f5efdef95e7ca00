//! Registry metadata: repositories, blob links, manifests, tags, references, uploads.
//! One trait, one test suite (`tests::suite`) every backend passes. SQLite is the embedded
//! default; a PostgreSQL backend implements the same trait over the same schema.

pub mod auth;
pub mod events;
pub mod postgres;
mod sqlite;
mod sqlite_auth;
mod sqlite_events;
mod sqlite_gc;
mod sqlite_retention;
mod sqlite_usage;
pub use sqlite_usage::{human as human_bytes, namespace_of};

use async_trait::async_trait;
use bytes::Bytes;

pub use sqlite::{SqliteMeta, now_ms};

use super::policy::TagPolicy;

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// A manifest references a blob the repository does not hold.
    #[error("blob {0} is not in the repository")]
    MissingBlob(String),
    /// An index references a manifest the repository does not hold.
    #[error("manifest {0} is not in the repository")]
    MissingManifest(String),
    #[error("descriptor of {digest} says {declared} bytes but the content has {actual}")]
    SizeMismatch {
        digest: String,
        declared: i64,
        actual: i64,
    },
    #[error("{0} already exists")]
    Conflict(String),
    /// A quota would be exceeded (the message names it and the figures).
    #[error("{0}")]
    Quota(String),
    /// A request that cannot be done as things are, with the reason.
    #[error("{0}")]
    Refused(String),
    /// A tag protected by an immutability policy would be moved or deleted.
    #[error("tag {tag:?} of {repository} cannot be changed: {policy}")]
    Immutable {
        repository: String,
        tag: String,
        policy: String,
    },
    /// A delete would leave a tagged manifest incomplete.
    #[error("{what} is needed by tag {tag:?} (manifest {manifest}){}; delete the tag first", policy.as_ref().map(|p| format!(", which {p} protects")).unwrap_or_default())]
    InUse {
        what: String,
        tag: String,
        manifest: String,
        policy: Option<String>,
    },
    #[error("the metadata database is busy")]
    Busy,
    /// Garbage collection is deleting this blob's bytes; an upload of it waits until they
    /// are gone, then stores them again.
    #[error("blob {0} is being garbage collected")]
    Collecting(String),
    /// A bound on what may be open at once (uploads of a repository) was reached.
    #[error("{0}")]
    Limit(String),
    /// The disk under the database is full.
    #[error("the metadata database's disk is full")]
    Full,
    /// The database cannot be reached or does not answer (the message says which);
    /// the request may succeed once it is back.
    #[error("{0}")]
    Unavailable(String),
    #[error("metadata database: {0}")]
    Db(String),
}

/// Refuses a descriptor whose size is not the content's.
pub(super) fn check_size(digest: &str, declared: i64, actual: i64) -> Result<(), MetaError> {
    if declared == actual {
        Ok(())
    } else {
        Err(MetaError::SizeMismatch {
            digest: digest.to_owned(),
            declared,
            actual,
        })
    }
}

/// A stored size as unsigned (never negative in practice).
pub(super) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A size to store.
pub(super) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Who makes a change: the actor of its event, and its audit row (written in the
/// transaction that makes the change, so a change is never made unrecorded).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Who {
    pub actor: Option<String>,
    /// `password` or a token's id.
    pub credential: Option<String>,
    pub client: Option<String>,
}

/// Deployment rows one user's reports may hold, at most.
pub const MAX_DEPLOYMENTS_PER_REPORTER: i64 = 10_000;

/// Uploads open at once in one repository, at most.
pub const MAX_OPEN_UPLOADS: i64 = 1000;

/// A stored manifest.
#[derive(Debug, Clone)]
pub struct ManifestRecord {
    pub digest: String,
    pub media_type: String,
    pub content: Bytes,
}

/// A manifest to store, with what it references and the tags to point at it.
#[derive(Debug, Clone)]
pub struct NewManifest {
    pub digest: String,
    pub media_type: String,
    pub artifact_type: Option<String>,
    pub subject: Option<String>,
    /// Annotations as a JSON object, for the referrers API.
    pub annotations: Option<String>,
    pub content: Bytes,
    pub blobs: Vec<(String, i64)>,
    /// Index entries: each must be a manifest or a blob of the repository.
    pub children: Vec<(String, i64)>,
    pub tags: Vec<String>,
    /// Who pushed it, for the event and the audit row it makes.
    pub by: Who,
}

/// A manifest whose `subject` is a given digest.
#[derive(Debug, Clone, PartialEq)]
pub struct Referrer {
    pub digest: String,
    pub media_type: String,
    pub artifact_type: Option<String>,
    pub annotations: Option<String>,
    pub size: i64,
}

/// A tag with its manifest, for the tag details listing.
#[derive(Debug, Clone)]
pub struct TagRow {
    pub name: String,
    pub digest: String,
    pub media_type: String,
    pub content: Bytes,
    /// When the tag was last pointed at a manifest (unix milliseconds).
    pub updated_at: i64,
}

/// A registry change, as the outbox records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    pub id: i64,
    /// The id receivers de-duplicate on.
    pub uuid: String,
    /// Unix milliseconds.
    pub at: i64,
    /// `push` (a new manifest, once per tag it was pushed with), `tag` (an existing
    /// manifest given a tag: a promotion or re-tag), `untag`, `delete` (a manifest),
    /// `quota` (a quota passed 85 %: `repository` is its target, `team/*` or a
    /// repository, `digest` is empty, `size` the bytes used and `quota` the limit).
    pub action: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: String,
    pub media_type: Option<String>,
    pub size: Option<i64>,
    pub actor: Option<String>,
    pub quota: Option<i64>,
    /// What a person reads (a quota warning's message).
    pub detail: Option<String>,
}

/// The order of a tag details listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagOrder {
    /// Most recently pushed first (Docker Hub's default).
    NewestFirst,
    OldestFirst,
    Name,
    NameDesc,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRow {
    pub repository: String,
    pub size: u64,
    /// The digest its bytes were verified to have, once they were (just before they are
    /// renamed into place).
    pub digest: Option<String>,
}

/// A repository's link to a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub size: u64,
    /// When the link was last made or used (unix milliseconds).
    pub touched_at: i64,
}

/// A link garbage collection removed (or, in a dry run, would remove).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GcLink {
    pub repository: String,
    pub digest: String,
    pub size: i64,
}

/// A blob garbage collection deletes (or would delete), with its size.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GcBlob {
    pub digest: String,
    pub size: i64,
}

/// A manifest garbage collection deleted (or would delete).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GcManifest {
    pub repository: String,
    pub digest: String,
    pub size: i64,
    /// Why: `orphan referrer` (its subject is gone), `retention` (condemned by a rule).
    pub reason: String,
}

/// What one pass removes, before it does: the dry run's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcPreview {
    pub links: Vec<GcLink>,
    /// Blobs left with no link, no reference and no upload claiming them once `links`
    /// are gone.
    pub blobs: Vec<GcBlob>,
    pub manifests: Vec<GcManifest>,
}

/// One recorded pass of the collector.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcRun {
    pub started_at: i64,
    pub finished_at: i64,
    pub dry_run: bool,
    /// `server` or `cli:<user>`.
    pub by: String,
    pub links: u64,
    pub blobs: u64,
    pub bytes: u64,
    pub manifests: u64,
    pub uploads: u64,
    pub repositories: u64,
    pub error: Option<String>,
}

/// A digest a deploy agent reports: running, or one of its last rollback targets.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Deployment {
    pub agent: String,
    pub stack: String,
    pub service: String,
    pub repository: String,
    pub digest: String,
    /// `running` or `previous`.
    pub state: String,
    /// Unix ms.
    pub deployed_at: i64,
    #[serde(default)]
    pub reported_at: i64,
    #[serde(default)]
    pub reported_by: Option<String>,
}

/// A quota and what its target uses now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Quota {
    /// `team/*` or a repository.
    pub target: String,
    pub bytes: u64,
    pub used: u64,
}

/// A usage counter: `ns:team` or `repo:team/api`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UsageRow {
    pub scope: String,
    pub bytes: u64,
    pub blobs: u64,
}

/// What a repository holds, for the usage report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RepoContents {
    pub repository: String,
    pub tags: u64,
    pub manifests: u64,
    /// When a tag was last pushed or moved (unix ms).
    pub last_push: Option<i64>,
}

/// A manifest with no tag.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UntaggedManifest {
    pub digest: String,
    pub media_type: String,
    pub size: i64,
    pub created_at: i64,
    pub untagged_at: Option<i64>,
    pub pulled_at: Option<i64>,
    /// Another manifest of the repository (an index) references it.
    pub referenced: bool,
    /// Retention condemned it (garbage collection deletes it after gc_delay).
    pub condemned_at: Option<i64>,
    /// The manifest it refers to, for a referrer.
    pub subject: Option<String>,
}

/// A deleted tag that can be restored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeletedTag {
    pub tag: String,
    pub digest: String,
    pub deleted_at: i64,
    pub by: Option<String>,
    /// `deleted` (by hand) or the retention rule that deleted it.
    pub reason: String,
    /// Set when retention condemned the manifest: garbage collection deletes it once
    /// this is older than gc_delay.
    pub condemned_at: Option<i64>,
}

/// What `repository_delete` removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepoDeleted {
    pub tags: u64,
    pub manifests: u64,
    pub links: u64,
}

/// Rows a garbage collection step handles per transaction, so that pushes and pulls
/// interleave with a long pass.
pub const GC_BATCH: u32 = 1000;

#[async_trait]
pub trait MetaStore: Send + Sync + 'static {
    /// `repo`'s link to the blob, if it has one.
    async fn link(&self, repo: &str, digest: &str) -> Result<Option<Link>, MetaError>;
    /// The blob's size if `repo` links it.
    async fn linked_blob(&self, repo: &str, digest: &str) -> Result<Option<u64>, MetaError> {
        Ok(self.link(repo, digest).await?.map(|l| l.size))
    }
    /// Marks `repo`'s link to the blob used now (so garbage collection leaves it for
    /// another `gc_delay`); false if there is no such link any more.
    async fn touch_link(&self, repo: &str, digest: &str) -> Result<bool, MetaError>;
    /// Links `digest` into `repo` if `from` links it; returns its size, or None. A mount
    /// reads across repositories, so it is audited (in its transaction).
    async fn mount_blob(
        &self,
        repo: &str,
        from: &str,
        digest: &str,
        by: &Who,
    ) -> Result<Option<u64>, MetaError>;
    /// Removes `repo`'s link to `digest`; false if there was none. Refused with
    /// `InUse` if a manifest reachable from a tag of `repo` references the blob.
    async fn unlink_blob(&self, repo: &str, digest: &str, by: &Who) -> Result<bool, MetaError>;

    /// Opens an upload; `monolithic` for a whole blob in one request, which no client can
    /// resume.
    async fn upload_create(&self, id: &str, repo: &str, monolithic: bool) -> Result<(), MetaError>;
    async fn upload_get(&self, id: &str) -> Result<Option<UploadRow>, MetaError>;
    /// Records that upload `id` now holds `size` bytes, if it still holds `from` (the
    /// size its write started at): refused with `Refused` otherwise (another write
    /// moved it meanwhile, or the upload is gone), so that of two writes that started at
    /// the same size only one counts.
    async fn upload_set_size(&self, id: &str, from: u64, size: u64) -> Result<(), MetaError>;
    /// Records that the upload's bytes have `digest`, before they become that blob: the
    /// upload's claim on the digest, which garbage collection respects. Refused with
    /// `Collecting` while the collector is deleting that blob's bytes.
    async fn upload_verified(&self, id: &str, digest: &str) -> Result<(), MetaError>;
    async fn upload_delete(&self, id: &str) -> Result<bool, MetaError>;
    /// Takes, or renews, the right to write upload `id` for `owner` (a replica) for `ms`:
    /// false if another owner holds it and it has not run out, or the upload is gone.
    async fn upload_lease(&self, id: &str, owner: &str, ms: i64) -> Result<bool, MetaError>;
    /// Gives up `owner`'s lease on upload `id`, if it holds it.
    async fn upload_release(&self, id: &str, owner: &str) -> Result<(), MetaError>;
    /// Ids of uploads last written before `before_ms` (unix milliseconds) that no one is
    /// writing now (no lease in force); only the monolithic ones if `monolithic_only`.
    async fn uploads_idle_since(
        &self,
        before_ms: i64,
        monolithic_only: bool,
    ) -> Result<Vec<String>, MetaError>;
    /// In one transaction: records the blob, links it into the upload's repository, and
    /// closes the upload.
    async fn upload_complete(
        &self,
        id: &str,
        repo: &str,
        digest: &str,
        size: u64,
    ) -> Result<(), MetaError>;

    /// In one transaction: checks every reference is present in the repository, stores the
    /// manifest and its references, and points its tags at it.
    async fn manifest_put(&self, repo: &str, m: NewManifest) -> Result<(), MetaError>;
    async fn manifest_by_digest(
        &self,
        repo: &str,
        digest: &str,
    ) -> Result<Option<ManifestRecord>, MetaError>;
    async fn manifest_by_tag(
        &self,
        repo: &str,
        tag: &str,
    ) -> Result<Option<ManifestRecord>, MetaError>;
    /// Deletes a manifest and every tag on it; false if it was not there. Refused with
    /// `InUse` if an index reachable from another tag references it. With `referrers`,
    /// its untagged referrers (manifests whose `subject` it is, and theirs) go with it.
    async fn manifest_delete(
        &self,
        repo: &str,
        digest: &str,
        by: &Who,
        referrers: bool,
    ) -> Result<bool, MetaError>;
    /// Deletes every tag, manifest and blob link of `repo`, and the repository; None if
    /// it does not exist. Refused with `Immutable` if a policy protects one of its tags.
    async fn repository_delete(
        &self,
        repo: &str,
        by: &Who,
    ) -> Result<Option<RepoDeleted>, MetaError>;

    /// Whether the database answers now (`/readyz`): an error says why not.
    async fn ready(&self) -> Result<(), MetaError>;

    // ---- garbage collection (ARCHITECTURE.md, "Garbage collection") ----

    /// Whether anything but the collector has committed since the last call (a push, a
    /// delete, another process): a pass rests between its batches while the registry is
    /// busy, and runs at full speed while it is idle.
    async fn gc_contended(&self) -> Result<bool, MetaError>;
    /// What a pass with links touched before `cutoff_ms` would remove.
    async fn gc_preview(&self, cutoff_ms: i64, referrers: bool) -> Result<GcPreview, MetaError>;
    /// Removes up to `limit` links touched before `cutoff_ms` that no manifest of their
    /// repository references, in (repository, digest) order after `after` (`("", "")`:
    /// from the start), so a pass in many small batches reads each link once.
    async fn gc_sweep_links(
        &self,
        cutoff_ms: i64,
        after: (&str, &str),
        limit: u32,
    ) -> Result<Vec<GcLink>, MetaError>;
    /// Deletes up to `limit` untagged manifests created before `cutoff_ms` whose subject
    /// is not in their repository (and that no tag needs).
    async fn gc_sweep_orphan_referrers(
        &self,
        cutoff_ms: i64,
        limit: u32,
    ) -> Result<Vec<GcManifest>, MetaError>;
    /// Marks up to `limit` blobs that no repository links, no manifest references and no
    /// upload claims as being deleted, and returns them. From then on nothing can link
    /// or claim them until [`MetaStore::gc_forget`] removes their rows.
    async fn gc_mark_blobs(&self, after: &str, limit: u32) -> Result<Vec<GcBlob>, MetaError>;
    /// Takes (or renews) the lease of the one pass that may run, for `ms`; false if
    /// another owner holds it and it has not run out.
    async fn gc_lease(&self, owner: &str, ms: i64) -> Result<bool, MetaError>;
    async fn gc_release(&self, owner: &str) -> Result<(), MetaError>;
    /// Clears the mark of blobs whose bytes could not be deleted (they are intact).
    async fn gc_unmark(&self, digests: Vec<String>) -> Result<(), MetaError>;
    /// Of blobs the backend holds (`found`), those with no row: with `mark`, a row
    /// marked as being deleted is made for each one no upload claims, and those are
    /// returned; without, those that would be.
    async fn gc_orphans(&self, found: Vec<GcBlob>, mark: bool) -> Result<Vec<GcBlob>, MetaError>;
    /// Blobs marked as being deleted (by this pass, or one a crash cut short).
    async fn gc_marked(&self) -> Result<Vec<GcBlob>, MetaError>;
    /// Removes the rows of marked blobs whose bytes are gone.
    async fn gc_forget(&self, digests: Vec<String>) -> Result<(), MetaError>;
    /// Removes repositories with no tag, manifest, link or open upload (or, with
    /// `dry_run`, lists them).
    async fn gc_sweep_repositories(&self, dry_run: bool) -> Result<Vec<String>, MetaError>;
    /// Deletes up to `limit` manifests retention condemned before `cutoff_ms` that are
    /// still untagged and referenced by no other manifest.
    async fn gc_sweep_condemned(
        &self,
        cutoff_ms: i64,
        limit: u32,
    ) -> Result<Vec<GcManifest>, MetaError>;
    async fn gc_record(&self, run: &GcRun) -> Result<(), MetaError>;
    /// After a batch of collection: lets the backend fold its write-ahead log into the
    /// database now, so that a request committing next does not pay for it.
    async fn gc_checkpoint(&self) -> Result<(), MetaError> {
        Ok(())
    }

    // ---- retention (store/retention.rs) ----

    async fn retention_rule_add(
        &self,
        rule: &crate::store::retention::RetentionRule,
        by: Option<&str>,
    ) -> Result<i64, MetaError>;
    async fn retention_rules(
        &self,
    ) -> Result<Vec<crate::store::retention::RetentionRule>, MetaError>;
    async fn retention_rule_remove(&self, id: i64) -> Result<bool, MetaError>;
    /// A repository's tags and manifests as the planner needs them.
    async fn retention_state(
        &self,
        repo: &str,
    ) -> Result<crate::store::retention::RepoState, MetaError>;
    /// In one transaction: deletes each planned tag still pointing at its planned digest
    /// (unless a policy now protects it), remembering it for restore, and condemns each
    /// planned manifest still untagged and unreferenced. Returns what it did.
    async fn retention_apply(
        &self,
        repo: &str,
        tags: Vec<crate::store::retention::Deletion>,
        condemn: Vec<crate::store::retention::Deletion>,
        by: &Who,
    ) -> Result<(u64, u64), MetaError>;
    /// For each manifest of `items` (repository, digest), the bytes of the blobs it
    /// references that no manifest outside `items` references (each blob counted once).
    async fn bytes_freed(&self, items: Vec<(String, String)>) -> Result<Vec<u64>, MetaError>;
    /// Tags of `repo` deleted whose manifest is still stored, newest first.
    async fn deleted_tags(&self, repo: &str) -> Result<Vec<DeletedTag>, MetaError>;
    /// Points `tag` back at the manifest it had when it was deleted (the latest such, or
    /// the one with `digest`). Errors name why it cannot be: the tag exists, the manifest
    /// is gone.
    async fn tag_restore(
        &self,
        repo: &str,
        tag: &str,
        digest: Option<&str>,
        by: &Who,
    ) -> Result<String, MetaError>;
    /// Manifests of `repo` with no tag (index children included, marked), oldest first.
    async fn untagged_manifests(&self, repo: &str) -> Result<Vec<UntaggedManifest>, MetaError>;
    // ---- deployments ----

    /// Replaces what `agent` reported for `stack` with `rows` (an empty list clears it).
    async fn deployments_report(
        &self,
        agent: &str,
        stack: &str,
        rows: Vec<Deployment>,
        by: &Who,
    ) -> Result<(), MetaError>;
    /// Everything reported, by agent, stack and service.
    async fn deployments(&self) -> Result<Vec<Deployment>, MetaError>;
    /// Forgets an agent's reports (one that was decommissioned); returns the rows removed.
    async fn deployments_forget(&self, agent: &str, by: &Who) -> Result<u64, MetaError>;
    /// The digests of `repo` some agent reports.
    async fn deployed_digests(&self, repo: &str) -> Result<Vec<String>, MetaError>;

    // ---- usage and quotas ----

    /// Sets the quota of `target` (`team/*` or a repository) to `bytes`.
    async fn quota_set(&self, target: &str, bytes: u64, by: Option<&str>) -> Result<(), MetaError>;
    async fn quota_remove(&self, target: &str) -> Result<bool, MetaError>;
    async fn quotas(&self) -> Result<Vec<Quota>, MetaError>;
    /// The usage counters as kept, and (`recompute`) as recomputed from the links.
    async fn usage(&self, recompute: bool) -> Result<Vec<UsageRow>, MetaError>;
    /// Per repository: tags, manifests, and the last push (unix ms).
    async fn usage_contents(&self) -> Result<Vec<RepoContents>, MetaError>;
    /// Records manifest pulls (repository, digest, unix ms) in one transaction.
    async fn record_pulls(&self, pulls: Vec<(String, String, i64)>) -> Result<(), MetaError>;
    /// The last `limit` passes, newest first.
    async fn gc_runs(&self, limit: u32) -> Result<Vec<GcRun>, MetaError>;
    async fn tag_delete(&self, repo: &str, tag: &str, by: &Who) -> Result<bool, MetaError>;

    /// Up to `limit` tags after `last`, sorted; None if the repository does not exist.
    async fn tags(
        &self,
        repo: &str,
        last: Option<&str>,
        limit: u32,
    ) -> Result<Option<Vec<String>>, MetaError>;
    /// Up to `limit` repository names after `last`, sorted.
    async fn repositories(&self, last: Option<&str>, limit: u32) -> Result<Vec<String>, MetaError>;
    /// Up to `limit` repository names in `keys` after `last`, sorted; the work is bounded
    /// by `limit` and the number of ranges, not by the number of repositories.
    async fn repositories_in(
        &self,
        keys: &crate::oci::keyset::KeySet,
        last: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>, MetaError>;
    async fn referrers(&self, repo: &str, subject: &str) -> Result<Vec<Referrer>, MetaError>;
    /// The number of tags and one page of them with their manifests; None if the
    /// repository does not exist.
    async fn tag_page(
        &self,
        repo: &str,
        order: TagOrder,
        offset: u64,
        limit: u32,
    ) -> Result<Option<(u64, Vec<TagRow>)>, MetaError>;

    /// Up to `limit` events with an id above `after`, oldest first.
    async fn events_after(&self, after: i64, limit: u32) -> Result<Vec<EventRecord>, MetaError>;

    /// Adds a tag immutability policy; returns its id.
    async fn policy_add(
        &self,
        repositories: &str,
        tags: &[String],
        by: Option<&str>,
    ) -> Result<i64, MetaError>;
    async fn policies(&self) -> Result<Vec<TagPolicy>, MetaError>;
    async fn policy_remove(&self, id: i64) -> Result<bool, MetaError>;

    // ---- imports (`store/import.rs`) ----

    /// The items (`tag:<name>`, `manifest:<digest>`) earlier imports from `source` brought
    /// into `repo`, with the digest each was brought at.
    async fn imported(
        &self,
        source: &str,
        repo: &str,
    ) -> Result<std::collections::HashMap<String, String>, MetaError>;
    /// Records that an import from `source` brought `item` of `repo` at `digest`.
    async fn imported_record(
        &self,
        source: &str,
        repo: &str,
        item: &str,
        digest: &str,
    ) -> Result<(), MetaError>;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn d(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    /// An image manifest record with no tag, for tests of other modules.
    pub(crate) fn tests_manifest(digest: String, blobs: Vec<(String, i64)>) -> NewManifest {
        manifest(digest, blobs, &[])
    }

    fn manifest(digest: String, blobs: Vec<(String, i64)>, tags: &[&str]) -> NewManifest {
        NewManifest {
            digest,
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            artifact_type: None,
            subject: None,
            annotations: None,
            content: Bytes::from_static(b"{}"),
            blobs,
            children: vec![],
            tags: tags.iter().map(|t| t.to_string()).collect(),
            by: Who {
                actor: Some("tester".into()),
                ..Who::default()
            },
        }
    }

    pub(crate) async fn suite(m: &dyn MetaStore) {
        // Uploads.
        m.upload_create("up1", "team/api", false).await.unwrap();
        assert_eq!(
            m.upload_get("up1").await.unwrap(),
            Some(UploadRow {
                repository: "team/api".into(),
                digest: None,
                size: 0
            })
        );
        m.upload_set_size("up1", 0, 10).await.unwrap();
        assert!(
            matches!(
                m.upload_set_size("up1", 0, 20).await,
                Err(MetaError::Refused(_))
            ),
            "a write that started at a size the upload no longer has does not count"
        );
        assert!(matches!(
            m.upload_set_size("gone", 0, 1).await,
            Err(MetaError::Refused(_))
        ));
        assert_eq!(m.upload_get("up1").await.unwrap().unwrap().size, 10);
        // An upload alone does not create the repository.
        assert_eq!(m.tags("team/api", None, 10).await.unwrap(), None);
        m.upload_complete("up1", "team/api", &d(1), 10)
            .await
            .unwrap();
        assert_eq!(m.upload_get("up1").await.unwrap(), None);
        assert_eq!(m.linked_blob("team/api", &d(1)).await.unwrap(), Some(10));
        assert_eq!(m.linked_blob("other", &d(1)).await.unwrap(), None);
        assert_eq!(m.tags("team/api", None, 10).await.unwrap(), Some(vec![]));

        // Mount needs a link in the source.
        assert_eq!(
            m.mount_blob("other", "nowhere", &d(1), &Who::default())
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            m.mount_blob("other", "team/api", &d(1), &Who::default())
                .await
                .unwrap(),
            Some(10)
        );
        assert_eq!(m.linked_blob("other", &d(1)).await.unwrap(), Some(10));

        // Manifests must find their blobs, with the right sizes.
        let e = m
            .manifest_put("team/api", manifest(d(9), vec![(d(2), 1)], &["x"]))
            .await;
        assert!(
            matches!(e, Err(MetaError::MissingBlob(ref b)) if *b == d(2)),
            "{e:?}"
        );
        let e = m
            .manifest_put("team/api", manifest(d(9), vec![(d(1), 11)], &["x"]))
            .await;
        assert!(matches!(e, Err(MetaError::SizeMismatch { .. })), "{e:?}");
        assert!(m.manifest_by_tag("team/api", "x").await.unwrap().is_none());
        m.manifest_put(
            "team/api",
            manifest(d(9), vec![(d(1), 10)], &["v1", "latest"]),
        )
        .await
        .unwrap();
        assert_eq!(
            m.manifest_by_tag("team/api", "latest")
                .await
                .unwrap()
                .unwrap()
                .digest,
            d(9)
        );
        assert!(
            m.manifest_by_digest("team/api", &d(9))
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            m.manifest_by_digest("other", &d(9))
                .await
                .unwrap()
                .is_none()
        );

        // An index needs its children in the same repository.
        let mut idx = manifest(d(10), vec![], &["multi"]);
        idx.media_type = "application/vnd.oci.image.index.v1+json".into();
        idx.children = vec![(d(9), 2)];
        assert!(matches!(
            m.manifest_put("other", idx.clone()).await,
            Err(MetaError::MissingManifest(_))
        ));
        m.manifest_put("team/api", idx).await.unwrap();

        // Referrers.
        let mut sig = manifest(d(11), vec![(d(1), 10)], &[]);
        sig.subject = Some(d(9));
        sig.artifact_type = Some("application/example".into());
        m.manifest_put("team/api", sig).await.unwrap();
        let r = m.referrers("team/api", &d(9)).await.unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].artifact_type.as_deref(), Some("application/example"));
        assert!(m.referrers("other", &d(9)).await.unwrap().is_empty());

        // The catalog lists repositories holding a manifest.
        assert_eq!(m.repositories(None, 10).await.unwrap(), vec!["team/api"]);
        m.manifest_put("other", manifest(d(77), vec![(d(1), 10)], &[]))
            .await
            .unwrap();
        // Tags: sorted, paginated.
        assert_eq!(
            m.tags("team/api", None, 10).await.unwrap().unwrap(),
            vec!["latest", "multi", "v1"]
        );
        assert_eq!(
            m.tags("team/api", Some("latest"), 1)
                .await
                .unwrap()
                .unwrap(),
            vec!["multi"]
        );
        assert_eq!(
            m.repositories(None, 10).await.unwrap(),
            vec!["other", "team/api"]
        );
        assert_eq!(
            m.repositories(Some("other"), 10).await.unwrap(),
            vec!["team/api"]
        );
        {
            use crate::oci::keyset::KeySet;
            let team = KeySet::prefix("team/");
            assert_eq!(
                m.repositories_in(&team, None, 10).await.unwrap(),
                ["team/api"]
            );
            assert!(
                m.repositories_in(&team, Some("team/api"), 10)
                    .await
                    .unwrap()
                    .is_empty()
            );
            let both = team.union(&KeySet::one("other"));
            assert_eq!(
                m.repositories_in(&both, None, 10).await.unwrap(),
                ["other", "team/api"]
            );
            assert_eq!(m.repositories_in(&both, None, 1).await.unwrap(), ["other"]);
            assert_eq!(
                m.repositories_in(&both, Some("other"), 5).await.unwrap(),
                ["team/api"]
            );
            assert!(
                m.repositories_in(&KeySet::empty(), None, 5)
                    .await
                    .unwrap()
                    .is_empty()
            );
            assert_eq!(
                m.repositories_in(&KeySet::all(), None, 5)
                    .await
                    .unwrap()
                    .len(),
                2
            );
        }

        // Deletes.
        assert!(
            m.tag_delete("team/api", "v1", &Who::default())
                .await
                .unwrap()
        );
        assert!(
            !m.tag_delete("team/api", "v1", &Who::default())
                .await
                .unwrap()
        );
        assert!(
            m.manifest_by_digest("team/api", &d(9))
                .await
                .unwrap()
                .is_some()
        );
        // Nothing a tag needs can go: d(9) is a child of the index tagged `multi`, and
        // blob d(1) is a layer of d(9).
        let e = m
            .manifest_delete("team/api", &d(9), &Who::default(), true)
            .await;
        assert!(
            matches!(&e, Err(MetaError::InUse { tag, manifest, .. }) if tag == "multi" && *manifest == d(10)),
            "{e:?}"
        );
        let e = m.unlink_blob("team/api", &d(1), &Who::default()).await;
        assert!(
            matches!(&e, Err(MetaError::InUse { tag, .. }) if tag == "latest"),
            "{e:?}"
        );
        assert!(m.linked_blob("team/api", &d(1)).await.unwrap().is_some());
        assert!(
            m.tag_delete("team/api", "multi", &Who::default())
                .await
                .unwrap()
        );
        // The manifest's own tags go with it.
        assert!(
            m.manifest_delete("team/api", &d(9), &Who::default(), true)
                .await
                .unwrap()
        );
        assert!(
            m.manifest_by_tag("team/api", "latest")
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            !m.manifest_delete("team/api", &d(9), &Who::default(), true)
                .await
                .unwrap()
        );
        // Only untagged manifests reference d(1) now.
        assert!(
            m.unlink_blob("team/api", &d(1), &Who::default())
                .await
                .unwrap()
        );
        assert!(
            m.unlink_blob("other", &d(1), &Who::default())
                .await
                .unwrap()
        );
        assert!(
            !m.unlink_blob("other", &d(1), &Who::default())
                .await
                .unwrap()
        );
        assert!(m.upload_create("up2", "x", false).await.is_ok());
        assert!(m.upload_create("up3", "x", true).await.is_ok());
        assert_eq!(
            m.uploads_idle_since(0, false).await.unwrap(),
            Vec::<String>::new()
        );
        let mut idle = m.uploads_idle_since(i64::MAX, false).await.unwrap();
        idle.sort();
        assert_eq!(idle, ["up2", "up3"]);
        assert_eq!(m.uploads_idle_since(i64::MAX, true).await.unwrap(), ["up3"]);
        m.upload_verified("up3", &d(3)).await.unwrap();
        assert_eq!(
            m.upload_get("up3").await.unwrap().unwrap().digest,
            Some(d(3))
        );
        // One writer at a time: the lease is renewed by its holder only, given up by
        // it only, taken over once run out; an upload being written is never idle.
        assert!(m.upload_lease("up2", "r1", 60_000).await.unwrap());
        assert!(
            m.upload_lease("up2", "r1", 60_000).await.unwrap(),
            "renewed"
        );
        assert!(!m.upload_lease("up2", "r2", 60_000).await.unwrap(), "held");
        assert_eq!(
            m.uploads_idle_since(i64::MAX, false).await.unwrap(),
            ["up3"]
        );
        m.upload_release("up2", "r2").await.unwrap();
        assert!(
            !m.upload_lease("up2", "r2", 60_000).await.unwrap(),
            "still held"
        );
        m.upload_release("up2", "r1").await.unwrap();
        assert!(m.upload_lease("up2", "r2", -1).await.unwrap(), "free");
        assert!(
            m.upload_lease("up2", "r1", 60_000).await.unwrap(),
            "ran out"
        );
        m.upload_release("up2", "r1").await.unwrap();
        assert!(!m.upload_lease("no-such", "r1", 60_000).await.unwrap());
        assert!(m.upload_delete("up3").await.unwrap());
        assert!(m.upload_delete("up2").await.unwrap());
        assert!(!m.upload_delete("up2").await.unwrap());

        // Tag details: count and pages with their manifests, in the asked order.
        m.manifest_put("pol/app", manifest(d(20), vec![], &["a", "b"]))
            .await
            .unwrap();
        m.manifest_put("pol/app", manifest(d(21), vec![], &["c"]))
            .await
            .unwrap();
        let (count, page) = m
            .tag_page("pol/app", TagOrder::Name, 1, 10)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(count, 3);
        let names: Vec<_> = page.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["b", "c"]);
        assert_eq!(page[1].digest, d(21));
        let (_, page) = m
            .tag_page("pol/app", TagOrder::NameDesc, 0, 1)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(page[0].name, "c");
        assert!(
            m.tag_page("nowhere", TagOrder::Name, 0, 1)
                .await
                .unwrap()
                .is_none()
        );

        // Immutability: a protected tag neither moves nor goes; a re-push of the same
        // manifest and unprotected tags are fine.
        let id = m
            .policy_add("pol/*", &["v*".into(), "[0-9]*".into()], Some("admin"))
            .await
            .unwrap();
        m.manifest_put("pol/app", manifest(d(20), vec![], &["1.0.0", "prod"]))
            .await
            .unwrap();
        m.manifest_put("pol/app", manifest(d(20), vec![], &["1.0.0"]))
            .await
            .unwrap();
        let e = m
            .manifest_put("pol/app", manifest(d(21), vec![], &["prod", "1.0.0"]))
            .await;
        assert!(
            matches!(e, Err(MetaError::Immutable { ref tag, .. }) if tag == "1.0.0"),
            "{e:?}"
        );
        // The failed push changed nothing, not even the movable tag it also named.
        assert_eq!(
            m.manifest_by_tag("pol/app", "prod")
                .await
                .unwrap()
                .unwrap()
                .digest,
            d(20)
        );
        m.manifest_put("pol/app", manifest(d(21), vec![], &["prod"]))
            .await
            .unwrap();
        assert!(matches!(
            m.tag_delete("pol/app", "1.0.0", &Who::default()).await,
            Err(MetaError::Immutable { .. })
        ));
        assert!(matches!(
            m.manifest_delete("pol/app", &d(20), &Who::default(), true)
                .await,
            Err(MetaError::Immutable { .. })
        ));
        assert!(
            m.tag_delete("pol/app", "prod", &Who::default())
                .await
                .unwrap()
        );
        let listed = m.policies().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].tags, ["v*", "[0-9]*"]);
        assert_eq!(listed[0].created_by.as_deref(), Some("admin"));
        assert!(m.policy_remove(id).await.unwrap());
        assert!(!m.policy_remove(id).await.unwrap());
        assert!(
            m.tag_delete("pol/app", "1.0.0", &Who::default())
                .await
                .unwrap()
        );

        // The outbox recorded each change of pol/app, in order, and nothing for the
        // refused pushes or the re-push that changed nothing.
        let events: Vec<_> = m
            .events_after(0, 1000)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.repository == "pol/app")
            .map(|e| (e.action, e.tag, e.digest))
            .collect();
        let ev = |a: &str, t: &str, n: u8| (a.to_owned(), Some(t.to_owned()), d(n));
        assert_eq!(
            events,
            vec![
                ev("push", "a", 20),
                ev("push", "b", 20),
                ev("push", "c", 21),
                ev("tag", "1.0.0", 20),
                ev("tag", "prod", 20),
                ev("tag", "prod", 21),
                ev("untag", "prod", 21),
                ev("untag", "1.0.0", 20),
            ]
        );
        let all = m.events_after(0, 1000).await.unwrap();
        assert!(all.windows(2).all(|w| w[0].id < w[1].id));
        assert!(all.iter().any(|e| e.action == "delete" && e.digest == d(9)));
        let first = &all[0];
        assert_eq!(first.actor.as_deref(), Some("tester"));
        assert_eq!(m.events_after(first.id, 1).await.unwrap()[0].id, all[1].id);
    }

    async fn blob_in(m: &dyn MetaStore, repo: &str, digest: &str, size: u64) {
        let id = format!("up-{repo}-{digest}");
        m.upload_create(&id, repo, false).await.unwrap();
        m.upload_verified(&id, digest).await.unwrap();
        m.upload_complete(&id, repo, digest, size).await.unwrap();
    }

    fn digests<T>(v: &[T], f: impl Fn(&T) -> String) -> Vec<String> {
        let mut out: Vec<String> = v.iter().map(f).collect();
        out.sort();
        out
    }

    /// A pass in small batches: the links cursor reads on from where the last batch
    /// ended, and the collector's own writes do not count as contention while everyone
    /// else's do. Every backend passes it.
    pub(crate) async fn gc_pacing_suite(m: &dyn MetaStore) {
        let later = now_ms() + 60_000;
        for n in 1..=3 {
            blob_in(m, "pace/a", &d(n), 10).await;
        }
        blob_in(m, "pace/b", &d(1), 10).await;
        assert!(m.gc_contended().await.unwrap(), "the uploads were writes");
        assert!(!m.gc_contended().await.unwrap(), "nothing wrote since");

        let mut after = (String::new(), String::new());
        let mut swept = Vec::new();
        loop {
            let batch = m
                .gc_sweep_links(later, (&after.0, &after.1), 2)
                .await
                .unwrap();
            assert!(batch.len() <= 2, "{batch:?}");
            let Some(last) = batch.last() else { break };
            after = (last.repository.clone(), last.digest.clone());
            swept.extend(batch.into_iter().map(|l| (l.repository, l.digest)));
        }
        let want = vec![
            ("pace/a".to_owned(), d(1)),
            ("pace/a".to_owned(), d(2)),
            ("pace/a".to_owned(), d(3)),
            ("pace/b".to_owned(), d(1)),
        ];
        assert_eq!(swept, want, "each link once, in order");
        let marked = m.gc_mark_blobs("", 100).await.unwrap();
        assert_eq!(marked.len(), 3);
        m.gc_forget(marked.into_iter().map(|b| b.digest).collect())
            .await
            .unwrap();
        assert!(m.gc_lease("pacer", 1000).await.unwrap());
        m.gc_release("pacer").await.unwrap();
        assert!(
            !m.gc_contended().await.unwrap(),
            "the collector's own writes are not contention"
        );

        // A cursor past everything finds nothing, even where garbage is left before it.
        blob_in(m, "pace/a", &d(4), 10).await;
        assert!(
            m.gc_sweep_links(later, ("pace/z", ""), 100)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(m.gc_contended().await.unwrap(), "an upload is contention");
        assert!(!m.gc_contended().await.unwrap());
        m.manifest_put("pace/a", manifest(d(60), vec![(d(4), 10)], &["t"]))
            .await
            .unwrap();
        assert!(
            m.gc_contended().await.unwrap(),
            "a manifest push is contention"
        );
    }

    /// Garbage collection, repository deletes and referrers: every backend passes it.
    pub(crate) async fn gc_suite(m: &dyn MetaStore) {
        let later = now_ms() + 60_000; // every link counts as unused for the delay
        let earlier = now_ms() - 3_600_000; // none does
        blob_in(m, "gc/a", &d(1), 10).await;
        blob_in(m, "gc/a", &d(2), 20).await;
        m.manifest_put("gc/a", manifest(d(50), vec![(d(1), 10)], &["t"]))
            .await
            .unwrap();

        // Links used within the delay stay; of the rest, only the unreferenced go.
        assert!(
            m.gc_sweep_links(earlier, ("", ""), 100)
                .await
                .unwrap()
                .is_empty()
        );
        let preview = m.gc_preview(later, true).await.unwrap();
        let swept = m.gc_sweep_links(later, ("", ""), 100).await.unwrap();
        assert_eq!(
            swept,
            vec![GcLink {
                repository: "gc/a".into(),
                digest: d(2),
                size: 20
            }]
        );
        assert_eq!(
            preview.links, swept,
            "the dry run lists what the pass removes"
        );
        assert_eq!(m.linked_blob("gc/a", &d(2)).await.unwrap(), None);
        assert!(m.link("gc/a", &d(1)).await.unwrap().is_some());

        // A blob nothing links, references or claims is marked; from then on no upload
        // can claim it and no mount can link it until its row is forgotten.
        let marked = m.gc_mark_blobs("", 100).await.unwrap();
        assert_eq!(
            marked,
            vec![GcBlob {
                digest: d(2),
                size: 20
            }]
        );
        assert_eq!(
            preview.blobs, marked,
            "the dry run lists what the pass removes"
        );
        assert!(m.gc_mark_blobs("", 100).await.unwrap().is_empty());
        m.upload_create("claim2", "gc/b", false).await.unwrap();
        assert!(matches!(
            m.upload_verified("claim2", &d(2)).await,
            Err(MetaError::Collecting(ref x)) if *x == d(2)
        ));
        assert_eq!(
            m.mount_blob("gc/b", "gc/a", &d(2), &Who::default())
                .await
                .unwrap(),
            None
        );
        assert_eq!(m.gc_marked().await.unwrap(), marked);
        m.gc_forget(vec![d(2)]).await.unwrap();
        assert!(m.gc_marked().await.unwrap().is_empty());
        // Once the bytes are gone the upload claims the digest and stores it again.
        m.upload_verified("claim2", &d(2)).await.unwrap();
        m.upload_complete("claim2", "gc/b", &d(2), 20)
            .await
            .unwrap();
        assert_eq!(m.linked_blob("gc/b", &d(2)).await.unwrap(), Some(20));

        // A digest an upload has claimed is never marked, even with no link.
        assert!(m.unlink_blob("gc/b", &d(2), &Who::default()).await.unwrap());
        m.upload_create("claim2b", "gc/c", false).await.unwrap();
        m.upload_verified("claim2b", &d(2)).await.unwrap();
        assert!(m.gc_mark_blobs("", 100).await.unwrap().is_empty());
        m.upload_complete("claim2b", "gc/c", &d(2), 20)
            .await
            .unwrap();

        // Touching a link keeps it; a link that is gone cannot be touched.
        assert!(m.touch_link("gc/c", &d(2)).await.unwrap());
        assert!(!m.touch_link("gc/c", &d(3)).await.unwrap());

        // Bytes with no row: listed, then marked, unless an upload claims them.
        let found = vec![
            GcBlob {
                digest: d(3),
                size: 3,
            },
            GcBlob {
                digest: d(1),
                size: 10,
            },
            GcBlob {
                digest: d(4),
                size: 4,
            },
        ];
        m.upload_create("claim4", "gc/c", false).await.unwrap();
        m.upload_verified("claim4", &d(4)).await.unwrap();
        let orphans = m.gc_orphans(found.clone(), false).await.unwrap();
        assert_eq!(digests(&orphans, |b| b.digest.clone()), vec![d(3)]);
        assert!(
            m.gc_marked().await.unwrap().is_empty(),
            "a look changes nothing"
        );
        assert_eq!(m.gc_orphans(found, true).await.unwrap(), orphans);
        assert!(matches!(
            m.upload_verified("claim4", &d(3)).await,
            Err(MetaError::Collecting(_))
        ));
        m.gc_forget(vec![d(3)]).await.unwrap();
        m.upload_delete("claim4").await.unwrap();

        // Referrers go with their subject when asked, unless tagged; a tagged one left
        // orphaned is collected once its tag goes.
        blob_in(m, "gc/r", &d(5), 5).await;
        m.manifest_put("gc/r", manifest(d(60), vec![(d(5), 5)], &[]))
            .await
            .unwrap();
        for (n, tags) in [(61u8, vec![]), (62, vec!["sig"])] {
            let mut r = manifest(d(n), vec![(d(5), 5)], &tags);
            r.subject = Some(d(60));
            m.manifest_put("gc/r", r).await.unwrap();
        }
        let mut rr = manifest(d(63), vec![(d(5), 5)], &[]);
        rr.subject = Some(d(61)); // a referrer of a referrer
        m.manifest_put("gc/r", rr).await.unwrap();
        assert!(
            m.manifest_delete("gc/r", &d(60), &Who::default(), true)
                .await
                .unwrap()
        );
        assert!(
            m.manifest_by_digest("gc/r", &d(61))
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            m.manifest_by_digest("gc/r", &d(63))
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            m.manifest_by_digest("gc/r", &d(62))
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            m.gc_sweep_orphan_referrers(later, 100)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(m.tag_delete("gc/r", "sig", &Who::default()).await.unwrap());
        assert!(
            m.gc_sweep_orphan_referrers(earlier, 100)
                .await
                .unwrap()
                .is_empty(),
            "an orphan younger than the delay stays (its subject may be on its way)"
        );
        let p = m.gc_preview(later, true).await.unwrap();
        let swept = m.gc_sweep_orphan_referrers(later, 100).await.unwrap();
        assert_eq!(digests(&swept, |x| x.digest.clone()), vec![d(62)]);
        assert_eq!(p.manifests, swept);
        // Without `referrers`, a deleted subject's referrers stay.
        m.manifest_put("gc/r", manifest(d(64), vec![(d(5), 5)], &[]))
            .await
            .unwrap();
        let mut r = manifest(d(65), vec![(d(5), 5)], &[]);
        r.subject = Some(d(64));
        m.manifest_put("gc/r", r).await.unwrap();
        assert!(
            m.manifest_delete("gc/r", &d(64), &Who::default(), false)
                .await
                .unwrap()
        );
        assert!(
            m.manifest_by_digest("gc/r", &d(65))
                .await
                .unwrap()
                .is_some()
        );

        // Deleting a repository takes its tags, manifests and links, and it leaves the
        // catalog; a policy on one of its tags refuses it.
        assert!(
            m.repositories(None, 100)
                .await
                .unwrap()
                .contains(&"gc/a".to_owned())
        );
        let done = m
            .repository_delete("gc/a", &Who::default())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((done.tags, done.manifests, done.links), (1, 1, 1));
        assert_eq!(m.tags("gc/a", None, 10).await.unwrap(), None);
        assert!(
            !m.repositories(None, 100)
                .await
                .unwrap()
                .contains(&"gc/a".to_owned())
        );
        assert!(
            m.repository_delete("gc/a", &Who::default())
                .await
                .unwrap()
                .is_none()
        );
        blob_in(m, "gc/p", &d(6), 6).await;
        m.manifest_put("gc/p", manifest(d(66), vec![(d(6), 6)], &["v1"]))
            .await
            .unwrap();
        let id = m
            .policy_add("gc/p", &["v*".to_owned()], None)
            .await
            .unwrap();
        assert!(matches!(
            m.repository_delete("gc/p", &Who::default()).await,
            Err(MetaError::Immutable { .. })
        ));
        assert!(m.manifest_by_tag("gc/p", "v1").await.unwrap().is_some());
        m.policy_remove(id).await.unwrap();

        // A repository with links but no manifest is not in the catalog; one with
        // nothing at all is removed by the sweep (a dry run only lists it).
        assert!(
            !m.repositories(None, 100)
                .await
                .unwrap()
                .contains(&"gc/c".to_owned())
        );
        assert!(m.unlink_blob("gc/c", &d(2), &Who::default()).await.unwrap());
        let empty = m.gc_sweep_repositories(true).await.unwrap();
        assert!(empty.contains(&"gc/c".to_owned()), "{empty:?}");
        assert_eq!(m.gc_sweep_repositories(false).await.unwrap(), empty);
        assert!(m.gc_sweep_repositories(true).await.unwrap().is_empty());

        // In the end everything unreferenced goes, and everything referenced stays.
        m.gc_sweep_links(later, ("", ""), 1000).await.unwrap();
        while !m.gc_mark_blobs("", 1).await.unwrap().is_empty() {}
        let left = digests(&m.gc_marked().await.unwrap(), |b| b.digest.clone());
        assert!(left.contains(&d(1)) && left.contains(&d(2)), "{left:?}");
        assert!(!left.contains(&d(5)) && !left.contains(&d(6)), "{left:?}");
        m.gc_forget(left).await.unwrap();

        // Passes are recorded, newest first.
        let run = GcRun {
            started_at: 1,
            finished_at: 2,
            by: "tester".into(),
            blobs: 3,
            bytes: 30,
            ..GcRun::default()
        };
        m.gc_record(&run).await.unwrap();
        m.gc_record(&GcRun {
            dry_run: true,
            ..run.clone()
        })
        .await
        .unwrap();
        let runs = m.gc_runs(10).await.unwrap();
        assert_eq!(runs.len(), 2);
        assert!(runs[0].dry_run && !runs[1].dry_run);
        assert_eq!(runs[1], run);
    }

    /// Retention's side of a backend: untagged times, applying a plan, restore, pulls,
    /// condemned manifests collected.
    pub(crate) async fn retention_suite(m: &dyn MetaStore) {
        use crate::store::retention::{Deletion, RetentionRule, RuleAction};
        let who = Who::default();
        blob_in(m, "ret/app", &d(1), 1).await;
        m.manifest_put("ret/app", manifest(d(80), vec![(d(1), 1)], &["a", "b"]))
            .await
            .unwrap();
        m.manifest_put("ret/app", manifest(d(81), vec![(d(1), 1)], &[]))
            .await
            .unwrap();
        let st = m.retention_state("ret/app").await.unwrap();
        let get = |st: &crate::store::retention::RepoState, n: u8| {
            st.manifests
                .iter()
                .find(|x| x.digest == d(n))
                .cloned()
                .unwrap()
        };
        assert!(get(&st, 80).untagged_at.is_none());
        assert!(get(&st, 81).untagged_at.is_some(), "pushed without a tag");
        assert_eq!(st.tags.len(), 2);
        // Moving one tag away leaves it tagged; moving the last makes it untagged.
        m.manifest_put("ret/app", manifest(d(81), vec![(d(1), 1)], &["a"]))
            .await
            .unwrap();
        let st = m.retention_state("ret/app").await.unwrap();
        assert!(get(&st, 80).untagged_at.is_none() && get(&st, 81).untagged_at.is_none());
        assert!(m.tag_delete("ret/app", "b", &who).await.unwrap());
        let st = m.retention_state("ret/app").await.unwrap();
        assert!(get(&st, 80).untagged_at.is_some());

        // The deleted tag is listed and can be restored; a tag that exists cannot.
        let del = m.deleted_tags("ret/app").await.unwrap();
        assert_eq!((del[0].tag.as_str(), del[0].digest.clone()), ("b", d(80)));
        assert!(matches!(
            m.tag_restore("ret/app", "zz", None, &who).await,
            Err(MetaError::Refused(_))
        ));
        assert_eq!(
            m.tag_restore("ret/app", "b", None, &who).await.unwrap(),
            d(80)
        );
        assert_eq!(
            m.manifest_by_tag("ret/app", "b")
                .await
                .unwrap()
                .unwrap()
                .digest,
            d(80)
        );
        assert!(m.deleted_tags("ret/app").await.unwrap().is_empty());

        // A plan applied: the tag goes only if still where planned; the manifest is
        // condemned only if still untagged and unreferenced.
        let del = |tag: Option<&str>, n: u8| Deletion {
            repository: "ret/app".into(),
            tag: tag.map(str::to_owned),
            digest: d(n),
            rule: "rule 1".into(),
            bytes: 0,
        };
        let (t, c) = m
            .retention_apply(
                "ret/app",
                vec![del(Some("b"), 80), del(Some("a"), 80)],
                vec![del(None, 80)],
                &who,
            )
            .await
            .unwrap();
        assert_eq!((t, c), (1, 1), "a points at another manifest now");
        assert!(m.manifest_by_tag("ret/app", "a").await.unwrap().is_some());
        let st = m.retention_state("ret/app").await.unwrap();
        assert!(get(&st, 80).condemned);
        assert_eq!(m.deleted_tags("ret/app").await.unwrap()[0].reason, "rule 1");
        assert!(
            m.deleted_tags("ret/app").await.unwrap()[0]
                .condemned_at
                .is_some()
        );
        // Within the delay it stays (and can come back); restoring clears the sentence.
        assert!(
            m.gc_sweep_condemned(now_ms() - 60_000, 10)
                .await
                .unwrap()
                .is_empty()
        );
        m.tag_restore("ret/app", "b", None, &who).await.unwrap();
        assert!(!get(&m.retention_state("ret/app").await.unwrap(), 80).condemned);
        assert!(m.tag_delete("ret/app", "b", &who).await.unwrap());
        m.retention_apply("ret/app", vec![], vec![del(None, 80)], &who)
            .await
            .unwrap();
        let p = m.gc_preview(now_ms() + 60_000, true).await.unwrap();
        let swept = m.gc_sweep_condemned(now_ms() + 60_000, 10).await.unwrap();
        assert_eq!(swept.len(), 1);
        assert_eq!(p.manifests, swept);
        assert!(
            m.manifest_by_digest("ret/app", &d(80))
                .await
                .unwrap()
                .is_none()
        );
        // After it, nothing is restored.
        assert!(m.deleted_tags("ret/app").await.unwrap().is_empty());
        let e = m.tag_restore("ret/app", "b", None, &who).await.unwrap_err();
        assert!(e.to_string().contains("garbage collected"), "{e}");

        // Pulls: the latest time wins.
        m.record_pulls(vec![
            ("ret/app".into(), d(81), 5),
            ("ret/app".into(), d(81), 9),
            ("ret/app".into(), d(99), 9),
        ])
        .await
        .unwrap();
        m.record_pulls(vec![("ret/app".into(), d(81), 7)])
            .await
            .unwrap();
        assert_eq!(
            get(&m.retention_state("ret/app").await.unwrap(), 81).pulled_at,
            Some(9)
        );
        // Bytes freed: d(1) is shared by 81, so condemning 81 alone frees it (nothing
        // else references it now).
        assert_eq!(
            m.bytes_freed(vec![("ret/app".into(), d(81))])
                .await
                .unwrap(),
            vec![1]
        );

        // Rules round-trip.
        let rule = RetentionRule {
            id: 0,
            repositories: "ret/*".into(),
            action: RuleAction::KeepLast {
                count: 3,
                tags: vec!["main-*".into()],
            },
            source: "cli".into(),
        };
        let id = m.retention_rule_add(&rule, Some("admin")).await.unwrap();
        let got = m.retention_rules().await.unwrap();
        assert_eq!(got, vec![RetentionRule { id, ..rule }]);
        assert!(m.retention_rule_remove(id).await.unwrap());
        assert!(!m.retention_rule_remove(id).await.unwrap());
    }

    /// Usage and quotas: a blob counted once per namespace, released with its last link,
    /// a push past a quota refused with nothing counted.
    pub(crate) async fn usage_suite(m: &dyn MetaStore) {
        let who = Who::default();
        let bytes = |rows: &[UsageRow], scope: &str| {
            rows.iter()
                .find(|r| r.scope == scope)
                .map(|r| (r.bytes, r.blobs))
        };
        blob_in(m, "q/a", &d(1), 100).await;
        blob_in(m, "q/b", &d(1), 100).await;
        m.mount_blob("q/c", "q/a", &d(1), &who).await.unwrap();
        blob_in(m, "other/a", &d(1), 100).await;
        blob_in(m, "q/a", &d(2), 50).await;
        let u = m.usage(false).await.unwrap();
        assert_eq!(
            bytes(&u, "ns:q"),
            Some((150, 2)),
            "d(1) counts once in q: {u:?}"
        );
        assert_eq!(bytes(&u, "repo:q/a"), Some((150, 2)));
        assert_eq!(bytes(&u, "repo:q/c"), Some((100, 1)));
        assert_eq!(bytes(&u, "ns:other"), Some((100, 1)));
        assert_eq!(u, m.usage(true).await.unwrap());
        // A re-push of a linked blob changes nothing.
        blob_in(m, "q/a", &d(2), 50).await;
        assert_eq!(m.usage(false).await.unwrap(), u);

        // Quotas: a namespace's and a repository's.
        m.quota_set("q/*", 200, Some("admin")).await.unwrap();
        m.upload_create("over", "q/d", false).await.unwrap();
        m.upload_verified("over", &d(3)).await.unwrap();
        let e = m
            .upload_complete("over", "q/d", &d(3), 60)
            .await
            .unwrap_err();
        assert!(
            matches!(e, MetaError::Quota(ref msg) if msg == "quota of q/ exceeded: 210 B of 200 B"),
            "{e}"
        );
        assert_eq!(m.usage(false).await.unwrap(), u, "nothing partial counted");
        assert_eq!(m.linked_blob("q/d", &d(3)).await.unwrap(), None);
        // A blob the namespace already holds costs nothing more.
        assert_eq!(
            m.mount_blob("q/d", "q/a", &d(2), &who).await.unwrap(),
            Some(50)
        );
        m.quota_set("q/d", 10, None).await.unwrap();
        assert!(matches!(
            m.mount_blob("q/e", "q/d", &d(2), &who).await,
            Ok(Some(50))
        ));
        let e = m
            .manifest_put("q/d", manifest(d(90), vec![(d(2), 50)], &["x"]))
            .await
            .unwrap_err();
        assert!(
            matches!(e, MetaError::Quota(ref msg) if msg.starts_with("quota of q/d exceeded")),
            "{e}"
        );
        let q = m.quotas().await.unwrap();
        assert_eq!(q.len(), 2);
        assert_eq!((q[0].target.as_str(), q[0].used), ("q/*", 150));
        assert!(m.quota_remove("q/d").await.unwrap());
        assert!(!m.quota_remove("q/d").await.unwrap());
        m.manifest_put("q/d", manifest(d(90), vec![(d(2), 50)], &["x"]))
            .await
            .unwrap();

        // Released with the last link of the namespace, by a delete, a sweep or a
        // repository delete.
        assert!(m.unlink_blob("q/b", &d(1), &who).await.unwrap());
        assert_eq!(
            bytes(&m.usage(false).await.unwrap(), "ns:q"),
            Some((150, 2))
        );
        m.repository_delete("q/c", &who).await.unwrap();
        m.repository_delete("q/e", &who).await.unwrap();
        m.repository_delete("q/d", &who).await.unwrap();
        assert_eq!(
            bytes(&m.usage(false).await.unwrap(), "ns:q"),
            Some((150, 2))
        );
        m.gc_sweep_links(now_ms() + 60_000, ("", ""), 100)
            .await
            .unwrap();
        let after = m.usage(false).await.unwrap();
        assert!(
            after.is_empty(),
            "every link left was unreferenced: {after:?}"
        );
        assert_eq!(after, m.usage(true).await.unwrap());
        let contents = m.usage_contents().await.unwrap();
        assert!(contents.iter().any(|c| c.repository == "other/a"));
    }

    /// What a review found: one pass at a time, condemned manifests an agent reports or
    /// someone pulled since stay, an index's platform manifests go with it, referrers of
    /// kept subjects count as referenced, a restore never tags an incomplete manifest.
    pub(crate) async fn review_suite(m: &dyn MetaStore) {
        use crate::store::retention::Deletion;
        let who = Who::default();
        // The lease.
        assert!(m.gc_lease("a", 60_000).await.unwrap());
        assert!(
            !m.gc_lease("b", 60_000).await.unwrap(),
            "one pass at a time"
        );
        assert!(
            m.gc_lease("a", 60_000).await.unwrap(),
            "renewed by its owner"
        );
        m.gc_release("a").await.unwrap();
        assert!(m.gc_lease("b", -1).await.unwrap());
        assert!(
            m.gc_lease("c", 60_000).await.unwrap(),
            "a lease that ran out is taken over"
        );
        m.gc_release("c").await.unwrap();

        let later = now_ms() + 60_000;
        let del = |tag: Option<&str>, n: u8| Deletion {
            repository: "rv/app".into(),
            tag: tag.map(str::to_owned),
            digest: d(n),
            rule: "rule".into(),
            bytes: 0,
        };
        blob_in(m, "rv/app", &d(1), 1).await;
        blob_in(m, "rv/app", &d(2), 2).await;
        // A condemned manifest an agent reports stays.
        m.manifest_put("rv/app", manifest(d(100), vec![(d(1), 1)], &[]))
            .await
            .unwrap();
        m.retention_apply("rv/app", vec![], vec![del(None, 100)], &who)
            .await
            .unwrap();
        let report = Deployment {
            agent: "a".into(),
            stack: "s".into(),
            service: "web".into(),
            repository: "rv/app".into(),
            digest: d(100),
            state: "running".into(),
            deployed_at: 1,
            reported_at: 0,
            reported_by: None,
        };
        m.deployments_report("a", "s", vec![report], &who)
            .await
            .unwrap();
        assert!(m.gc_sweep_condemned(later, 10).await.unwrap().is_empty());
        m.deployments_report("a", "s", vec![], &who).await.unwrap();
        // ... and so does one pulled since it was condemned.
        m.record_pulls(vec![("rv/app".into(), d(100), now_ms() + 1)])
            .await
            .unwrap();
        assert!(m.gc_sweep_condemned(later, 10).await.unwrap().is_empty());

        // A condemned index takes its untagged platform manifests with it.
        m.manifest_put("rv/app", manifest(d(101), vec![(d(1), 1)], &[]))
            .await
            .unwrap();
        m.manifest_put("rv/app", manifest(d(102), vec![(d(2), 2)], &["keep"]))
            .await
            .unwrap();
        let mut index = manifest(d(103), vec![], &["multi"]);
        index.media_type = "application/vnd.oci.image.index.v1+json".into();
        index.children = vec![(d(101), 2), (d(102), 2)];
        m.manifest_put("rv/app", index).await.unwrap();
        assert!(m.tag_delete("rv/app", "multi", &who).await.unwrap());
        m.retention_apply("rv/app", vec![], vec![del(None, 103)], &who)
            .await
            .unwrap();
        let mut gone = Vec::new();
        loop {
            let batch = m.gc_sweep_condemned(later, 10).await.unwrap();
            if batch.is_empty() {
                break;
            }
            gone.extend(batch.into_iter().map(|g| g.digest));
        }
        gone.sort();
        assert_eq!(gone, vec![d(101), d(103)], "the tagged child stays");

        // A referrer of a kept subject counts as referenced for delete-untagged.
        let mut sig = manifest(d(104), vec![(d(1), 1)], &[]);
        sig.subject = Some(d(102));
        m.manifest_put("rv/app", sig).await.unwrap();
        let st = m.retention_state("rv/app").await.unwrap();
        assert!(
            st.manifests
                .iter()
                .any(|x| x.digest == d(104) && x.referenced)
        );

        // A restore never tags a manifest missing a layer.
        m.manifest_put("rv/app", manifest(d(105), vec![(d(2), 2)], &["gone"]))
            .await
            .unwrap();
        assert!(m.tag_delete("rv/app", "keep", &who).await.unwrap());
        assert!(m.tag_delete("rv/app", "gone", &who).await.unwrap());
        assert!(m.unlink_blob("rv/app", &d(2), &who).await.unwrap());
        let e = m
            .tag_restore("rv/app", "gone", None, &who)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("cannot be restored"), "{e}");
        assert!(m.manifest_by_tag("rv/app", "gone").await.unwrap().is_none());

        // Claiming a digest for an upload that is gone is refused.
        assert!(matches!(
            m.upload_verified("no-such-upload", &d(1)).await,
            Err(MetaError::Refused(_))
        ));
    }
}
