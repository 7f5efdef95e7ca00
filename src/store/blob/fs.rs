//! Blobs as files: `blobs/<alg>/<2 hex>/<hex>`, uploads as `uploads/<id>`.
//! A blob file appears only by rename of a fully written, fsynced upload, so a reader
//! never sees a partial blob, and a crash leaves at most an orphan upload file.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;

use super::direct::{Engine, UploadWriter};
use super::{BlobError, BlobStore, ByteStream};
use crate::oci::{Digest, Hasher};

const READ_CHUNK: usize = 256 * 1024;
/// A body that brings nothing for this long while a partly filled buffer is held hands
/// the buffer off, so a stalled client holds no upload memory.
const FLUSH_IDLE: std::time::Duration = std::time::Duration::from_secs(1);
/// Upload memory of a store opened with [`FsBlobStore::open`].
pub const DEFAULT_UPLOAD_MEMORY_MIB: usize = 256;

pub struct FsBlobStore {
    root: PathBuf,
    engine: std::sync::Arc<Engine>,
    /// A readiness check is running (on a hung disk it may never return: no second one
    /// is started beside it).
    checking: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FsBlobStore {
    /// Opens (creating if needed) a blob store under `root`.
    pub fn open(root: &Path) -> io::Result<FsBlobStore> {
        FsBlobStore::with_upload_memory(root, DEFAULT_UPLOAD_MEMORY_MIB)
    }

    /// Opens a blob store whose uploads share `upload_memory_mib` MiB of buffers.
    pub fn with_upload_memory(root: &Path, upload_memory_mib: usize) -> io::Result<FsBlobStore> {
        crate::store::perms::create_dir_all(&root.join("blobs"))?;
        crate::store::perms::create_dir_all(&root.join("uploads"))?;
        Ok(FsBlobStore {
            root: root.to_owned(),
            engine: Engine::new(upload_memory_mib),
            checking: Default::default(),
        })
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root
            .join("blobs")
            .join(digest.algorithm().name())
            .join(&hex[..2])
            .join(hex)
    }

    fn upload_path(&self, id: &str) -> io::Result<PathBuf> {
        // Ids come from the registry, but never let one escape the folder.
        if id.is_empty()
            || id.len() > 64
            || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad upload id"));
        }
        Ok(self.root.join("uploads").join(id))
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn not_found_as(e: io::Error, err: BlobError) -> BlobError {
    if e.kind() == io::ErrorKind::NotFound {
        err
    } else {
        BlobError::Io(e)
    }
}

/// Clears a flag when dropped.
struct ResetOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("blocking task failed: {e}")))?
}

/// Streams `range` of the file at `path`, reading one chunk ahead of the one being sent,
/// so disk reads and socket writes overlap and each byte is copied once into user space.
/// Each chunk is read by a task of its own on the blocking pool: a slow reader holds a
/// thread only while a chunk is read, never while the client takes its time. Memory per
/// reader is bounded: the chunk being sent and the one read ahead.
async fn open_range(
    path: PathBuf,
    range: Range<u64>,
    missing: BlobError,
) -> Result<ByteStream, BlobError> {
    let file = blocking(move || File::open(&path))
        .await
        .map_err(|e| not_found_as(e, missing))?;
    let file = std::sync::Arc::new(file);
    let read = |file: &std::sync::Arc<File>, at: u64, end: u64| {
        let file = std::sync::Arc::clone(file);
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let n = usize::try_from(end - at).map_or(READ_CHUNK, |l| l.min(READ_CHUNK));
            let mut buf = vec![0u8; n];
            let mut got = 0;
            while got < n {
                match file.read_at(&mut buf[got..], at + got as u64) {
                    // The file is shorter than its recorded size: never send a short body.
                    Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                    Ok(k) => got += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(Bytes::from(buf))
        })
    };
    struct State {
        file: std::sync::Arc<File>,
        at: u64,
        end: u64,
        next: Option<tokio::task::JoinHandle<io::Result<Bytes>>>,
    }
    let first = (range.start < range.end).then(|| read(&file, range.start, range.end));
    let state = State {
        file,
        at: range.start,
        end: range.end,
        next: first,
    };
    Ok(Box::pin(futures_util::stream::unfold(
        Some(state),
        move |state| async move {
            let mut st = state?;
            let pending = st.next.take()?;
            let chunk = match pending.await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Some((Err(e), None)),
                Err(e) => return Some((Err(io::Error::other(e)), None)),
            };
            st.at += chunk.len() as u64;
            if st.at < st.end {
                st.next = Some(read(&st.file, st.at, st.end));
            }
            Some((Ok(chunk), Some(st)))
        },
    )))
}

