//! `wharf import --from-distribution DIR`: reads the filesystem storage of the CNCF
//! registry (`registry:2`, Debian's `docker-registry`) into this registry, so a team
//! moves without pushing again.
//!
//! The CNCF registry keeps, under `docker/registry/v2/`:
//!
//! - `blobs/<algorithm>/<first two hex>/<hex>/data`: every blob, manifests included;
//! - `repositories/<name>/_layers/<algorithm>/<hex>/link`: the blobs a repository holds;
//! - `repositories/<name>/_manifests/revisions/<algorithm>/<hex>/link`: its manifests;
//! - `repositories/<name>/_manifests/tags/<tag>/current/link`: where each tag points;
//! - `repositories/<name>/_uploads/`: uploads in progress (not imported).
//!
//! Each `link` holds a digest. Everything goes through the registry's own write paths:
//! blob bytes through [`Store::blob_put`] (streamed, digest verified before the blob
//! exists), a blob already imported into another repository by a mount (no bytes
//! moved), manifests through [`Store::manifest_put`] by digest (content verified,
//! references checked: an index after its children), tags last. What is already here is
//! skipped, so an interrupted import is resumed by running it again, and a second run
//! copies only what changed (tags moved in the source are moved here). What cannot be
//! imported (a blob missing from the source, a manifest this registry refuses) is
//! reported, and the rest goes on.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use serde::Serialize;

use super::{Store, StoreError, Who};
use crate::oci::{Digest, Reference, RepoName};

/// Blob uploads of one repository running at once.
const PARALLEL_BLOBS: usize = 4;

/// What an import did.
#[derive(Debug, Default, Serialize)]
pub struct ImportReport {
    pub repositories: u64,
    /// Blobs whose bytes were copied, and their size.
    pub blobs_copied: u64,
    pub bytes_copied: u64,
    /// Blobs linked from a repository already holding them (no bytes moved).
    pub blobs_linked: u64,
    /// Blobs the repository already held.
    pub blobs_present: u64,
    /// Blob links of the source whose data is gone (its garbage collection removes the
    /// data and leaves the links): nothing the source could serve, so not a problem
    /// unless a manifest needs one (then that manifest is).
    pub blobs_missing: u64,
    pub manifests_imported: u64,
    pub manifests_present: u64,
    pub tags_imported: u64,
    /// Tags that pointed elsewhere here and were moved to where the source points.
    pub tags_moved: u64,
    pub tags_present: u64,
    /// What could not be imported, and why.
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    /// `repository`, `repository@digest` or `repository:tag`.
    pub item: String,
    pub reason: String,
}

/// Why an import could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(
        "{0} is not the storage of a CNCF registry (no docker/registry/v2/repositories in it, nor repositories/ and blobs/)"
    )]
    NotDistribution(PathBuf),
    #[error("reading {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One repository of the source, as read from its links.
#[derive(Debug, Default)]
struct SourceRepo {
    layers: Vec<Digest>,
    revisions: Vec<Digest>,
    tags: Vec<(String, Digest)>,
}

/// The `v2` directory of a CNCF registry's storage: `dir` itself, or
/// `dir/docker/registry/v2` (the registry's `rootdirectory`).
pub fn distribution_root(dir: &Path) -> Result<PathBuf, ImportError> {
    for root in [dir.join("docker/registry/v2"), dir.to_owned()] {
        if root.join("repositories").is_dir() && root.join("blobs").is_dir() {
            return Ok(root);
        }
    }
    Err(ImportError::NotDistribution(dir.to_owned()))
}

