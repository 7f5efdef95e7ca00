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
//! copies only what changed. The database records what each import brought
//! (`MetaStore::imported`), so a later run moves a tag only if it still points where the
//! import put it, and brings back nothing deleted here since. What cannot be imported (a
//! blob missing from the source, a manifest this registry refuses, a symbolic link: none
//! is followed) is reported, and the rest goes on.

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
    /// What the source has and was left as it is here, and why (deleted or moved here
    /// since an earlier import, or here before it): not a problem.
    pub kept: Vec<Kept>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Kept {
    /// `repository:tag` or `repository@digest`.
    pub item: String,
    pub why: String,
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

impl From<super::meta::MetaError> for ImportError {
    fn from(e: super::meta::MetaError) -> Self {
        ImportError::Store(e.into())
    }
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
            if kind.is_symlink() {
                report.problems.push(Problem {
                    item: rel.clone(),
                    reason: format!("{}: a symbolic link (not followed)", entry.path().display()),
                });
                continue;
            }
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

/// Opens a regular file of the source for reading, without following a symbolic link
/// (a storage copied from elsewhere could point one at a secret, a FIFO or `/dev/zero`).
fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                std::io::Error::other("a symbolic link (not followed)")
            } else {
                e
            }
        })?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(f)
}

/// The digest in a `link` file (None if there is no such file), or why it has none. Its
/// content is never repeated in the message.
fn read_link(path: &Path) -> Result<Option<Digest>, String> {
    use std::io::Read;
    let mut text = String::new();
    let read = open_regular(path).and_then(|f| f.take(256).read_to_string(&mut text));
    match read {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    }
    text.trim()
        .parse::<Digest>()
        .map(Some)
        .map_err(|_| format!("{}: not a digest ({} bytes)", path.display(), text.len()))
}

/// The subdirectories of `dir` (none if it does not exist); a symbolic link among them,
/// or an error reading `dir`, is a problem of `item`.
fn subdirs(dir: &Path, item: &str, report: &mut ImportReport) -> Vec<(String, PathBuf)> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            report.problems.push(Problem {
                item: item.to_owned(),
                reason: format!("{}: {e}", dir.display()),
            });
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for e in entries {
        let e = match e {
            Ok(e) => e,
            Err(err) => {
                report.problems.push(Problem {
                    item: item.to_owned(),
                    reason: format!("{}: {err}", dir.display()),
                });
                continue;
            }
        };
        match e.file_type() {
            Ok(t) if t.is_dir() => {
                out.push((e.file_name().to_string_lossy().into_owned(), e.path()))
            }
            Ok(t) if t.is_symlink() => report.problems.push(Problem {
                item: item.to_owned(),
                reason: format!("{}: a symbolic link (not followed)", e.path().display()),
            }),
            Ok(_) => {}
            Err(err) => report.problems.push(Problem {
                item: item.to_owned(),
                reason: format!("{}: {err}", e.path().display()),
            }),
        }
    }
    out
}

