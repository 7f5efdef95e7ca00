//! Online garbage collection: one pass removes orphaned referrers, repository links no
//! manifest references (once unused for `gc_delay`), blobs nothing links, references or
//! claims (rows and bytes), bytes no row accounts for, expired uploads and empty
//! repositories, while the registry keeps serving. The race-free protocol is in
//! ARCHITECTURE.md ("Garbage collection"); the metadata side of each step is one
//! transaction behind [`MetaStore`], so every backend gives the same guarantees.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::meta::{GcBlob, GcLink, GcManifest, GcRun, RepoDeleted, now_ms};
use super::retention::{Deletion, RetentionRule, plan};
use super::{Store, StoreError, Who};
use crate::oci::{Digest, RepoName};

/// The default grace delay: a blob or link unreferenced for less is kept.
pub const DEFAULT_GC_DELAY: Duration = Duration::from_secs(24 * 3600);
/// The default time between the server's passes.
pub const DEFAULT_GC_INTERVAL: Duration = Duration::from_secs(3600);

/// A pass's lease, renewed after each batch: a pass that died is taken over once it
/// runs out.
const GC_LEASE_MS: i64 = 30_000;
/// How often a pass renews its lease: a small fraction of it.
const GC_RENEW: Duration = Duration::from_secs(3);

/// How long an upload waits for the collector to finish deleting a blob it is about to
/// store again, at most (the deletion of one file takes milliseconds).
const CLAIM_WAIT: Duration = Duration::from_secs(30);

/// Rows a pass changes per transaction: a push waiting for the database's one writer
/// waits for at most one such batch.
const GC_STEP: u32 = 100;
/// While anything else writes, a pass rests this many times as long as its last batch
/// took (a quarter of the writer and of the disk at most); on an idle registry it does
/// not rest.
const GC_YIELD: u32 = 3;
/// The longest rest: a slow batch (a busy disk) must not make the pass outlive its
/// lease between two renewals.
const GC_REST_MAX: Duration = Duration::from_secs(2);

/// A pass's hold on the collector's lease (`gc_lease`), renewed every [`GC_RENEW`]
/// between batches; a pass that finds it lost stops.
struct Lease<'a> {
    store: &'a Store,
    owner: &'a str,
    renewed: std::sync::Mutex<Instant>,
}

impl Lease<'_> {
    /// Renews the lease if the last renewal is [`GC_RENEW`] old.
    async fn renew(&self) -> Result<(), StoreError> {
        if self.renewed.lock().expect("renewal time").elapsed() < GC_RENEW {
            return Ok(());
        }
        self.renew_now().await
    }

    /// Renews the lease now: right before bytes are deleted, so a pass that stalled
    /// past its lease (a hung disk, a long wait for the writer) deletes nothing.
    async fn renew_now(&self) -> Result<(), StoreError> {
        *self.renewed.lock().expect("renewal time") = Instant::now();
        if self.store.meta.gc_lease(self.owner, GC_LEASE_MS).await? {
            Ok(())
        } else {
            Err(StoreError::Internal(
                "the garbage collection lease was lost".into(),
            ))
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcSettings {
    /// Links unused, and referrers orphaned, for less than this are kept.
    pub delay: Duration,
    /// Whether a manifest's untagged referrers are deleted with it (and orphaned ones
    /// collected).
    pub delete_referrers: bool,
}

impl Default for GcSettings {
    fn default() -> Self {
        GcSettings {
            delay: DEFAULT_GC_DELAY,
            delete_referrers: true,
        }
    }
}

/// One line of the usage report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageEntry {
    /// `namespace` or `repository`.
    pub kind: String,
    pub name: String,
    pub bytes: u64,
    pub blobs: u64,
    pub tags: u64,
    pub manifests: u64,
    /// Unix ms.
    pub last_push: Option<i64>,
    pub quota: Option<u64>,
}

/// What a retention run deleted (or, in a dry run, would delete).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RetentionReport {
    pub dry_run: bool,
    /// Tags deleted, then manifests condemned (garbage collection deletes them after
    /// gc_delay), each with the rule and the bytes it frees.
    pub deletions: Vec<Deletion>,
    pub tags: u64,
    pub manifests: u64,
    pub bytes: u64,
}

/// What one pass removed, or, in a dry run, would remove.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    /// Blob rows and their bytes (including bytes no row accounted for).
    pub blobs: u64,
    pub bytes: u64,
    /// Blob files no row accounted for (left by a crash), counted in `blobs` too.
    pub orphan_files: u64,
    /// Repository links to blobs no manifest of the repository references.
    pub links: u64,
    pub manifests: u64,
    pub uploads: u64,
    pub repositories: u64,
    pub duration_ms: u64,
    /// What was (or would be) removed, item by item.
    pub removed: Removed,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Removed {
    pub blobs: Vec<GcBlob>,
    pub links: Vec<GcLink>,
    pub manifests: Vec<GcManifest>,
    pub uploads: Vec<String>,
    pub repositories: Vec<String>,
}

