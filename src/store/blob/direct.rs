//! Writing upload data to disk with `O_DIRECT` where the filesystem allows it, hashing it
//! on the way.
//!
//! An upload must be on disk before it is acknowledged, so its bytes are written once and
//! synced. Through the page cache that is two steps: a copy into freshly allocated cache
//! pages, then the flush. With `O_DIRECT` the data goes from our buffer to the device in
//! one step, at the device's speed, and leaves the page cache to blobs being read.
//! `O_DIRECT` needs the buffer, the file offset and the length aligned to the device's
//! block size, so the unaligned head (a chunk that starts mid-block) and tail (the last
//! partial block) go through an ordinary descriptor. The two never cover the same block.
//! Filesystems without `O_DIRECT` (tmpfs on old kernels) get ordinary writes throughout.
//!
//! The bytes travel in a few large aligned buffers that go round a loop: the caller copies
//! the request body into a free buffer (the one copy in user space), the hashing thread
//! hashes it, the I/O thread writes it and hands it back. Hashing, which bounds a push, so
//! never waits for the disk, the disk never waits for hashing, and there is one hand-off
//! per megabyte rather than per network read. The body's own buffers are released as soon
//! as they are copied, so the HTTP layer reuses them instead of allocating fresh memory.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use tokio::sync::mpsc;

use crate::oci::Hasher;

/// Alignment for `O_DIRECT`: 4 KiB covers the logical block size of common devices.
const ALIGN: usize = 4096;
/// Bytes gathered before one write.
const BUFFER: usize = 1024 * 1024;
/// Buffers per upload at most: one filling, one hashing, two being written, the rest to
/// absorb a slow write. Allocated as needed, so a small upload uses one.
const BUFFERS: usize = 8;
/// Writes in flight per upload. One write at a time leaves the device idle between
/// writes; two kept it 10-20% busier here (`fio`, 1 MiB `O_DIRECT` writes).
const WRITERS: usize = 2;

/// A buffer over-allocated by `ALIGN` so that an aligned window of `BUFFER` bytes fits.
struct AlignedBuf {
    mem: Vec<u8>,
    start: usize,
}

impl AlignedBuf {
    fn new() -> AlignedBuf {
        let mem = vec![0u8; BUFFER + ALIGN];
        let start = mem.as_ptr().align_offset(ALIGN);
        AlignedBuf { mem, start }
    }

    fn window(&self, len: usize) -> &[u8] {
        &self.mem[self.start..self.start + len]
    }

    fn window_mut(&mut self, from: usize, len: usize) -> &mut [u8] {
        let at = self.start + from;
        &mut self.mem[at..at + len]
    }
}

/// `len` bytes of `buf` to hash and write at file offset `at`.
struct Job {
    buf: AlignedBuf,
    len: usize,
    at: u64,
}

/// One or more job queues, served in turn.
struct Queues {
    queues: Vec<Sender<Job>>,
    next: usize,
}

impl Queues {
    /// Sends `job` to the next queue; false if its thread has stopped.
    fn send(&mut self, job: Job) -> bool {
        let sent = self.queues[self.next].send(job).is_ok();
        self.next = (self.next + 1) % self.queues.len();
        sent
    }
}

/// The threads of one writer and how to reach them.
struct Stages {
    /// The hashing thread's queue, or the I/O threads' queues when there is no hasher.
    jobs: Queues,
    free: mpsc::Receiver<AlignedBuf>,
    hash: Option<JoinHandle<Hasher>>,
    io: Vec<JoinHandle<io::Result<()>>>,
    /// Set when an I/O thread fails or the writer is dropped unfinished. The I/O threads
    /// then write nothing more but still hand every buffer back, so the writer never
    /// waits for a buffer that will not come; it sees the flag at its next hand-off.
    stop: Arc<AtomicBool>,
}

impl Stages {
    /// Waits for every thread: the hasher (if any), and the I/O threads' result.
    fn join(self) -> io::Result<Option<Hasher>> {
        drop(self.jobs);
        let hasher = match self.hash.map(JoinHandle::join) {
            None => None,
            Some(Ok(h)) => Some(h),
            Some(Err(_)) => return Err(io::Error::other("upload hashing thread panicked")),
        };
        let mut result = Ok(());
        for io in self.io {
            let r = io
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("upload writer thread panicked")));
            result = result.and(r);
        }
        result.map(|()| hasher)
    }
}

