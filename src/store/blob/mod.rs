//! Content-addressed blob bytes. Addressed only by digest (and, while an upload is open,
//! by upload id). Knows nothing of repositories or metadata.
//!
//! Every backend passes the same test suite (`tests::suite`). The trait needs neither
//! rename nor local temp files: an object store implements `upload_write` with multipart
//! parts and `upload_commit` with a copy or completion to the blob's key.

mod direct;
mod fs;
pub mod s3;
#[cfg(test)]
pub(crate) mod testgarage;

use std::io;
use std::ops::Range;
use std::pin::Pin;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::Stream;

pub use fs::{DEFAULT_UPLOAD_MEMORY_MIB, FsBlobStore};
pub use s3::{S3BlobStore, S3Config};

use crate::oci::{Digest, Hasher};

/// A stream of bytes read from or written to a backend.
pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob not found in the backend")]
    NotFound,
    #[error("upload data not found in the backend")]
    UploadNotFound,
    /// The request body failed while being read (client went away, etc.).
    #[error("request body: {0}")]
    Body(io::Error),
    #[error("storage I/O: {0}")]
    Io(#[from] io::Error),
    /// The storage cannot be reached or is overloaded (the message says which); the
    /// request may succeed once it is back.
    #[error("{0}")]
    Unavailable(String),
}

#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Writes `data` into upload `id` at byte `offset`, discarding whatever the upload held
    /// past `offset` (left by an interrupted write). Creates the upload at offset 0.
    /// Every byte written is fed, in order, to `hasher` if one is given: the backend
    /// overlaps hashing with its own I/O. Returns the number of bytes written, which are
    /// durable when this returns, and the hasher.
    async fn upload_write(
        &self,
        id: &str,
        offset: u64,
        data: ByteStream,
        hasher: Option<Hasher>,
    ) -> Result<(u64, Option<Hasher>), BlobError>;

    /// The first `len` bytes of upload `id`, to re-verify a digest.
    async fn upload_read(&self, id: &str, len: u64) -> Result<ByteStream, BlobError>;

    /// Makes the first `len` bytes of upload `id` the content of blob `digest`, durably,
    /// and removes the upload. The caller has verified the digest. If the blob already
    /// exists the upload is simply removed.
    async fn upload_commit(&self, id: &str, len: u64, digest: &Digest) -> Result<(), BlobError>;

    /// Cuts upload `id` back to its first `len` bytes (after a write that failed part way,
    /// so its bytes do not sit on disk until the next write); no error if it does not
    /// exist.
    async fn upload_truncate(&self, id: &str, len: u64) -> Result<(), BlobError>;

    /// Removes upload `id`; no error if it does not exist.
    async fn upload_delete(&self, id: &str) -> Result<(), BlobError>;

    /// The ids of every upload the backend holds data for.
    async fn upload_ids(&self) -> Result<Vec<String>, BlobError>;

    /// The size of blob `digest`, if the backend holds it.
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, BlobError>;

    /// The bytes `range` of blob `digest`; `range` lies within the blob.
    async fn read(&self, digest: &Digest, range: Range<u64>) -> Result<ByteStream, BlobError>;

    /// Returns memory kept warm for uploads and unused for a while to the system.
    fn trim(&self) {}

    /// Upload buffers (of 1 MiB) in use now, and how many the budget allows.
    fn upload_buffers(&self) -> (usize, usize) {
        (0, 0)
    }

    /// The local file holding blob `digest`, when the backend keeps blobs as files, so
    /// the server can send it with `sendfile(2)`. `None` means: use [`BlobStore::read`].
    async fn open_file(&self, _digest: &Digest) -> Result<Option<std::fs::File>, BlobError> {
        Ok(None)
    }

    /// A URL the client may fetch blob `digest` from directly (a presigned URL of an
    /// object store), when the backend is set to redirect blob GETs. `None`: serve it.
    fn redirect_url(&self, _digest: &Digest) -> Option<String> {
        None
    }

    /// Removes blob `digest`; no error if it does not exist.
    async fn delete(&self, digest: &Digest) -> Result<(), BlobError>;

    /// Every blob the backend holds, with its size: garbage collection compares them with
    /// the metadata to find bytes no row accounts for (left by a crash).
    async fn list(&self) -> Result<Vec<(Digest, u64)>, BlobError>;

    /// Whether the backend can serve and store now (`/readyz`): an error says why not.
    async fn ready(&self) -> Result<(), BlobError>;
}

#[cfg(test)]
pub(crate) mod tests {
    use futures_util::{StreamExt, stream};

    use super::*;
    use crate::oci::Algorithm;

    fn chunks(parts: &[&[u8]]) -> ByteStream {
        let v: Vec<io::Result<Bytes>> = parts
            .iter()
            .map(|p| Ok(Bytes::copy_from_slice(p)))
            .collect();
        Box::pin(stream::iter(v))
    }

