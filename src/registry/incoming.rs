//! Request bodies as handlers see them.
//!
//! - **Idle timeout.** A body that delivers less than [`PROGRESS`] bytes (and does not
//!   end) within its timeout is cut off with an error the API answers 408. The timeout is
//!   short until the caller is authenticated (`[limits] anonymous_body_timeout`) and
//!   longer after (`body_idle_timeout`); the clock starts when the handler first reads,
//!   so time spent waiting for a lock does not count against the client. A trickle of a
//!   byte every few seconds never makes [`PROGRESS`], so it cannot hold a request open.
//! - **Taken back after the handler.** A handler that answers without reading the body
//!   (a 401 on a PUT, a 416 on a PATCH) leaves it in the request; the dispatcher then
//!   reads and drops what is left, up to [`DRAIN_LIMIT`], so the client's next request
//!   on the same connection is read correctly, or else answers with `Connection: close`.
//!   hyper alone would close the connection without saying so, and a client reusing it
//!   (Go's, as in docker and containerd) would get EOF on its next request.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};

/// Bytes a body must bring within its timeout to count as progressing.
pub const PROGRESS: usize = 16 * 1024;
/// The most of an unread body read and dropped to keep a connection usable (and let
/// the client read the answer: many clients report a body they could not finish
/// sending rather than the answer that came early), for an authenticated caller.
pub const DRAIN_LIMIT: u64 = 64 * 1024 * 1024;
/// The same for a caller not authenticated.
pub const DRAIN_LIMIT_ANONYMOUS: u64 = 1024 * 1024;

/// The error a body cut off for idleness fails with.
#[derive(Debug, thiserror::Error)]
#[error("the request body brought less than 16 KiB in {0:?}; cut off")]
pub struct IdleBody(Duration);

/// Whether `e` (or what it wraps) is a body cut off for idleness.
pub fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<IdleBody>() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if timed_out(inner) {
                    return true;
                }
            }
        }
        cur = err.source();
    }
    false
}

/// What the handler's body and the dispatcher share.
struct Shared {
    body: Option<Body>,
    /// The handler read the body to its end.
    ended: bool,
    /// The handler read from it at all.
    polled: bool,
    /// The body failed (cut off, or the client went away): nothing to drain.
    failed: bool,
}

/// The timeout a body is held to; raised once the caller is authenticated.
#[derive(Clone)]
pub struct Deadline(Arc<AtomicU64>);

impl Deadline {
    pub fn new(timeout: Duration) -> Deadline {
        Deadline(Arc::new(AtomicU64::new(timeout.as_millis() as u64)))
    }

    pub fn set(&self, timeout: Duration) {
        self.0.store(timeout.as_millis() as u64, Ordering::Relaxed);
    }

    fn get(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::Relaxed))
    }
}

/// The body a handler gets; see the module documentation.
struct Timed {
    shared: Arc<Mutex<Shared>>,
    deadline: Deadline,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    progress: usize,
    hint: SizeHint,
}