pub struct UploadWriter {
    plain: Arc<File>,
    buf: Option<AlignedBuf>,
    filled: usize,
    /// How many bytes the current buffer takes: `BUFFER`, or less for an unaligned head.
    limit: usize,
    /// File offset of the first byte in `buf`.
    buf_at: u64,
    allocated: usize,
    stages: Option<Stages>,
}

/// The hashing thread: hashes each job in order and passes it on.
fn hash_jobs(mut hasher: Hasher, jobs: &Receiver<Job>, mut next: Queues) -> Hasher {
    while let Ok(job) = jobs.recv() {
        hasher.update(job.buf.window(job.len));
        if !next.send(job) {
            break; // the I/O thread failed; the writer reports its error
        }
    }
    hasher
}

/// An I/O thread: writes each job, hands its buffer back. The jobs of one writer land
/// on distinct blocks, so the threads never write over each other. After a failure (its
/// own or another thread's, through `stop`) it only hands buffers back, and returns its
/// error when the queue closes.
fn write_jobs(
    plain: &File,
    mut direct: Option<Arc<File>>,
    jobs: &Receiver<Job>,
    free: &mpsc::Sender<AlignedBuf>,
    stop: &AtomicBool,
    fail_at: Option<u64>,
) -> io::Result<()> {
    let mut result = Ok(());
    while let Ok(job) = jobs.recv() {
        if result.is_ok() && !stop.load(Ordering::Acquire) {
            result = if fail_at == Some(job.at) {
                // Tests: a slow write that then fails, while the other thread goes on.
                std::thread::sleep(std::time::Duration::from_millis(200));
                Err(io::Error::other("injected write failure"))
            } else {
                write_job(plain, &mut direct, &job)
            };
            if result.is_err() {
                stop.store(true, Ordering::Release);
            }
        }
        // The writer may have finished with buffers to spare: nothing to hand back to.
        let _ = free.try_send(job.buf);
    }
    result
}

fn write_job(plain: &File, direct: &mut Option<Arc<File>>, job: &Job) -> io::Result<()> {
    let data = job.buf.window(job.len);
    // Whole blocks at an aligned offset go direct, the rest (a head or a tail) plain.
    let whole = match direct {
        Some(_) if job.at % ALIGN as u64 == 0 => job.len - job.len % ALIGN,
        _ => 0,
    };
    if let (Some(d), true) = (&direct, whole > 0) {
        match d.write_all_at(&data[..whole], job.at) {
            Ok(()) => {}
            // The filesystem refused the direct write (alignment): write it, and the
            // rest of this upload, the ordinary way.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                *direct = None;
                plain.write_all_at(&data[..whole], job.at)?;
            }
            Err(e) => return Err(e),
        }
    }
    if whole < job.len {
        plain.write_all_at(&data[whole..], job.at + whole as u64)?;
    }
    Ok(())
}

impl UploadWriter {
    /// Opens upload file `path` to write from `offset` on, dropping anything after it.
    /// Every byte written is fed, in order, to `hasher` if given; `finish` returns it.
    pub fn open(path: &Path, offset: u64, hasher: Option<Hasher>) -> io::Result<UploadWriter> {
        UploadWriter::open_inner(path, offset, hasher, None)
    }

    /// `open`, with the write of the buffer at file offset `fail_at` failing (tests).
    fn open_inner(
        path: &Path,
        offset: u64,
        hasher: Option<Hasher>,
        fail_at: Option<u64>,
    ) -> io::Result<UploadWriter> {
        let plain = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(path)?;
        plain.set_len(offset)?;
        let plain = Arc::new(plain);
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()
            .map(Arc::new);
        let is_direct = direct.is_some();
        let stop = Arc::new(AtomicBool::new(false));
        let (free_tx, free_rx) = mpsc::channel::<AlignedBuf>(BUFFERS);
        let mut to_io = Vec::new();
        let mut io = Vec::new();
        for _ in 0..WRITERS {
            let (tx, rx) = channel::<Job>();
            let (plain, direct) = (Arc::clone(&plain), direct.clone());
            let (free_tx, stop) = (free_tx.clone(), Arc::clone(&stop));
            to_io.push(tx);
            io.push(
                std::thread::Builder::new()
                    .name("wharf-upload-io".into())
                    .spawn(move || write_jobs(&plain, direct, &rx, &free_tx, &stop, fail_at))?,
            );
        }
        let to_io = Queues {
            queues: to_io,
            next: 0,
        };
        // With a hasher, jobs go to it first and it forwards them to the I/O threads.
        let (jobs, hash) = match hasher {
            Some(h) => {
                let (tx, rx) = channel::<Job>();
                let hash = std::thread::Builder::new()
                    .name("wharf-upload-hash".into())
                    .spawn(move || hash_jobs(h, &rx, to_io))?;
                let jobs = Queues {
                    queues: vec![tx],
                    next: 0,
                };
                (jobs, Some(hash))
            }
            None => (to_io, None),
        };
        let head = (ALIGN - (offset % ALIGN as u64) as usize) % ALIGN;
        Ok(UploadWriter {
            plain,
            buf: None,
            filled: 0,
            // Bring the file offset to a block boundary with a short first buffer: whole
            // blocks then go direct. (If the filesystem refuses a direct write, the I/O
            // thread falls back to ordinary writes on its own.)
            limit: if is_direct && head > 0 { head } else { BUFFER },
            buf_at: offset,
            allocated: 0,
            stages: Some(Stages {
                jobs,
                free: free_rx,
                hash,
                io,
                stop,
            }),
        })
    }