fn size_of(blobs: &[GcBlob]) -> u64 {
    blobs
        .iter()
        .map(|b| u64::try_from(b.size).unwrap_or(0))
        .sum()
}

impl Store {
    /// Claims `digest` for upload `id` before its bytes are put in place (see
    /// ARCHITECTURE.md): while the collector is deleting that blob, waits for it to
    /// finish, then claims it (the bytes are then stored again).
    pub(super) async fn claim(&self, id: &str, digest: &Digest) -> Result<(), StoreError> {
        let deadline = Instant::now() + CLAIM_WAIT;
        loop {
            match self.meta.upload_verified(id, digest.as_str()).await {
                Err(super::MetaError::Collecting(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(super::MetaError::Refused(_)) => return Err(StoreError::UploadUnknown),
                other => return Ok(other?),
            }
        }
    }

    /// Deletes a repository's tags, manifests and blob links (its bytes go to garbage
    /// collection); it leaves the catalog.
    pub async fn repository_delete(
        &self,
        repo: &RepoName,
        by: &Who,
    ) -> Result<RepoDeleted, StoreError> {
        self.meta
            .repository_delete(repo.as_str(), by)
            .await?
            .ok_or(StoreError::NameUnknown)
    }

    /// The retention rules: the config file's, then those made with `wharf retention`.
    pub async fn retention_rules(&self) -> Result<Vec<RetentionRule>, StoreError> {
        let mut rules = self.retention.clone();
        rules.extend(self.meta.retention_rules().await?);
        Ok(rules)
    }

    /// Applies the retention rules to every repository now (or, with `dry_run`, says
    /// what that would delete). A run deletes tags and condemns the manifests left
    /// untagged; their bytes go with garbage collection after gc_delay.
    pub async fn retention_run(
        &self,
        dry_run: bool,
        by: &Who,
    ) -> Result<RetentionReport, StoreError> {
        let rules = self.retention_rules().await?;
        let mut report = RetentionReport {
            dry_run,
            ..RetentionReport::default()
        };
        if rules.is_empty() {
            return Ok(report);
        }
        let policies = self.meta.policies().await?;
        let now = now_ms();
        let mut last: Option<String> = None;
        loop {
            let page = self.meta.repositories(last.as_deref(), 1000).await?;
            let Some(end) = page.last().cloned() else {
                break;
            };
            for repo in page {
                let state = self.meta.retention_state(&repo).await?;
                // What deploy agents run, and their rollback targets, always stays.
                let protected: std::collections::HashSet<String> = self
                    .meta
                    .deployed_digests(&repo)
                    .await?
                    .into_iter()
                    .collect();
                let mut p = plan(
                    &repo,
                    &rules,
                    &state,
                    &protected,
                    |t| policies.iter().any(|pol| pol.locks(&repo, t)),
                    now,
                );
                if p.tags.is_empty() && p.condemn.is_empty() {
                    continue;
                }
                let freed = self
                    .meta
                    .bytes_freed(
                        p.condemn
                            .iter()
                            .map(|d| (repo.clone(), d.digest.clone()))
                            .collect(),
                    )
                    .await?;
                for (d, b) in p.condemn.iter_mut().zip(freed) {
                    d.bytes = b;
                    report.bytes += b;
                }
                if dry_run {
                    report.tags += p.tags.len() as u64;
                    report.manifests += p.condemn.len() as u64;
                } else {
                    let (t, m) = self
                        .meta
                        .retention_apply(&repo, p.tags.clone(), p.condemn.clone(), by)
                        .await?;
                    report.tags += t;
                    report.manifests += m;
                }
                report.deletions.extend(p.tags);
                report.deletions.extend(p.condemn);
            }
            last = Some(end);
        }
        Ok(report)
    }

    /// Replaces what a deploy agent reports for one of its stacks.
    pub async fn deployments_report(
        &self,
        agent: &str,
        stack: &str,
        rows: Vec<super::meta::Deployment>,
        by: &Who,
    ) -> Result<(), StoreError> {
        Ok(self.meta.deployments_report(agent, stack, rows, by).await?)
    }

    pub async fn deployments(&self) -> Result<Vec<super::meta::Deployment>, StoreError> {
        Ok(self.meta.deployments().await?)
    }

    pub async fn deployments_forget(&self, agent: &str, by: &Who) -> Result<u64, StoreError> {
        Ok(self.meta.deployments_forget(agent, by).await?)
    }

    /// The usage counters (`ns:team`, `repo:team/api`).
    pub async fn usage_counters(&self) -> Result<Vec<super::meta::UsageRow>, StoreError> {
        Ok(self.meta.usage(false).await?)
    }

    /// The usage report: per namespace and repository, bytes (blobs counted once per
    /// namespace), blobs, tags, manifests and the last push; only `namespace`'s if
    /// given. With `verify`, the counters are compared with a recomputation from the
    /// links, and a difference is an error naming it.
    pub async fn usage_report(
        &self,
        namespace: Option<&str>,
        verify: bool,
    ) -> Result<Vec<UsageEntry>, StoreError> {
        let counters = self.meta.usage(false).await?;
        if verify {
            let fresh = self.meta.usage(true).await?;
            if fresh != counters {
                let differ: Vec<String> = fresh
                    .iter()
                    .filter(|f| !counters.contains(f))
                    .map(|f| format!("{} is {} bytes in {} blobs", f.scope, f.bytes, f.blobs))
                    .chain(counters.iter().filter(|c| !fresh.contains(c)).map(|c| {
                        format!(
                            "the counter of {} says {} bytes in {} blobs",
                            c.scope, c.bytes, c.blobs
                        )
                    }))
                    .collect();
                return Err(StoreError::Internal(format!(
                    "usage counters differ from a recomputation: {}",
                    differ.join("; ")
                )));
            }
        }
        let contents = self.meta.usage_contents().await?;
        let quotas = self.meta.quotas().await?;
        let mut out: Vec<UsageEntry> = Vec::new();
        for r in &counters {
            let Some((kind, name)) = r.scope.split_once(':') else {
                continue;
            };
            let ns = super::meta::namespace_of(name);
            if namespace.is_some_and(|want| want != ns) {
                continue;
            }
            let mut e = UsageEntry {
                kind: if kind == "ns" {
                    "namespace"
                } else {
                    "repository"
                }
                .into(),
                name: name.to_owned(),
                bytes: r.bytes,
                blobs: r.blobs,
                tags: 0,
                manifests: 0,
                last_push: None,
                quota: None,
            };
            for c in &contents {
                let inside = if kind == "ns" {
                    super::meta::namespace_of(&c.repository) == name
                } else {
                    c.repository == name
                };
                if inside {
                    e.tags += c.tags;
                    e.manifests += c.manifests;
                    e.last_push = e.last_push.max(c.last_push);
                }
            }
            let target = if kind == "ns" {
                format!("{name}/*")
            } else {
                name.to_owned()
            };
            e.quota = quotas.iter().find(|q| q.target == target).map(|q| q.bytes);
            out.push(e);
        }
        out.sort_by(|a, b| {
            super::meta::namespace_of(&a.name)
                .cmp(super::meta::namespace_of(&b.name))
                .then_with(|| b.kind.cmp(&a.kind))
                .then_with(|| a.name.cmp(&b.name))
        });
        Ok(out)
    }

    /// Per repository: tags, manifests and the last push.
    pub async fn usage_contents(&self) -> Result<Vec<super::meta::RepoContents>, StoreError> {
        Ok(self.meta.usage_contents().await?)
    }

    pub async fn quotas(&self) -> Result<Vec<super::meta::Quota>, StoreError> {
        Ok(self.meta.quotas().await?)
    }

    /// Sets a quota on `team/*` (a namespace: its blobs counted once) or a repository.
    pub async fn quota_set(
        &self,
        target: &str,
        bytes: u64,
        by: Option<&str>,
    ) -> Result<(), StoreError> {
        Ok(self.meta.quota_set(target, bytes, by).await?)
    }

    pub async fn quota_remove(&self, target: &str) -> Result<bool, StoreError> {
        Ok(self.meta.quota_remove(target).await?)
    }

    /// Manifests of `repo` with no tag, oldest first.
    pub async fn untagged_manifests(
        &self,
        repo: &RepoName,
    ) -> Result<Vec<super::meta::UntaggedManifest>, StoreError> {
        Ok(self.meta.untagged_manifests(repo.as_str()).await?)
    }

    /// Tags of `repo` deleted whose manifest is still stored, newest first.
    pub async fn deleted_tags(
        &self,
        repo: &RepoName,
    ) -> Result<Vec<super::meta::DeletedTag>, StoreError> {
        Ok(self.meta.deleted_tags(repo.as_str()).await?)
    }

    /// Points a deleted tag back at its manifest while the manifest is still stored.
    pub async fn tag_restore(
        &self,
        repo: &RepoName,
        tag: &str,
        digest: Option<&Digest>,
        by: &Who,
    ) -> Result<String, StoreError> {
        Ok(self
            .meta
            .tag_restore(repo.as_str(), tag, digest.map(Digest::as_str), by)
            .await?)
    }

    /// The last `limit` passes, newest first.
    pub async fn gc_runs(&self, limit: u32) -> Result<Vec<GcRun>, StoreError> {
        Ok(self.meta.gc_runs(limit).await?)
    }

    /// Runs one pass now (`by` is recorded: `server`, `cli:<user>`). A dry run changes
    /// nothing and reports what the pass would remove.
    pub async fn gc(&self, dry_run: bool, by: &str) -> Result<GcReport, StoreError> {
        let started_at = now_ms();
        let clock = Instant::now();
        // One pass at a time, whichever process runs it: two would share marks, and one
        // could delete the bytes of a blob the other has already forgotten and an
        // upload has stored again.
        let owner = format!("{by} {}", uuid::Uuid::new_v4());
        if !dry_run && !self.meta.gc_lease(&owner, GC_LEASE_MS).await? {
            return Err(StoreError::GcRunning);
        }
        let result = if dry_run {
            self.gc_preview().await
        } else {
            let r = self.gc_pass(&owner, by == "server").await;
            let _ = self.meta.gc_release(&owner).await;
            r
        };
        let mut run = GcRun {
            started_at,
            finished_at: now_ms(),
            dry_run,
            by: by.to_owned(),
            ..GcRun::default()
        };
        match &result {
            Ok(r) => {
                run.links = r.links;
                run.blobs = r.blobs;
                run.bytes = r.bytes;
                run.manifests = r.manifests;
                run.uploads = r.uploads;
                run.repositories = r.repositories;
            }
            Err(e) => run.error = Some(e.to_string()),
        }
        self.meta.gc_record(&run).await?;
        let mut report = result?;
        report.duration_ms = u64::try_from(clock.elapsed().as_millis()).unwrap_or(u64::MAX);
        Ok(report)
    }

    /// After a batch that began at `began`: rests while the registry is busy, never
    /// longer than [`GC_REST_MAX`] (well within the lease, which is renewed between
    /// batches).
    async fn rest(&self, began: Instant) -> Result<(), StoreError> {
        if self.meta.gc_contended().await? {
            tokio::time::sleep((began.elapsed() * GC_YIELD).min(GC_REST_MAX)).await;
        }
        Ok(())
    }

    fn cutoff(&self) -> i64 {
        now_ms().saturating_sub(i64::try_from(self.gc.delay.as_millis()).unwrap_or(i64::MAX))
    }

    /// Blob files no row accounts for; `lease` is renewed as it goes (it reads every
    /// blob, which under load takes longer than a lease).
    async fn files_without_rows(
        &self,
        mark: bool,
        lease: Option<&Lease<'_>>,
    ) -> Result<Vec<GcBlob>, StoreError> {
        let found: Vec<GcBlob> = self
            .blobs
            .list()
            .await?
            .into_iter()
            .map(|(d, size)| GcBlob {
                digest: d.to_string(),
                size: i64::try_from(size).unwrap_or(i64::MAX),
            })
            .collect();
        let mut out = Vec::new();
        for chunk in found.chunks(GC_STEP as usize) {
            if let Some(l) = lease {
                l.renew().await?;
            }
            let t = Instant::now();
            out.extend(self.meta.gc_orphans(chunk.to_vec(), mark).await?);
            self.rest(t).await?;
        }
        Ok(out)
    }

    async fn gc_preview(&self) -> Result<GcReport, StoreError> {
        let p = self
            .meta
            .gc_preview(self.cutoff(), self.gc.delete_referrers)
            .await?;
        let orphans = self.files_without_rows(false, None).await?;
        let uploads = self.expired_uploads().await?;
        let mut repositories = self.meta.gc_sweep_repositories(true).await?;
        // Repositories the pass empties go too: those whose every link and manifest it
        // removes are found by the real pass's last step; the dry run lists the ones
        // already empty.
        repositories.sort();
        let mut blobs = p.blobs;
        blobs.extend(orphans.iter().cloned());
        Ok(GcReport {
            dry_run: true,
            blobs: blobs.len() as u64,
            bytes: size_of(&blobs),
            orphan_files: orphans.len() as u64,
            links: p.links.len() as u64,
            manifests: p.manifests.len() as u64,
            uploads: uploads.len() as u64,
            repositories: repositories.len() as u64,
            duration_ms: 0,
            removed: Removed {
                blobs,
                links: p.links,
                manifests: p.manifests,
                uploads,
                repositories,
            },
        })
    }

    /// One pass, holding the lease of `owner`. Uploads are expired only by the server
    /// (`uploads`): only it knows which are being written to now.
    async fn gc_pass(&self, owner: &str, uploads: bool) -> Result<GcReport, StoreError> {
        let lease = Lease {
            store: self,
            owner,
            renewed: std::sync::Mutex::new(Instant::now()),
        };
        let renew = || lease.renew();
        let mut removed = Removed::default();
        let mut clock = Instant::now();
        let mut step = |name: &str| {
            tracing::debug!("gc: {name} took {} ms", clock.elapsed().as_millis());
            clock = Instant::now();
        };
        // A pass a crash cut short left blobs marked: finish them first.
        let pending = self.meta.gc_marked().await?;
        lease.renew_now().await?;
        let pending = self.delete_marked(&pending).await?;
        removed.blobs.extend(pending);
        step("finishing marked blobs");
        let cutoff = self.cutoff();
        let n = GC_STEP;
        // Until none is left: deleting an index condemns its platform manifests.
        loop {
            renew().await?;
            let t = Instant::now();
            let batch = self.meta.gc_sweep_condemned(cutoff, n).await?;
            let done = batch.is_empty();
            removed.manifests.extend(batch);
            if done {
                break;
            }
            self.rest(t).await?;
        }
        if self.gc.delete_referrers {
            loop {
                renew().await?;
                let t = Instant::now();
                let batch = self.meta.gc_sweep_orphan_referrers(cutoff, n).await?;
                let done = batch.len() < n as usize;
                removed.manifests.extend(batch);
                if done {
                    break;
                }
                self.rest(t).await?;
            }
        }
        step("manifests");
        let (mut repo, mut digest) = (String::new(), String::new());
        loop {
            renew().await?;
            let t = Instant::now();
            let batch = self
                .meta
                .gc_sweep_links(cutoff, (&repo, &digest), n)
                .await?;
            let done = batch.len() < n as usize;
            if let Some(last) = batch.last() {
                (repo, digest) = (last.repository.clone(), last.digest.clone());
            }
            removed.links.extend(batch);
            if done {
                break;
            }
            self.rest(t).await?;
        }
        step("links");
        let mut after = String::new();
        loop {
            renew().await?;
            let t = Instant::now();
            let batch = self.meta.gc_mark_blobs(&after, n).await?;
            let done = batch.len() < n as usize;
            if let Some(last) = batch.last() {
                after = last.digest.clone();
            }
            lease.renew_now().await?;
            let deleted = self.delete_marked(&batch).await?;
            removed.blobs.extend(deleted);
            if done {
                break;
            }
            self.rest(t).await?;
        }
        step("blobs");
        renew().await?;
        let orphans = self.files_without_rows(true, Some(&lease)).await?;
        lease.renew_now().await?;
        let orphans = self.delete_marked(&orphans).await?;
        step("files without rows");
        let orphan_files = orphans.len() as u64;
        removed.blobs.extend(orphans);
        renew().await?;
        if uploads {
            for id in self.expired_uploads().await? {
                if self.expire_upload(&id).await? {
                    removed.uploads.push(id);
                }
            }
            self.sweep_upload_data().await?;
        }
        renew().await?;
        removed.repositories = self.meta.gc_sweep_repositories(false).await?;
        step("uploads and repositories");
        Ok(GcReport {
            dry_run: false,
            blobs: removed.blobs.len() as u64,
            bytes: size_of(&removed.blobs),
            orphan_files,
            links: removed.links.len() as u64,
            manifests: removed.manifests.len() as u64,
            uploads: removed.uploads.len() as u64,
            repositories: removed.repositories.len() as u64,
            duration_ms: 0,
            removed,
        })
    }

    /// Deletes the bytes of blobs marked as being deleted, then their rows; returns those
    /// deleted. A blob whose bytes could not be deleted is unmarked (its bytes are
    /// intact) and logged, so one bad file never stops collection nor blocks its digest.
    async fn delete_marked(&self, blobs: &[GcBlob]) -> Result<Vec<GcBlob>, StoreError> {
        if blobs.is_empty() {
            return Ok(Vec::new());
        }
        // Several deletes at once: each is a file system (or object store) round trip.
        use futures_util::StreamExt;
        let mut deletes = futures_util::stream::iter(blobs.iter().cloned())
            .map(|b| {
                let store = std::sync::Arc::clone(&self.blobs);
                async move {
                    let r = match b.digest.parse::<Digest>() {
                        Ok(d) => store.delete(&d).await.map_err(|e| e.to_string()),
                        Err(e) => Err(format!("malformed digest: {e}")),
                    };
                    (b, r)
                }
            })
            .buffer_unordered(16);
        let (mut done, mut failed) = (Vec::new(), Vec::new());
        while let Some((b, r)) = deletes.next().await {
            match r {
                Ok(()) => done.push(b),
                Err(e) => {
                    tracing::warn!(digest = %b.digest, "garbage collection could not delete the blob's bytes (kept): {e}");
                    failed.push(b.digest);
                }
            }
        }
        if !failed.is_empty() {
            self.meta.gc_unmark(failed).await?;
        }
        self.meta
            .gc_forget(done.iter().map(|b| b.digest.clone()).collect())
            .await?;
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Range;
    use std::sync::Arc;

    use async_trait::async_trait;
    use bytes::Bytes;
    use futures_util::StreamExt;

    use super::*;
    use crate::oci::{Hasher, Reference};
    use crate::store::blob::{BlobError, BlobStore, ByteStream, FsBlobStore};
    use crate::store::meta::{MetaStore, SqliteMeta};

    /// A filesystem backend whose blob deletes wait at a gate, so a test can act while
    /// the collector is in the middle of deleting bytes.
    struct GatedDeletes {
        inner: FsBlobStore,
        entered: tokio::sync::Notify,
        release: tokio::sync::Semaphore,
        /// Deletes fail (a file the process may not remove).
        fail: std::sync::atomic::AtomicBool,
        /// Listing waits at the gate too.
        gate_list: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl BlobStore for GatedDeletes {
        async fn upload_write(
            &self,
            id: &str,
            offset: u64,
            data: ByteStream,
            hasher: Option<Hasher>,
        ) -> Result<(u64, Option<Hasher>), BlobError> {
            self.inner.upload_write(id, offset, data, hasher).await
        }
        async fn ready(&self) -> Result<(), BlobError> {
            self.inner.ready().await
        }
        async fn upload_read(&self, id: &str, len: u64) -> Result<ByteStream, BlobError> {
            self.inner.upload_read(id, len).await
        }
        async fn upload_commit(&self, id: &str, len: u64, d: &Digest) -> Result<(), BlobError> {
            self.inner.upload_commit(id, len, d).await
        }
        async fn upload_truncate(&self, id: &str, len: u64) -> Result<(), BlobError> {
            self.inner.upload_truncate(id, len).await
        }
        async fn upload_delete(&self, id: &str) -> Result<(), BlobError> {
            self.inner.upload_delete(id).await
        }
        async fn upload_ids(&self) -> Result<Vec<String>, BlobError> {
            self.inner.upload_ids().await
        }
        async fn stat(&self, d: &Digest) -> Result<Option<u64>, BlobError> {
            self.inner.stat(d).await
        }
        async fn read(&self, d: &Digest, range: Range<u64>) -> Result<ByteStream, BlobError> {
            self.inner.read(d, range).await
        }
        async fn delete(&self, d: &Digest) -> Result<(), BlobError> {
            self.entered.notify_one();
            self.release.acquire().await.unwrap().forget();
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(BlobError::Io(std::io::Error::from(
                    std::io::ErrorKind::PermissionDenied,
                )));
            }
            self.inner.delete(d).await
        }
        async fn list(&self) -> Result<Vec<(Digest, u64)>, BlobError> {
            if self.gate_list.load(std::sync::atomic::Ordering::SeqCst) {
                self.entered.notify_one();
                self.release.acquire().await.unwrap().forget();
            }
            self.inner.list().await
        }
    }

    fn body(data: &'static [u8]) -> ByteStream {
        Box::pin(futures_util::stream::iter(vec![Ok(Bytes::from_static(
            data,
        ))]))
    }

    async fn read_all(store: &Store, d: &Digest, len: u64) -> Result<Vec<u8>, StoreError> {
        let mut s = store.blob_read(d, 0..len).await?;
        let mut out = Vec::new();
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c.map_err(|e| StoreError::Internal(e.to_string()))?);
        }
        Ok(out)
    }

    fn who() -> Who {
        Who::default()
    }

    impl GatedDeletes {
        /// Over `dir`; deletes `fail` if asked, and listing waits at the gate if `gate_list`.
        fn new(dir: &std::path::Path, fail: bool, gate_list: bool) -> Arc<GatedDeletes> {
            Arc::new(GatedDeletes {
                inner: FsBlobStore::open(dir).unwrap(),
                entered: tokio::sync::Notify::new(),
                release: tokio::sync::Semaphore::new(0),
                fail: std::sync::atomic::AtomicBool::new(fail),
                gate_list: std::sync::atomic::AtomicBool::new(gate_list),
            })
        }
    }

    /// An upload that commits a blob while the collector deletes its bytes waits for the
    /// collector, then stores the bytes again: the blob it links is readable.
    #[tokio::test]
    async fn an_upload_racing_the_deletion_of_its_blob_keeps_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = GatedDeletes::new(dir.path(), false, false);
        let meta = Arc::new(SqliteMeta::open(&dir.path().join("meta.db")).unwrap());
        let store = Arc::new(
            Store::new(Arc::clone(&blobs) as _, meta).with_gc(GcSettings {
                delay: Duration::ZERO,
                delete_referrers: true,
            }),
        );
        const DATA: &[u8] = b"a layer two pushes share";
        let d = Digest::sha256_of(DATA);
        let a = RepoName::parse("race/a").unwrap();
        let b = RepoName::parse("race/b").unwrap();
        store.blob_put(&a, &d, None, body(DATA)).await.unwrap();
        store.blob_delete(&a, &d, &who()).await.unwrap();

        let gc = tokio::spawn({
            let store = Arc::clone(&store);
            async move { store.gc(false, "test").await }
        });
        blobs.entered.notified().await; // the collector is deleting the bytes now
        let push = tokio::spawn({
            let (store, b, d) = (Arc::clone(&store), b.clone(), d.clone());
            async move { store.blob_put(&b, &d, None, body(DATA)).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!push.is_finished(), "the upload waits for the collector");
        blobs.release.add_permits(1000);
        let report = gc.await.unwrap().unwrap();
        assert_eq!(report.blobs, 1);
        assert_eq!(push.await.unwrap().unwrap(), DATA.len() as u64);
        assert_eq!(store.blob_size(&b, &d).await.unwrap(), DATA.len() as u64);
        assert_eq!(read_all(&store, &d, DATA.len() as u64).await.unwrap(), DATA);
    }

    /// A blob whose bytes cannot be deleted is kept and unmarked: the pass goes on, the
    /// next one is not stuck on it, and its digest can be pushed. While one pass runs,
    /// another is refused.
    #[tokio::test]
    async fn a_delete_that_fails_stops_nothing_and_passes_run_one_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = GatedDeletes::new(dir.path(), true, false);
        let meta = Arc::new(SqliteMeta::open(&dir.path().join("meta.db")).unwrap());
        let store = Arc::new(
            Store::new(Arc::clone(&blobs) as _, meta).with_gc(GcSettings {
                delay: Duration::ZERO,
                delete_referrers: true,
            }),
        );
        let repo = RepoName::parse("fail/app").unwrap();
        let d = Digest::sha256_of(b"stuck");
        store
            .blob_put(&repo, &d, None, body(b"stuck"))
            .await
            .unwrap();
        store.blob_delete(&repo, &d, &who()).await.unwrap();
        let first = tokio::spawn({
            let store = Arc::clone(&store);
            async move { store.gc(false, "server").await }
        });
        blobs.entered.notified().await;
        let second = store.gc(false, "cli:test").await;
        assert!(matches!(second, Err(StoreError::GcRunning)), "{second:?}");
        blobs.release.add_permits(1000);
        let r = first.await.unwrap().unwrap();
        assert_eq!(r.blobs, 0, "nothing counted as removed");
        assert_eq!(
            blobs.stat(&d).await.unwrap(),
            Some(5),
            "the bytes are intact"
        );
        // Not stuck: the digest can be pushed again at once, and a later pass deletes it.
        store
            .blob_put(&repo, &d, None, body(b"stuck"))
            .await
            .unwrap();
        store.blob_delete(&repo, &d, &who()).await.unwrap();
        blobs.fail.store(false, std::sync::atomic::Ordering::SeqCst);
        let r = store.gc(false, "server").await.unwrap();
        assert_eq!(r.blobs, 1);
        assert_eq!(blobs.stat(&d).await.unwrap(), None);
    }

    /// A pass whose lease ran out (here: taken over while the pass was slow, listing
    /// the blob files) stops at its next step instead of going on beside another pass.
    #[tokio::test]
    async fn a_pass_that_lost_its_lease_stops() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = GatedDeletes::new(dir.path(), false, true);
        let meta = Arc::new(SqliteMeta::open(&dir.path().join("meta.db")).unwrap());
        let store = Arc::new(
            Store::new(Arc::clone(&blobs) as _, Arc::clone(&meta) as _).with_gc(GcSettings {
                delay: Duration::from_secs(3600), // nothing to delete: the pass reaches the listing
                delete_referrers: true,
            }),
        );
        let repo = RepoName::parse("lease/app").unwrap();
        let d = Digest::sha256_of(b"kept");
        store
            .blob_put(&repo, &d, None, body(b"kept"))
            .await
            .unwrap();
        let pass = tokio::spawn({
            let store = Arc::clone(&store);
            async move { store.gc(false, "slow").await }
        });
        blobs.entered.notified().await; // listing the blob files
        tokio::time::sleep(GC_RENEW + Duration::from_millis(100)).await;
        // The lease lapses and another pass takes it.
        rusqlite::Connection::open(dir.path().join("meta.db"))
            .unwrap()
            .execute("UPDATE gc_lease SET until = 0", [])
            .unwrap();
        assert!(meta.gc_lease("other", GC_LEASE_MS).await.unwrap());
        blobs.release.add_permits(1000);
        let r = pass.await.unwrap();
        assert!(
            matches!(r, Err(StoreError::Internal(ref m)) if m.contains("lease was lost")),
            "{r:?}"
        );
    }

