//! The zero-downtime cutover: an HTTP/1.1 reverse proxy in the agent, one per proxied
//! service, listening on the service's public address and forwarding each request to
//! the container that is live.
//!
//! A deploy starts the new container beside the old one (the service publishes no port
//! of its own), waits for its health, then [`Proxy::switch`]es: requests from then on go
//! to the new container, while requests already at the old one finish (bounded by
//! `drain_s`) before it is stopped. A new container that is unhealthy never receives a
//! request. Keep-alive connections from clients stay open across a switch (each request
//! is routed on its own); streaming bodies pass through; a WebSocket upgrade is tunnelled
//! to the container that answered it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::{Client as Upstream, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

/// Connections a proxy holds at once; past it new ones are closed at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// A client must send a request's headers within this (slow-header clients), and a
/// kept-alive connection that sends nothing for this long is closed.
const HEADER_TIMEOUT: Duration = Duration::from_secs(20);
/// A container must start answering a request within this.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);

type Body = BoxBody<Bytes, hyper::Error>;

/// The container requests go to.
#[derive(Clone)]
pub struct Backend {
    pub addr: SocketAddr,
    pub container: String,
    /// Requests (and upgraded connections) at this backend now.
    active: Arc<AtomicUsize>,
}

impl Backend {
    pub fn new(addr: SocketAddr, container: &str) -> Backend {
        Backend {
            addr,
            container: container.to_owned(),
            active: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Waits until no request is at this backend, or `limit` has passed; the requests
    /// still there.
    pub async fn drained(&self, limit: Duration) -> usize {
        let until = Instant::now() + limit;
        loop {
            let n = self.active.load(Ordering::SeqCst);
            if n == 0 || Instant::now() >= until {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Counts a request at a backend for as long as it lives.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(b: &Backend) -> InFlight {
        b.active.fetch_add(1, Ordering::SeqCst);
        InFlight(Arc::clone(&b.active))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct Proxy {
    pub service: String,
    pub listen: SocketAddr,
    backend: RwLock<Option<Backend>>,
    /// Kept-alive connections to the containers, pooled per container address (a
    /// switch moves new requests to another pool; the old one idles out).
    upstream: Upstream<HttpConnector, Incoming>,
}

impl Proxy {
    /// Listens on `listen`; requests get 503 until a backend is set.
    pub async fn start(service: &str, listen: SocketAddr) -> anyhow::Result<Arc<Proxy>> {
        Proxy::start_with(service, listen, MAX_CONNECTIONS, HEADER_TIMEOUT).await
    }

    /// `start` with its limits: connections held at once, and the time a client has to
    /// send a request's headers.
    pub async fn start_with(
        service: &str,
        listen: SocketAddr,
        max_connections: usize,
        header_timeout: Duration,
    ) -> anyhow::Result<Arc<Proxy>> {
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
            anyhow::anyhow!("the proxy of {service} cannot listen on {listen}: {e}")
        })?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        connector.set_nodelay(true);
        let upstream = Upstream::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .pool_timer(TokioTimer::new())
            .build(connector);
        let proxy = Arc::new(Proxy {
            service: service.to_owned(),
            listen,
            backend: RwLock::new(None),
            upstream,
        });
        let p = Arc::clone(&proxy);
        let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors, say: wait a little rather than spin.
                        tracing::warn!(error = %e, "agent proxy: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    // Full: refuse this one rather than let descriptors run out.
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let p = Arc::clone(&p);
                tokio::spawn(async move {
                    let _slot = slot;
                    let service = hyper::service::service_fn(move |req| {
                        let p = Arc::clone(&p);
                        async move { Ok::<_, std::convert::Infallible>(p.handle(req, peer).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(header_timeout)
                        .max_buf_size(128 * 1024)
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Ok(proxy)
    }

    pub fn backend(&self) -> Option<Backend> {
        self.backend
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sends new requests to `to`; the backend before, to drain.
    pub fn switch(&self, to: Backend) -> Option<Backend> {
        tracing::info!(service = %self.service, "agent proxy: {} now goes to {} ({})", self.listen, to.addr, short(&to.container));
        self.backend
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .replace(to)
    }

    async fn handle(&self, mut req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        if req.method() == hyper::Method::CONNECT {
            return plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not proxied".into(),
            );
        }
        let Some(backend) = self.backend() else {
            return plain(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{}: no healthy container yet", self.service),
            );
        };
        let guard = InFlight::new(&backend);
        let upgrade = is_upgrade(req.headers());
        let client_side = upgrade.then(|| hyper::upgrade::on(&mut req));
        prepare(&mut req, peer, upgrade);
        let target = format!(
            "http://{}{}",
            backend.addr,
            req.uri().path_and_query().map_or("/", |p| p.as_str())
        );
        match target.parse() {
            Ok(u) => *req.uri_mut() = u,
            Err(_) => return plain(StatusCode::BAD_REQUEST, "a bad request target".into()),
        }
        let mut resp =
            match tokio::time::timeout(RESPONSE_TIMEOUT, self.upstream.request(req)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    return plain(
                        StatusCode::BAD_GATEWAY,
                        format!("{}: cannot reach {}: {e}", self.service, backend.addr),
                    );
                }
                Err(_) => {
                    return plain(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!(
                            "{}: {} did not answer within {}s",
                            self.service,
                            backend.addr,
                            RESPONSE_TIMEOUT.as_secs()
                        ),
                    );
                }
            };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_side) = client_side {
                let server_side = hyper::upgrade::on(&mut resp);
                tokio::spawn(async move {
                    let _guard = guard;
                    if let (Ok(c), Ok(s)) = (client_side.await, server_side.await) {
                        let (mut c, mut s) = (TokioIo::new(c), TokioIo::new(s));
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                    }
                });
                let (parts, _) = resp.into_parts();
                return Response::from_parts(parts, empty());
            }
        }
        strip_hop_by_hop(resp.headers_mut(), false);
        // The request counts until its response body has been sent.
        resp.map(move |b| {
            b.map_frame(move |f| {
                let _ = &guard;
                f
            })
            .boxed()
        })
    }
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

fn plain(status: StatusCode, text: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(text + "\n"))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

fn is_upgrade(h: &hyper::HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Headers for one hop only (RFC 9110 §7.6.1), and those `Connection` names; an upgrade
/// keeps `Connection: upgrade` and `Upgrade`.
fn strip_hop_by_hop(h: &mut hyper::HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && n == header::UPGRADE))
        // What a request needs, or what the proxy sets itself, is never dropped on the
        // client's word.
        .filter(|n| {
            !matches!(n.as_str(), "host" | "content-length" | "content-type")
                && !n.as_str().starts_with("x-forwarded-")
        })
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
    ] {
        h.remove(n);
    }
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
}

/// The request as the container gets it: hop-by-hop headers gone, the forwarding
/// headers set by the proxy alone (it is the public edge: what a client claims there is
/// dropped), and the target in origin form.
fn prepare(req: &mut Request<Incoming>, peer: SocketAddr, upgrade: bool) {
    if req.uri().authority().is_some() {
        // `GET http://other/ HTTP/1.1`: the container sees the path, and `Host`.
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        if let Ok(u) = path.parse() {
            *req.uri_mut() = u;
        }
    }
    let h = req.headers_mut();
    strip_hop_by_hop(h, upgrade);
    for n in [
        "forwarded",
        "x-real-ip",
        "x-forwarded-host",
        "x-forwarded-for",
    ] {
        h.remove(n);
    }
    if let Ok(v) = HeaderValue::from_str(&peer.ip().to_string()) {
        h.insert("x-forwarded-for", v.clone());
        h.insert("x-real-ip", v);
    }
    if let Some(host) = h.get(header::HOST).cloned() {
        h.insert("x-forwarded-host", host);
    }
    h.insert("x-forwarded-proto", HeaderValue::from_static("http"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_stay_on_their_hop() {
        let mut h = hyper::HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::HOST, HeaderValue::from_static("app"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("x-secret").is_none() && h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert_eq!(h.get(header::HOST).unwrap(), "app");

        let mut h = hyper::HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
    }

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A backend that answers every request with `name`, and an `Upgrade: echo` request
    /// with 101 and then echoes what it gets.
    async fn backend(name: &'static str) -> SocketAddr {
        backend_counted(name).await.0
    }

    /// `backend`, and the connections it has accepted.
    async fn backend_counted(name: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let mut chunk = [0u8; 4096];
                        let n = s.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                        buf.drain(..end + 4);
                        if head.contains("upgrade: echo") {
                            s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n").await.unwrap();
                            s.write_all(&buf).await.unwrap();
                            let (mut r, mut w) = s.split();
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                            return;
                        }
                        // A body, if any, is read whole (the tests send small ones).
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|n| n.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        while buf.len() < len {
                            let mut chunk = [0u8; 4096];
                            let n = s.read(&mut chunk).await.unwrap();
                            buf.extend_from_slice(&chunk[..n]);
                        }
                        let body = format!("{name} {}", String::from_utf8_lossy(&buf[..len]));
                        buf.drain(..len);
                        let forwarded = head.contains("x-forwarded-for: 127.0.0.1\r\n")
                            && head.contains("host: app")
                            && !head.contains("10.9.9.9");
                        let r = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-saw-forwarded: {forwarded}\r\n\r\n{body}",
                            body.len()
                        );
                        s.write_all(r.as_bytes()).await.unwrap();
                    }
                });
            }
        });
        (addr, accepted)
    }

    async fn read_response(s: &mut tokio::net::TcpStream) -> String {
        let mut buf = Vec::new();
        loop {
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&buf));
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let len = text[..end]
                    .to_lowercase()
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("content-length: ")
                            .map(|n| n.trim().parse::<usize>().unwrap())
                    })
                    .unwrap_or(0);
                if text.len() >= end + 4 + len {
                    return text;
                }
            }
        }
    }

    #[tokio::test]
    async fn requests_follow_the_switch_on_one_connection_and_upgrades_pass_through() {
        let (a, b) = (backend("a").await, backend("b").await);
        let listen: SocketAddr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let p = Proxy::start("web", listen).await.unwrap();
        // No backend yet: 503, said plainly.
        let mut c = tokio::net::TcpStream::connect(listen).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nhost: app\r\n\r\n")
            .await
            .unwrap();
        assert!(read_response(&mut c).await.starts_with("HTTP/1.1 503"));

        assert!(p.switch(Backend::new(a, "a")).is_none());
        c.write_all(b"POST /x HTTP/1.1\r\nhost: app\r\ncontent-length: 5\r\n\r\nhello")
            .await
            .unwrap();
        let r = read_response(&mut c).await;
        assert!(
            r.starts_with("HTTP/1.1 200") && r.ends_with("a hello"),
            "{r}"
        );
        assert!(r.contains("x-saw-forwarded: true"), "{r}");
        // A forwarded-for the client claims is not passed on, nor can it be stripped.
        c.write_all(b"GET / HTTP/1.1\r\nhost: app\r\nx-forwarded-for: 10.9.9.9\r\nconnection: x-forwarded-for, host\r\n\r\n")
            .await
            .unwrap();
        let r = read_response(&mut c).await;
        assert!(
            r.contains("x-saw-forwarded: true") && !r.contains("10.9.9.9"),
            "{r}"
        );
        // The same kept-alive connection: the next request goes where the switch says,
        // and the old backend has nothing left to drain.
        let old = p.switch(Backend::new(b, "b")).unwrap();
        assert_eq!(old.drained(Duration::from_secs(1)).await, 0);
        c.write_all(b"GET / HTTP/1.1\r\nhost: app\r\n\r\n")
            .await
            .unwrap();
        let r = read_response(&mut c).await;
        assert!(r.ends_with("b "), "{r}");

        // An upgrade is tunnelled both ways.
        let mut u = tokio::net::TcpStream::connect(listen).await.unwrap();
        u.write_all(
            b"GET /ws HTTP/1.1\r\nhost: app\r\nconnection: Upgrade\r\nupgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            u.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        u.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        u.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        // While the tunnel is open it counts at its backend.
        assert_eq!(p.backend().unwrap().active.load(Ordering::SeqCst), 1);
        drop(u);

        // A backend that is gone: 502, not a hang.
        let gone = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        p.switch(Backend::new(gone, "gone"));
        let mut c = tokio::net::TcpStream::connect(listen).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nhost: app\r\n\r\n")
            .await
            .unwrap();
        assert!(read_response(&mut c).await.starts_with("HTTP/1.1 502"));
    }

    #[tokio::test]
    async fn slow_and_excess_clients_are_cut_off_and_connect_is_refused() {
        let a = backend("a").await;
        let listen: SocketAddr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let p = Proxy::start_with("web", listen, 2, Duration::from_millis(500))
            .await
            .unwrap();
        p.switch(Backend::new(a, "a"));
        // A client that sends half a request and stalls is closed.
        let mut slow = tokio::net::TcpStream::connect(listen).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nhost:").await.unwrap();
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut buf))
            .await
            .expect("the slow client was never cut off")
            .unwrap_or(0);
        // hyper answers 408 or just closes.
        assert!(
            n == 0 || buf.starts_with(b"HTTP/1.1 408"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        // Past the cap, a new connection is closed at once; the held ones still work.
        let mut one = tokio::net::TcpStream::connect(listen).await.unwrap();
        let mut two = tokio::net::TcpStream::connect(listen).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut three = tokio::net::TcpStream::connect(listen).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), three.read(&mut buf))
            .await
            .expect("the connection past the cap was kept")
            .unwrap_or(0);
        assert_eq!(n, 0);
        for c in [&mut one, &mut two] {
            c.write_all(b"CONNECT a:443 HTTP/1.1\r\nhost: a:443\r\n\r\n")
                .await
                .unwrap();
            assert!(read_response(c).await.starts_with("HTTP/1.1 405"));
        }
    }

    #[tokio::test]
    async fn connections_to_the_container_are_kept_alive_and_reused() {
        let (a, accepted) = backend_counted("a").await;
        let listen: SocketAddr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let p = Proxy::start("web", listen).await.unwrap();
        p.switch(Backend::new(a, "a"));
        // Fifty requests, each on a new client connection, one after another.
        for _ in 0..50 {
            let mut c = tokio::net::TcpStream::connect(listen).await.unwrap();
            c.write_all(b"GET / HTTP/1.1\r\nhost: app\r\n\r\n")
                .await
                .unwrap();
            assert!(read_response(&mut c).await.ends_with("a "));
        }
        let n = accepted.load(Ordering::SeqCst);
        assert!(n <= 2, "{n} connections to the container for 50 requests");
    }
}