#[async_trait]
impl BlobStore for FsBlobStore {
    async fn upload_write(
        &self,
        id: &str,
        offset: u64,
        mut data: ByteStream,
        hasher: Option<Hasher>,
    ) -> Result<(u64, Option<Hasher>), BlobError> {
        let path = self.upload_path(id)?;
        let engine = std::sync::Arc::clone(&self.engine);
        let mut out = blocking(move || UploadWriter::open(&engine, &path, offset, hasher)).await?;
        loop {
            let next = if out.holds_buffer() {
                match tokio::time::timeout(FLUSH_IDLE, data.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        // The body stalls: the partly filled buffer goes to disk.
                        out.flush().await?;
                        continue;
                    }
                }
            } else {
                data.next().await
            };
            let Some(chunk) = next else { break };
            // Each chunk is copied into the writer's buffers and dropped at once, so the
            // HTTP layer reads the next one into the same memory.
            out.write(&chunk.map_err(BlobError::Body)?).await?;
        }
        let (end, hasher) = out.finish().await?;
        Ok((end - offset, hasher))
    }

    async fn upload_read(&self, id: &str, len: u64) -> Result<ByteStream, BlobError> {
        open_range(self.upload_path(id)?, 0..len, BlobError::UploadNotFound).await
    }

    async fn upload_commit(&self, id: &str, len: u64, digest: &Digest) -> Result<(), BlobError> {
        let upload = self.upload_path(id)?;
        let target = self.blob_path(digest);
        blocking(move || {
            if target.exists() {
                return match std::fs::remove_file(&upload) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                };
            }
            let dir = target.parent().expect("blob path has a parent");
            if len == 0 && !upload.exists() {
                // An empty upload (no PATCH) has no file: the empty blob is made here.
                crate::store::perms::create_dir_all(dir)?;
                let tmp = dir.join(format!(".empty.{}", uuid::Uuid::new_v4().simple()));
                std::os::unix::fs::OpenOptionsExt::mode(
                    OpenOptions::new().write(true).create(true).truncate(true),
                    crate::store::perms::FILE_MODE,
                )
                .open(&tmp)?
                .sync_all()?;
                std::fs::rename(&tmp, &target)?;
                return sync_dir(dir);
            }
            // Every append ended with fdatasync, so the bytes are durable. A crash during
            // an append can leave bytes past the recorded length: cut them off first.
            let file = OpenOptions::new().write(true).open(&upload)?;
            if file.metadata()?.len() != len {
                file.set_len(len)?;
                file.sync_all()?;
            }
            drop(file);
            crate::store::perms::create_dir_all(dir)?;
            std::fs::rename(&upload, &target)?;
            // Syncing the blob's folder makes the rename durable. The uploads folder is
            // not synced: at worst a crash brings back a stale upload name, which the
            // sweeper removes as data no upload owns.
            sync_dir(dir)
        })
        .await
        .map_err(|e| not_found_as(e, BlobError::UploadNotFound))
    }

    async fn upload_truncate(&self, id: &str, len: u64) -> Result<(), BlobError> {
        let path = self.upload_path(id)?;
        blocking(move || match OpenOptions::new().write(true).open(&path) {
            Ok(f) if f.metadata()?.len() > len => f.set_len(len),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        })
        .await
        .map_err(BlobError::Io)
    }

    async fn upload_delete(&self, id: &str) -> Result<(), BlobError> {
        match tokio::fs::remove_file(self.upload_path(id)?).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    async fn upload_ids(&self) -> Result<Vec<String>, BlobError> {
        let dir = self.root.join("uploads");
        Ok(blocking(move || {
            let mut ids = Vec::new();
            for e in std::fs::read_dir(dir)? {
                if let Some(name) = e?.file_name().to_str() {
                    ids.push(name.to_owned());
                }
            }
            Ok(ids)
        })
        .await?)
    }

    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, BlobError> {
        match tokio::fs::metadata(self.blob_path(digest)).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn read(&self, digest: &Digest, range: Range<u64>) -> Result<ByteStream, BlobError> {
        open_range(self.blob_path(digest), range, BlobError::NotFound).await
    }

    fn trim(&self) {
        self.engine.trim();
    }

    fn upload_buffers(&self) -> (usize, usize) {
        self.engine.buffers()
    }

    async fn open_file(&self, digest: &Digest) -> Result<Option<File>, BlobError> {
        let path = self.blob_path(digest);
        blocking(move || File::open(path))
            .await
            .map(Some)
            .map_err(|e| not_found_as(e, BlobError::NotFound))
    }

    async fn delete(&self, digest: &Digest) -> Result<(), BlobError> {
        match tokio::fs::remove_file(self.blob_path(digest)).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    async fn ready(&self) -> Result<(), BlobError> {
        use std::sync::atomic::Ordering;
        if self.checking.swap(true, Ordering::AcqRel) {
            return Err(BlobError::Io(io::Error::other(
                "the previous check of the storage has not returned yet",
            )));
        }
        let dirs = [self.root.join("blobs"), self.root.join("uploads")];
        let checking = std::sync::Arc::clone(&self.checking);
        blocking(move || {
            let _done = ResetOnDrop(checking);
            for dir in &dirs {
                if !std::fs::metadata(dir)?.is_dir() {
                    return Err(io::Error::other(format!(
                        "{} is not a directory",
                        dir.display()
                    )));
                }
                rustix::fs::access(dir, rustix::fs::Access::WRITE_OK).map_err(|e| {
                    io::Error::other(format!("{} is not writable: {e}", dir.display()))
                })?;
            }
            Ok(())
        })
        .await
        .map_err(BlobError::Io)
    }

    async fn list(&self) -> Result<Vec<(Digest, u64)>, BlobError> {
        let root = self.root.join("blobs");
        Ok(blocking(move || {
            let mut out = Vec::new();
            let missing = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
            for algo in std::fs::read_dir(&root)? {
                let algo = algo?;
                let Some(a) = algo.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                for prefix in std::fs::read_dir(algo.path())? {
                    let prefix = prefix?;
                    let files = match std::fs::read_dir(prefix.path()) {
                        Ok(f) => f,
                        Err(e) if missing(&e) || e.kind() == io::ErrorKind::NotADirectory => {
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    for f in files {
                        let f = f?;
                        // Names that are not digests (the `.empty.*` files being made)
                        // are not blobs.
                        let Some(d) = f
                            .file_name()
                            .to_str()
                            .and_then(|hex| format!("{a}:{hex}").parse::<Digest>().ok())
                        else {
                            continue;
                        };
                        match f.metadata() {
                            Ok(m) => out.push((d, m.len())),
                            Err(e) if missing(&e) => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
            Ok(out)
        })
        .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fs_backend_passes_the_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        super::super::tests::suite(&store).await;
    }

    #[tokio::test]
    async fn upload_ids_cannot_escape() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let s: ByteStream = Box::pin(futures_util::stream::empty());
        assert!(store.upload_write("../x", 0, s, None).await.is_err());
    }
}