    /// A HEAD answered 200 keeps the link for a whole delay, so the manifest that
    /// references it can still be pushed, even when the link was older than the delay.
    #[tokio::test]
    async fn a_blob_seen_by_head_is_kept_for_the_delay() {
        let dir = tempfile::tempdir().unwrap();
        let delay = Duration::from_millis(1500);
        let (blobs, meta) = crate::store::open_local_backends(dir.path()).unwrap();
        let store = Store::new(blobs, meta).with_gc(GcSettings {
            delay,
            delete_referrers: true,
        });
        let repo = RepoName::parse("head/app").unwrap();
        let config = br#"{"architecture":"amd64","os":"linux"}"#;
        let d = Digest::sha256_of(config);
        store.blob_put(&repo, &d, None, body(config)).await.unwrap();
        tokio::time::sleep(delay + Duration::from_millis(100)).await;
        // The link is older than the delay; a client's HEAD sees it...
        assert_eq!(
            store.blob_size(&repo, &d).await.unwrap(),
            config.len() as u64
        );
        // ... and a pass right after it leaves it.
        assert_eq!(store.gc(false, "test").await.unwrap().links, 0);
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{d}","size":{}}},"layers":[]}}"#,
            config.len()
        );
        store
            .manifest_put(
                &repo,
                &Reference::Tag("v1".into()),
                vec![],
                Some("application/vnd.oci.image.manifest.v1+json"),
                Bytes::from(manifest),
                who(),
            )
            .await
            .unwrap();
        // Without a HEAD, a link older than the delay that no manifest references goes.
        let other = Digest::sha256_of(b"never referenced");
        store
            .blob_put(&repo, &other, None, body(b"never referenced"))
            .await
            .unwrap();
        tokio::time::sleep(delay + Duration::from_millis(100)).await;
        let r = store.gc(false, "test").await.unwrap();
        assert_eq!((r.links, r.blobs), (1, 1));
        assert!(matches!(
            store.blob_size(&repo, &other).await,
            Err(StoreError::BlobUnknown)
        ));
        assert_eq!(
            store.blob_size(&repo, &d).await.unwrap(),
            config.len() as u64
        );
    }

    /// A pass a crash cut short (blobs marked, bytes maybe deleted) is finished by the
    /// next one, and bytes no row accounts for are removed.
    #[tokio::test]
    async fn the_next_pass_finishes_what_a_crash_left() {
        let dir = tempfile::tempdir().unwrap();
        let (blobs, meta) = crate::store::open_local_backends(dir.path()).unwrap();
        let store =
            Store::new(Arc::clone(&blobs) as _, Arc::clone(&meta) as _).with_gc(GcSettings {
                delay: Duration::ZERO,
                delete_referrers: true,
            });
        let repo = RepoName::parse("crash/app").unwrap();
        let d = Digest::sha256_of(b"marked");
        store
            .blob_put(&repo, &d, None, body(b"marked"))
            .await
            .unwrap();
        store.blob_delete(&repo, &d, &who()).await.unwrap();
        // A pass marked it and died before deleting anything.
        assert_eq!(meta.gc_mark_blobs("", 10).await.unwrap().len(), 1);
        // Bytes with no row at all (a crash between rename and commit, long ago).
        let stray = Digest::sha256_of(b"stray");
        blobs
            .upload_write("stray", 0, body(b"stray"), None)
            .await
            .unwrap();
        blobs.upload_commit("stray", 5, &stray).await.unwrap();
        let dry = store.gc(true, "test").await.unwrap();
        assert_eq!(dry.orphan_files, 1);
        assert!(
            blobs.stat(&stray).await.unwrap().is_some(),
            "a dry run deletes nothing"
        );
        let r = store.gc(false, "test").await.unwrap();
        assert_eq!((r.blobs, r.orphan_files, r.bytes), (2, 1, 6 + 5));
        assert_eq!(blobs.stat(&d).await.unwrap(), None);
        assert_eq!(blobs.stat(&stray).await.unwrap(), None);
        assert!(meta.gc_marked().await.unwrap().is_empty());
        let runs = store.gc_runs(10).await.unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[0].blobs, runs[0].dry_run), (2, false));
        assert!(runs[1].dry_run);
    }
}
