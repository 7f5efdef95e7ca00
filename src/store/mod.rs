//! The registry's state: repositories, blob links, uploads, manifests, tags.
//!
//! **Architecture invariant:** this layer knows nothing of HTTP. It combines a
//! [`BlobStore`] (bytes, by digest) and a [`MetaStore`] (what exists where) so that:
//! a blob is readable through a repository only once its bytes are durable, its digest is
//! verified and the repository links it; a manifest is stored only if everything it
//! references is present in its repository (checked in the same transaction that stores
//! it); and upload progress lives in the metadata database, not in process memory.

pub mod blob;
pub mod gc;
pub mod import;
pub mod meta;
pub mod migrate;
pub mod perms;
pub mod policy;
pub mod retention;

use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::StreamExt;

pub use blob::{BlobError, BlobStore, ByteStream, FsBlobStore};
pub use meta::{ManifestRecord, MetaError, MetaStore, Referrer, SqliteMeta, TagOrder, Who};
pub use policy::TagPolicy;

use crate::oci::manifest::{self, ManifestError, Platform};
use crate::oci::{Algorithm, Digest, Hasher, Reference, RepoName};

/// The default (and minimum) largest manifest accepted: 4 MiB.
pub const DEFAULT_MAX_MANIFEST: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("blob unknown to registry")]
    BlobUnknown,
    #[error("blob upload unknown to registry")]
    UploadUnknown,
    /// A chunk does not start where the upload ends.
    #[error("chunk starts at {start} but the upload holds {current} bytes")]
    RangeMismatch { start: u64, current: u64 },
    #[error("{0}")]
    SizeInvalid(String),
    #[error("provided digest {provided} does not match content digest {computed}")]
    DigestMismatch { provided: String, computed: String },
    #[error("manifest unknown to registry")]
    ManifestUnknown,
    #[error("blob {0} referenced by the manifest is not in this repository")]
    ManifestBlobUnknown(String),
    #[error("manifest {0} referenced by the index is not in this repository")]
    ManifestChildUnknown(String),
    #[error(transparent)]
    ManifestInvalid(#[from] ManifestError),
    #[error("repository name not known to registry")]
    NameUnknown,
    #[error("manifest is {size} bytes, over the limit of {limit}")]
    ManifestTooLarge { size: usize, limit: usize },
    #[error("the request body failed: {0}")]
    Body(io::Error),
    #[error("the metadata database is busy")]
    Busy,
    /// A limit on work at once was reached; the client should retry shortly.
    #[error("{0}")]
    Overloaded(String),
    /// The disk (of the blobs or of the database) is full.
    #[error("the registry's storage is full")]
    StorageFull,
    /// A delete would leave a tagged manifest incomplete.
    #[error("{what} cannot be deleted: it is needed by tag {tag:?} (manifest {manifest}){}; delete the tag first", policy.as_ref().map(|p| format!(", which {p} protects")).unwrap_or_default())]
    InUse {
        what: String,
        tag: String,
        manifest: String,
        policy: Option<String>,
    },
    /// An immutability policy protects the tag.
    #[error("tag {tag:?} of {repository} is immutable: {policy} forbids moving or deleting it")]
    Immutable {
        repository: String,
        tag: String,
        policy: String,
    },
    /// A quota would be exceeded.
    #[error("{0}")]
    Quota(String),
    /// Cannot be done as things are (the reason says why).
    #[error("{0}")]
    Refused(String),
    /// Another garbage collection pass holds the lease (one runs at a time).
    #[error("another garbage collection pass is running; try again when it has ended")]
    GcRunning,
    /// A backend cannot be reached now (the metadata database); retry.
    #[error("{0}")]
    Unavailable(String),
    #[error("storage: {0}")]
    Internal(String),
}

impl From<BlobError> for StoreError {
    fn from(e: BlobError) -> Self {
        match e {
            BlobError::Body(e) => StoreError::Body(e),
            BlobError::NotFound => StoreError::BlobUnknown,
            BlobError::UploadNotFound => StoreError::UploadUnknown,
            BlobError::Io(e) if e.kind() == io::ErrorKind::StorageFull => StoreError::StorageFull,
            BlobError::Io(e) => StoreError::Internal(e.to_string()),
            BlobError::Unavailable(e) => StoreError::Unavailable(e),
        }
    }
}

impl From<MetaError> for StoreError {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::MissingBlob(d) => StoreError::ManifestBlobUnknown(d),
            MetaError::MissingManifest(d) => StoreError::ManifestChildUnknown(d),
            MetaError::SizeMismatch {
                digest,
                declared,
                actual,
            } => StoreError::ManifestInvalid(ManifestError::Invalid(format!(
                "descriptor of {digest} gives size {declared} but the content is {actual} bytes"
            ))),
            MetaError::Busy => StoreError::Busy,
            MetaError::Collecting(d) => StoreError::Overloaded(format!(
                "blob {d} is being garbage collected; retry in a moment"
            )),
            MetaError::Limit(why) => StoreError::Overloaded(why),
            MetaError::Full => StoreError::StorageFull,
            MetaError::InUse {
                what,
                tag,
                manifest,
                policy,
            } => StoreError::InUse {
                what,
                tag,
                manifest,
                policy,
            },
            MetaError::Immutable {
                repository,
                tag,
                policy,
            } => StoreError::Immutable {
                repository,
                tag,
                policy,
            },
            MetaError::Conflict(what) => StoreError::Internal(format!("{what} already exists")),
            MetaError::Refused(why) => StoreError::Refused(why),
            MetaError::Quota(why) => StoreError::Quota(why),
            MetaError::Db(e) => StoreError::Internal(e),
            MetaError::Unavailable(e) => StoreError::Unavailable(e),
        }
    }
}