/// The repositories under `root/repositories`, by name, sorted. A directory holding
/// `_manifests` or `_layers` is a repository; its other subdirectories may be
/// repositories too (`team` and `team/api`). Symbolic links are not followed.
fn repositories(root: &Path, report: &mut ImportReport) -> Result<Vec<String>, ImportError> {
    let base = root.join("repositories");
    let mut found = Vec::new();
    let mut todo = vec![String::new()];
    while let Some(rel) = todo.pop() {
        let dir = if rel.is_empty() {
            base.clone()
        } else {
            base.join(&rel)
        };
        let mut is_repo = false;
        for entry in std::fs::read_dir(&dir).map_err(|e| ImportError::Io(dir.clone(), e))? {
            let entry = entry.map_err(|e| ImportError::Io(dir.clone(), e))?;
            let kind = entry
                .file_type()
                .map_err(|e| ImportError::Io(entry.path(), e))?;
            if !kind.is_dir() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "_manifests" || name == "_layers" {
                is_repo = true;
            } else if !name.starts_with('_') {
                todo.push(if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                });
            }
        }
        if is_repo {
            match RepoName::parse(&rel) {
                Ok(_) => found.push(rel),
                Err(e) => report.problems.push(Problem {
                    item: rel,
                    reason: format!("not a valid repository name here: {e}"),
                }),
            }
        }
    }
    found.sort();
    Ok(found)
}