    pub async fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            if self.buf.is_none() {
                self.buf = Some(self.free_buffer().await?);
            }
            let buf = self.buf.as_mut().expect("a buffer was just taken");
            let n = (self.limit - self.filled).min(data.len());
            buf.window_mut(self.filled, n).copy_from_slice(&data[..n]);
            self.filled += n;
            data = &data[n..];
            if self.filled == self.limit {
                self.hand_off().await?;
            }
        }
        Ok(())
    }

    /// A buffer to fill: a returned one, a new one while fewer than `BUFFERS` exist, or
    /// the next one the I/O thread hands back.
    async fn free_buffer(&mut self) -> io::Result<AlignedBuf> {
        let stages = self.stages.as_mut().expect("open writer");
        if let Ok(buf) = stages.free.try_recv() {
            return Ok(buf);
        }
        if self.allocated < BUFFERS {
            self.allocated += 1;
            return Ok(AlignedBuf::new());
        }
        match stages.free.recv().await {
            Some(buf) => Ok(buf),
            None => Err(self.stage_error().await),
        }
    }

    /// Queues the current buffer's bytes for hashing and writing.
    async fn hand_off(&mut self) -> io::Result<()> {
        let Some(buf) = self.buf.take() else {
            return Ok(());
        };
        let job = Job {
            buf,
            len: self.filled,
            at: self.buf_at,
        };
        let stages = self.stages.as_mut().expect("open writer");
        if stages.stop.load(Ordering::Acquire) || !stages.jobs.send(job) {
            return Err(self.stage_error().await);
        }
        self.buf_at += self.filled as u64;
        self.filled = 0;
        self.limit = BUFFER;
        Ok(())
    }

    /// A stage stopped early: the I/O thread's error.
    async fn stage_error(&mut self) -> io::Error {
        let Some(stages) = self.stages.take() else {
            return io::Error::other("upload writer already stopped");
        };
        match join_blocking(stages).await {
            Err(e) => e,
            Ok(_) => io::Error::other("upload writer stopped early"),
        }
    }

    /// Writes what is left and makes the file durable. Returns the file's length and the
    /// hasher, which has seen every byte.
    pub async fn finish(mut self) -> io::Result<(u64, Option<Hasher>)> {
        self.hand_off().await?;
        let stages = self.stages.take().expect("open writer");
        let hasher = join_blocking(stages).await?;
        let plain = Arc::clone(&self.plain);
        // fdatasync flushes the inode's data, the direct writes included, its size, and
        // the device's write cache.
        tokio::task::spawn_blocking(move || plain.sync_data())
            .await
            .map_err(|e| io::Error::other(format!("sync task failed: {e}")))??;
        Ok((self.buf_at, hasher))
    }
}

/// Joins the threads on the blocking pool. If the caller is dropped meanwhile (the client
/// went away), the guard stops the threads and waits for them, as `Drop` does: the
/// upload's lock must not be released while a write is still coming.
async fn join_blocking(stages: Stages) -> io::Result<Option<Hasher>> {
    struct WaitIfDropped {
        stop: Arc<AtomicBool>,
        done: Option<Receiver<()>>,
    }
    impl Drop for WaitIfDropped {
        fn drop(&mut self) {
            if let Some(done) = self.done.take() {
                self.stop.store(true, Ordering::Release);
                let _ = done.recv(); // returns when the join below has finished
            }
        }
    }
    let (done_tx, done_rx) = channel::<()>();
    let mut guard = WaitIfDropped {
        stop: Arc::clone(&stages.stop),
        done: Some(done_rx),
    };
    let joined = tokio::task::spawn_blocking(move || {
        let r = stages.join();
        drop(done_tx);
        r
    })
    .await;
    guard.done = None;
    joined.map_err(|e| io::Error::other(format!("join task failed: {e}")))?
}

