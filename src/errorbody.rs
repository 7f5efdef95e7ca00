//! The OCI error body for requests hyper refuses itself.
//!
//! hyper answers a request it cannot parse (two `Content-Length` headers, a negative
//! one, a bad request line, a URI or headers too long) on its own, before any handler
//! runs, with an empty body: `HTTP/1.1 400 Bad Request`, `connection: close`,
//! `content-length: 0`, `date: ...`. Clients then show nothing useful. This wrapper of
//! a connection's I/O recognises exactly that answer as hyper writes it (every answer of
//! wharf's own carries `docker-distribution-api-version`, which hyper's does not) and
//! writes it out with the registry's JSON error body instead.
//!
//! Bytes that look like that answer could also be part of a blob being sent, so the
//! choice waits for hyper's next step: hyper shuts the connection down right after its
//! own answer, and does anything else (writes more, or reads the next request) after
//! data. Only before a shutdown is the JSON answer written; otherwise the bytes go out
//! as they were.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The JSON answer for hyper's automatic one in `head`, if `head` is one.
fn rewrite(head: &[u8]) -> Option<Vec<u8>> {
    // Cheap tests first: this sees every write, blob bodies included.
    if head.len() > 256 || !(head.starts_with(b"HTTP/1.1 4") || head.starts_with(b"HTTP/1.1 5")) {
        return None;
    }
    let text = std::str::from_utf8(head).ok()?;
    let rest = text.strip_prefix("HTTP/1.1 ")?;
    let (status_line, headers) = rest.split_once("\r\n")?;
    let date = headers
        .strip_prefix("connection: close\r\ncontent-length: 0\r\ndate: ")?
        .strip_suffix("\r\n\r\n")?;
    if date.len() != 29 || !date.ends_with(" GMT") {
        return None;
    }
    let code: u16 = status_line.get(..3)?.parse().ok()?;
    let message = match code {
        400 => {
            "the request is malformed: its request line or a header could not be read (for example two Content-Length headers, or a negative one)"
        }
        414 => "the request URI is too long",
        431 => "the request's headers are too large",
        505 => "this HTTP version is not supported",
        _ => return None,
    };
    let body =
        serde_json::json!({"errors": [{"code": "UNSUPPORTED", "message": message}]}).to_string();
    Some(
        format!(
            "HTTP/1.1 {status_line}\r\nconnection: close\r\ncontent-type: application/json\r\ndocker-distribution-api-version: registry/2.0\r\ncontent-length: {}\r\ndate: {date}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

pub struct ErrorBodies<T> {
    inner: T,
    /// Bytes still to be written, and how much of them is.
    pending: Option<(Vec<u8>, usize)>,
    /// What looked like hyper's own answer, as written and as rewritten, until hyper's
    /// next step tells which it was.
    candidate: Option<(Vec<u8>, Vec<u8>)>,
}

impl<T> ErrorBodies<T> {
    pub fn new(inner: T) -> ErrorBodies<T> {
        ErrorBodies {
            inner,
            pending: None,
            candidate: None,
        }
    }

    /// The candidate was data after all: it goes out as it was.
    fn as_written(&mut self) {
        if let Some((original, _)) = self.candidate.take() {
            self.pending = Some((original, 0));
        }
    }
}

impl<T: AsyncWrite + Unpin> ErrorBodies<T> {
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((buf, at)) = &mut self.pending {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &buf[*at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *at += n;
            if *at == buf.len() {
                self.pending = None;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for ErrorBodies<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // hyper reads the next request: what it wrote was an answer of wharf's.
        self.as_written();
        if self.pending.is_some() {
            if let Poll::Ready(Err(e)) = self.drive(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ErrorBodies<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.as_written();
        ready!(self.drive(cx))?;
        if let Some(answer) = rewrite(buf) {
            self.candidate = Some((buf.to_vec(), answer));
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.as_written();
        ready!(self.drive(cx))?;
        let mut nonempty = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(only), None) = (nonempty.next(), nonempty.next()) {
            if let Some(answer) = rewrite(only) {
                self.candidate = Some((only.to_vec(), answer));
                return Poll::Ready(Ok(only.len()));
            }
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A candidate waits for hyper's next step (see the module documentation).
        ready!(self.drive(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // hyper closes right after its own answer: write the JSON one instead.
        if let Some((_, answer)) = self.candidate.take() {
            self.pending = Some((answer, 0));
        }
        ready!(self.drive(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_same_bytes_as_data_go_out_unchanged() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let hyper = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 20:49:20 GMT\r\n\r\n";
        // Data: hyper writes it, then more, then flushes and reads on.
        let (a, mut b) = tokio::io::duplex(4096);
        let mut w = ErrorBodies::new(a);
        w.write_all(hyper).await.unwrap();
        w.write_all(b"more").await.unwrap();
        w.flush().await.unwrap();
        let mut got = vec![0u8; hyper.len() + 4];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..hyper.len()], &hyper[..]);
        // hyper's own answer: written, then the connection is shut down.
        let (a, mut b) = tokio::io::duplex(4096);
        let mut w = ErrorBodies::new(a);
        w.write_all(hyper).await.unwrap();
        w.flush().await.unwrap();
        w.shutdown().await.unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert!(String::from_utf8(got).unwrap().contains("\"errors\""));
    }

    #[test]
    fn only_hypers_own_answer_is_rewritten() {
        let hyper = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 20:49:20 GMT\r\n\r\n";
        let out = String::from_utf8(rewrite(hyper).unwrap()).unwrap();
        assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["errors"][0]["code"], "UNSUPPORTED");
        assert!(rewrite(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(rewrite(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 20:49:20 GMT\r\n\r\n").is_none());
        assert!(rewrite(b"{\"layers\": []}").is_none());
    }
}
