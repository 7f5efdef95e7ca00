//! Runs the registry on a listener until shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::auth::{Auth, AuthError};
use crate::config::Config;
use crate::registry::{self, AppState};
use crate::store::{Store, StoreError, open_local_backends};

/// How long requests in flight may run on after shutdown is asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// An upload session untouched for this long is removed, with its bytes.
pub const UPLOAD_MAX_IDLE: Duration = Duration::from_secs(24 * 3600);
/// How often idle uploads are looked for.
const UPLOAD_SWEEP_EVERY: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot open the data directory: {0}")]
    Store(#[from] StoreError),
    #[error("access control: {0}")]
    Auth(#[from] AuthError),
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves the registry on `listener` with the data in `config.data` until `shutdown`
/// completes; then stops accepting, lets requests in flight finish (for at most
/// [`SHUTDOWN_GRACE`]) and returns.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (blobs, meta) = open_local_backends(&config.data)?;
    let store = Arc::new(Store::new(blobs, Arc::clone(&meta) as _));
    let auth = Arc::new(Auth::open(meta, &config.data, &config.service)?);
    let admin_pw = config.admin_password.as_ref().map(|s| s.expose());
    if let Some(generated) = auth.ensure_admin(admin_pw).await? {
        // Shown this once: it is stored only as a hash.
        tracing::warn!(
            "created user admin with password {} (shown only this once; change it with `wharf user passwd admin`)",
            generated.expose()
        );
    }
    let sweeper = tokio::spawn(sweep_uploads(Arc::clone(&store)));
    let state = AppState {
        store,
        auth,
        public_url: config.public_url.clone(),
        tls: false,
    };
    let app = registry::router(Arc::new(state))
        .into_make_service_with_connect_info::<std::net::SocketAddr>();
    let addr = listener.local_addr()?;
    tracing::info!(
        "wharf listening on http://{addr}, data in {}",
        config.data.display()
    );

    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections, finishing requests in flight");
        let _ = stopping_tx.send(());
    });
    let server = std::future::IntoFuture::into_future(server);
    tokio::pin!(server);
    let deadline = async move {
        if stopping_rx.await.is_ok() {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = &mut server => r?,
        () = deadline => tracing::warn!("requests still in flight after {SHUTDOWN_GRACE:?}; aborting them"),
    }
    sweeper.abort();
    tracing::info!("stopped");
    Ok(())
}

async fn sweep_uploads(store: Arc<Store>) {
    let mut every = tokio::time::interval(UPLOAD_SWEEP_EVERY);
    loop {
        every.tick().await;
        match store.expire_uploads(UPLOAD_MAX_IDLE).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!("removed {n} upload sessions idle for over {UPLOAD_MAX_IDLE:?}")
            }
            Err(e) => tracing::warn!(error = %e, "could not expire idle uploads"),
        }
    }
}
