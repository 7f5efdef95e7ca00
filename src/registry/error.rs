//! The one place where errors become HTTP: OCI error codes, statuses, and the JSON body
//! `{"errors":[{"code","message","detail"}]}`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::oci::DigestError;
use crate::oci::name::{NameError, ReferenceError};
use crate::store::StoreError;

/// The error codes of the distribution spec (and the legacy `TAG_INVALID`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OciErrorCode {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    PaginationNumberInvalid,
    RangeInvalid,
    SizeInvalid,
    TagInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    Toomanyrequests,
    /// The registry cannot serve now (a part of it is down): the distribution
    /// registry's code for 503.
    Unavailable,
    Unknown,
}

/// An API error: what the client gets, never the internal cause.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: OciErrorCode,
    pub message: String,
    pub detail: Option<serde_json::Value>,
    /// Headers the answer must carry (e.g. `Range` on a 416).
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: OciErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            detail: None,
            headers: Vec::new(),
        }
    }

    pub fn with_detail(mut self, detail: serde_json::Value) -> ApiError {
        self.detail = Some(detail);
        self
    }

    pub fn with_header(mut self, name: header::HeaderName, value: &str) -> ApiError {
        if let Ok(v) = HeaderValue::from_str(value) {
            self.headers.push((name, v));
        }
        self
    }

    pub fn name_invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, OciErrorCode::NameInvalid, message)
    }

    pub fn digest_invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            OciErrorCode::DigestInvalid,
            message,
        )
    }

    pub fn upload_invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            OciErrorCode::BlobUploadInvalid,
            message,
        )
    }

    pub fn unsupported(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError::new(status, OciErrorCode::Unsupported, message)
    }

    pub fn not_found() -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            OciErrorCode::NameUnknown,
            "no such endpoint",
        )
    }

    fn internal() -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            OciErrorCode::Unknown,
            "internal error; the server log has the cause",
        )
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    errors: [ErrorEntry<'a>; 1],
}

#[derive(Serialize)]
struct ErrorEntry<'a> {
    code: OciErrorCode,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a serde_json::Value>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&ErrorBody {
            errors: [ErrorEntry {
                code: self.code,
                message: &self.message,
                detail: self.detail.as_ref(),
            }],
        })
        .expect("error body serializes");
        let mut resp = (self.status, body).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        for (name, value) in self.headers {
            h.insert(name, value);
        }
        resp
    }
}

impl From<NameError> for ApiError {
    fn from(e: NameError) -> Self {
        match e {
            NameError::InvalidTag(_) => ApiError::new(
                StatusCode::BAD_REQUEST,
                OciErrorCode::TagInvalid,
                e.to_string(),
            ),
            _ => ApiError::name_invalid(e.to_string()),
        }
    }
}

impl From<DigestError> for ApiError {
    fn from(e: DigestError) -> Self {
        ApiError::digest_invalid(e.to_string())
    }
}

impl From<ReferenceError> for ApiError {
    fn from(e: ReferenceError) -> Self {
        match e {
            ReferenceError::Digest(d) => d.into(),
            ReferenceError::Name(n) => n.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        use OciErrorCode as C;
        let msg = e.to_string();
        match e {
            StoreError::BlobUnknown => ApiError::new(StatusCode::NOT_FOUND, C::BlobUnknown, msg),
            StoreError::UploadUnknown => {
                ApiError::new(StatusCode::NOT_FOUND, C::BlobUploadUnknown, msg)
            }
            StoreError::RangeMismatch { current, .. } => {
                ApiError::new(StatusCode::RANGE_NOT_SATISFIABLE, C::BlobUploadInvalid, msg)
                    .with_header(header::RANGE, &upload_range(current))
            }
            StoreError::SizeInvalid(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, C::SizeInvalid, msg)
            }
            StoreError::DigestMismatch {
                ref provided,
                ref computed,
            } => {
                let detail = serde_json::json!({ "provided": provided, "computed": computed });
                ApiError::digest_invalid(msg).with_detail(detail)
            }
            StoreError::ManifestUnknown => {
                ApiError::new(StatusCode::NOT_FOUND, C::ManifestUnknown, msg)
            }
            StoreError::ManifestBlobUnknown(ref d) | StoreError::ManifestChildUnknown(ref d) => {
                let detail = serde_json::json!({ "digest": d });
                ApiError::new(StatusCode::BAD_REQUEST, C::ManifestBlobUnknown, msg)
                    .with_detail(detail)
            }
            StoreError::ManifestInvalid(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, C::ManifestInvalid, msg)
            }
            StoreError::ManifestTooLarge { size, limit } => {
                let detail = serde_json::json!({ "size": size, "limit": limit });
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, C::ManifestInvalid, msg)
                    .with_detail(detail)
            }
            StoreError::NameUnknown => ApiError::new(StatusCode::NOT_FOUND, C::NameUnknown, msg),
            StoreError::Refused(_) => ApiError::new(StatusCode::CONFLICT, C::Denied, msg.clone()),
            StoreError::Quota(_) => ApiError::new(StatusCode::FORBIDDEN, C::Denied, msg.clone()),
            StoreError::Immutable {
                ref repository,
                ref tag,
                ref policy,
            } => ApiError::new(StatusCode::FORBIDDEN, C::Denied, msg.clone()).with_detail(
                serde_json::json!({ "repository": repository, "tag": tag, "policy": policy }),
            ),
            StoreError::Body(e) if super::incoming::timed_out(&e) => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                C::BlobUploadInvalid,
                format!("{e}; nothing of this request was stored past what was acknowledged"),
            )
            .with_header(header::CONNECTION, "close"),
            StoreError::Body(e) => {
                tracing::debug!(error = %e, "request body failed");
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    C::SizeInvalid,
                    format!("request body could not be read: {e}"),
                )
            }
            StoreError::Overloaded(_) | StoreError::GcRunning => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, C::Toomanyrequests, msg)
                    .with_header(header::RETRY_AFTER, "1")
            }
            StoreError::Busy => {
                tracing::warn!("metadata database busy");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    C::Toomanyrequests,
                    "the registry is busy; retry",
                )
                .with_header(header::RETRY_AFTER, "1")
            }
            StoreError::StorageFull => {
                tracing::error!("storage full: a write was refused");
                ApiError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    C::Unknown,
                    "the registry's storage is full: nothing was stored; free space on the registry's disk, then retry",
                )
            }
            StoreError::InUse {
                ref tag,
                ref manifest,
                ref policy,
                ..
            } => {
                let detail =
                    serde_json::json!({ "tag": tag, "manifest": manifest, "policy": policy });
                ApiError::new(StatusCode::CONFLICT, C::Denied, msg).with_detail(detail)
            }
            StoreError::Unavailable(cause) => {
                tracing::warn!(%cause, "a backend is unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    C::Unavailable,
                    "the registry's database is unavailable; retry shortly",
                )
                .with_header(header::RETRY_AFTER, "1")
            }
            StoreError::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                ApiError::internal()
            }
        }
    }
}

/// The `Range` header of an upload holding `size` bytes: `0-<last byte>`, `0-0` when empty.
pub fn upload_range(size: u64) -> String {
    format!("0-{}", size.saturating_sub(1))
}