/// What one metadata backend gives the server: every metadata trait.
pub trait Meta: MetaStore + meta::auth::AuthMeta + meta::events::EventsMeta {}
impl<T: MetaStore + meta::auth::AuthMeta + meta::events::EventsMeta> Meta for T {}

/// Opens the backends the configuration names: blobs under `dir`, and metadata in
/// `dir/meta.db` or, with `database_url`, in PostgreSQL.
pub async fn open_backends(
    dir: &Path,
    database_url: Option<&str>,
    storage: &crate::config::Storage,
    upload_memory_mib: usize,
) -> Result<(Arc<dyn BlobStore>, Arc<dyn Meta>), StoreError> {
    let blobs: Arc<dyn BlobStore> = match storage {
        crate::config::Storage::Fs => open_blob_dir(dir, upload_memory_mib)?,
        crate::config::Storage::S3(s3) => Arc::new(
            blob::S3BlobStore::new(s3.clone(), upload_memory_mib)
                .map_err(|e| StoreError::Internal(format!("[storage]: {e}")))?,
        ),
    };
    let meta: Arc<dyn Meta> = match database_url {
        Some(url) => Arc::new(meta::postgres::PostgresMeta::open(url).await?),
        None => {
            let io = |e: io::Error| StoreError::Internal(format!("{}: {e}", dir.display()));
            perms::create_dir_all(dir).map_err(io)?;
            perms::touch_private(&dir.join("meta.db")).map_err(io)?;
            Arc::new(SqliteMeta::open(&dir.join("meta.db"))?)
        }
    };
    Ok((blobs, meta))
}

/// The blob store under `dir`, made private to the user running wharf.
fn open_blob_dir(dir: &Path, upload_memory_mib: usize) -> Result<Arc<FsBlobStore>, StoreError> {
    let io = |e: io::Error| StoreError::Internal(format!("{}: {e}", dir.display()));
    perms::create_dir_all(dir).map_err(io)?;
    match perms::make_private(dir) {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            "the data directory {} was readable by other users: made {n} files and folders private (0600/0700)",
            dir.display()
        ),
        Err(e) => return Err(io(e)),
    }
    Ok(Arc::new(
        FsBlobStore::with_upload_memory(dir, upload_memory_mib).map_err(io)?,
    ))
}

/// Opens the embedded backends: blobs under `dir`, metadata in `dir/meta.db`.
pub fn open_local_backends(dir: &Path) -> Result<(Arc<FsBlobStore>, Arc<SqliteMeta>), StoreError> {
    open_local_backends_with(dir, blob::DEFAULT_UPLOAD_MEMORY_MIB)
}

/// [`open_local_backends`] with uploads sharing `upload_memory_mib` MiB of buffers.
/// The directory and everything in it is private to the user running wharf; one made
/// readable by others is put right, with a log line.
pub fn open_local_backends_with(
    dir: &Path,
    upload_memory_mib: usize,
) -> Result<(Arc<FsBlobStore>, Arc<SqliteMeta>), StoreError> {
    let blobs = open_blob_dir(dir, upload_memory_mib)?;
    let io = |e: io::Error| StoreError::Internal(format!("{}: {e}", dir.display()));
    perms::touch_private(&dir.join("meta.db")).map_err(io)?;
    let meta = SqliteMeta::open(&dir.join("meta.db"))?;
    Ok((blobs, Arc::new(meta)))
}

/// One tag as the tag details listing shows it.
#[derive(Debug, Clone)]
pub struct TagDetail {
    pub name: String,
    pub digest: String,
    pub media_type: String,
    /// The bytes of the layers the tag's image(s) are made of, as pushed (compressed).
    pub size: u64,
    /// One per image: a single-platform tag has one, a multi-platform index one per entry.
    pub images: Vec<ImageDetail>,
    /// When the tag was last pointed at a manifest (unix milliseconds).
    pub pushed_at_ms: i64,
}

#[derive(Debug, Clone)]
pub struct ImageDetail {
    pub digest: String,
    pub platform: Option<Platform>,
    pub size: u64,
}

/// The largest image config read to learn an image's platform.
const MAX_CONFIG_READ: u64 = 1024 * 1024;

/// What a stored manifest answered.
#[derive(Debug, Clone)]
pub struct PutManifest {
    pub digest: Digest,
    pub subject: Option<Digest>,
}

/// The in-process part of an open upload: a lock that serializes its chunks, and the
/// running SHA-256 at a given length. Losing it (restart, another replica) only costs a
/// re-read of the upload to verify its digest.
#[derive(Default)]
struct UploadState {
    hasher: Option<(u64, Hasher)>,
    /// Set while a write holds the upload's lease ([`UploadLease`]): raised if the lease
    /// could not be renewed, which stops the write.
    lease_lost: Option<Arc<std::sync::atomic::AtomicBool>>,
}

type UploadSlot = Arc<tokio::sync::Mutex<UploadState>>;

/// An upload not written to for this long is removed.
pub const UPLOAD_MAX_IDLE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// A monolithic upload (`POST ?digest=`) cannot be resumed by any client: one not
/// written to for this long was cut off and is removed.
pub const MONOLITHIC_MAX_IDLE: std::time::Duration = std::time::Duration::from_secs(600);

/// Manifest pulls held in memory between two writes, at most.
const MAX_PENDING_PULLS: usize = 100_000;

/// Uploads writing at once, at most, by default (`[limits] max_uploads`).
pub const DEFAULT_MAX_UPLOADS: usize = 256;

/// How long `/readyz` waits for the database and for the storage.
pub const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What [`Store::ready`] found: for each part, why it is not ready (`None`: it is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub database: Option<String>,
    pub storage: Option<String>,
}

impl Readiness {
    pub fn ok(&self) -> bool {
        self.database.is_none() && self.storage.is_none()
    }
}

