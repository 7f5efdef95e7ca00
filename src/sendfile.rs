//! Zero-copy blob bodies on plain-HTTP connections.
//!
//! hyper writes a response body from memory: each byte of a blob would be read from the
//! page cache into a buffer and then copied again into the socket. Here a blob body
//! yields *placeholder* chunks instead: slices of [`PLACEHOLDER`], a static block nobody
//! writes, paired with a [`Job`] (file, offset, length) queued on the connection. The
//! connection's I/O wrapper, [`Conn`], recognises a placeholder by its address when hyper
//! writes it and sends the job's file range with `sendfile(2)`: the kernel moves the
//! bytes from the page cache to the socket, and user space never touches them.
//!
//! Safety of the pairing rests on three facts, each checked:
//! - hyper writes body chunks as given, never copying them, when its I/O supports
//!   vectored writes ([`Conn::is_write_vectored`] is true, and the server never asks
//!   hyper to flatten). A copied placeholder would lose its address and be sent as
//!   zeros; the tests pull blobs through this path and compare every byte.
//! - An HTTP/1 connection writes one response at a time, in order, so jobs are consumed
//!   in the order the body queued them.
//! - Every write of a placeholder must cover exactly what its job has left; anything
//!   else (a missing job, a length that does not match) fails the connection rather
//!   than send bytes that might be wrong. A placeholder dropped unwritten marks its job,
//!   which is then skipped, so it can never pair with a later response's chunk.
//!
//! `sendfile` runs on the connection's runtime thread. So that it never waits for the
//! disk there, the body checks each chunk's first and last page with a read that may not
//! wait (`RWF_NOWAIT`) and, when either is missing, reads the chunk in on a blocking
//! thread before yielding it.
//!
//! TLS connections keep the copying path: their bytes must pass through rustls.

use std::collections::VecDeque;
use std::fs::File;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// The most one placeholder chunk stands for. hyper stops polling a body while more
/// than its buffer limit (about 400 KiB) is queued, so one job is pending at a time.
const CHUNK: usize = 1 << 20;

/// Stands in for file bytes; never read, never written. Its address is what matters.
static PLACEHOLDER: [u8; CHUNK] = [0; CHUNK];

fn is_placeholder(buf: &[u8]) -> bool {
    let start = PLACEHOLDER.as_ptr() as usize;
    let p = buf.as_ptr() as usize;
    !buf.is_empty() && p >= start && p < start + CHUNK
}

/// A range of a file still to send.
struct Job {
    file: Arc<File>,
    offset: u64,
    remaining: usize,
    /// Set when the placeholder chunk is dropped: hyper wrote it whole, or it was
    /// discarded unwritten, in which case the job must not pair with a later chunk.
    dropped: Arc<AtomicBool>,
}

/// The owner of a placeholder chunk's memory (the static block) that tells its job when
/// the chunk is gone.
struct Placeholder {
    len: usize,
    dropped: Arc<AtomicBool>,
}

impl AsRef<[u8]> for Placeholder {
    fn as_ref(&self) -> &[u8] {
        &PLACEHOLDER[..self.len]
    }
}

impl Drop for Placeholder {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::Release);
    }
}

/// The jobs of one connection, shared by its [`Conn`] and the bodies of its responses
/// (reached through the request's extensions).
#[derive(Clone)]
pub struct Queue {
    jobs: Arc<Mutex<VecDeque<Job>>>,
    sent: Arc<AtomicU64>,
}

