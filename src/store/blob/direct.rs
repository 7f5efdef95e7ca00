//! Writing upload data to disk with `O_DIRECT` where the filesystem allows it.
//!
//! An upload must be on disk before it is acknowledged, so its bytes are written once and
//! synced. Through the page cache that is two steps: a copy into freshly allocated cache
//! pages, then the flush. With `O_DIRECT` the data goes from our buffer to the device in
//! one step, at the device's speed, and leaves the page cache to blobs being read.
//! `O_DIRECT` needs the buffer, the file offset and the length aligned to the device's
//! block size, so the unaligned head (a chunk that starts mid-block) and tail (the last
//! partial block) go through an ordinary descriptor. The two never cover the same block.
//! Filesystems without `O_DIRECT` (tmpfs on old kernels) get ordinary writes throughout.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

/// Alignment for `O_DIRECT`: 4 KiB covers the logical block size of common devices.
const ALIGN: usize = 4096;
/// Bytes gathered before one write.
const BUFFER: usize = 1024 * 1024;
/// Buffers per upload: one filling, one queued, one being written. The device stays busy
/// while the next buffer fills.
const BUFFERS: usize = 3;

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
}

/// A full buffer to write: `len` bytes at file offset `at`.
struct Job {
    buf: AlignedBuf,
    len: usize,
    at: u64,
}

pub struct UploadWriter {
    plain: Arc<File>,
    /// Whether whole blocks are meant for `O_DIRECT`: the head is then aligned first. (If
    /// the filesystem refuses a direct write, the I/O thread falls back on its own.)
    direct: bool,
    buf: AlignedBuf,
    filled: usize,
    /// File offset of the first byte in `buf`.
    buf_at: u64,
    jobs: Option<SyncSender<Job>>,
    free: Receiver<AlignedBuf>,
    io: Option<JoinHandle<io::Result<()>>>,
}

/// The I/O thread: writes each job, hands its buffer back.
fn write_jobs(
    plain: &File,
    mut direct: Option<File>,
    jobs: &Receiver<Job>,
    free: &SyncSender<AlignedBuf>,
) -> io::Result<()> {
    while let Ok(job) = jobs.recv() {
        let data = job.buf.window(job.len);
        let result = match &direct {
            Some(d) => d.write_all_at(data, job.at),
            None => plain.write_all_at(data, job.at),
        };
        match result {
            Ok(()) => {}
            // The filesystem refused the direct write (alignment): write it, and the
            // rest of this upload, the ordinary way.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && direct.is_some() => {
                direct = None;
                plain.write_all_at(data, job.at)?;
            }
            Err(e) => return Err(e),
        }
        let _ = free.send(job.buf);
    }
    Ok(())
}

impl UploadWriter {
    /// Opens upload file `path` to write from `offset` on, dropping anything after it.
    pub fn open(path: &Path, offset: u64) -> io::Result<UploadWriter> {
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
            .ok();
        let (jobs_tx, jobs_rx) = sync_channel::<Job>(BUFFERS - 2);
        let (free_tx, free_rx) = sync_channel::<AlignedBuf>(BUFFERS);
        for _ in 0..BUFFERS - 1 {
            free_tx
                .send(AlignedBuf::new())
                .expect("room for the spare buffers");
        }
        let is_direct = direct.is_some();
        let io_file = Arc::clone(&plain);
        let io = std::thread::Builder::new()
            .name("wharf-upload-io".into())
            .spawn(move || write_jobs(&io_file, direct, &jobs_rx, &free_tx))?;
        Ok(UploadWriter {
            plain,
            direct: is_direct,
            buf: AlignedBuf::new(),
            filled: 0,
            buf_at: offset,
            jobs: Some(jobs_tx),
            free: free_rx,
            io: Some(io),
        })
    }

