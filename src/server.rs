//! Runs the registry on a listener until shutdown: plain HTTP, or HTTPS with rustls.
//! One accept loop serves both, so both shut down the same way.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceExt as _;

use crate::auth::{Auth, AuthError};
use crate::config::{Config, TlsFiles};
use crate::errorbody::ErrorBodies;
use crate::idle::IdleGuard;
use crate::registry::{self, AppState};
use crate::sendfile;
use crate::store::meta::auth::AuthMeta;
use crate::store::meta::events::EventsMeta;
use crate::store::{Store, StoreError, open_backends};
use std::sync::atomic::{AtomicU64, Ordering};

/// How long requests in flight may run on after shutdown is asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
pub use crate::store::{MONOLITHIC_MAX_IDLE, UPLOAD_MAX_IDLE};
/// How often idle uploads are looked for.
const UPLOAD_SWEEP_EVERY: Duration = Duration::from_secs(3600);
/// How long a client may take to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot open the registry's data: {0}")]
    Store(#[from] StoreError),
    #[error("the blob storage cannot be used: {0}")]
    Storage(String),
    #[error("access control: {0}")]
    Auth(#[from] AuthError),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
}

/// Builds the rustls configuration from PEM files.
fn tls_acceptor(files: &TlsFiles) -> Result<tokio_rustls::TlsAcceptor, ServeError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| {
            ServeError::Tls(format!(
                "reading certificates from {}: {e}",
                files.cert.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(ServeError::Tls(format!(
            "no certificate in {}",
            files.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        ServeError::Tls(format!(
            "reading the private key from {}: {e}",
            files.key.display()
        ))
    })?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServeError::Tls(format!("certificate and key do not fit: {e}")))?;
    // HTTP/2 for clients that offer it (as the CNCF registry does), HTTP/1.1 for the rest.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves the registry on `listener` with the data in `config.data` until `shutdown`
/// completes; then stops accepting, lets requests in flight finish (for at most
/// [`SHUTDOWN_GRACE`]) and returns.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let started = std::time::Instant::now();
    let tls = config.tls.as_ref().map(tls_acceptor).transpose()?;
    if let Some(files) = &config.tls {
        if crate::store::perms::readable_by_others(&files.key).unwrap_or(false) {
            tracing::warn!(
                "the TLS key {} is readable by other users; make it private: chmod 600 {}",
                files.key.display(),
                files.key.display()
            );
        }
    }
    let limits = &config.limits;
    let max_connections = raise_descriptor_limit(limits.max_connections);
    let (blobs, meta) = open_backends(
        &config.data,
        config.database_url.as_ref().map(|u| u.expose()),
        &config.storage,
        limits.upload_memory_mib,
    )
    .await?;
    // A wrong bucket, endpoint or credentials stop the start with the store's answer,
    // rather than failing every push later.
    match tokio::time::timeout(crate::store::READY_TIMEOUT, blobs.ready()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(ServeError::Storage(e.to_string())),
        Err(_) => {
            return Err(ServeError::Storage(format!(
                "no answer within {} s",
                crate::store::READY_TIMEOUT.as_secs()
            )));
        }
    }
    let mut store = Store::new(blobs, Arc::clone(&meta) as _);
    if config.database_url.is_some() {
        // Other replicas may share the database: uploads take leases there.
        store = store.with_shared_uploads();
    }
    let store = Arc::new(
        store
            .with_max_uploads(limits.max_uploads)
            .with_gc(config.gc.clone())
            .with_retention(config.retention.clone())
            .with_pull_tracking(config.track_pulls),
    );
    let events = Arc::clone(&meta) as Arc<dyn EventsMeta>;
    let auth = Arc::new(
        Auth::with_settings(
            meta as Arc<dyn AuthMeta>,
            &config.data,
            &config.service,
            config.limits.auth(),
        )
        .await?,
    );
    auth.load_trust().await?;
    let admin_pw = config.admin_password.as_ref().map(|s| s.expose());
    if let Some(generated) = auth.ensure_admin(admin_pw).await? {
        // Shown this once: it is stored only as a hash.
        tracing::warn!(
            "created user admin with password {} (shown only this once; change it with `wharf user passwd admin`)",
            generated.expose()
        );
    }
    let sweeper = tokio::spawn(sweep_uploads(Arc::clone(&store), started));
    let collector = tokio::spawn(collect_garbage(
        Arc::clone(&store),
        Arc::clone(&auth),
        config.gc_interval,
    ));
    let pulls = tokio::spawn(flush_pulls(Arc::clone(&store)));
    let purger = tokio::spawn(purge_tokens(Arc::clone(&auth)));
    let audit_flusher = tokio::spawn(flush_audit(Arc::clone(&auth)));
    let trimmer = tokio::spawn(trim_memory(Arc::clone(&store)));
    sync_config_webhooks(events.as_ref(), &config.webhooks).await?;
    let addr = listener.local_addr()?;
    let registry_url = match &config.public_url {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None => format!("{}://{addr}", if tls.is_some() { "https" } else { "http" }),
    };
    let dispatcher = tokio::spawn(crate::events::run_dispatcher(
        events,
        config.webhook_delivery.clone(),
        registry_url,
    ));
    let state = AppState {
        store: Arc::clone(&store),
        auth: Arc::clone(&auth),
        public_url: config.public_url.clone(),
        tls: tls.is_some(),
        metrics: registry::Metrics::default(),
        limits: config.limits.clone(),
        access_log: registry::access_log::AccessLog::start(
            &config.access_log,
            config.access_log_format,
        )
        .map_err(|e| ServeError::Config(format!("access log {}: {e}", config.access_log)))?,
        uploaders: registry::Uploaders::default(),
    };
    let open_connections = Arc::clone(&state.metrics.open_connections);
    let overloaded = Arc::clone(&state.metrics.refused_connections);
    let sendfile_bytes = Arc::clone(&state.metrics.sendfile_bytes);
    let app = registry::router(Arc::new(state));
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(
        "wharf listening on {scheme}://{addr}, data in {}",
        config.data.display()
    );

    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The timer enables hyper's header read timeout against slow-header clients; it
    // also closes a kept-alive connection that sends no next request in that time.
    builder.timer(TokioTimer::new());
    // Headers (and hyper's read buffer) of at most this much per connection.
    builder.max_buf_size(MAX_BUF);
    // TLS connections speak HTTP/2 when the client offers it (ALPN), else HTTP/1.1.
    let mut tls_builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    tls_builder
        .http1()
        .timer(TokioTimer::new())
        .max_buf_size(MAX_BUF);
    // A stream is a request: 32 at once per connection, not hyper's 200, so one HTTP/2
    // connection cannot hold more than a few HTTP/1 connections would.
    tls_builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(32)
        .max_header_list_size(64 * 1024);
    let tls_builder = Arc::new(tls_builder);
    let permits = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let per_client = Arc::new(PerClient::default());
    let per_client_max = config.limits.max_connections_per_client.max(1);
    let idle = config.limits.connection_idle_timeout;
    // Refusals in progress at once: past it an excess connection is simply closed.
    let refusing = Arc::new(tokio::sync::Semaphore::new(64));
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let client = crate::auth::limiter::ClientKey::from(peer.ip());
        let permit = match Arc::clone(&permits).try_acquire_owned() {
            Ok(p) => per_client.enter(client, per_client_max).map(|c| (p, c)),
            Err(_) => None,
        };
        let Some((permit, share)) = permit else {
            overloaded.fetch_add(1, Ordering::Relaxed);
            // Plain HTTP gets a 503 it can read; TLS is just closed (a handshake for a
            // refusal would cost more than the connection it refuses).
            if tls.is_none() {
                if let Ok(turn) = Arc::clone(&refusing).try_acquire_owned() {
                    tokio::spawn(async move {
                        let _turn = turn;
                        refuse(tcp, max_connections).await;
                    });
                }
            }
            continue;
        };
        let guard = ConnectionGuard::new(permit, share, Arc::clone(&open_connections));
        // Plain connections send blob bodies with sendfile; TLS ones copy through rustls.
        let queue = sendfile::Queue::new(Arc::clone(&sendfile_bytes));
        let zero_copy = tls.is_none().then(|| queue.clone());
        let service = TowerToHyperService::new(app.clone().map_request(
            move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                if let Some(q) = &zero_copy {
                    req.extensions_mut().insert(q.clone());
                }
                req
            },
        ));
        match &tls {
            None => {
                // hyper must keep writing vectored (never `writev(false)`), or it would
                // copy the placeholder chunks: see `sendfile`.
                let io = TokioIo::new(IdleGuard::with_idle(
                    ErrorBodies::new(sendfile::Conn::new(tcp, queue)),
                    idle,
                ));
                let conn = builder.serve_connection(io, service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _guard = guard;
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, %peer, "connection ended with an error");
                    }
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let builder = Arc::clone(&tls_builder);
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let _guard = guard;
                    let tcp = IdleGuard::with_idle(tcp, idle);
                    let stream =
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                            .await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                return tracing::debug!(error = %e, %peer, "TLS handshake failed");
                            }
                            Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                        };
                    let io = TokioIo::new(ErrorBodies::new(stream));
                    let conn = builder.serve_connection(io, service);
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(error = %e, %peer, "connection ended with an error");
                    }
                });
            }
        }
    }
    drop(listener);
    tracing::info!("shutting down: no new connections, finishing requests in flight");
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!("requests still in flight after {SHUTDOWN_GRACE:?}; aborting them");
        }
    }
    sweeper.abort();
    collector.abort();
    pulls.abort();
    let _ = store.flush_pulls().await;
    purger.abort();
    trimmer.abort();
    audit_flusher.abort();
    auth.flush_failures().await;
    dispatcher.abort();
    tracing::info!("stopped");
    Ok(())
}

