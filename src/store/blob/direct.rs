//! Writing upload data to disk with `O_DIRECT` where the filesystem allows it, hashing it
//! on the way, with buffers and workers shared by every upload.
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
//! The writer copies the request body into a 1 MiB buffer (the one copy in user space)
//! and hands each full buffer to two tasks at once: hashing (in order, one buffer at a
//! time per upload) and writing (at its offset, at most [`WRITES_PER_UPLOAD`] at a
//! time). Both run on tokio's blocking pool under permits of the [`Engine`] that every
//! upload shares: at most one hash per core and [`Engine::writers`] writes run at once,
//! whatever the number of uploads, and no thread belongs to an upload.
//!
//! Buffers come from the engine's budget (`[limits] upload_memory_mib`): when it is all
//! in use a writer waits for one, which stops reading the body and so slows the client
//! down, rather than refusing it. A buffer is anonymous memory of its own, returned to
//! the system when it is dropped (the engine keeps a few warm and lets the rest go once
//! a burst is over), so memory comes back after a burst. A body that stalls hands off
//! its partly filled buffer (see `FsBlobStore::upload_write`), so a slow client holds no
//! buffer while it waits.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::oci::Hasher;

/// Alignment for `O_DIRECT`: 4 KiB covers the logical block size of common devices.
const ALIGN: usize = 4096;
/// Bytes gathered before one write.
pub const BUFFER: usize = 1024 * 1024;
/// Writes in flight per upload. One write at a time leaves the device idle between
/// writes; two kept it 10-20% busier here (`fio`, 1 MiB `O_DIRECT` writes).
const WRITES_PER_UPLOAD: usize = 2;
/// A stalled body with fewer bytes than this buffered keeps them in a small copy instead
/// of writing them (see `UploadWriter::flush`).
const HOLD: usize = 64 * 1024;
/// Buffers kept warm for the next upload; the rest go back to the system.
const KEEP_WARM: usize = 8;
/// Warm buffers unused this long are returned to the system too.
const WARM_FOR: Duration = Duration::from_secs(10);

/// What every upload shares: the buffer budget, warm buffers, and the permits that bound
/// hashing and writing.
pub struct Engine {
    total: usize,
    budget: Arc<Semaphore>,
    warm: Mutex<Vec<(memmap2::MmapMut, Instant)>>,
    hashing: Arc<Semaphore>,
    writing: Arc<Semaphore>,
}

impl Engine {
    /// An engine with `memory_mib` MiB of upload buffers in all.
    pub fn new(memory_mib: usize) -> Arc<Engine> {
        let cores = crate::auth::parallelism();
        Arc::new(Engine {
            total: memory_mib.max(1),
            budget: Arc::new(Semaphore::new(memory_mib.max(1))),
            warm: Mutex::new(Vec::new()),
            hashing: Arc::new(Semaphore::new(cores)),
            writing: Arc::new(Semaphore::new(Engine::writers())),
        })
    }

    /// Writes run at once, in all: enough to keep a device's queue busy.
    pub fn writers() -> usize {
        (2 * crate::auth::parallelism()).max(4)
    }

    /// A buffer, once the budget allows one: waits (holding no thread) meanwhile.
    async fn buffer(self: &Arc<Engine>) -> io::Result<Buf> {
        let permit = Arc::clone(&self.budget)
            .acquire_owned()
            .await
            .map_err(|_| io::Error::other("upload buffers closed"))?;
        let warm = self.warm.lock().expect("warm buffers").pop();
        let mem = match warm {
            Some((m, _)) => m,
            None => memmap2::MmapMut::map_anon(BUFFER)?,
        };
        Ok(Buf {
            mem: Some(mem),
            engine: Arc::clone(self),
            _permit: permit,
        })
    }

    /// Returns warm buffers unused for a while to the system.
    pub fn trim(&self) {
        let mut warm = self.warm.lock().expect("warm buffers");
        warm.retain(|(_, since)| since.elapsed() < WARM_FOR);
    }

    /// Buffers of the budget in use now, and the budget.
    pub fn buffers(&self) -> (usize, usize) {
        (self.total - self.budget.available_permits(), self.total)
    }

    #[cfg(test)]
    fn buffers_in_use(&self) -> usize {
        self.buffers().0
    }
}

/// One upload buffer: page-aligned anonymous memory and its place in the budget.
struct Buf {
    mem: Option<memmap2::MmapMut>,
    engine: Arc<Engine>,
    _permit: OwnedSemaphorePermit,
}

impl Buf {
    fn window(&self, from: usize, len: usize) -> &[u8] {
        &self.mem.as_ref().expect("buffer memory")[from..from + len]
    }

