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
use crate::registry::{self, AppState};
use crate::sendfile;
use crate::store::meta::events::EventsMeta;
use crate::store::{Store, StoreError, open_local_backends};

/// How long requests in flight may run on after shutdown is asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// An upload session untouched for this long is removed, with its bytes.
pub const UPLOAD_MAX_IDLE: Duration = Duration::from_secs(24 * 3600);
/// A monolithic upload (`POST ?digest=`) no request has written to for this long was
/// cut off; no client can resume one.
pub const MONOLITHIC_MAX_IDLE: Duration = Duration::from_secs(600);
/// How often idle uploads are looked for.
const UPLOAD_SWEEP_EVERY: Duration = Duration::from_secs(3600);
/// How long a client may take to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot open the data directory: {0}")]
    Store(#[from] StoreError),
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
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
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
    let (blobs, meta) = open_local_backends(&config.data)?;
    let store = Arc::new(Store::new(blobs, Arc::clone(&meta) as _));
    let events = Arc::clone(&meta) as Arc<dyn EventsMeta>;
    let auth = Arc::new(Auth::with_settings(
        meta,
        &config.data,
        &config.service,
        config.limits.auth(),
    )?);
    let admin_pw = config.admin_password.as_ref().map(|s| s.expose());
    if let Some(generated) = auth.ensure_admin(admin_pw).await? {
        // Shown this once: it is stored only as a hash.
        tracing::warn!(
            "created user admin with password {} (shown only this once; change it with `wharf user passwd admin`)",
            generated.expose()
        );
    }
    let sweeper = tokio::spawn(sweep_uploads(Arc::clone(&store), started));
    let audit_flusher = tokio::spawn(flush_audit(Arc::clone(&auth)));
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
        store,
        auth: Arc::clone(&auth),
        public_url: config.public_url.clone(),
        tls: tls.is_some(),
        metrics: registry::Metrics::default(),
    };
    let sendfile_bytes = Arc::clone(&state.metrics.sendfile_bytes);
    let app = registry::router(Arc::new(state));
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(
        "wharf listening on {scheme}://{addr}, data in {}",
        config.data.display()
    );

    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The timer enables hyper's header read timeout against slow-header clients.
    builder.timer(TokioTimer::new());
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
                let io = TokioIo::new(sendfile::Conn::new(tcp, queue));
                let conn = builder.serve_connection(io, service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, %peer, "connection ended with an error");
                    }
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let builder = builder.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
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
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
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
    audit_flusher.abort();
    auth.flush_failures().await;
    dispatcher.abort();
    tracing::info!("stopped");
    Ok(())
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

/// Writes the audit summaries of repeated failures once their minute has ended.
async fn flush_audit(auth: Arc<Auth>) {
    let mut every = tokio::time::interval(Duration::from_secs(10));
    loop {
        every.tick().await;
        auth.flush_failures().await;
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