/// The digest in a `link` file, or why it has none.
fn read_link(path: &Path) -> Result<Digest, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.trim()
        .parse::<Digest>()
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The links `dir/<algorithm>/<hex>/link` (`_layers`, `_manifests/revisions`).
fn links(dir: &Path, item: &str, report: &mut ImportReport) -> Vec<Digest> {
    let mut out = Vec::new();
    let Ok(algorithms) = std::fs::read_dir(dir) else {
        return out;
    };
    for alg in algorithms.flatten() {
        let Ok(entries) = std::fs::read_dir(alg.path()) else {
            continue;
        };
        for e in entries.flatten() {
            let link = e.path().join("link");
            if !link.is_file() {
                continue;
            }
            match read_link(&link) {
                Ok(d) => out.push(d),
                Err(reason) => report.problems.push(Problem {
                    item: item.to_owned(),
                    reason,
                }),
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

fn read_repo(root: &Path, name: &str, report: &mut ImportReport) -> SourceRepo {
    let dir = root.join("repositories").join(name);
    let mut repo = SourceRepo {
        layers: links(&dir.join("_layers"), name, report),
        revisions: links(&dir.join("_manifests/revisions"), name, report),
        tags: Vec::new(),
    };
    if let Ok(tags) = std::fs::read_dir(dir.join("_manifests/tags")) {
        for t in tags.flatten() {
            let tag = t.file_name().to_string_lossy().into_owned();
            let item = format!("{name}:{tag}");
            if !matches!(Reference::parse(&tag), Ok(Reference::Tag(_))) {
                report.problems.push(Problem {
                    item,
                    reason: "not a valid tag name".into(),
                });
                continue;
            }
            let link = t.path().join("current/link");
            if !link.exists() {
                continue; // a deleted tag keeps only its index
            }
            match read_link(&link) {
                Ok(d) => repo.tags.push((tag, d)),
                Err(reason) => report.problems.push(Problem { item, reason }),
            }
        }
    }
    repo.tags.sort();
    repo
}

/// A manifest's bytes from the source, refused unread past `max` bytes.
fn read_manifest(root: &Path, d: &Digest, max: usize) -> Result<bytes::Bytes, String> {
    let path = blob_path(root, d);
    let unreadable =
        |e: std::io::Error| format!("the manifest's data cannot be read from the source: {e}");
    let len = std::fs::metadata(&path).map_err(unreadable)?.len();
    if len > max as u64 {
        return Err(format!(
            "the manifest is {len} bytes, over this registry's limit of {max}"
        ));
    }
    std::fs::read(&path)
        .map(bytes::Bytes::from)
        .map_err(unreadable)
}

fn blob_path(root: &Path, d: &Digest) -> PathBuf {
    let alg = d.as_str().split(':').next().unwrap_or("sha256");
    let hex = d.hex();
    root.join("blobs")
        .join(alg)
        .join(&hex[..2])
        .join(hex)
        .join("data")
}

/// Imports the CNCF registry storage at `dir` into `store`. `progress` is told about
/// each repository when it is done.
pub async fn import_distribution(
    store: &Store,
    dir: &Path,
    by: &Who,
    mut progress: impl FnMut(&str, &ImportReport),
) -> Result<ImportReport, ImportError> {
    let root = distribution_root(dir)?;
    let mut report = ImportReport::default();
    // A repository known to hold each blob: later repositories link it from there.
    let mut holder: HashMap<Digest, RepoName> = HashMap::new();
    for name in repositories(&root, &mut report)? {
        let repo = RepoName::parse(&name).expect("checked when listed");
        let source = read_repo(&root, &name, &mut report);
        import_repo(store, &root, &repo, &source, by, &mut holder, &mut report).await?;
        report.repositories += 1;
        progress(&name, &report);
    }
    Ok(report)
}

/// What happened to one blob.
enum BlobOutcome {
    Present,
    Linked,
    Copied(u64),
    Missing,
    Problem(String),
}

async fn import_blob(
    store: &Store,
    root: &Path,
    repo: &RepoName,
    d: &Digest,
    from: Option<RepoName>,
    by: &Who,
) -> Result<BlobOutcome, StoreError> {
    match store.blob_size(repo, d).await {
        Ok(_) => return Ok(BlobOutcome::Present),
        Err(StoreError::BlobUnknown) => {}
        Err(e) => return Err(e),
    }
    if let Some(from) = from {
        if store.blob_mount(repo, &from, d, by).await?.is_some() {
            return Ok(BlobOutcome::Linked);
        }
    }
    let path = blob_path(root, d);
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BlobOutcome::Missing),
        Err(e) => return Ok(BlobOutcome::Problem(format!("{}: {e}", path.display()))),
    };
    let len = match file.metadata().await {
        Ok(m) => m.len(),
        Err(e) => return Ok(BlobOutcome::Problem(format!("{}: {e}", path.display()))),
    };
    let body = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20);
    match store.blob_put(repo, d, Some(len), Box::pin(body)).await {
        Ok(n) => Ok(BlobOutcome::Copied(n)),
        Err(e @ StoreError::DigestMismatch { .. }) => Ok(BlobOutcome::Problem(format!(
            "the source's data does not match its digest ({e})"
        ))),
        Err(e @ (StoreError::Quota(_) | StoreError::SizeInvalid(_))) => {
            Ok(BlobOutcome::Problem(e.to_string()))
        }
        Err(StoreError::Overloaded(_)) => Err(StoreError::Overloaded(
            "too many uploads at once: retry the import".into(),
        )),
        Err(e) => Err(e),
    }
}

async fn import_repo(
    store: &Store,
    root: &Path,
    repo: &RepoName,
    source: &SourceRepo,
    by: &Who,
    holder: &mut HashMap<Digest, RepoName>,
    report: &mut ImportReport,
) -> Result<(), ImportError> {
    // Blobs, a few at a time.
    let jobs = source.layers.iter().map(|d| {
        let from = holder.get(d).cloned();
        async move { (d, import_blob(store, root, repo, d, from, by).await) }
    });
    let mut results = futures_util::stream::iter(jobs).buffer_unordered(PARALLEL_BLOBS);
    let mut held = Vec::new();
    let mut missing = std::collections::HashSet::new();
    while let Some((d, outcome)) = results.next().await {
        match outcome? {
            BlobOutcome::Missing => {
                report.blobs_missing += 1;
                missing.insert(d.to_string());
                continue;
            }
            BlobOutcome::Present => report.blobs_present += 1,
            BlobOutcome::Linked => report.blobs_linked += 1,
            BlobOutcome::Copied(n) => {
                report.blobs_copied += 1;
                report.bytes_copied += n;
            }
            BlobOutcome::Problem(reason) => {
                report.problems.push(Problem {
                    item: format!("{repo}@{d}"),
                    reason,
                });
                continue;
            }
        }
        held.push(d.clone());
    }
    drop(results);
    for d in held {
        holder.entry(d).or_insert_with(|| repo.clone());
    }

    // Manifests: those already here are skipped; an index waits for its children (in
    // rounds, until a round imports nothing more).
    let mut pending = Vec::new();
    for d in &source.revisions {
        match store
            .manifest_get(repo, &Reference::Digest(d.clone()))
            .await
        {
            Ok(_) => report.manifests_present += 1,
            Err(StoreError::ManifestUnknown) => pending.push(d.clone()),
            Err(e) => return Err(e.into()),
        }
    }
    // Each manifest is read when it is stored (again in a later round), so memory stays
    // one manifest whatever the repository holds.
    let mut waiting = pending;
    loop {
        let mut later = Vec::new();
        let mut refused = Vec::new();
        let before = waiting.len();
        for d in waiting {
            let body = match read_manifest(root, &d, store.max_manifest()) {
                Ok(b) => b,
                Err(reason) => {
                    refused.push((d, reason));
                    continue;
                }
            };
            let put = store
                .manifest_put(
                    repo,
                    &Reference::Digest(d.clone()),
                    Vec::new(),
                    None,
                    body,
                    by.clone(),
                )
                .await;
            match put {
                Ok(_) => report.manifests_imported += 1,
                Err(e @ StoreError::ManifestChildUnknown(_)) => later.push((d, e.to_string())),
                Err(StoreError::ManifestBlobUnknown(b)) if missing.contains(&b) => refused.push((
                    d,
                    format!("its blob {b} is missing from the source (removed by its garbage collection?)"),
                )),
                Err(e) if refusal(&e) => refused.push((d, e.to_string())),
                Err(e) => return Err(e.into()),
            }
        }
        for (d, reason) in refused {
            report.problems.push(Problem {
                item: format!("{repo}@{d}"),
                reason,
            });
        }
        if later.is_empty() || later.len() == before {
            for (d, reason) in later {
                report.problems.push(Problem {
                    item: format!("{repo}@{d}"),
                    reason,
                });
            }
            break;
        }
        waiting = later.into_iter().map(|(d, _)| d).collect();
    }

    // Tags: where the source points, moved if they point elsewhere here.
    for (tag, d) in &source.tags {
        let reference = Reference::Tag(tag.clone());
        let here = match store.manifest_get(repo, &reference).await {
            Ok(m) => Some(m.digest),
            Err(StoreError::ManifestUnknown) => None,
            Err(e) => return Err(e.into()),
        };
        if here.as_deref() == Some(d.as_str()) {
            report.tags_present += 1;
            continue;
        }
        let body = match store
            .manifest_get(repo, &Reference::Digest(d.clone()))
            .await
        {
            Ok(m) => m.content,
            Err(StoreError::ManifestUnknown) => {
                report.problems.push(Problem {
                    item: format!("{repo}:{tag}"),
                    reason: format!("its manifest {d} was not imported"),
                });
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        match store
            .manifest_put(repo, &reference, Vec::new(), None, body, by.clone())
            .await
        {
            Ok(_) if here.is_some() => report.tags_moved += 1,
            Ok(_) => report.tags_imported += 1,
            Err(e) if refusal(&e) => report.problems.push(Problem {
                item: format!("{repo}:{tag}"),
                reason: e.to_string(),
            }),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// A refusal of one item (the rest goes on), as opposed to a failure of the registry.
fn refusal(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::ManifestInvalid(_)
            | StoreError::ManifestBlobUnknown(_)
            | StoreError::ManifestChildUnknown(_)
            | StoreError::ManifestTooLarge { .. }
            | StoreError::DigestMismatch { .. }
            | StoreError::SizeInvalid(_)
            | StoreError::Immutable { .. }
            | StoreError::Quota(_)
            | StoreError::Refused(_)
    )
}