impl Queue {
    /// `sent` counts the bytes this connection sends with `sendfile`.
    pub fn new(sent: Arc<AtomicU64>) -> Queue {
        Queue {
            jobs: Arc::default(),
            sent,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Job>> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A response body sending `len` bytes of `file` from `offset` through the connection's
/// [`Queue`].
pub struct FileBody {
    file: Arc<File>,
    offset: u64,
    remaining: u64,
    queue: Queue,
    /// Reading the next chunk into the page cache on a blocking thread.
    warming: Option<tokio::task::JoinHandle<io::Result<()>>>,
}

impl FileBody {
    pub fn new(file: File, offset: u64, len: u64, queue: Queue) -> FileBody {
        FileBody {
            file: Arc::new(file),
            offset,
            remaining: len,
            queue,
            warming: None,
        }
    }
}

/// Whether the page holding byte `at` of `file` is in the page cache: a one-byte read
/// that may not wait for the disk. Where the kernel cannot tell, says yes (`sendfile`
/// then reads the disk itself).
fn cached(file: &File, at: u64) -> bool {
    let mut byte = [0u8; 1];
    let mut bufs = [io::IoSliceMut::new(&mut byte)];
    !matches!(
        rustix::io::preadv2(file, &mut bufs, at, rustix::io::ReadWriteFlags::NOWAIT),
        Err(rustix::io::Errno::AGAIN)
    )
}

/// Reads `len` bytes of `file` from `offset`, which leaves them in the page cache.
fn warm(file: &File, offset: u64, len: usize) -> io::Result<()> {
    use std::os::unix::fs::FileExt as _;
    let mut buf = vec![0u8; len.min(256 * 1024)];
    let end = offset + len as u64;
    let mut at = offset;
    while at < end {
        let n = usize::try_from(end - at).map_or(buf.len(), |l| l.min(buf.len()));
        match file.read_at(&mut buf[..n], at)? {
            0 => break, // a short file: `sendfile` reports it
            read => at += read as u64,
        }
    }
    Ok(())
}

impl http_body::Body for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    /// A chunk outside the page cache is first read in on a blocking thread, so that
    /// `sendfile` on the runtime thread does not wait for the disk.
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = usize::try_from(self.remaining).map_or(CHUNK, |r| r.min(CHUNK));
        match self.warming.as_mut() {
            Some(warming) => {
                let done = ready!(Pin::new(warming).poll(cx));
                self.warming = None;
                let done = done.map_err(|e| io::Error::other(format!("blob read-in: {e}")));
                if let Err(e) = done.and_then(|r| r) {
                    return Poll::Ready(Some(Err(e)));
                }
            }
            None => {
                let last = self.offset + n as u64 - 1;
                if !cached(&self.file, self.offset) || !cached(&self.file, last) {
                    let (file, offset) = (Arc::clone(&self.file), self.offset);
                    let task = tokio::task::spawn_blocking(move || warm(&file, offset, n));
                    self.warming = Some(task);
                    return self.poll_frame(cx);
                }
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let job = Job {
            file: Arc::clone(&self.file),
            offset: self.offset,
            remaining: n,
            dropped: Arc::clone(&dropped),
        };
        self.queue.lock().push_back(job);
        self.offset += n as u64;
        self.remaining -= n as u64;
        let chunk = Bytes::from_owner(Placeholder { len: n, dropped });
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// A plain TCP connection that sends placeholder chunks as file ranges.
pub struct Conn {
    tcp: TcpStream,
    queue: Queue,
}

impl Conn {
    pub fn new(tcp: TcpStream, queue: Queue) -> Conn {
        Conn { tcp, queue }
    }

    /// Sends the front job's next bytes for a placeholder slice of `want` bytes.
    fn poll_send_file(&self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        let mut jobs = self.queue.lock();
        // A chunk dropped unwritten (nothing in hyper does that today, but a layer that
        // read the body would) leaves its job behind: skip it rather than pair it.
        while jobs
            .front()
            .is_some_and(|j| j.dropped.load(Ordering::Acquire))
        {
            jobs.pop_front();
        }
        let Some(job) = jobs.front_mut() else {
            return Poll::Ready(Err(io::Error::other(
                "zero-copy body: a placeholder chunk without a queued file range",
            )));
        };
        if job.remaining != want {
            return Poll::Ready(Err(io::Error::other(format!(
                "zero-copy body: hyper wrote {want} placeholder bytes where {} were queued",
                job.remaining
            ))));
        }
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            let mut offset = job.offset;
            let sent = self.tcp.try_io(Interest::WRITABLE, || {
                rustix::fs::sendfile(&self.tcp, &*job.file, Some(&mut offset), job.remaining)
                    .map_err(io::Error::from)
            });
            match sent {
                // The file is shorter than its recorded size: never send a short body.
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => {
                    self.queue.sent.fetch_add(n as u64, Ordering::Relaxed);
                    job.offset += n as u64;
                    job.remaining -= n;
                    if job.remaining == 0 {
                        jobs.pop_front();
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    /// Writes the slices before the first placeholder with one `writev`, or, when the
    /// first slice is a placeholder, sends its file range.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let Some(first) = bufs.iter().position(|b| !b.is_empty()) else {
            return Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        };
        if is_placeholder(&bufs[first]) {
            return self.poll_send_file(cx, bufs[first].len());
        }
        let end = bufs
            .iter()
            .position(|b| is_placeholder(b))
            .unwrap_or(bufs.len());
        Pin::new(&mut self.tcp).poll_write_vectored(cx, &bufs[..end])
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A connected pair: the server side wrapped in a [`Conn`], and the client side.
    async fn pair(queue: Queue) -> (Conn, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Conn::new(server, queue), client)
    }

    fn temp_file(data: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(data).unwrap();
        f
    }

    /// A queued range of a file holding `data`, as a body would queue it.
    fn job(data: &[u8], offset: u64, remaining: usize) -> Job {
        Job {
            file: Arc::new(temp_file(data)),
            offset,
            remaining,
            dropped: Arc::default(),
        }
    }

    /// Writes `bufs` to the end, the way hyper flushes its queue.
    async fn write_all_vectored(conn: &mut Conn, bufs: &[&[u8]]) -> io::Result<()> {
        let mut bufs: Vec<&[u8]> = bufs.to_vec();
        while !bufs.is_empty() {
            let slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
            let mut n = conn.write_vectored(&slices).await?;
            while n > 0 {
                let take = n.min(bufs[0].len());
                bufs[0] = &bufs[0][take..];
                n -= take;
                if bufs[0].is_empty() {
                    bufs.remove(0);
                }
            }
        }
        Ok(())
    }

    async fn next_chunk(body: &mut FileBody) -> Option<Bytes> {
        std::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut *body), cx))
            .await
            .map(|f| f.unwrap().into_data().unwrap())
    }

    /// As hyper does: poll a chunk, write it (after the head), poll the next. The reader
    /// starts late, so the socket fills and `sendfile` sends chunks in several parts.
    #[tokio::test]
    async fn a_head_then_placeholders_send_the_head_then_the_file_range() {
        let data: Vec<u8> = (0..40 * CHUNK as u32 + 77)
            .map(|i| (i % 253) as u8)
            .collect();
        let sent = Arc::new(AtomicU64::new(0));
        let queue = Queue::new(Arc::clone(&sent));
        let (mut conn, mut client) = pair(queue.clone()).await;
        let (offset, len) = (CHUNK as u64 - 5, 38 * CHUNK as u64 + 50);
        let mut body = FileBody::new(temp_file(&data), offset, len, queue);
        let reader = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut head: &[u8] = b"HEAD\r\n";
        let mut chunks = 0;
        while let Some(chunk) = next_chunk(&mut body).await {
            assert!(is_placeholder(&chunk));
            write_all_vectored(&mut conn, &[head, &chunk])
                .await
                .unwrap();
            head = b"";
            chunks += 1;
        }
        write_all_vectored(&mut conn, &[b"TAIL"]).await.unwrap();
        drop(conn);
        let got = reader.await.unwrap();
        assert_eq!(chunks, 39);
        let range = &data[offset as usize..(offset + len) as usize];
        assert_eq!(got.len(), 6 + range.len() + 4);
        assert_eq!(&got[..6], b"HEAD\r\n");
        assert!(got[6..6 + range.len()] == *range, "file bytes differ");
        assert_eq!(&got[6 + range.len()..], b"TAIL");
        assert_eq!(sent.load(Ordering::Relaxed), len);
    }

    #[tokio::test]
    async fn a_chunk_dropped_unwritten_never_pairs_with_a_later_one() {
        let queue = Queue::new(Arc::default());
        let (mut conn, mut client) = pair(queue.clone()).await;
        let mut first = FileBody::new(temp_file(b"first file"), 0, 10, queue.clone());
        drop(next_chunk(&mut first).await.unwrap());
        let mut second = FileBody::new(temp_file(b"other file"), 0, 10, queue);
        let chunk = next_chunk(&mut second).await.unwrap();
        write_all_vectored(&mut conn, &[&chunk]).await.unwrap();
        drop(conn);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"other file");
    }

    /// A chunk the disk must supply is read in before the body yields it, so `sendfile`
    /// finds it in the page cache.
    #[tokio::test]
    async fn a_chunk_outside_the_page_cache_is_read_in_before_it_is_yielded() {
        let data = vec![7u8; 3 * CHUNK];
        let file = temp_file(&data);
        file.sync_all().unwrap();
        let fs = rustix::fs::fstatfs(&file).unwrap();
        assert_ne!(
            fs.f_type, 0x0102_1994,
            "the temp dir is tmpfs, whose pages cannot leave memory: run with TMPDIR on a disk"
        );
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        let probe = file.try_clone().unwrap();
        let mut body = FileBody::new(file, 0, data.len() as u64, Queue::new(Arc::default()));
        next_chunk(&mut body).await.unwrap();
        assert!(
            cached(&probe, 0) && cached(&probe, CHUNK as u64 - 1),
            "the first chunk was yielded before it was in the page cache"
        );
    }

    #[tokio::test]
    async fn a_placeholder_without_its_range_fails_instead_of_sending_zeros() {
        let queue = Queue::new(Arc::default());
        let (mut conn, mut client) = pair(queue.clone()).await;
        // No job at all.
        let err = conn.write(&PLACEHOLDER[..10]).await.unwrap_err();
        assert!(
            err.to_string().contains("without a queued file range"),
            "{err}"
        );
        // A job whose length does not match what is written.
        queue.lock().push_back(job(b"0123456789", 0, 10));
        let err = conn.write(&PLACEHOLDER[..4]).await.unwrap_err();
        assert!(err.to_string().contains("where 10 were queued"), "{err}");
        // A file shorter than its job: an error, not a short body.
        queue.lock().clear();
        queue.lock().push_back(job(b"0123", 4, 10));
        let err = conn.write(&PLACEHOLDER[..10]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        drop(conn);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty(), "sent {got:?}");
    }
}