/// Raises the open-file limit to its hard maximum (the usual soft limit, 1024, is far
/// too low for a server holding a connection and two files per upload) and returns the
/// connections to allow: `wanted`, or fewer if descriptors would run out first.
pub fn raise_descriptor_limit(wanted: usize) -> usize {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let before = limit.current;
        limit.current = limit.maximum;
        match setrlimit(Resource::Nofile, limit) {
            Ok(()) => tracing::debug!(?before, now = ?limit.current, "raised the open-file limit"),
            Err(e) => {
                tracing::warn!(error = %e, "could not raise the open-file limit");
                limit = getrlimit(Resource::Nofile);
            }
        }
    }
    // A connection takes one descriptor, an upload on it two more; keep some spare.
    let fds = limit.current.map_or(u64::MAX, |c| c).min(usize::MAX as u64) as usize;
    let fit = fds.saturating_sub(256) / 2;
    if fit < wanted {
        tracing::warn!(
            "the open-file limit ({fds}) allows {fit} connections, not the {wanted} of max_connections"
        );
    }
    wanted.min(fit).max(1)
}

/// Headers and read buffer of one HTTP/1 connection, at most (hyper's default, about
/// 400 KiB, times thousands of connections would be gigabytes).
const MAX_BUF: usize = 128 * 1024;

