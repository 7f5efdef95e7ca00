//! Online garbage collection: one pass removes orphaned referrers, repository links no
//! manifest references (once unused for `gc_delay`), blobs nothing links, references or
//! claims (rows and bytes), bytes no row accounts for, expired uploads and empty
//! repositories, while the registry keeps serving. The race-free protocol is in
//! ARCHITECTURE.md ("Garbage collection"); the metadata side of each step is one
//! transaction behind [`MetaStore`], so every backend gives the same guarantees.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::meta::{GC_BATCH, GcBlob, GcLink, GcManifest, GcRun, RepoDeleted, now_ms};
use super::{Store, StoreError, Who};
use crate::oci::{Digest, RepoName};

/// The default grace delay: a blob or link unreferenced for less is kept.
pub const DEFAULT_GC_DELAY: Duration = Duration::from_secs(24 * 3600);
/// The default time between the server's passes.
pub const DEFAULT_GC_INTERVAL: Duration = Duration::from_secs(3600);

/// How long an upload waits for the collector to finish deleting a blob it is about to
/// store again, at most (the deletion of one file takes milliseconds).
const CLAIM_WAIT: Duration = Duration::from_secs(30);

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

    /// The last `limit` passes, newest first.
    pub async fn gc_runs(&self, limit: u32) -> Result<Vec<GcRun>, StoreError> {
        Ok(self.meta.gc_runs(limit).await?)
    }

    /// Runs one pass now (`by` is recorded: `server`, `cli:<user>`). A dry run changes
    /// nothing and reports what the pass would remove.
    pub async fn gc(&self, dry_run: bool, by: &str) -> Result<GcReport, StoreError> {
        let started_at = now_ms();
        let clock = Instant::now();
        let result = if dry_run {
            self.gc_preview().await
        } else {
            self.gc_pass().await
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

    fn cutoff(&self) -> i64 {
        now_ms().saturating_sub(i64::try_from(self.gc.delay.as_millis()).unwrap_or(i64::MAX))
    }

    /// Blob files no row accounts for.
    async fn files_without_rows(&self, mark: bool) -> Result<Vec<GcBlob>, StoreError> {
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
        for chunk in found.chunks(GC_BATCH as usize) {
            out.extend(self.meta.gc_orphans(chunk.to_vec(), mark).await?);
        }
        Ok(out)
    }

    async fn gc_preview(&self) -> Result<GcReport, StoreError> {
        let p = self
            .meta
            .gc_preview(self.cutoff(), self.gc.delete_referrers)
            .await?;
        let orphans = self.files_without_rows(false).await?;
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

    async fn gc_pass(&self) -> Result<GcReport, StoreError> {
        let mut removed = Removed::default();
        // A pass a crash cut short left blobs marked: finish them first.
        let pending = self.meta.gc_marked().await?;
        self.delete_marked(&pending).await?;
        removed.blobs.extend(pending);
        let cutoff = self.cutoff();
        if self.gc.delete_referrers {
            loop {
                let batch = self
                    .meta
                    .gc_sweep_orphan_referrers(cutoff, GC_BATCH)
                    .await?;
                let done = batch.len() < GC_BATCH as usize;
                removed.manifests.extend(batch);
                if done {
                    break;
                }
            }
        }
        loop {
            let batch = self.meta.gc_sweep_links(cutoff, GC_BATCH).await?;
            let done = batch.len() < GC_BATCH as usize;
            removed.links.extend(batch);
            if done {
                break;
            }
        }
        loop {
            let batch = self.meta.gc_mark_blobs(GC_BATCH).await?;
            self.delete_marked(&batch).await?;
            let done = batch.len() < GC_BATCH as usize;
            removed.blobs.extend(batch);
            if done {
                break;
            }
        }
        let orphans = self.files_without_rows(true).await?;
        self.delete_marked(&orphans).await?;
        let orphan_files = orphans.len() as u64;
        removed.blobs.extend(orphans);
        for id in self.expired_uploads().await? {
            if self.expire_upload(&id).await? {
                removed.uploads.push(id);
            }
        }
        self.sweep_upload_data().await?;
        removed.repositories = self.meta.gc_sweep_repositories(false).await?;
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

    /// Deletes the bytes of blobs marked as being deleted, then their rows.
    async fn delete_marked(&self, blobs: &[GcBlob]) -> Result<(), StoreError> {
        if blobs.is_empty() {
            return Ok(());
        }
        for b in blobs {
            match b.digest.parse::<Digest>() {
                Ok(d) => self.blobs.delete(&d).await?,
                Err(_) => tracing::warn!(digest = %b.digest, "a blob row with a malformed digest"),
            }
        }
        self.meta
            .gc_forget(blobs.iter().map(|b| b.digest.clone()).collect())
            .await?;
        Ok(())
    }
}