pub struct Store {
    blobs: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    uploads: Mutex<HashMap<String, UploadSlot>>,
    max_manifest: usize,
    /// One per upload request writing now (PATCH, PUT or POST with a body).
    writing: Arc<tokio::sync::Semaphore>,
    max_uploads: usize,
    /// Uploads being re-read to verify their digest, at most one per core.
    rehashing: tokio::sync::Semaphore,
    gc: gc::GcSettings,
    /// Retention rules of the config file.
    retention: Vec<retention::RetentionRule>,
    /// Manifest pulls not yet written: `repo@digest` to (repository, digest, unix ms).
    pulls: Mutex<HashMap<String, (String, String, i64)>>,
    track_pulls: bool,
    /// The last readiness check and when it ended.
    readiness: tokio::sync::Mutex<Option<(std::time::Instant, Readiness)>>,
    /// This replica's name, when several share the database: each write to an upload
    /// then holds the upload's lease in the database ([`UploadLease`]).
    replica: Option<String>,
}

/// How long an upload's write lease lasts unless renewed, how often its holder renews
/// it, and how long without a renewal makes the holder stop writing (well before another
/// replica could take the lease).
const UPLOAD_LEASE: std::time::Duration = std::time::Duration::from_secs(30);
const UPLOAD_LEASE_RENEW: std::time::Duration = std::time::Duration::from_secs(5);
const UPLOAD_LEASE_STOP: std::time::Duration = std::time::Duration::from_secs(15);

/// This replica's right to write one upload, held in the database while several
/// replicas share it, so that two chunks of one upload are never written at once on two
/// replicas (nor one expired by a replica while another writes it). Renewed in the
/// background while held; [`UploadLease::release`] gives it up.
struct UploadLease {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
    /// Set when the lease could not be renewed in time: the write stops.
    lost: Arc<std::sync::atomic::AtomicBool>,
}

impl UploadLease {
    /// Stops renewing and gives the lease up, before the caller answers (so the client's
    /// next request, on any replica, finds it free).
    async fn release(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }
}