/// Connections open per client address (IPv6 by /64), so one client cannot take every
/// place of `max_connections`.
#[derive(Default)]
struct PerClient(
    std::sync::Mutex<std::collections::HashMap<crate::auth::limiter::ClientKey, usize>>,
);

/// One connection's share of its client's places.
struct Share {
    of: Arc<PerClient>,
    client: crate::auth::limiter::ClientKey,
}

impl PerClient {
    fn enter(
        self: &Arc<Self>,
        client: crate::auth::limiter::ClientKey,
        max: usize,
    ) -> Option<Share> {
        let mut map = self.0.lock().expect("connections per client");
        let n = map.entry(client).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Share {
            of: Arc::clone(self),
            client,
        })
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut map = self.of.0.lock().expect("connections per client");
        if let Some(n) = map.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.client);
                if map.is_empty() {
                    map.shrink_to_fit();
                }
            }
        }
    }
}

/// Holds a connection's place among `max_connections` and its client's, and counts it
/// as open.
struct ConnectionGuard {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _share: Share,
    open: Arc<AtomicU64>,
}

impl ConnectionGuard {
    fn new(
        permit: tokio::sync::OwnedSemaphorePermit,
        share: Share,
        open: Arc<AtomicU64>,
    ) -> ConnectionGuard {
        open.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard {
            _permit: permit,
            _share: share,
            open,
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Answers a plain connection past `max_connections` (or its client's share) with 503
/// and closes it, within a second at most.
async fn refuse(tcp: tokio::net::TcpStream, max: usize) {
    use tokio::io::AsyncWriteExt;
    let body = serde_json::json!({"errors": [{"code": "TOOMANYREQUESTS", "message":
        format!("the registry has as many connections open as it takes (at most {max}, fewer from one address); retry in a moment")}]})
    .to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ndocker-distribution-api-version: registry/2.0\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async move {
        let mut tcp = tcp;
        let _ = tcp.write_all(answer.as_bytes()).await;
        let _ = tcp.shutdown().await;
    })
    .await;
}

/// Makes the database's config webhooks those of the file: added, updated, removed.
async fn sync_config_webhooks(
    events: &dyn EventsMeta,
    hooks: &[crate::events::WebhookConfig],
) -> Result<(), ServeError> {
    use sha2::Digest as _;
    let mut keep = Vec::new();
    for h in hooks {
        let id = format!(
            "cfg-{}",
            &hex::encode(sha2::Sha256::digest(h.url.as_bytes()))[..12]
        );
        let record = crate::events::validate(id.clone(), h, "config")
            .map_err(|e| ServeError::Config(format!("webhook {}: {e}", h.url)))?;
        events
            .webhook_put(&record)
            .await
            .map_err(|e| ServeError::Store(e.into()))?;
        keep.push(id);
    }
    events
        .webhooks_retain("config", &keep)
        .await
        .map_err(|e| ServeError::Store(e.into()))?;
    Ok(())
}

/// Writes the refused requests' audit rows once a second, in one transaction.
async fn flush_audit(auth: Arc<Auth>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        every.tick().await;
        auth.flush_failures().await;
    }
}

/// Tokens revoked or expired this long ago are deleted (they can never work again), and
/// addresses not signed in from for as long are forgotten.
const TOKEN_KEEP: Duration = Duration::from_secs(30 * 86_400);

async fn purge_tokens(auth: Arc<Auth>) {
    let mut every = tokio::time::interval(UPLOAD_SWEEP_EVERY);
    loop {
        every.tick().await;
        let before = crate::store::meta::now_ms() - TOKEN_KEEP.as_millis() as i64;
        match auth.meta().tokens_purge(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!("deleted {n} tokens revoked or expired over 30 days ago"),
            Err(e) => tracing::warn!(error = %e, "could not purge old tokens"),
        }
    }
}

/// Gives upload memory unused for a while back to the system.
async fn trim_memory(store: Arc<Store>) {
    let mut every = tokio::time::interval(Duration::from_secs(5));
    loop {
        every.tick().await;
        store.trim();
    }
}

/// Runs a garbage collection pass every `interval` (the first at start, which also
/// finishes one a crash cut short); never if `interval` is zero.
async fn collect_garbage(store: Arc<Store>, auth: Arc<Auth>, interval: Duration) {
    if interval.is_zero() {
        return;
    }
    let mut every = tokio::time::interval(interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let by = crate::store::Who {
        actor: Some("retention".into()),
        ..Default::default()
    };
    loop {
        every.tick().await;
        match store.retention_run(false, &by).await {
            Ok(r) if r.tags + r.manifests == 0 => {}
            Ok(r) => {
                tracing::info!(
                    tags = r.tags,
                    manifests = r.manifests,
                    bytes = r.bytes,
                    "retention deleted {} tags and condemned {} manifests",
                    r.tags,
                    r.manifests
                );
                let _ = auth
                    .audit(
                        Some("retention"),
                        "retention.run",
                        None,
                        Some(format!(
                            "{} tags deleted, {} manifests condemned, {} bytes to free",
                            r.tags, r.manifests, r.bytes
                        )),
                        None,
                    )
                    .await;
            }
            Err(e) => tracing::warn!(error = %e, "retention failed"),
        }
        match store.gc(false, "server").await {
            Ok(r) if r.blobs + r.links + r.manifests + r.uploads + r.repositories == 0 => {
                tracing::debug!("garbage collection: nothing to remove")
            }
            Ok(r) => tracing::info!(
                blobs = r.blobs,
                bytes = r.bytes,
                links = r.links,
                manifests = r.manifests,
                uploads = r.uploads,
                repositories = r.repositories,
                ms = r.duration_ms,
                "garbage collection removed {} blobs ({} bytes)",
                r.blobs,
                r.bytes
            ),
            // `wharf gc` or another replica is collecting: nothing to say at every tick.
            Err(StoreError::GcRunning) => {
                tracing::debug!("garbage collection: another pass is running")
            }
            Err(e) => tracing::warn!(error = %e, "garbage collection failed"),
        }
    }
}

/// Writes the manifest pulls recorded in memory every second, in one transaction.
async fn flush_pulls(store: Arc<Store>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        every.tick().await;
        if let Err(e) = store.flush_pulls().await {
            tracing::warn!(error = %e, "could not record manifest pulls");
        }
    }
}

async fn sweep_uploads(store: Arc<Store>, started: std::time::Instant) {
    let mut every = tokio::time::interval(UPLOAD_SWEEP_EVERY);
    let mut first = true;
    loop {
        every.tick().await;
        // The first sweep, at start, removes every monolithic upload last written before
        // this server started: those were cut off by a crash or a kill.
        let monolithic_idle = if first {
            started.elapsed()
        } else {
            MONOLITHIC_MAX_IDLE
        };
        first = false;
        let swept = store.expire_uploads(UPLOAD_MAX_IDLE, monolithic_idle).await;
        match swept {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!("removed {n} upload sessions idle for over {UPLOAD_MAX_IDLE:?}")
            }
            Err(e) => tracing::warn!(error = %e, "could not expire idle uploads"),
        }
    }
}