    async fn collect(mut s: ByteStream) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c.unwrap());
        }
        out
    }

    /// The suite every backend passes.
    pub(crate) async fn suite(store: &dyn BlobStore) {
        let data = b"hello, wharf";
        let digest = Digest::sha256_of(data);
        assert_eq!(store.stat(&digest).await.unwrap(), None);
        assert!(matches!(
            store.read(&digest, 0..1).await,
            Err(BlobError::NotFound)
        ));

        // Write in two parts, then an interrupted tail that a rewrite at offset discards.
        // The hasher given with a write sees exactly the bytes written.
        let (n, h) = store
            .upload_write(
                "u1",
                0,
                chunks(&[b"hello"]),
                Some(Algorithm::Sha256.hasher()),
            )
            .await
            .unwrap();
        assert_eq!(n, 5);
        let (n, h) = store
            .upload_write("u1", 5, chunks(&[b", wh", b"arf", b"JUNK"]), h)
            .await
            .unwrap();
        assert_eq!(n, 11);
        assert_eq!(h.unwrap().finish(), Digest::sha256_of(b"hello, wharfJUNK"));
        let (n, h) = store
            .upload_write("u1", 12, chunks(&[]), None)
            .await
            .unwrap();
        assert_eq!((n, h.is_none()), (0, true));
        assert_eq!(
            collect(store.upload_read("u1", 12).await.unwrap()).await,
            data
        );
        store.upload_commit("u1", 12, &digest).await.unwrap();
        assert_eq!(store.stat(&digest).await.unwrap(), Some(12));
        assert_eq!(
            collect(store.read(&digest, 0..12).await.unwrap()).await,
            data
        );
        assert_eq!(
            collect(store.read(&digest, 7..12).await.unwrap()).await,
            b"wharf"
        );
        assert!(matches!(
            store.upload_read("u1", 1).await,
            Err(BlobError::UploadNotFound)
        ));

        // Committing the same content again keeps one copy and removes the upload.
        store
            .upload_write("u2", 0, chunks(&[data]), None)
            .await
            .unwrap();
        store.upload_commit("u2", 12, &digest).await.unwrap();
        assert_eq!(store.stat(&digest).await.unwrap(), Some(12));

        // Interrupted tail beyond the committed length is not part of the blob.
        let d2 = Digest::sha256_of(b"abc");
        store
            .upload_write("u3", 0, chunks(&[b"abcdef"]), None)
            .await
            .unwrap();
        store.upload_commit("u3", 3, &d2).await.unwrap();
        assert_eq!(collect(store.read(&d2, 0..3).await.unwrap()).await, b"abc");

        // Empty blob.
        let empty = Digest::sha256_of(b"");
        store
            .upload_write("u4", 0, chunks(&[]), None)
            .await
            .unwrap();
        store.upload_commit("u4", 0, &empty).await.unwrap();
        assert_eq!(store.stat(&empty).await.unwrap(), Some(0));
        assert!(
            collect(store.read(&empty, 0..0).await.unwrap())
                .await
                .is_empty()
        );

        // An empty upload never written to commits as the empty blob too.
        store.delete(&empty).await.unwrap();
        store.upload_commit("u4b", 0, &empty).await.unwrap();
        assert_eq!(store.stat(&empty).await.unwrap(), Some(0));

        // Truncation back to a length drops what lies past it, and nothing else.
        store
            .upload_write("u7", 0, chunks(&[b"abcdef"]), None)
            .await
            .unwrap();
        store.upload_truncate("u7", 2).await.unwrap();
        assert_eq!(
            collect(store.upload_read("u7", 2).await.unwrap()).await,
            b"ab"
        );
        let past_the_end = store.upload_read("u7", 3).await;
        let short = match past_the_end {
            Err(_) => true,
            Ok(mut s) => {
                let mut failed = false;
                while let Some(c) = s.next().await {
                    failed |= c.is_err();
                }
                failed
            }
        };
        assert!(short, "the bytes past the cut are gone");
        store.upload_truncate("u7", 5).await.unwrap();
        assert_eq!(
            collect(store.upload_read("u7", 2).await.unwrap()).await,
            b"ab"
        );
        store.upload_truncate("no-such-upload", 0).await.unwrap();
        store.upload_delete("u7").await.unwrap();

        // Cancelled upload.
        store
            .upload_write("u5", 0, chunks(&[b"x"]), None)
            .await
            .unwrap();
        assert!(store.upload_ids().await.unwrap().contains(&"u5".to_owned()));
        store.upload_delete("u5").await.unwrap();
        store.upload_delete("u5").await.unwrap();
        assert!(matches!(
            store.upload_read("u5", 1).await,
            Err(BlobError::UploadNotFound)
        ));
        assert!(!store.upload_ids().await.unwrap().contains(&"u5".to_owned()));

        // A body error surfaces as Body, not as a storage failure.
        let failing: ByteStream = Box::pin(stream::iter(vec![
            Ok(Bytes::from_static(b"ab")),
            Err(io::Error::new(io::ErrorKind::ConnectionReset, "gone")),
        ]));
        assert!(matches!(
            store.upload_write("u6", 0, failing, None).await,
            Err(BlobError::Body(_))
        ));

        // The listing holds every blob with its size, and nothing else.
        let mut listed = store.list().await.unwrap();
        listed.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        let mut want = vec![(digest.clone(), 12), (d2.clone(), 3), (empty.clone(), 0)];
        want.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        assert_eq!(listed, want);

        store.delete(&digest).await.unwrap();
        store.delete(&digest).await.unwrap();
        assert_eq!(store.stat(&digest).await.unwrap(), None);
        want.retain(|(d, _)| *d != digest);
        let mut listed = store.list().await.unwrap();
        listed.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        assert_eq!(listed, want);
    }
}