impl http_body::Body for Timed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let polled = {
            let mut sh = this.shared.lock().expect("request body");
            sh.polled = true;
            let Some(body) = sh.body.as_mut() else {
                return Poll::Ready(None);
            };
            match Pin::new(body).poll_frame(cx) {
                Poll::Ready(None) => {
                    sh.ended = true;
                    Poll::Ready(None)
                }
                other => other,
            }
        };
        let timeout = this.deadline.get();
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.progress += data.len();
                    if this.progress >= PROGRESS {
                        this.progress = 0;
                        this.timer = None; // restarted at the next wait
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.shared.lock().expect("request body").failed = true;
                        Poll::Ready(Some(Err(axum::Error::new(IdleBody(timeout)))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
            Poll::Ready(Some(Err(e))) => {
                this.shared.lock().expect("request body").failed = true;
                Poll::Ready(Some(Err(e)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        let sh = self.shared.lock().expect("request body");
        sh.body.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

/// The request body, wrapped for the handler, and what the dispatcher keeps of it.
pub struct Incoming {
    shared: Arc<Mutex<Shared>>,
    deadline: Deadline,
}

impl Incoming {
    /// Wraps `body`; returns what the handler gets.
    pub fn wrap(body: Body, timeout: Duration) -> (Incoming, Body) {
        let hint = body.size_hint();
        let shared = Arc::new(Mutex::new(Shared {
            body: Some(body),
            ended: false,
            polled: false,
            failed: false,
        }));
        let deadline = Deadline::new(timeout);
        let timed = Timed {
            shared: Arc::clone(&shared),
            deadline: deadline.clone(),
            timer: None,
            progress: 0,
            hint,
        };
        (Incoming { shared, deadline }, Body::new(timed))
    }

    pub fn deadline(&self) -> &Deadline {
        &self.deadline
    }

    /// After the handler: what to do with what it left of the body.
    /// `expects_continue`: the client waits for `100 Continue` before sending the body,
    /// so a body never asked for is not coming, and hyper closes the connection.
    pub fn leftover(self, expects_continue: bool, limit: u64) -> Leftover {
        let (body, polled) = {
            let mut sh = self.shared.lock().expect("request body");
            if sh.ended {
                return Leftover::Nothing;
            }
            if sh.failed {
                return Leftover::Close;
            }
            (sh.body.take(), sh.polled)
        };
        let Some(body) = body else {
            return Leftover::Nothing;
        };
        if body.is_end_stream() {
            return Leftover::Nothing;
        }
        if (expects_continue && !polled) || body.size_hint().lower() > limit {
            return Leftover::Close;
        }
        Leftover::Drain(Drain {
            body,
            idle: self.deadline.get(),
            limit,
        })
    }
}

/// What a handler left of a request body.
pub enum Leftover {
    /// It read it all (or there was none).
    Nothing,
    /// Too much, failed, or never coming: the answer says `Connection: close`.
    Close,
    /// A little: read and dropped while the answer goes out, so the connection can
    /// carry the next request.
    Drain(Drain),
}

pub struct Drain {
    body: Body,
    idle: Duration,
    limit: u64,
}

impl Drain {
    /// Reads the rest of the body and drops it, on the same rule as the handler had
    /// (16 KiB per timeout), up to the limit and a minute at most; true if it ended.
    /// Giving up drops the body, and hyper then closes the connection.
    pub async fn run(self) -> bool {
        let Drain { body, idle, limit } = self;
        let drain = async {
            use futures_util::StreamExt;
            let mut seen = 0u64;
            let mut stream = body.into_data_stream();
            loop {
                let window = async {
                    let mut got = 0usize;
                    while got < PROGRESS {
                        match stream.next().await {
                            Some(Ok(c)) => got += c.len(),
                            Some(Err(_)) => return Err(()),
                            None => return Ok((got, true)),
                        }
                    }
                    Ok((got, false))
                };
                match tokio::time::timeout(idle, window).await {
                    Ok(Ok((got, end))) => {
                        seen += got as u64;
                        if seen > limit {
                            return false;
                        }
                        if end {
                            return true;
                        }
                    }
                    Ok(Err(())) | Err(_) => return false,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), drain)
            .await
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn trickle(every: Duration, n: usize) -> Body {
        let s = futures_util::stream::unfold(0usize, move |i| async move {
            if i == n {
                return None;
            }
            tokio::time::sleep(every).await;
            Some((Ok::<_, std::io::Error>(Bytes::from_static(b"x")), i + 1))
        });
        Body::from_stream(s)
    }

    #[tokio::test]
    async fn a_trickle_is_cut_off_and_a_steady_body_is_not() {
        let (_, body) = Incoming::wrap(
            trickle(Duration::from_millis(30), 100),
            Duration::from_millis(200),
        );
        let err = body.collect().await.unwrap_err();
        assert!(timed_out(&err), "{err}");
        // The same bytes sent fast enough make progress.
        let fast = Body::from(vec![7u8; 3 * PROGRESS]);
        let (_, body) = Incoming::wrap(fast, Duration::from_millis(200));
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 3 * PROGRESS);
    }

    async fn finish(incoming: Incoming, limit: u64) -> bool {
        match incoming.leftover(false, limit) {
            Leftover::Nothing => true,
            Leftover::Close => false,
            Leftover::Drain(d) => d.run().await,
        }
    }

    #[tokio::test]
    async fn an_unread_body_is_drained_if_small() {
        let (incoming, body) = Incoming::wrap(Body::from(vec![1u8; 1000]), Duration::from_secs(1));
        drop(body);
        assert!(finish(incoming, DRAIN_LIMIT_ANONYMOUS).await);
        let big = Body::from(vec![1u8; DRAIN_LIMIT_ANONYMOUS as usize + 1]);
        let (incoming, body) = Incoming::wrap(big, Duration::from_secs(1));
        drop(body);
        assert!(
            !finish(incoming, DRAIN_LIMIT_ANONYMOUS).await,
            "too much to drain: close"
        );
        let (incoming, body) = Incoming::wrap(
            trickle(Duration::from_secs(3600), 1),
            Duration::from_millis(100),
        );
        drop(body);
        assert!(
            !finish(incoming, DRAIN_LIMIT).await,
            "a body that never comes: close"
        );
    }
}