    pub fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        if self.direct && self.filled == 0 {
            // Bring the file offset to a block boundary with an ordinary write.
            let misaligned = (self.buf_at % ALIGN as u64) as usize;
            if misaligned != 0 {
                let n = (ALIGN - misaligned).min(data.len());
                self.plain.write_all_at(&data[..n], self.buf_at)?;
                self.buf_at += n as u64;
                data = &data[n..];
            }
        }
        while !data.is_empty() {
            let n = (BUFFER - self.filled).min(data.len());
            let at = self.buf.start + self.filled;
            self.buf.mem[at..at + n].copy_from_slice(&data[..n]);
            self.filled += n;
            data = &data[n..];
            if self.filled == BUFFER {
                self.hand_off(BUFFER)?;
            }
        }
        Ok(())
    }

    /// Queues the first `len` bytes of the buffer (whole blocks) for the I/O thread and
    /// continues in a free buffer, keeping the bytes after `len`.
    fn hand_off(&mut self, len: usize) -> io::Result<()> {
        let Ok(mut next) = self.free.recv() else {
            return Err(self.io_error());
        };
        let rest = self.filled - len;
        let from = self.buf.start + len;
        next.mem[next.start..next.start + rest].copy_from_slice(&self.buf.mem[from..from + rest]);
        let full = std::mem::replace(&mut self.buf, next);
        let job = Job {
            buf: full,
            len,
            at: self.buf_at,
        };
        if self.jobs.as_ref().expect("open writer").send(job).is_err() {
            return Err(self.io_error());
        }
        self.buf_at += len as u64;
        self.filled = rest;
        Ok(())
    }

    /// The I/O thread stopped: its error.
    fn io_error(&mut self) -> io::Error {
        self.jobs = None;
        match self.io.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => e,
            _ => io::Error::other("upload writer thread stopped"),
        }
    }

    /// Writes what is left and makes the file durable. Returns the file's length.
    pub fn finish(mut self) -> io::Result<u64> {
        let whole = if self.direct {
            self.filled - self.filled % ALIGN
        } else {
            self.filled
        };
        if whole > 0 {
            self.hand_off(whole)?;
        }
        self.jobs = None; // the I/O thread drains its queue and ends
        match self.io.take().map(JoinHandle::join) {
            Some(Ok(result)) => result?,
            _ => return Err(io::Error::other("upload writer thread panicked")),
        }
        if self.filled > 0 {
            self.plain
                .write_all_at(self.buf.window(self.filled), self.buf_at)?;
            self.buf_at += self.filled as u64;
        }
        // fdatasync flushes the inode's data, the direct writes included, its size, and
        // the device's write cache.
        self.plain.sync_data()?;
        Ok(self.buf_at)
    }
}

impl Drop for UploadWriter {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(io) = self.io.take() {
            let _ = io.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn appends_at_any_offset_give_the_exact_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u");
        let mut expected = Vec::new();
        // Chunk sizes that cross, start and end mid-block and span whole buffers.
        for (i, len) in [1usize, 4095, 4096, 10_000, BUFFER + 7, 3 * ALIGN, 0, 123]
            .into_iter()
            .enumerate()
        {
            let mut w = UploadWriter::open(&path, expected.len() as u64).unwrap();
            let data = pattern(len, i as u8);
            // Feed in uneven pieces, as a network body arrives.
            for piece in data.chunks(777) {
                w.write(piece).unwrap();
            }
            expected.extend_from_slice(&data);
            assert_eq!(w.finish().unwrap(), expected.len() as u64);
            assert_eq!(std::fs::read(&path).unwrap(), expected, "after chunk {i}");
        }
    }

    #[test]
    fn reopening_at_an_earlier_offset_drops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u");
        let mut w = UploadWriter::open(&path, 0).unwrap();
        w.write(&pattern(20_000, 1)).unwrap();
        w.finish().unwrap();
        let mut w = UploadWriter::open(&path, 5000).unwrap();
        w.write(b"end").unwrap();
        assert_eq!(w.finish().unwrap(), 5003);
        let got = std::fs::read(&path).unwrap();
        assert_eq!(&got[..5000], &pattern(20_000, 1)[..5000]);
        assert_eq!(&got[5000..], b"end");
    }
}
