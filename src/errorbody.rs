//! The OCI error body for requests hyper refuses itself.
//!
//! hyper answers a request it cannot parse (two `Content-Length` headers, a negative
//! one, a bad request line, a URI or headers too long) on its own, before any handler
//! runs, with an empty body: `HTTP/1.1 400 Bad Request`, `connection: close`,
//! `content-length: 0`, `date: ...`. Clients then show nothing useful. This wrapper of
//! a connection's I/O recognises exactly that answer as hyper writes it (every answer of
//! wharf's own carries `docker-distribution-api-version`, which hyper's does not) and
//! writes it out with the registry's JSON error body instead. hyper closes the
//! connection after such an answer, so the length of what was written does not matter
//! to anything that follows.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The JSON answer for hyper's automatic one in `head`, if `head` is one.
fn rewrite(head: &[u8]) -> Option<Vec<u8>> {
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
    /// A rewritten answer still to be written, and how much of it is.
    pending: Option<(Vec<u8>, usize)>,
}

impl<T> ErrorBodies<T> {
    pub fn new(inner: T) -> ErrorBodies<T> {
        ErrorBodies {
            inner,
            pending: None,
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

impl<T: AsyncRead + Unpin> AsyncRead for ErrorBodies<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ErrorBodies<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.drive(cx))?;
        if let Some(answer) = rewrite(buf) {
            self.pending = Some((answer, 0));
            // The rest is written by the next write, flush or shutdown.
            let _ = self.drive(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.drive(cx))?;
        let mut nonempty = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(only), None) = (nonempty.next(), nonempty.next()) {
            if let Some(answer) = rewrite(only) {
                let len = only.len();
                self.pending = Some((answer, 0));
                let _ = self.drive(cx)?;
                return Poll::Ready(Ok(len));
            }
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drive(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drive(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