impl Drop for UploadLease {
    fn drop(&mut self) {
        // A request that went away: the renewer gives the lease up by itself.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Store {
    pub fn new(blobs: Arc<dyn BlobStore>, meta: Arc<dyn MetaStore>) -> Store {
        Store {
            blobs,
            meta,
            uploads: Mutex::new(HashMap::new()),
            max_manifest: DEFAULT_MAX_MANIFEST,
            writing: Arc::new(tokio::sync::Semaphore::new(DEFAULT_MAX_UPLOADS)),
            max_uploads: DEFAULT_MAX_UPLOADS,
            rehashing: tokio::sync::Semaphore::new(crate::auth::parallelism()),
            gc: gc::GcSettings::default(),
            retention: Vec::new(),
            pulls: Mutex::new(HashMap::new()),
            track_pulls: true,
            readiness: tokio::sync::Mutex::new(None),
            replica: None,
        }
    }

    /// Several replicas share this store's database and blobs: writes to an upload take
    /// its lease in the database (see [`UploadLease`]).
    pub fn with_shared_uploads(mut self) -> Store {
        self.replica = Some(uuid::Uuid::new_v4().to_string());
        self
    }

    /// Takes upload `id`'s write lease when replicas share the store; refused while
    /// another replica writes it.
    async fn lease_upload(&self, id: &str) -> Result<Option<UploadLease>, StoreError> {
        let Some(owner) = self.replica.clone() else {
            return Ok(None);
        };
        let ms = UPLOAD_LEASE.as_millis() as i64;
        if !self.meta.upload_lease(id, &owner, ms).await? {
            return Err(StoreError::Overloaded(format!(
                "upload {id} is being written by another request; retry once it has finished"
            )));
        }
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (meta, id, flag) = (Arc::clone(&self.meta), id.to_owned(), Arc::clone(&lost));
        let done = tokio::spawn(async move {
            let mut renewed = std::time::Instant::now();
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    () = tokio::time::sleep(UPLOAD_LEASE_RENEW) => {
                        match meta.upload_lease(&id, &owner, ms).await {
                            Ok(true) => renewed = std::time::Instant::now(),
                            Ok(false) => flag.store(true, std::sync::atomic::Ordering::SeqCst),
                            Err(e) => {
                                tracing::warn!(error = %e, upload = %id, "could not renew an upload's lease");
                                if renewed.elapsed() > UPLOAD_LEASE_STOP {
                                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                                }
                            }
                        }
                    }
                }
            }
            if let Err(e) = meta.upload_release(&id, &owner).await {
                tracing::warn!(error = %e, upload = %id, "could not release an upload's lease (it runs out by itself)");
            }
        });
        Ok(Some(UploadLease {
            stop: Some(stop),
            done: Some(done),
            lost,
        }))
    }

    /// Whether manifest pulls are recorded (for retention's `keep-pulled`).
    pub fn with_pull_tracking(mut self, on: bool) -> Store {
        self.track_pulls = on;
        self
    }

    /// The retention rules of the config file (those of `wharf retention` are read from
    /// the database at each run).
    pub fn with_retention(mut self, rules: Vec<retention::RetentionRule>) -> Store {
        self.retention = rules;
        self
    }

    /// Writes the manifest pulls recorded since the last call, in one transaction.
    pub async fn flush_pulls(&self) -> Result<usize, StoreError> {
        let pulls: Vec<(String, String, i64)> = {
            let mut map = self.pulls.lock().expect("pulls lock");
            if map.is_empty() {
                return Ok(0);
            }
            std::mem::take(&mut *map).into_values().collect()
        };
        let n = pulls.len();
        self.meta.record_pulls(pulls).await?;
        Ok(n)
    }

    /// Remembers that `repo`'s manifest `digest` was pulled now; written by
    /// [`Store::flush_pulls`]. At most [`MAX_PENDING_PULLS`] are held: past it a pull is
    /// not recorded until the next flush (only retention's `keep-pulled` reads them).
    pub fn note_pull(&self, repo: &str, digest: &str) {
        if !self.track_pulls {
            return;
        }
        let key = format!("{repo}@{digest}");
        let now = meta::now_ms();
        let mut map = self.pulls.lock().expect("pulls lock");
        if let Some(e) = map.get_mut(&key) {
            e.2 = now;
        } else if map.len() < MAX_PENDING_PULLS {
            map.insert(key, (repo.to_owned(), digest.to_owned(), now));
        }
    }

    /// Garbage collection's delay and whether referrers go with their subject.
    pub fn with_gc(mut self, settings: gc::GcSettings) -> Store {
        self.gc = settings;
        self
    }

    pub fn gc_settings(&self) -> &gc::GcSettings {
        &self.gc
    }

    /// At most `n` upload requests write at once; past it they are refused with
    /// [`StoreError::Overloaded`] (503), so that neither descriptors nor memory run out.
    pub fn with_max_uploads(mut self, n: usize) -> Store {
        self.writing = Arc::new(tokio::sync::Semaphore::new(n.max(1)));
        self.max_uploads = n.max(1);
        self
    }

    /// A place among the uploads writing now, or 503 (manifest bodies take one too).
    pub fn writing_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, StoreError> {
        Arc::clone(&self.writing).try_acquire_owned().map_err(|_| {
            StoreError::Overloaded(format!(
                "{} uploads are being written at once, the most this registry takes; retry in a moment",
                self.max_uploads
            ))
        })
    }

    /// Whether the database and the blob storage answer now, each within
    /// [`READY_TIMEOUT`]: what `/readyz` reports to a load balancer. One check runs at a
    /// time and its answer serves for a second, so a flood of anonymous probes costs
    /// one check a second.
    pub async fn ready(&self) -> Readiness {
        let mut last = match tokio::time::timeout(READY_TIMEOUT, self.readiness.lock()).await {
            Ok(l) => l,
            Err(_) => {
                let waiting = Some("a check is still waiting for an answer".to_owned());
                return Readiness {
                    database: waiting.clone(),
                    storage: waiting,
                };
            }
        };
        if let Some((at, r)) = last.as_ref() {
            if at.elapsed() < std::time::Duration::from_secs(1) {
                return r.clone();
            }
        }
        let r = self.check_ready().await;
        *last = Some((std::time::Instant::now(), r.clone()));
        r
    }

    async fn check_ready(&self) -> Readiness {
        async fn within<E: std::fmt::Display>(
            f: impl std::future::Future<Output = Result<(), E>>,
        ) -> Option<String> {
            match tokio::time::timeout(READY_TIMEOUT, f).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!("no answer within {} s", READY_TIMEOUT.as_secs())),
            }
        }
        let (database, storage) =
            tokio::join!(within(self.meta.ready()), within(self.blobs.ready()));
        Readiness { database, storage }
    }

    /// Upload requests writing now, and the most allowed.
    pub fn uploads_writing(&self) -> (usize, usize) {
        (
            self.max_uploads - self.writing.available_permits(),
            self.max_uploads,
        )
    }

    /// Upload buffers in use, and the budget (see `blob::direct`).
    pub fn upload_buffers(&self) -> (usize, usize) {
        self.blobs.upload_buffers()
    }

    /// Gives memory kept warm for uploads and unused for a while back to the system.
    pub fn trim(&self) {
        self.blobs.trim();
    }

    /// The embedded default: blobs under `dir`, metadata in `dir/meta.db`.
    pub fn open_local(dir: &Path) -> Result<Store, StoreError> {
        let (blobs, meta) = open_local_backends(dir)?;
        Ok(Store::new(blobs, meta))
    }

    pub fn max_manifest(&self) -> usize {
        self.max_manifest
    }

    /// The lock of upload `id`, created on first use. Only for uploads known to exist:
    /// see [`Store::lock_upload`].
    fn slot(&self, id: &str) -> UploadSlot {
        let mut map = self.uploads.lock().expect("uploads lock");
        Arc::clone(map.entry(id.to_owned()).or_default())
    }

    fn forget(&self, id: &str) {
        self.uploads.lock().expect("uploads lock").remove(id);
    }

    /// Forgets `id`'s lock unless another request holds or waits for it.
    fn forget_unused(&self, id: &str) {
        let mut map = self.uploads.lock().expect("uploads lock");
        if map.get(id).is_some_and(|s| Arc::strong_count(s) == 1) {
            map.remove(id);
        }
    }

    /// Locks upload `id` of `repo` and returns its row. Nothing is kept in memory for an
    /// id that does not exist (its requests are answered 404 and leave no trace), and the
    /// row is read again under the lock, since the upload may have ended meanwhile.
    async fn lock_upload(
        &self,
        repo: &RepoName,
        id: &str,
    ) -> Result<(tokio::sync::OwnedMutexGuard<UploadState>, meta::UploadRow), StoreError> {
        self.upload_row(repo, id).await?;
        let guard = self.slot(id).lock_owned().await;
        match self.upload_row(repo, id).await {
            Ok(row) => Ok((guard, row)),
            Err(e) => {
                drop(guard);
                self.forget_unused(id);
                Err(e)
            }
        }
    }

    // ---- blobs ----

    /// The size of `digest` if `repo` may serve it. A link not used for half the GC
    /// delay is marked used, so that a client that saw it (a HEAD before pushing the
    /// manifest that references it) has a whole delay before the collector may take it.
    pub async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<u64, StoreError> {
        let link = self
            .meta
            .link(repo.as_str(), digest.as_str())
            .await?
            .ok_or(StoreError::BlobUnknown)?;
        let delay = i64::try_from(self.gc.delay.as_millis()).unwrap_or(i64::MAX);
        if delay > 0
            && link.touched_at < meta::now_ms().saturating_sub(delay / 2)
            && !self.meta.touch_link(repo.as_str(), digest.as_str()).await?
        {
            return Err(StoreError::BlobUnknown);
        }
        Ok(link.size)
    }

    pub async fn blob_read(
        &self,
        digest: &Digest,
        range: Range<u64>,
    ) -> Result<ByteStream, StoreError> {
        Ok(self.blobs.read(digest, range).await?)
    }

    /// Where a client may fetch blob `digest` itself, when the backend redirects.
    pub fn blob_redirect(&self, digest: &Digest) -> Option<String> {
        self.blobs.redirect_url(digest)
    }

    /// The local file holding blob `digest`, when the backend keeps one.
    pub async fn blob_file(&self, digest: &Digest) -> Result<Option<std::fs::File>, StoreError> {
        Ok(self.blobs.open_file(digest).await?)
    }

    /// Removes `repo`'s link to the blob. The bytes stay until garbage collection finds
    /// no repository links them.
    pub async fn blob_delete(
        &self,
        repo: &RepoName,
        digest: &Digest,
        by: &Who,
    ) -> Result<(), StoreError> {
        if self
            .meta
            .unlink_blob(repo.as_str(), digest.as_str(), by)
            .await?
        {
            Ok(())
        } else {
            Err(StoreError::BlobUnknown)
        }
    }

    /// Links `digest` into `repo` from `from`; None if `from` does not hold it.
    pub async fn blob_mount(
        &self,
        repo: &RepoName,
        from: &RepoName,
        digest: &Digest,
        by: &Who,
    ) -> Result<Option<u64>, StoreError> {
        Ok(self
            .meta
            .mount_blob(repo.as_str(), from.as_str(), digest.as_str(), by)
            .await?)
    }

    // ---- uploads ----

    pub async fn upload_start(&self, repo: &RepoName) -> Result<String, StoreError> {
        let id = uuid::Uuid::new_v4().to_string();
        self.meta.upload_create(&id, repo.as_str(), false).await?;
        Ok(id)
    }

    async fn upload_row(&self, repo: &RepoName, id: &str) -> Result<meta::UploadRow, StoreError> {
        match self.meta.upload_get(id).await? {
            Some(row) if row.repository == repo.as_str() => Ok(row),
            _ => Err(StoreError::UploadUnknown),
        }
    }

    /// Bytes received so far by upload `id`.
    pub async fn upload_status(&self, repo: &RepoName, id: &str) -> Result<u64, StoreError> {
        Ok(self.upload_row(repo, id).await?.size)
    }

    /// Appends a chunk. `start` (from Content-Range) must equal the current size; `len`
    /// (from Content-Length) must equal the bytes received. Returns the new size.
    pub async fn upload_append(
        &self,
        repo: &RepoName,
        id: &str,
        start: Option<u64>,
        len: Option<u64>,
        body: ByteStream,
    ) -> Result<u64, StoreError> {
        let _writing = self.writing_permit()?;
        let (mut state, mut row) = self.lock_upload(repo, id).await?;
        let lease = self.lease_upload(id).await?;
        if lease.is_some() {
            // Read again under the lease: another replica may have written since.
            row = self.upload_row(repo, id).await?;
        }
        state.lease_lost = lease.as_ref().map(|l| Arc::clone(&l.lost));
        let r = self
            .append_locked(&mut state, id, row.size, start, len, body)
            .await;
        if let Some(l) = lease {
            l.release().await;
        }
        r
    }

    async fn append_locked(
        &self,
        state: &mut UploadState,
        id: &str,
        size: u64,
        start: Option<u64>,
        len: Option<u64>,
        body: ByteStream,
    ) -> Result<u64, StoreError> {
        let lost = state.lease_lost.take();
        if let Some(start) = start {
            if start != size {
                return Err(StoreError::RangeMismatch {
                    start,
                    current: size,
                });
            }
        }
        let hasher = match state.hasher.take() {
            Some((at, h)) if at == size => Some(h),
            _ if size == 0 => Some(Algorithm::Sha256.hasher()),
            _ => None,
        };
        // The backend hashes while it writes: see `BlobStore::upload_write`.
        let mut count = 0u64;
        let lost_in_body = lost.clone();
        let checked = body.map(move |chunk| {
            chunk.and_then(|c| {
                if lost_in_body
                    .as_ref()
                    .is_some_and(|l| l.load(std::sync::atomic::Ordering::SeqCst))
                {
                    return Err(io::Error::other(
                        "the upload's lease in the database could not be renewed",
                    ));
                }
                count += c.len() as u64;
                if len.is_some_and(|l| count > l) {
                    Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "body is longer than its declared length",
                    ))
                } else {
                    Ok(c)
                }
            })
        });
        let written = self
            .blobs
            .upload_write(id, size, Box::pin(checked), hasher)
            .await;
        let (written, hasher) = match written {
            Ok(w) => w,
            Err(e) => {
                // Whatever the failed write left past the recorded size is cut off now,
                // not at the next write: a body cut at 90 % of 2 GiB frees its disk.
                let lease_lost = lost
                    .as_ref()
                    .is_some_and(|l| l.load(std::sync::atomic::Ordering::SeqCst));
                // Not once the lease is lost: the bytes may be another replica's now.
                if lease_lost {
                    state.hasher = None;
                } else if let Err(t) = self.blobs.upload_truncate(id, size).await {
                    tracing::warn!(error = %t, upload = id, "could not cut back a failed upload");
                }
                let e = StoreError::from(e);
                if size == 0 && matches!(e, StoreError::StorageFull) {
                    // Nothing of it is stored and the client starts over: no empty row.
                    let _ = self.meta.upload_delete(id).await;
                    let _ = self.blobs.upload_delete(id).await;
                    state.hasher = None;
                    self.forget(id);
                }
                return Err(e);
            }
        };
        let new_size = size + written;
        if lost
            .as_ref()
            .is_some_and(|l| l.load(std::sync::atomic::Ordering::SeqCst))
        {
            state.hasher = None;
            return Err(StoreError::Overloaded(format!(
                "upload {id}: this replica lost the upload's lease while writing; ask its status and resume"
            )));
        }
        if let Err(e) = self.meta.upload_set_size(id, size, new_size).await {
            // Another write counted instead (or the upload ended): these bytes do not,
            // and the hash of them is not the upload's.
            state.hasher = None;
            return Err(e.into());
        }
        state.hasher = hasher.map(|h| (new_size, h));
        Ok(new_size)
    }

    /// Finishes upload `id` as blob `digest`, after appending `last` (a final chunk) if
    /// given. The digest is verified before the blob becomes visible.
    pub async fn upload_finish(
        &self,
        repo: &RepoName,
        id: &str,
        digest: &Digest,
        last: Option<(Option<u64>, Option<u64>, ByteStream)>,
    ) -> Result<u64, StoreError> {
        let _writing = match last {
            Some(_) => Some(self.writing_permit()?),
            None => None,
        };
        let (mut state, mut row) = self.lock_upload(repo, id).await?;
        let lease = self.lease_upload(id).await?;
        if lease.is_some() {
            row = self.upload_row(repo, id).await?;
        }
        state.lease_lost = lease.as_ref().map(|l| Arc::clone(&l.lost));
        let r = self.finish_locked(state, row, repo, id, digest, last).await;
        if let Some(l) = lease {
            l.release().await;
        }
        r
    }

    async fn finish_locked(
        &self,
        mut state: tokio::sync::OwnedMutexGuard<UploadState>,
        row: meta::UploadRow,
        repo: &RepoName,
        id: &str,
        digest: &Digest,
        last: Option<(Option<u64>, Option<u64>, ByteStream)>,
    ) -> Result<u64, StoreError> {
        let mut size = row.size;
        if let Some((start, len, body)) = last {
            size = self
                .append_locked(&mut state, id, size, start, len, body)
                .await?;
        }
        // The running hash answers at once; it stays, so a wrong digest given first
        // does not cost a re-read of the upload at the next try.
        let cached = match &state.hasher {
            Some((at, h)) if *at == size && h.algorithm() == digest.algorithm() => {
                Some(h.clone().finish())
            }
            _ => None,
        };
        let computed = match cached {
            Some(d) => Some(d),
            None => match self.blobs.upload_read(id, size).await {
                Ok(mut bytes) => {
                    // Re-reading (after a restart, or for another algorithm) hashes on
                    // the blocking pool, a few uploads at a time.
                    let _permit = self
                        .rehashing
                        .acquire()
                        .await
                        .map_err(|_| StoreError::Internal("rehashing closed".into()))?;
                    let mut h = digest.algorithm().hasher();
                    while let Some(chunk) = bytes.next().await {
                        let chunk = chunk.map_err(|e| StoreError::Internal(e.to_string()))?;
                        h = tokio::task::spawn_blocking(move || {
                            h.update(&chunk);
                            h
                        })
                        .await
                        .map_err(|e| StoreError::Internal(e.to_string()))?;
                    }
                    Some(h.finish())
                }
                // Never written to: the empty blob.
                Err(BlobError::UploadNotFound) if size == 0 && row.digest.is_none() => {
                    Some(Digest::of(digest.algorithm(), b""))
                }
                // The bytes were renamed into place but the metadata was not committed
                // (a crash or a full disk between the two). Only the digest they were
                // verified to have, recorded before the rename, may finish the upload:
                // another blob of the same size is someone else's bytes.
                Err(BlobError::UploadNotFound)
                    if row.digest.as_deref() == Some(digest.as_str())
                        && self.blobs.stat(digest).await? == Some(size) =>
                {
                    None
                }
                Err(BlobError::UploadNotFound) => return Err(StoreError::UploadUnknown),
                Err(e) => return Err(e.into()),
            },
        };
        if let Some(computed) = computed {
            if computed != *digest {
                return Err(StoreError::DigestMismatch {
                    provided: digest.to_string(),
                    computed: computed.to_string(),
                });
            }
            self.claim(id, digest).await?;
            self.blobs.upload_commit(id, size, digest).await?;
        }
        match self
            .meta
            .upload_complete(id, repo.as_str(), digest.as_str(), size)
            .await
        {
            Ok(()) => {}
            // Over quota: nothing was counted; the upload ends (its bytes, if no one
            // else's, go with the next garbage collection pass).
            Err(MetaError::Quota(why)) => {
                let _ = self.meta.upload_delete(id).await;
                drop(state);
                self.forget(id);
                return Err(StoreError::Quota(why));
            }
            Err(e) => return Err(e.into()),
        }
        drop(state);
        self.forget(id);
        Ok(size)
    }

    pub async fn upload_cancel(&self, repo: &RepoName, id: &str) -> Result<(), StoreError> {
        let _state = self.lock_upload(repo, id).await?;
        // Not while another replica writes it.
        let _lease = self.lease_upload(id).await?;
        self.meta.upload_delete(id).await?;
        self.blobs.upload_delete(id).await?;
        self.forget(id);
        Ok(())
    }

    /// Removes uploads idle for longer than `max_idle`, monolithic ones (which no client
    /// can resume) idle for longer than `monolithic_idle`, and upload data that no open
    /// upload owns (left by a crash between the two deletes of a cancel). Returns how
    /// many uploads were removed.
    pub async fn expire_uploads(
        &self,
        max_idle: std::time::Duration,
        monolithic_idle: std::time::Duration,
    ) -> Result<usize, StoreError> {
        let mut removed = 0;
        for id in self.uploads_idle(max_idle, monolithic_idle).await? {
            if self.expire_upload(&id).await? {
                removed += 1;
            }
        }
        self.sweep_upload_data().await?;
        Ok(removed)
    }

    /// Uploads idle for longer than `max_idle`, and monolithic ones idle for longer than
    /// `monolithic_idle`.
    async fn uploads_idle(
        &self,
        max_idle: std::time::Duration,
        monolithic_idle: std::time::Duration,
    ) -> Result<Vec<String>, StoreError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let cutoff = |idle: std::time::Duration| {
            i64::try_from(now.saturating_sub(idle).as_millis()).unwrap_or(i64::MAX)
        };
        let mut idle = self
            .meta
            .uploads_idle_since(cutoff(max_idle), false)
            .await?;
        idle.extend(
            self.meta
                .uploads_idle_since(cutoff(monolithic_idle), true)
                .await?,
        );
        idle.sort();
        idle.dedup();
        Ok(idle)
    }

    /// Uploads past their idle limits ([`UPLOAD_MAX_IDLE`], [`MONOLITHIC_MAX_IDLE`]).
    pub(crate) async fn expired_uploads(&self) -> Result<Vec<String>, StoreError> {
        self.uploads_idle(UPLOAD_MAX_IDLE, MONOLITHIC_MAX_IDLE)
            .await
    }

    /// Removes upload `id` unless a request is writing to it right now.
    pub(crate) async fn expire_upload(&self, id: &str) -> Result<bool, StoreError> {
        let slot = self.slot(id);
        let Ok(_state) = slot.try_lock() else {
            return Ok(false);
        };
        self.meta.upload_delete(id).await?;
        self.blobs.upload_delete(id).await?;
        self.forget(id);
        Ok(true)
    }

    /// Removes upload data that no open upload owns.
    pub(crate) async fn sweep_upload_data(&self) -> Result<(), StoreError> {
        for id in self.blobs.upload_ids().await? {
            if self.meta.upload_get(&id).await?.is_none() {
                let slot = self.slot(&id);
                let Ok(_state) = slot.try_lock() else {
                    continue;
                };
                // Re-check under the lock: the upload may have been created meanwhile.
                if self.meta.upload_get(&id).await?.is_none() {
                    self.blobs.upload_delete(&id).await?;
                }
                self.forget(&id);
            }
        }
        Ok(())
    }

    /// A whole blob in one request (`POST ?digest=`).
    pub async fn blob_put(
        &self,
        repo: &RepoName,
        digest: &Digest,
        len: Option<u64>,
        body: ByteStream,
    ) -> Result<u64, StoreError> {
        if self.writing.available_permits() == 0 {
            return Err(self.writing_permit().err().unwrap_or_else(|| {
                StoreError::Overloaded("too many uploads at once; retry in a moment".into())
            }));
        }
        let id = uuid::Uuid::new_v4().to_string();
        self.meta.upload_create(&id, repo.as_str(), true).await?;
        let result = self
            .upload_finish(repo, &id, digest, Some((None, len, body)))
            .await;
        if result.is_err() {
            let _ = self.meta.upload_delete(&id).await;
            let _ = self.blobs.upload_delete(&id).await;
            self.forget(&id);
        }
        result
    }

    // ---- manifests ----

    /// Stores a manifest under `reference` (a tag, or the digest it must have), tagging it
    /// also with `extra_tags`.
    pub async fn manifest_put(
        &self,
        repo: &RepoName,
        reference: &Reference,
        extra_tags: Vec<String>,
        content_type: Option<&str>,
        body: Bytes,
        by: Who,
    ) -> Result<PutManifest, StoreError> {
        if body.len() > self.max_manifest {
            return Err(StoreError::ManifestTooLarge {
                size: body.len(),
                limit: self.max_manifest,
            });
        }
        let mut tags = extra_tags;
        let digest = match reference {
            Reference::Tag(t) => {
                tags.push(t.clone());
                Digest::sha256_of(&body)
            }
            Reference::Digest(d) => {
                let computed = Digest::of(d.algorithm(), &body);
                if computed != *d {
                    return Err(StoreError::DigestMismatch {
                        provided: d.to_string(),
                        computed: computed.to_string(),
                    });
                }
                computed
            }
        };
        let parsed = manifest::parse(&body, content_type)?;
        let annotations = parsed
            .annotations
            .as_ref()
            .map(|a| serde_json::to_string(a).expect("string map serializes"));
        let record = meta::NewManifest {
            digest: digest.to_string(),
            media_type: parsed.media_type,
            artifact_type: parsed.artifact_type,
            subject: parsed.subject.as_ref().map(ToString::to_string),
            annotations,
            content: body,
            blobs: parsed
                .blobs
                .iter()
                .map(|(d, s)| (d.to_string(), *s))
                .collect(),
            children: parsed
                .children
                .iter()
                .map(|(d, s)| (d.to_string(), *s))
                .collect(),
            tags,
            by,
        };
        self.meta.manifest_put(repo.as_str(), record).await?;
        Ok(PutManifest {
            digest,
            subject: parsed.subject,
        })
    }

    pub async fn manifest_get(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<ManifestRecord, StoreError> {
        let found = match reference {
            Reference::Tag(t) => self.meta.manifest_by_tag(repo.as_str(), t).await?,
            Reference::Digest(d) => {
                self.meta
                    .manifest_by_digest(repo.as_str(), d.as_str())
                    .await?
            }
        };
        found.ok_or(StoreError::ManifestUnknown)
    }

    /// Deletes a tag (by tag) or a manifest and all its tags (by digest).
    pub async fn manifest_delete(
        &self,
        repo: &RepoName,
        reference: &Reference,
        by: &Who,
    ) -> Result<(), StoreError> {
        let deleted = match reference {
            Reference::Tag(t) => self.meta.tag_delete(repo.as_str(), t, by).await?,
            Reference::Digest(d) => {
                self.meta
                    .manifest_delete(repo.as_str(), d.as_str(), by, self.gc.delete_referrers)
                    .await?
            }
        };
        if deleted {
            Ok(())
        } else {
            Err(StoreError::ManifestUnknown)
        }
    }

    pub async fn tags(
        &self,
        repo: &RepoName,
        last: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        self.meta
            .tags(repo.as_str(), last, limit)
            .await?
            .ok_or(StoreError::NameUnknown)
    }

    pub async fn repositories(
        &self,
        last: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        Ok(self.meta.repositories(last, limit).await?)
    }

    /// Up to `limit` repository names in `keys` after `last` (see
    /// [`MetaStore::repositories_in`]).
    pub async fn repositories_in(
        &self,
        keys: &crate::oci::keyset::KeySet,
        last: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        Ok(self.meta.repositories_in(keys, last, limit).await?)
    }

    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
    ) -> Result<Vec<Referrer>, StoreError> {
        Ok(self.meta.referrers(repo.as_str(), subject.as_str()).await?)
    }

    // ---- tag details and policies ----

    /// The repository's tag count and one page of tags with digest, size, platforms and
    /// push time, read in one pass over the metadata.
    pub async fn tag_details(
        &self,
        repo: &RepoName,
        order: TagOrder,
        offset: u64,
        limit: u32,
    ) -> Result<(u64, Vec<TagDetail>), StoreError> {
        let (count, rows) = self
            .meta
            .tag_page(repo.as_str(), order, offset, limit)
            .await?
            .ok_or(StoreError::NameUnknown)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let shape = manifest::shape(&row.content).unwrap_or_default();
            let images = if manifest::is_index_type(&row.media_type) {
                self.index_images(repo, &shape).await?
            } else {
                vec![ImageDetail {
                    digest: row.digest.clone(),
                    platform: self.config_platform(shape.config.as_ref()).await,
                    size: shape.layers_size,
                }]
            };
            let size = if images.is_empty() {
                // An index of blobs (a build cache): its entries are the layers.
                shape
                    .entries
                    .iter()
                    .map(|e| u64::try_from(e.size).unwrap_or(0))
                    .sum()
            } else {
                images.iter().map(|i| i.size).sum()
            };
            out.push(TagDetail {
                name: row.name,
                digest: row.digest,
                media_type: row.media_type,
                size,
                images,
                pushed_at_ms: row.updated_at,
            });
        }
        Ok((count, out))
    }

    /// The images of an index: each manifest entry with its platform and layer size.
    /// Attestation entries (`unknown/unknown`) are not images and are left out.
    async fn index_images(
        &self,
        repo: &RepoName,
        shape: &manifest::Shape,
    ) -> Result<Vec<ImageDetail>, StoreError> {
        let mut images = Vec::new();
        for e in &shape.entries {
            if !manifest::is_manifest_type(&e.media_type) {
                continue;
            }
            let unknown = e
                .platform
                .as_ref()
                .and_then(|p| p.get("os"))
                .is_some_and(|os| os == "unknown");
            if unknown {
                continue;
            }
            let child = self
                .meta
                .manifest_by_digest(repo.as_str(), &e.digest)
                .await?;
            let child_shape = child
                .and_then(|c| manifest::shape(&c.content))
                .unwrap_or_default();
            let platform = match e.platform.as_ref().and_then(Platform::from_json) {
                Some(p) => Some(p),
                None => self.config_platform(child_shape.config.as_ref()).await,
            };
            images.push(ImageDetail {
                digest: e.digest.clone(),
                platform,
                size: child_shape.layers_size,
            });
        }
        Ok(images)
    }

    /// The platform an image config records; None for artifacts and unreadable configs.
    async fn config_platform(&self, config: Option<&manifest::Descriptor>) -> Option<Platform> {
        let config = config?;
        if !manifest::IMAGE_CONFIG_TYPES.contains(&config.media_type.as_str()) {
            return None;
        }
        let size = u64::try_from(config.size)
            .ok()
            .filter(|&s| s <= MAX_CONFIG_READ)?;
        let digest: Digest = config.digest.parse().ok()?;
        let mut stream = self.blobs.read(&digest, 0..size).await.ok()?;
        let mut buf = Vec::with_capacity(size as usize);
        while let Some(chunk) = stream.next().await {
            buf.extend_from_slice(&chunk.ok()?);
        }
        let v: serde_json::Value = serde_json::from_slice(&buf).ok()?;
        Platform::from_json(&v)
    }

    pub async fn policies(&self) -> Result<Vec<TagPolicy>, StoreError> {
        Ok(self.meta.policies().await?)
    }

    /// Adds an immutability policy over `repositories` for the tags matching `globs`
    /// (checked with [`policy::parse_tag_globs`]).
    pub async fn policy_add(
        &self,
        repositories: &crate::auth::Pattern,
        globs: &[String],
        by: Option<&str>,
    ) -> Result<i64, StoreError> {
        Ok(self
            .meta
            .policy_add(&repositories.to_string(), globs, by)
            .await?)
    }

    pub async fn policy_remove(&self, id: i64) -> Result<bool, StoreError> {
        Ok(self.meta.policy_remove(id).await?)
    }
}
