//! Blobs as files: `blobs/<alg>/<2 hex>/<hex>`, uploads as `uploads/<id>`.
//! A blob file appears only by rename of a fully written, fsynced upload, so a reader
//! never sees a partial blob, and a crash leaves at most an orphan upload file.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;
use tokio_util::io::ReaderStream;

use super::{BlobError, BlobStore, ByteStream};
use crate::oci::Digest;

const READ_BUFFER: usize = 256 * 1024;
const WRITE_BUFFER: usize = 1024 * 1024;

pub struct FsBlobStore {
    root: PathBuf,
}

impl FsBlobStore {
    /// Opens (creating if needed) a blob store under `root`.
    pub fn open(root: &Path) -> io::Result<FsBlobStore> {
        std::fs::create_dir_all(root.join("blobs"))?;
        std::fs::create_dir_all(root.join("uploads"))?;
        Ok(FsBlobStore {
            root: root.to_owned(),
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

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("blocking task failed: {e}")))?
}

async fn open_range(
    path: PathBuf,
    range: Range<u64>,
    missing: BlobError,
) -> Result<ByteStream, BlobError> {
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| not_found_as(e, missing))?;
    if range.start > 0 {
        file.seek(SeekFrom::Start(range.start)).await?;
    }
    let reader = file.take(range.end - range.start);
    Ok(Box::pin(ReaderStream::with_capacity(reader, READ_BUFFER)))
}

#[async_trait]
impl BlobStore for FsBlobStore {
    async fn upload_write(
        &self,
        id: &str,
        offset: u64,
        mut data: ByteStream,
    ) -> Result<u64, BlobError> {
        let path = self.upload_path(id)?;
        // The body is read here while a blocking thread writes, so hashing (done by the
        // caller on this stream) and disk writes overlap.
        let (tx, mut rx) = mpsc::channel::<Bytes>(16);
        let writer = tokio::task::spawn_blocking(move || -> io::Result<u64> {
            let mut file = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(&path)?;
            file.set_len(offset)?;
            file.seek(SeekFrom::Start(offset))?;
            let mut out = io::BufWriter::with_capacity(WRITE_BUFFER, file);
            let mut written = 0u64;
            while let Some(chunk) = rx.blocking_recv() {
                out.write_all(&chunk)?;
                written += chunk.len() as u64;
            }
            let file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
            file.sync_data()?;
            Ok(written)
        });
        let mut body_error = None;
        while let Some(chunk) = data.next().await {
            match chunk {
                Ok(c) => {
                    if tx.send(c).await.is_err() {
                        break; // the writer failed; its error is reported below
                    }
                }
                Err(e) => {
                    body_error = Some(e);
                    break;
                }
            }
        }
        drop(tx);
        let written = writer
            .await
            .map_err(|e| io::Error::other(format!("writer task failed: {e}")))??;
        match body_error {
            Some(e) => Err(BlobError::Body(e)),
            None => Ok(written),
        }
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
            let file = OpenOptions::new().write(true).open(&upload)?;
            file.set_len(len)?;
            file.sync_all()?;
            drop(file);
            let dir = target.parent().expect("blob path has a parent");
            std::fs::create_dir_all(dir)?;
            std::fs::rename(&upload, &target)?;
            sync_dir(dir)?;
            sync_dir(upload.parent().expect("upload path has a parent"))
        })
        .await
        .map_err(|e| not_found_as(e, BlobError::UploadNotFound))
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

    async fn delete(&self, digest: &Digest) -> Result<(), BlobError> {
        match tokio::fs::remove_file(self.blob_path(digest)).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
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
        assert!(store.upload_write("../x", 0, s).await.is_err());
    }
}