    fn window_mut(&mut self, from: usize, len: usize) -> &mut [u8] {
        &mut self.mem.as_mut().expect("buffer memory")[from..from + len]
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Some(mem) = self.mem.take() {
            let mut warm = self.engine.warm.lock().expect("warm buffers");
            if warm.len() < KEEP_WARM {
                warm.push((mem, Instant::now()));
            }
        }
    }
}

/// The writes of one writer in flight, so that a dropped writer can wait for them.
#[derive(Default)]
struct InFlight {
    count: Mutex<usize>,
    zero: Condvar,
    /// Set when a write fails or the writer is dropped unfinished: writes not yet
    /// started are skipped.
    stop: AtomicBool,
}

struct InFlightGuard(Arc<InFlight>);

impl InFlight {
    fn enter(self: &Arc<InFlight>) -> InFlightGuard {
        *self.count.lock().expect("in flight") += 1;
        InFlightGuard(Arc::clone(self))
    }

    fn wait_idle(&self) {
        let mut n = self.count.lock().expect("in flight");
        while *n > 0 {
            n = self.zero.wait(n).expect("in flight");
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut n = self.0.count.lock().expect("in flight");
        *n -= 1;
        if *n == 0 {
            self.0.zero.notify_all();
        }
    }
}

/// The two descriptors of an upload file and whether direct writes still work on it.
struct Files {
    plain: File,
    direct: Option<File>,
    direct_refused: AtomicBool,
    /// Tests: the write at this file offset fails, slowly.
    fail_at: Option<u64>,
}

impl Files {
    fn write(&self, data: &[u8], at: u64) -> io::Result<()> {
        if self.fail_at == Some(at) {
            std::thread::sleep(Duration::from_millis(200));
            return Err(io::Error::other("injected write failure"));
        }
        // Whole blocks at an aligned offset go direct, the rest (a head or a tail) plain.
        let direct = self
            .direct
            .as_ref()
            .filter(|_| !self.direct_refused.load(Ordering::Relaxed));
        let whole = match direct {
            Some(_) if at % ALIGN as u64 == 0 => data.len() - data.len() % ALIGN,
            _ => 0,
        };
        if let (Some(d), true) = (direct, whole > 0) {
            match d.write_all_at(&data[..whole], at) {
                Ok(()) => {}
                // The filesystem refused the direct write (alignment): write it, and the
                // rest of this upload, the ordinary way.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.direct_refused.store(true, Ordering::Relaxed);
                    self.plain.write_all_at(&data[..whole], at)?;
                }
                Err(e) => return Err(e),
            }
        }
        if whole < data.len() {
            self.plain.write_all_at(&data[whole..], at + whole as u64)?;
        }
        Ok(())
    }
}

fn joined<T>(r: Result<T, tokio::task::JoinError>) -> io::Result<T> {
    r.map_err(|e| io::Error::other(format!("upload task failed: {e}")))
}

pub struct UploadWriter {
    engine: Arc<Engine>,
    files: Arc<Files>,
    buf: Option<Buf>,
    filled: usize,
    /// How many bytes the current buffer takes: `BUFFER`, or less for an unaligned head.
    limit: usize,
    /// File offset of the first byte in `buf`.
    buf_at: u64,
    /// The running hash, when no buffer is being hashed.
    hasher: Option<Hasher>,
    /// The buffer being hashed; it gives the hasher back.
    hashing: Option<JoinHandle<Hasher>>,
    writes: VecDeque<JoinHandle<io::Result<()>>>,
    in_flight: Arc<InFlight>,
    finished: bool,
    /// Bytes (fewer than `HOLD`) a stall set aside, to start the next buffer.
    held: Vec<u8>,
}

impl UploadWriter {
    /// Opens upload file `path` to write from `offset` on, dropping anything after it.
    /// Every byte written is fed, in order, to `hasher` if given; `finish` returns it.
    pub fn open(
        engine: &Arc<Engine>,
        path: &Path,
        offset: u64,
        hasher: Option<Hasher>,
    ) -> io::Result<UploadWriter> {
        UploadWriter::open_inner(engine, path, offset, hasher, None)
    }

    /// `open`, with the write of the buffer at file offset `fail_at` failing (tests).
    fn open_inner(
        engine: &Arc<Engine>,
        path: &Path,
        offset: u64,
        hasher: Option<Hasher>,
        fail_at: Option<u64>,
    ) -> io::Result<UploadWriter> {
        let plain = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .mode(crate::store::perms::FILE_MODE)
            .open(path)?;
        plain.set_len(offset)?;
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        let files = Arc::new(Files {
            plain,
            direct,
            direct_refused: AtomicBool::new(false),
            fail_at,
        });
        let mut w = UploadWriter {
            engine: Arc::clone(engine),
            files,
            buf: None,
            filled: 0,
            limit: BUFFER,
            buf_at: offset,
            hasher,
            hashing: None,
            writes: VecDeque::new(),
            in_flight: Arc::default(),
            finished: false,
            held: Vec::new(),
        };
        w.limit = w.next_limit();
        Ok(w)
    }