/// The links `dir/<algorithm>/<hex>/link` (`_layers`, `_manifests/revisions`).
fn links(dir: &Path, item: &str, report: &mut ImportReport) -> Vec<Digest> {
    let mut out = Vec::new();
    for (_, alg) in subdirs(dir, item, report) {
        for (_, entry) in subdirs(&alg, item, report) {
            match read_link(&entry.join("link")) {
                Ok(Some(d)) => out.push(d),
                Ok(None) => {}
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
    for (tag, path) in subdirs(&dir.join("_manifests/tags"), name, report) {
        let item = format!("{name}:{tag}");
        if !matches!(Reference::parse(&tag), Ok(Reference::Tag(_))) {
            report.problems.push(Problem {
                item,
                reason: "not a valid tag name".into(),
            });
            continue;
        }
        // A deleted tag keeps only its index, no `current`.
        match read_link(&path.join("current/link")) {
            Ok(Some(d)) => repo.tags.push((tag, d)),
            Ok(None) => {}
            Err(reason) => report.problems.push(Problem { item, reason }),
        }
    }
    repo.tags.sort();
    repo
}

/// A manifest's bytes from the source, refused past `max` bytes (never reading more).
fn read_manifest(root: &Path, d: &Digest, max: usize) -> Result<bytes::Bytes, String> {
    use std::io::Read;
    let unreadable =
        |e: std::io::Error| format!("the manifest's data cannot be read from the source: {e}");
    let mut body = Vec::new();
    open_regular(&blob_path(root, d))
        .and_then(|f| f.take(max as u64 + 1).read_to_end(&mut body))
        .map_err(unreadable)?;
    if body.len() > max {
        return Err(format!(
            "the manifest is over this registry's limit of {max} bytes"
        ));
    }
    Ok(bytes::Bytes::from(body))
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
    // The source, as earlier imports recorded it.
    let origin = format!(
        "distribution:{}",
        std::fs::canonicalize(&root)
            .map_err(|e| ImportError::Io(root.clone(), e))?
            .display()
    );
    let mut report = ImportReport::default();
    // A repository known to hold each blob: later repositories link it from there.
    let mut holder: HashMap<Digest, RepoName> = HashMap::new();
    for name in repositories(&root, &mut report)? {
        let repo = RepoName::parse(&name).expect("checked when listed");
        let source = read_repo(&root, &name, &mut report);
        import_repo(
            store,
            &origin,
            &root,
            &repo,
            &source,
            by,
            &mut holder,
            &mut report,
        )
        .await?;
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
        match store.blob_mount(repo, &from, d, by).await {
            Ok(Some(_)) => return Ok(BlobOutcome::Linked),
            Ok(None) => {}
            Err(e @ StoreError::Quota(_)) => return Ok(BlobOutcome::Problem(e.to_string())),
            Err(e) => return Err(e),
        }
    }
    let path = blob_path(root, d);
    // A blob the collector is deleting, or a moment with too many uploads: wait a little.
    let mut tries = 0;
    loop {
        let file = match open_regular(&path) {
            Ok(f) => tokio::fs::File::from_std(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(BlobOutcome::Missing);
            }
            Err(e) => return Ok(BlobOutcome::Problem(format!("{}: {e}", path.display()))),
        };
        let len = match file.metadata().await {
            Ok(m) => m.len(),
            Err(e) => return Ok(BlobOutcome::Problem(format!("{}: {e}", path.display()))),
        };
        let body = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20);
        match store.blob_put(repo, d, Some(len), Box::pin(body)).await {
            Ok(n) => return Ok(BlobOutcome::Copied(n)),
            Err(e @ StoreError::DigestMismatch { .. }) => {
                return Ok(BlobOutcome::Problem(format!(
                    "the source's data does not match its digest ({e})"
                )));
            }
            Err(e @ (StoreError::Quota(_) | StoreError::SizeInvalid(_))) => {
                return Ok(BlobOutcome::Problem(e.to_string()));
            }
            Err(StoreError::Overloaded(_) | StoreError::Busy) if tries < 30 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn import_repo(
    store: &Store,
    origin: &str,
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
    // What earlier imports from this source brought: something they brought that is
    // gone or changed here was deleted or changed here, and is left so.
    let known = store.meta.imported(origin, repo.as_str()).await?;
    let mut pending = Vec::new();
    for d in &source.revisions {
        match store
            .manifest_get(repo, &Reference::Digest(d.clone()))
            .await
        {
            Ok(_) => report.manifests_present += 1,
            Err(StoreError::ManifestUnknown) if known.contains_key(&format!("manifest:{d}")) => {
                report.kept.push(Kept {
                    item: format!("{repo}@{d}"),
                    why: "deleted here since it was imported".into(),
                });
            }
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
                Ok(_) => {
                    report.manifests_imported += 1;
                    let item = format!("manifest:{d}");
                    store
                        .meta
                        .imported_record(origin, repo.as_str(), &item, d.as_str())
                        .await?;
                }
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

    // Tags: where the source points. One that points elsewhere here is moved only if it
    // still points where the last import put it (the source moved it, not someone here).
    for (tag, d) in &source.tags {
        let item = format!("tag:{tag}");
        let here = match store.manifest_get(repo, &Reference::Tag(tag.clone())).await {
            Ok(m) => Some(m.digest),
            Err(StoreError::ManifestUnknown) => None,
            Err(e) => return Err(e.into()),
        };
        let before = known.get(&item);
        if here.as_deref() == Some(d.as_str()) {
            report.tags_present += 1;
            if before.map(String::as_str) != Some(d.as_str()) {
                store
                    .meta
                    .imported_record(origin, repo.as_str(), &item, d.as_str())
                    .await?;
            }
            continue;
        }
        let why = match (&here, before) {
            (None, Some(_)) => Some("deleted here since it was imported".to_owned()),
            (Some(h), Some(b)) if h != b => Some(format!(
                "moved here to {h} since it was imported; the source has {d}"
            )),
            (Some(h), None) => Some(format!(
                "already here at {h}, not by an import; the source has {d}"
            )),
            _ => None,
        };
        if let Some(why) = why {
            report.kept.push(Kept {
                item: format!("{repo}:{tag}"),
                why,
            });
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
        // By digest with the tag: the manifest keeps its own digest (sha512 included).
        let put = store
            .manifest_put(
                repo,
                &Reference::Digest(d.clone()),
                vec![tag.clone()],
                None,
                body,
                by.clone(),
            )
            .await;
        match put {
            Ok(_) => {
                if here.is_some() {
                    report.tags_moved += 1;
                } else {
                    report.tags_imported += 1;
                }
                store
                    .meta
                    .imported_record(origin, repo.as_str(), &item, d.as_str())
                    .await?;
            }
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