impl Drop for UploadWriter {
    /// An unfinished writer (the body failed, or the request was dropped) stops its
    /// threads before the upload's lock is released, so no stale write can land after
    /// the next request for the same upload has started. They stop after at most the
    /// write in progress.
    fn drop(&mut self) {
        if let Some(stages) = self.stages.take() {
            stages.stop.store(true, Ordering::Release);
            let _ = stages.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::{Algorithm, Digest};

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[tokio::test]
    async fn appends_at_any_offset_give_the_exact_bytes_and_hash_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u");
        let mut expected = Vec::new();
        // Chunk sizes that cross, start and end mid-block and span several buffers.
        for (i, len) in [
            1usize,
            4095,
            4096,
            10_000,
            BUFFER + 7,
            3 * ALIGN,
            0,
            123,
            (BUFFERS + 2) * BUFFER + 5,
        ]
        .into_iter()
        .enumerate()
        {
            let hasher = (i % 2 == 0).then(|| Algorithm::Sha256.hasher());
            let mut w = UploadWriter::open(&path, expected.len() as u64, hasher).unwrap();
            let data = pattern(len, i as u8);
            // Feed in uneven pieces, as a network body arrives.
            for piece in data.chunks(77_777) {
                w.write(piece).await.unwrap();
            }
            expected.extend_from_slice(&data);
            let (end, hasher) = w.finish().await.unwrap();
            assert_eq!(end, expected.len() as u64);
            assert_eq!(std::fs::read(&path).unwrap(), expected, "after chunk {i}");
            match hasher {
                Some(h) => assert_eq!(h.finish(), Digest::sha256_of(&data), "chunk {i}"),
                None => assert_eq!(i % 2, 1, "chunk {i} was given a hasher"),
            }
        }
    }

    #[tokio::test]
    async fn reopening_at_an_earlier_offset_drops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u");
        let mut w = UploadWriter::open(&path, 0, None).unwrap();
        w.write(&pattern(20_000, 1)).await.unwrap();
        w.finish().await.unwrap();
        let mut w = UploadWriter::open(&path, 5000, None).unwrap();
        w.write(b"end").await.unwrap();
        assert_eq!(w.finish().await.unwrap().0, 5003);
        let got = std::fs::read(&path).unwrap();
        assert_eq!(&got[..5000], &pattern(20_000, 1)[..5000]);
        assert_eq!(&got[5000..], b"end");
    }

    #[tokio::test]
    async fn a_failed_write_is_reported_while_the_other_writer_thread_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        for hasher in [None, Some(Algorithm::Sha256.hasher())] {
            let path = dir.path().join("u");
            // The third buffer's write is slow and then fails: meanwhile the other I/O
            // thread returns its buffers and the writer queues them behind the slow one.
            let w = UploadWriter::open_inner(&path, 0, hasher, Some(2 * BUFFER as u64));
            let mut w = w.unwrap();
            let data = pattern(4 * BUFFERS * BUFFER, 3);
            let outcome = tokio::time::timeout(std::time::Duration::from_secs(60), async {
                for piece in data.chunks(100_000) {
                    w.write(piece).await?;
                }
                w.finish().await
            })
            .await
            .expect("the writer reports the failure instead of waiting forever");
            let Err(err) = outcome else {
                panic!("a failed write was acknowledged");
            };
            assert!(err.to_string().contains("injected"), "{err}");
        }
    }

    #[tokio::test]
    async fn a_dropped_writer_has_stopped_writing_when_the_drop_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u");
        let mut w = UploadWriter::open(&path, 0, Some(Algorithm::Sha256.hasher())).unwrap();
        w.write(&pattern(3 * BUFFER, 2)).await.unwrap();
        drop(w);
        // Whatever reached the disk, nothing more arrives after the drop.
        let len = std::fs::metadata(&path).unwrap().len();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        assert!(len <= 3 * BUFFER as u64);
    }
}
