//! The access log: one line per request (time, client, method, path, status, bytes,
//! duration, user, credential), as text or JSON, to standard error or a file.
//!
//! Lines go through a bounded queue to one writer thread, so a slow disk never holds up
//! a request: past [`QUEUE`] lines waiting, new ones are counted and dropped, and the
//! count is written as a line of its own. A file is opened for appending (mode 0600)
//! and opened again when it is moved away (logrotate's default rename), checked every
//! few seconds, so it can be rotated without a restart.

use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::Duration;

use serde::Serialize;

use crate::config::AccessLogFormat;

/// Lines waiting for the writer, at most.
const QUEUE: usize = 4096;
/// How often a log file is checked for having been moved away.
const REOPEN_CHECK: Duration = Duration::from_secs(5);

/// One request, as the log records it.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    pub time: String,
    pub client: Option<String>,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    /// The response body's length, when known.
    pub bytes: Option<u64>,
    pub duration_ms: f64,
    pub user: Option<&'a str>,
    pub credential: Option<&'a str>,
}

impl Entry<'_> {
    fn line(&self, format: AccessLogFormat) -> String {
        match format {
            AccessLogFormat::Json => serde_json::to_string(self).expect("an entry serializes"),
            AccessLogFormat::Text => format!(
                "{} {} \"{} {}\" {} {} {:.1}ms user={} credential={}",
                self.time,
                self.client.as_deref().unwrap_or("-"),
                self.method,
                self.path,
                self.status,
                self.bytes.map_or("-".to_owned(), |b| b.to_string()),
                self.duration_ms,
                self.user.unwrap_or("-"),
                self.credential.unwrap_or("-"),
            ),
        }
    }
}

pub struct AccessLog {
    tx: SyncSender<String>,
    dropped: Arc<AtomicU64>,
    format: AccessLogFormat,
}

enum Target {
    Stderr,
    File(PathBuf),
}

fn open_file(path: &PathBuf) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

fn inode(path: &PathBuf) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

fn write_lines(target: Target, rx: Receiver<String>, dropped: Arc<AtomicU64>) {
    let (mut out, path): (Box<dyn Write>, Option<PathBuf>) = match target {
        Target::Stderr => (Box::new(io::BufWriter::new(io::stderr())), None),
        Target::File(p) => match open_file(&p) {
            Ok(f) => (Box::new(io::BufWriter::new(f)), Some(p)),
            Err(e) => {
                tracing::error!(error = %e, "the access log cannot be opened; it is off");
                return;
            }
        },
    };
    let mut ino = path.as_ref().and_then(inode);
    let mut last_check = std::time::Instant::now();
    loop {
        let line = match rx.recv_timeout(REOPEN_CHECK) {
            Ok(l) => Some(l),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        if let Some(l) = line {
            let _ = out.write_all(l.as_bytes());
            let _ = out.write_all(b"\n");
            // Write everything queued, then flush once.
            while let Ok(l) = rx.try_recv() {
                let _ = out.write_all(l.as_bytes());
                let _ = out.write_all(b"\n");
            }
        }
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            let _ = writeln!(
                out,
                "access log: {lost} lines dropped (the writer fell behind)"
            );
        }
        let _ = out.flush();
        if let Some(p) = &path {
            if last_check.elapsed() >= REOPEN_CHECK {
                last_check = std::time::Instant::now();
                let now = inode(p);
                if now != ino {
                    if let Ok(f) = open_file(p) {
                        out = Box::new(io::BufWriter::new(f));
                        ino = inode(p);
                    }
                }
            }
        }
    }
    let _ = out.flush();
}

impl AccessLog {
    /// Starts the log: `off`, `stderr`, or a file path. None for `off`.
    pub fn start(target: &str, format: AccessLogFormat) -> io::Result<Option<AccessLog>> {
        let target = match target {
            "off" | "" => return Ok(None),
            "stderr" | "-" => Target::Stderr,
            path => {
                let p = PathBuf::from(path);
                open_file(&p)?; // fail at start, not silently later
                Target::File(p)
            }
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let d = Arc::clone(&dropped);
        std::thread::Builder::new()
            .name("wharf-access-log".into())
            .spawn(move || write_lines(target, rx, d))?;
        Ok(Some(AccessLog {
            tx,
            dropped,
            format,
        }))
    }

    pub fn record(&self, e: &Entry<'_>) {
        match self.tx.try_send(e.line(self.format)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// Now, as RFC 3339 with milliseconds.
pub fn now() -> String {
    let ms = crate::store::meta::now_ms();
    let base = crate::time::rfc3339(ms);
    format!("{}.{:03}Z", base.trim_end_matches('Z'), ms.rem_euclid(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            time: "2026-12-01T00:00:00.000Z".into(),
            client: Some("127.0.0.1".into()),
            method: "GET",
            path: "/v2/team/api/manifests/v1",
            status: 200,
            bytes: Some(512),
            duration_ms: 1.25,
            user: Some("alice"),
            credential: Some("abcdefabcdef"),
        }
    }

    #[test]
    fn lines_in_both_formats() {
        assert_eq!(
            entry().line(AccessLogFormat::Text),
            "2026-12-01T00:00:00.000Z 127.0.0.1 \"GET /v2/team/api/manifests/v1\" 200 512 1.2ms user=alice credential=abcdefabcdef"
        );
        let v: serde_json::Value =
            serde_json::from_str(&entry().line(AccessLogFormat::Json)).unwrap();
        assert_eq!(v["status"], 200);
        assert_eq!(v["credential"], "abcdefabcdef");
    }
}
