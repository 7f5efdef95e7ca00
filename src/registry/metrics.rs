//! Request counters, served in the Prometheus text format on `/metrics` (admins only).
//! Fixed arrays of atomics: counting costs one relaxed increment per request.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::{Method, StatusCode};

use super::route::Endpoint;

/// What a request addressed, as a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Route {
    Base,
    Catalog,
    Tags,
    Manifest,
    Blob,
    /// `POST .../blobs/uploads/` that starts an upload (or pushes a blob in one request).
    UploadStart,
    /// `POST .../blobs/uploads/?mount=...`: links an existing blob, moves no bytes.
    BlobMount,
    /// `GET|PATCH|PUT|DELETE .../blobs/uploads/<id>`.
    Upload,
    Referrers,
    Token,
    Api,
    /// `/healthz` and `/readyz`.
    Health,
    #[default]
    Other,
}

const ROUTES: [(Route, &str); 13] = [
    (Route::Base, "base"),
    (Route::Catalog, "catalog"),
    (Route::Tags, "tags"),
    (Route::Manifest, "manifest"),
    (Route::Blob, "blob"),
    (Route::UploadStart, "upload_start"),
    (Route::BlobMount, "blob_mount"),
    (Route::Upload, "upload"),
    (Route::Referrers, "referrers"),
    (Route::Token, "token"),
    (Route::Api, "api"),
    (Route::Health, "health"),
    (Route::Other, "other"),
];
const METHODS: [&str; 7] = ["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OTHER"];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
const SLOTS: usize = ROUTES.len() * METHODS.len() * CLASSES.len();

impl Route {
    pub fn of(endpoint: &Endpoint<'_>, mount: bool) -> Route {
        match endpoint {
            Endpoint::Base => Route::Base,
            Endpoint::Catalog => Route::Catalog,
            Endpoint::Tags { .. } => Route::Tags,
            Endpoint::Manifest { .. } => Route::Manifest,
            Endpoint::Blob { .. } => Route::Blob,
            Endpoint::UploadStart { .. } if mount => Route::BlobMount,
            Endpoint::UploadStart { .. } => Route::UploadStart,
            Endpoint::Upload { .. } => Route::Upload,
            Endpoint::Referrers { .. } => Route::Referrers,
        }
    }

    /// Its place in [`ROUTES`], which lists the variants in declaration order.
    fn index(self) -> usize {
        self as usize
    }
}

pub struct Metrics {
    requests: Vec<AtomicU64>,
    /// Blob bytes sent with `sendfile(2)`, by every plain-HTTP connection.
    pub sendfile_bytes: Arc<AtomicU64>,
    /// Connections open now.
    pub open_connections: Arc<AtomicU64>,
    /// Connections refused at `max_connections`.
    pub refused_connections: Arc<AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            sendfile_bytes: Arc::default(),
            open_connections: Arc::default(),
            refused_connections: Arc::default(),
        }
    }
}

impl Metrics {
    pub fn count(&self, route: Route, method: &Method, status: StatusCode) {
        let m = METHODS
            .iter()
            .position(|m| *m == method.as_str())
            .unwrap_or(METHODS.len() - 1);
        let class = usize::from(status.as_u16() / 100)
            .saturating_sub(1)
            .min(CLASSES.len() - 1);
        let slot = (route.index() * METHODS.len() + m) * CLASSES.len() + class;
        self.requests[slot].fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every non-zero counter.
    /// The metrics as Prometheus text, with `gauges` (name, help, value) of other parts.
    pub fn render(&self, gauges: &[(&str, &str, u64)]) -> String {
        let mut out = String::from(
            "# HELP wharf_http_requests_total HTTP requests served, by route, method and status class.\n\
             # TYPE wharf_http_requests_total counter\n",
        );
        for (r, (_, route)) in ROUTES.iter().enumerate() {
            for (m, method) in METHODS.iter().enumerate() {
                for (c, class) in CLASSES.iter().enumerate() {
                    let slot = (r * METHODS.len() + m) * CLASSES.len() + c;
                    let n = self.requests[slot].load(Ordering::Relaxed);
                    if n > 0 {
                        let _ = writeln!(
                            out,
                            "wharf_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{class}\"}} {n}"
                        );
                    }
                }
            }
        }
        let _ = write!(
            out,
            "# HELP wharf_blob_sendfile_bytes_total Blob bytes sent from the file by the kernel (sendfile), not copied through user space.\n\
             # TYPE wharf_blob_sendfile_bytes_total counter\n\
             wharf_blob_sendfile_bytes_total {}\n",
            self.sendfile_bytes.load(Ordering::Relaxed)
        );
        for (name, kind, help, value) in [
            (
                "wharf_connections_open",
                "gauge",
                "Connections open now.",
                self.open_connections.load(Ordering::Relaxed),
            ),
            (
                "wharf_connections_refused_total",
                "counter",
                "Connections answered 503 at max_connections.",
                self.refused_connections.load(Ordering::Relaxed),
            ),
        ]
        .into_iter()
        .chain(gauges.iter().map(|(n, h, v)| (*n, "gauge", *h, *v)))
        {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_listed_in_declaration_order() {
        for (i, (r, _)) in ROUTES.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }

    #[test]
    fn counts_and_renders() {
        let m = Metrics::default();
        m.count(Route::BlobMount, &Method::POST, StatusCode::CREATED);
        m.count(Route::BlobMount, &Method::POST, StatusCode::CREATED);
        m.count(Route::Upload, &Method::PATCH, StatusCode::ACCEPTED);
        m.count(
            Route::Other,
            &Method::OPTIONS,
            StatusCode::INTERNAL_SERVER_ERROR,
        );
        let text = m.render(&[]);
        assert!(text.contains(
            "wharf_http_requests_total{route=\"blob_mount\",method=\"POST\",status=\"2xx\"} 2\n"
        ));
        assert!(text.contains(
            "wharf_http_requests_total{route=\"upload\",method=\"PATCH\",status=\"2xx\"} 1\n"
        ));
        assert!(text.contains("route=\"other\",method=\"OTHER\",status=\"5xx\"} 1"));
        assert!(!text.contains("route=\"manifest\""));
    }
}