    /// The size of the next buffer: up to the next block boundary when the file offset
    /// is not on one (whole blocks then go direct), else a whole buffer.
    fn next_limit(&self) -> usize {
        let head = (ALIGN - (self.buf_at % ALIGN as u64) as usize) % ALIGN;
        if self.files.direct.is_some() && head > 0 {
            head
        } else {
            BUFFER
        }
    }

    pub async fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            if self.buf.is_none() {
                let mut buf = self.engine.buffer().await?;
                // What a stall set aside goes first.
                let held = std::mem::take(&mut self.held);
                buf.window_mut(0, held.len()).copy_from_slice(&held);
                self.filled = held.len();
                self.buf = Some(buf);
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

    /// A body has stalled: the buffer goes back to the budget. A little data is set
    /// aside in a small heap copy (and written with what follows), more is handed off
    /// as it is: a trickle of bytes then costs neither a budget buffer nor a write (and
    /// the journal commit that comes with it) for every byte.
    pub async fn flush(&mut self) -> io::Result<()> {
        if self.filled < HOLD && self.held.is_empty() {
            if let Some(buf) = self.buf.take() {
                self.held = buf.window(0, self.filled).to_vec();
                self.filled = 0;
            }
            return Ok(());
        }
        self.hand_off().await
    }

    /// Whether a partly filled budget buffer is held.
    pub fn holds_buffer(&self) -> bool {
        self.buf.is_some()
    }

    /// Starts hashing and writing the current buffer's bytes.
    async fn hand_off(&mut self) -> io::Result<()> {
        if self.buf.is_none() && !self.held.is_empty() {
            // Bytes set aside by a stall, and the body ended: into a buffer with them.
            let mut buf = self.engine.buffer().await?;
            let held = std::mem::take(&mut self.held);
            buf.window_mut(0, held.len()).copy_from_slice(&held);
            self.filled = held.len();
            self.buf = Some(buf);
        }
        let Some(buf) = self.buf.take() else {
            return Ok(());
        };
        if self.in_flight.stop.load(Ordering::Acquire) {
            return Err(self.first_error().await);
        }
        let (len, at) = (self.filled, self.buf_at);
        let buf = Arc::new(buf);
        // Hashing goes in order: this buffer after the one before it.
        let hasher = match self.hashing.take() {
            Some(h) => Some(joined(h.await)?),
            None => self.hasher.take(),
        };
        if let Some(mut hasher) = hasher {
            let permit = Arc::clone(&self.engine.hashing)
                .acquire_owned()
                .await
                .map_err(|_| io::Error::other("hashing closed"))?;
            let b = Arc::clone(&buf);
            self.hashing = Some(tokio::task::spawn_blocking(move || {
                let _permit = permit;
                hasher.update(b.window(0, len));
                drop(b); // the buffer goes back as soon as it is hashed and written
                hasher
            }));
        }
        // Writing goes alongside, a few at a time per upload.
        while self.writes.len() >= WRITES_PER_UPLOAD {
            let oldest = self.writes.pop_front().expect("a write in flight");
            joined(oldest.await)??;
        }
        let permit = Arc::clone(&self.engine.writing)
            .acquire_owned()
            .await
            .map_err(|_| io::Error::other("writing closed"))?;
        let guard = self.in_flight.enter();
        let files = Arc::clone(&self.files);
        self.writes.push_back(tokio::task::spawn_blocking(move || {
            let _permit = permit;
            if guard.0.stop.load(Ordering::Acquire) {
                return Ok(()); // another write failed or the writer was dropped
            }
            let r = files.write(buf.window(0, len), at);
            if r.is_err() {
                guard.0.stop.store(true, Ordering::Release);
            }
            drop(guard);
            r
        }));
        self.buf_at += len as u64;
        self.filled = 0;
        self.limit = self.next_limit();
        Ok(())
    }

    /// After a stop: the error of the write that failed.
    async fn first_error(&mut self) -> io::Error {
        let mut first = None;
        while let Some(w) = self.writes.pop_front() {
            if let Err(e) = joined(w.await).and_then(|r| r) {
                first.get_or_insert(e);
            }
        }
        first.unwrap_or_else(|| io::Error::other("upload writer stopped early"))
    }

    /// Writes what is left and makes the file durable. Returns the file's length and the
    /// hasher, which has seen every byte.
    pub async fn finish(mut self) -> io::Result<(u64, Option<Hasher>)> {
        self.hand_off().await?;
        while let Some(w) = self.writes.pop_front() {
            if let Err(e) = joined(w.await).and_then(|r| r) {
                self.in_flight.stop.store(true, Ordering::Release);
                let _ = self.first_error().await;
                return Err(e);
            }
        }
        let hasher = match self.hashing.take() {
            Some(h) => Some(joined(h.await)?),
            None => self.hasher.take(),
        };
        let files = Arc::clone(&self.files);
        // fdatasync flushes the inode's data, the direct writes included, its size, and
        // the device's write cache.
        joined(tokio::task::spawn_blocking(move || files.plain.sync_data()).await)??;
        self.finished = true;
        Ok((self.buf_at, hasher))
    }
}

impl Drop for UploadWriter {
    /// An unfinished writer (the body failed, or the request was dropped) stops its
    /// writes before the upload's lock is released, so no stale write can land after the
    /// next request for the same upload has started. Writes not started are skipped; it
    /// waits for at most the few in progress.
    fn drop(&mut self) {
        if !self.finished {
            self.in_flight.stop.store(true, Ordering::Release);
            self.in_flight.wait_idle();
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
        let engine = Engine::new(16);
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
            10 * BUFFER + 5,
        ]
        .into_iter()
        .enumerate()
        {
            let hasher = (i % 2 == 0).then(|| Algorithm::Sha256.hasher());
            let mut w = UploadWriter::open(&engine, &path, expected.len() as u64, hasher).unwrap();
            let data = pattern(len, i as u8);
            // Feed in uneven pieces, as a network body arrives, with a stall (a flush
            // of a partly filled buffer) now and then.
            for (j, piece) in data.chunks(77_777).enumerate() {
                w.write(piece).await.unwrap();
                if j % 5 == 3 {
                    w.flush().await.unwrap();
                }
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
        assert_eq!(engine.buffers_in_use(), 0, "every buffer went back");
    }

    #[tokio::test]
    async fn reopening_at_an_earlier_offset_drops_the_rest() {
        let engine = Engine::new(4);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u");
        let mut w = UploadWriter::open(&engine, &path, 0, None).unwrap();
        w.write(&pattern(20_000, 1)).await.unwrap();
        w.finish().await.unwrap();
        let mut w = UploadWriter::open(&engine, &path, 5000, None).unwrap();
        w.write(b"end").await.unwrap();
        assert_eq!(w.finish().await.unwrap().0, 5003);
        let got = std::fs::read(&path).unwrap();
        assert_eq!(&got[..5000], &pattern(20_000, 1)[..5000]);
        assert_eq!(&got[5000..], b"end");
    }

    #[tokio::test]
    async fn a_failed_write_is_reported_while_other_writes_go_on() {
        let engine = Engine::new(16);
        let dir = tempfile::tempdir().unwrap();
        for hasher in [None, Some(Algorithm::Sha256.hasher())] {
            let path = dir.path().join("u");
            // The third buffer's write is slow and then fails, while others go on.
            let w = UploadWriter::open_inner(&engine, &path, 0, hasher, Some(2 * BUFFER as u64));
            let mut w = w.unwrap();
            let data = pattern(32 * BUFFER, 3);
            let outcome = tokio::time::timeout(Duration::from_secs(60), async {
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
        assert_eq!(engine.buffers_in_use(), 0);
    }

    #[tokio::test]
    async fn a_dropped_writer_has_stopped_writing_when_the_drop_returns() {
        let engine = Engine::new(16);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u");
        let mut w =
            UploadWriter::open(&engine, &path, 0, Some(Algorithm::Sha256.hasher())).unwrap();
        w.write(&pattern(6 * BUFFER, 2)).await.unwrap();
        drop(w);
        // Whatever reached the disk, nothing more arrives after the drop.
        let len = std::fs::metadata(&path).unwrap().len();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        assert!(len <= 6 * BUFFER as u64);
    }

    #[tokio::test]
    async fn writers_wait_for_the_budget_instead_of_failing() {
        // Two buffers for three uploads writing at once: all finish, none fails.
        let engine = Engine::new(2);
        let dir = tempfile::tempdir().unwrap();
        let mut tasks = Vec::new();
        for i in 0..3u8 {
            let (engine, path) = (Arc::clone(&engine), dir.path().join(format!("u{i}")));
            tasks.push(tokio::spawn(async move {
                let mut w = UploadWriter::open(&engine, &path, 0, Some(Algorithm::Sha256.hasher()))
                    .unwrap();
                let data = pattern(5 * BUFFER + 11, i);
                for piece in data.chunks(300_000) {
                    w.write(piece).await.unwrap();
                }
                let (_, h) = w.finish().await.unwrap();
                assert_eq!(h.unwrap().finish(), Digest::sha256_of(&data));
                assert_eq!(std::fs::read(&path).unwrap(), data);
            }));
        }
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("no deadlock")
                .unwrap();
        }
        assert_eq!(engine.buffers_in_use(), 0);
        assert!(engine.warm.lock().unwrap().len() <= 2);
    }
}
