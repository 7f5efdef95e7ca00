//! Blobs in an S3-compatible object store (AWS S3, R2, B2, MinIO, Garage, Ceph), spoken
//! to with a small client of our own: AWS Signature V4 over `reqwest` (ARCHITECTURE.md,
//! "Choices").
//!
//! Layout under the configured `prefix`:
//! - `blobs/<alg>/<2 hex>/<hex>`: a blob, written only by a server-side copy of an upload
//!   whose digest the registry verified, so nothing is readable before it is verified.
//! - `uploads/<id>/<offset, 20 digits>`: an open upload, as segments of at most
//!   [`SEGMENT`] bytes. Every segment but the last is at least [`MIN_PART`] (S3's
//!   smallest multipart part): a write after a small last segment reads it back and
//!   writes it again with the new bytes, so chunks of any size work. The bucket holds
//!   the whole state of an upload (the listing of its segments), so any replica can take
//!   the next chunk, an upload survives a restart, and the running digest can always be
//!   recomputed by reading the segments back.
//!
//! Committing an upload is a multipart upload whose parts are server-side copies of the
//! segments (`UploadPartCopy`): no byte passes through wharf again.

use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use sha2::{Digest as _, Sha256};

use super::{BlobError, BlobStore, ByteStream};
use crate::oci::{Digest, Hasher};

/// The largest segment of an upload (and so part of a blob), and the memory one write
/// holds at most.
pub const SEGMENT: usize = 16 * 1024 * 1024;
/// S3's smallest part of a multipart upload but the last.
pub const MIN_PART: usize = 5 * 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A request that receives nothing for this long fails.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a presigned blob URL stays valid.
pub const PRESIGN_TTL: Duration = Duration::from_secs(15 * 60);
const UNSIGNED: &str = "UNSIGNED-PAYLOAD";

/// Where the bucket is and how to reach it (`[storage]` with `type = "s3"`).
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    /// `https://s3.eu-west-1.amazonaws.com`, `http://127.0.0.1:3900`...
    pub endpoint: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// `https://endpoint/bucket/key` rather than `https://bucket.endpoint/key`: true for
    /// most self-hosted stores.
    #[serde(default)]
    pub path_style: bool,
    /// Keys start with this (`registry/`), so one bucket can hold other things.
    #[serde(default)]
    pub prefix: String,
    /// Otherwise `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` from the environment.
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key: Option<String>,
    /// Blob GETs answer 307 to a presigned URL of the store instead of streaming
    /// through wharf.
    #[serde(default)]
    pub redirect: bool,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("prefix", &self.prefix)
            .field("redirect", &self.redirect)
            .finish_non_exhaustive()
    }
}

fn default_region() -> String {
    "us-east-1".into()
}

fn err(msg: impl Into<String>) -> BlobError {
    BlobError::Io(io::Error::other(msg.into()))
}

/// `YYYYMMDDTHHMMSSZ` and `YYYYMMDD` of `t`, in UTC.
fn amz_dates(t: SystemTime) -> (String, String) {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let date = format!("{y:04}{m:02}{d:02}");
    let time = format!(
        "{date}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    (time, date)
}

/// URI-encodes `s` as SigV4 wants: unreserved characters kept, `/` kept if `path`.
fn encode(s: &str, path: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if path => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    m.update(data.as_bytes());
    m.finalize().into_bytes().to_vec()
}

/// The text between the first `<tag>` and its `</tag>` in `xml` from `from`, and the
/// position after it.
fn tag<'a>(xml: &'a str, name: &str, from: usize) -> Option<(&'a str, usize)> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = xml[from..].find(&open)? + from + open.len();
    let end = xml[start..].find(&close)? + start;
    Some((&xml[start..end], end + close.len()))
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// One object of a listing.
struct Object {
    key: String,
    size: u64,
}

/// A segment of an upload: its first byte's offset in the upload, and its size.
#[derive(Debug, Clone, Copy)]
struct Segment {
    start: u64,
    size: u64,
}

impl Segment {
    fn end(&self) -> u64 {
        self.start + self.size
    }
}

#[derive(Clone)]
pub struct S3BlobStore {
    http: reqwest::Client,
    config: S3Config,
    /// Scheme and authority of the endpoint (`http://127.0.0.1:3900`).
    origin: String,
    host: String,
    key_id: String,
    secret: String,
    /// Segment buffers in use at once, at most (each up to [`SEGMENT`]).
    buffers: Arc<tokio::sync::Semaphore>,
    buffer_count: usize,
}

impl S3BlobStore {
    /// A store over `config`'s bucket; `upload_memory_mib` bounds the segment buffers.
    /// Nothing is asked of the store yet (`ready` does).
    pub fn new(config: S3Config, upload_memory_mib: usize) -> Result<S3BlobStore, String> {
        let key_id = config
            .access_key_id
            .clone()
            .or_else(|| std::env::var("AWS_ACCESS_KEY_ID").ok())
            .filter(|k| !k.is_empty())
            .ok_or("S3 storage needs credentials: access_key_id in [storage], or AWS_ACCESS_KEY_ID in the environment")?;
        let secret = config
            .secret_access_key
            .clone()
            .or_else(|| std::env::var("AWS_SECRET_ACCESS_KEY").ok())
            .filter(|k| !k.is_empty())
            .ok_or("S3 storage needs credentials: secret_access_key in [storage], or AWS_SECRET_ACCESS_KEY in the environment")?;
        if config.bucket.is_empty() {
            return Err("[storage] bucket is empty".into());
        }
        let endpoint = config.endpoint.trim_end_matches('/');
        let (scheme, authority) = endpoint
            .split_once("://")
            .filter(|(s, a)| (*s == "http" || *s == "https") && !a.is_empty() && !a.contains('/'))
            .ok_or_else(|| {
                format!(
                    "[storage] endpoint {:?} is not http(s)://HOST[:PORT]",
                    config.endpoint
                )
            })?;
        let (origin, host) = if config.path_style {
            (format!("{scheme}://{authority}"), authority.to_owned())
        } else {
            let host = format!("{}.{authority}", config.bucket);
            (format!("{scheme}://{host}"), host)
        };
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(30))
            // An answer is the store's own; a redirect would be followed unsigned.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        let buffer_count = (upload_memory_mib * 1024 * 1024 / SEGMENT).max(2);
        Ok(S3BlobStore {
            http,
            config,
            origin,
            host,
            key_id,
            secret,
            buffers: Arc::new(tokio::sync::Semaphore::new(buffer_count)),
            buffer_count,
        })
    }

    /// The request path of `key` (`/bucket/key` or `/key`).
    fn path(&self, key: &str) -> String {
        if self.config.path_style {
            format!("/{}/{}", self.config.bucket, key)
        } else {
            format!("/{key}")
        }
    }

    /// `x-amz-copy-source` of `key`: always `/bucket/key`, whatever the addressing.
    fn copy_source(&self, key: &str) -> String {
        encode(&format!("/{}/{key}", self.config.bucket), true)
    }

    fn blob_key(&self, digest: &Digest) -> String {
        let hex = digest.hex();
        format!(
            "{}blobs/{}/{}/{hex}",
            self.config.prefix,
            digest.algorithm().name(),
            &hex[..2]
        )
    }

    fn upload_prefix(&self, id: &str) -> Result<String, BlobError> {
        if id.is_empty()
            || id.len() > 64
            || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(BlobError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bad upload id",
            )));
        }
        Ok(format!("{}uploads/{id}/", self.config.prefix))
    }

    fn scope(&self, date: &str) -> String {
        format!("{date}/{}/s3/aws4_request", self.config.region)
    }

    fn signature(&self, date: &str, string_to_sign: &str) -> String {
        let k = hmac(format!("AWS4{}", self.secret).as_bytes(), date);
        let k = hmac(&k, &self.config.region);
        let k = hmac(&k, "s3");
        let k = hmac(&k, "aws4_request");
        hex::encode(hmac(&k, string_to_sign))
    }

    /// The canonical query string of `query` (sorted, encoded).
    fn canonical_query(query: &[(&str, String)]) -> String {
        let mut q: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| (encode(k, false), encode(v, false)))
            .collect();
        q.sort();
        q.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&")
    }

    /// A signed request: `headers` are signed with `host` and the `x-amz-` ones.
    fn request(
        &self,
        method: reqwest::Method,
        key: &str,
        query: &[(&str, String)],
        headers: &[(&str, String)],
    ) -> reqwest::RequestBuilder {
        let (now, date) = amz_dates(SystemTime::now());
        let path = encode(&self.path(key), true);
        let query_string = Self::canonical_query(query);
        let mut signed: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        signed.push(("host".into(), self.host.clone()));
        signed.push(("x-amz-content-sha256".into(), UNSIGNED.into()));
        signed.push(("x-amz-date".into(), now.clone()));
        signed.sort();
        let canonical_headers: String = signed.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
        let signed_names = signed
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>()
            .join(";");
        let canonical = format!(
            "{method}\n{path}\n{query_string}\n{canonical_headers}\n{signed_names}\n{UNSIGNED}"
        );
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n{now}\n{}\n{}",
            self.scope(&date),
            hex::encode(Sha256::digest(canonical.as_bytes()))
        );
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential={}/{}, SignedHeaders={signed_names}, Signature={}",
            self.key_id,
            self.scope(&date),
            self.signature(&date, &string_to_sign)
        );
        let url = if query_string.is_empty() {
            format!("{}{path}", self.origin)
        } else {
            format!("{}{path}?{query_string}", self.origin)
        };
        let mut rb = self
            .http
            .request(method, url)
            .header("authorization", auth)
            .header("x-amz-content-sha256", UNSIGNED)
            .header("x-amz-date", now);
        for (k, v) in headers {
            rb = rb.header(*k, v);
        }
        rb
    }

    /// A URL anyone may GET `key` with until `ttl` has passed (query-string SigV4).
    fn presign(&self, key: &str, ttl: Duration) -> String {
        let (now, date) = amz_dates(SystemTime::now());
        let path = encode(&self.path(key), true);
        let query = [
            ("X-Amz-Algorithm", "AWS4-HMAC-SHA256".to_owned()),
            (
                "X-Amz-Credential",
                format!("{}/{}", self.key_id, self.scope(&date)),
            ),
            ("X-Amz-Date", now.clone()),
            ("X-Amz-Expires", ttl.as_secs().to_string()),
            ("X-Amz-SignedHeaders", "host".to_owned()),
        ];
        let query_string = Self::canonical_query(&query);
        let canonical = format!(
            "GET\n{path}\n{query_string}\nhost:{}\n\nhost\n{UNSIGNED}",
            self.host
        );
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n{now}\n{}\n{}",
            self.scope(&date),
            hex::encode(Sha256::digest(canonical.as_bytes()))
        );
        format!(
            "{}{path}?{query_string}&X-Amz-Signature={}",
            self.origin,
            self.signature(&date, &string_to_sign)
        )
    }

    /// Sends `rb`; an answer that is not 2xx becomes an error naming the store's code.
    async fn send(
        &self,
        rb: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<reqwest::Response, BlobError> {
        let r = rb.send().await.map_err(|e| {
            BlobError::Unavailable(format!("the object store cannot be reached ({what}): {e}"))
        })?;
        if r.status().is_success() {
            return Ok(r);
        }
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        let code = tag(&body, "Code", 0).map_or("", |t| t.0);
        if status == reqwest::StatusCode::NOT_FOUND && (code == "NoSuchKey" || code.is_empty()) {
            return Err(BlobError::NotFound);
        }
        let message = tag(&body, "Message", 0).map_or("", |t| t.0);
        let why = format!("object store ({what}): {status} {code} {message}");
        // Its own trouble, or too much load: may pass. Anything else (credentials, a
        // missing bucket) is the configuration's.
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            Err(BlobError::Unavailable(why))
        } else {
            Err(err(why))
        }
    }

    /// Every object whose key starts with `prefix`.
    async fn list_objects(&self, prefix: &str) -> Result<Vec<Object>, BlobError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut query = vec![("list-type", "2".to_owned()), ("prefix", prefix.to_owned())];
            if let Some(t) = &token {
                query.push(("continuation-token", t.clone()));
            }
            let r = self
                .send(
                    self.request(reqwest::Method::GET, "", &query, &[]),
                    "list objects",
                )
                .await?;
            let xml = r
                .text()
                .await
                .map_err(|e| err(format!("object store listing: {e}")))?;
            let mut at = 0;
            while let Some((contents, next)) = tag(&xml, "Contents", at) {
                let key = tag(contents, "Key", 0).map(|t| unescape(t.0));
                let size = tag(contents, "Size", 0).and_then(|t| t.0.parse().ok());
                if let (Some(key), Some(size)) = (key, size) {
                    out.push(Object { key, size });
                }
                at = next;
            }
            let truncated = tag(&xml, "IsTruncated", 0).is_some_and(|t| t.0 == "true");
            let next = tag(&xml, "NextContinuationToken", 0).map(|t| unescape(t.0));
            if !truncated || next.is_none() {
                return Ok(out);
            }
            if next == token {
                return Err(err(
                    "object store listing: the same continuation token twice",
                ));
            }
            token = next;
        }
    }

    /// The segments of upload `id`, in order.
    async fn segments(&self, id: &str) -> Result<Vec<Segment>, BlobError> {
        let prefix = self.upload_prefix(id)?;
        let mut segs: Vec<Segment> = self
            .list_objects(&prefix)
            .await?
            .into_iter()
            .filter_map(|o| {
                let start = o.key.strip_prefix(&prefix)?.parse().ok()?;
                Some(Segment {
                    start,
                    size: o.size,
                })
            })
            .collect();
        segs.sort_by_key(|s| s.start);
        // Each segment starts where the one before ends: anything else (a hole, an
        // overlap) is not an upload this store wrote, and nothing is read or committed
        // from it.
        let mut end = 0;
        for s in &segs {
            if s.start != end {
                return Err(err(format!(
                    "upload {id}: its segments do not follow each other at byte {end}"
                )));
            }
            end = s.end();
        }
        Ok(segs)
    }

    fn segment_key(&self, id: &str, start: u64) -> Result<String, BlobError> {
        Ok(format!("{}{start:020}", self.upload_prefix(id)?))
    }

    async fn put(&self, key: &str, body: Bytes) -> Result<(), BlobError> {
        let len = body.len();
        self.send(
            self.request(
                reqwest::Method::PUT,
                key,
                &[],
                &[("content-length", len.to_string())],
            )
            .body(body),
            "put",
        )
        .await?;
        Ok(())
    }

    async fn delete_key(&self, key: &str) -> Result<(), BlobError> {
        match self
            .send(
                self.request(reqwest::Method::DELETE, key, &[], &[]),
                "delete",
            )
            .await
        {
            Ok(_) | Err(BlobError::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The bytes `range` of `key`, streamed.
    async fn get(&self, key: &str, range: Range<u64>) -> Result<ByteStream, BlobError> {
        if range.is_empty() {
            return Ok(Box::pin(futures_util::stream::empty()));
        }
        let r = self
            .send(
                self.request(
                    reqwest::Method::GET,
                    key,
                    &[],
                    &[("range", format!("bytes={}-{}", range.start, range.end - 1))],
                ),
                "get",
            )
            .await?;
        Ok(Box::pin(
            r.bytes_stream().map(|c| c.map_err(io::Error::other)),
        ))
    }

    /// The whole of `key` (a segment, at most [`SEGMENT`] bytes), into `buf`.
    async fn read_into(&self, key: &str, len: u64, buf: &mut BytesMut) -> Result<(), BlobError> {
        let mut s = self.get(key, 0..len).await?;
        while let Some(c) = s.next().await {
            buf.extend_from_slice(&c?);
        }
        if (buf.len() as u64) < len {
            return Err(err(format!("object store: {key} is shorter than listed")));
        }
        Ok(())
    }

    /// Cuts upload `id` to `len` bytes: segments past it go, the one across it is
    /// rewritten short. Returns the segments left.
    async fn cut(&self, id: &str, len: u64) -> Result<Vec<Segment>, BlobError> {
        let mut segs = self.segments(id).await?;
        // Last first: a crash part way leaves a prefix of the upload, never a hole.
        while let Some(last) = segs.last().copied() {
            if last.start >= len {
                self.delete_key(&self.segment_key(id, last.start)?).await?;
                segs.pop();
            } else {
                if last.end() > len {
                    let key = self.segment_key(id, last.start)?;
                    let keep = len - last.start;
                    let mut buf = BytesMut::with_capacity(keep as usize);
                    self.read_into(&key, keep, &mut buf).await?;
                    self.put(&key, buf.freeze()).await?;
                    segs.last_mut().expect("not empty").size = keep;
                }
                break;
            }
        }
        Ok(segs)
    }

    async fn copy_part(
        &self,
        dest: &str,
        upload: &str,
        number: usize,
        source: &str,
        range: Range<u64>,
    ) -> Result<String, BlobError> {
        let source = self.copy_source(source);
        let r = self
            .send(
                self.request(
                    reqwest::Method::PUT,
                    dest,
                    &[
                        ("partNumber", number.to_string()),
                        ("uploadId", upload.to_owned()),
                    ],
                    &[
                        ("x-amz-copy-source", source),
                        (
                            "x-amz-copy-source-range",
                            format!("bytes={}-{}", range.start, range.end - 1),
                        ),
                    ],
                ),
                "copy part",
            )
            .await?;
        let xml = r.text().await.map_err(|e| err(format!("copy part: {e}")))?;
        if xml.contains("<Error>") {
            return Err(err(format!("object store (copy part): {xml}")));
        }
        tag(&xml, "ETag", 0)
            .map(|t| unescape(t.0))
            .ok_or_else(|| err(format!("object store (copy part): no ETag in {xml}")))
    }

    /// Uploads `body` as part `number` of multipart upload `upload` of `dest`.
    async fn put_part(
        &self,
        dest: &str,
        upload: &str,
        number: usize,
        body: Bytes,
    ) -> Result<String, BlobError> {
        let len = body.len();
        let r = self
            .send(
                self.request(
                    reqwest::Method::PUT,
                    dest,
                    &[
                        ("partNumber", number.to_string()),
                        ("uploadId", upload.to_owned()),
                    ],
                    &[("content-length", len.to_string())],
                )
                .body(body),
                "upload part",
            )
            .await?;
        r.headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| err("object store (upload part): no ETag"))
    }

    /// The first `len` bytes of object `key` (at most a segment), in memory.
    async fn read_range(&self, key: &str, len: u64) -> Result<Bytes, BlobError> {
        let mut buf = BytesMut::with_capacity(len as usize);
        self.read_into(key, len, &mut buf).await?;
        buf.truncate(len as usize);
        Ok(buf.freeze())
    }

    /// Makes `parts` (segments, each cut to its first bytes) the object `dest`: one
    /// segment by a server-side copy (or, cut, by a PUT of its bytes); several by a
    /// multipart upload of server-side copies, except a last part under 5 MiB, whose
    /// bytes are sent (stores refuse to copy a part that small).
    async fn assemble(
        &self,
        dest: &str,
        parts: &[(String, Range<u64>, u64)],
    ) -> Result<(), BlobError> {
        if let [(source, range, whole)] = parts {
            if range.end == *whole {
                let source = self.copy_source(source);
                let r = self
                    .send(
                        self.request(
                            reqwest::Method::PUT,
                            dest,
                            &[],
                            &[("x-amz-copy-source", source)],
                        ),
                        "copy object",
                    )
                    .await?;
                let xml = r
                    .text()
                    .await
                    .map_err(|e| err(format!("copy object: {e}")))?;
                if xml.contains("<Error>") {
                    return Err(err(format!("object store (copy object): {xml}")));
                }
                return Ok(());
            }
            let bytes = self.read_range(source, range.end).await?;
            return self.put(dest, bytes).await;
        }
        let r = self
            .send(
                self.request(
                    reqwest::Method::POST,
                    dest,
                    &[("uploads", String::new())],
                    &[],
                ),
                "create multipart upload",
            )
            .await?;
        let xml = r
            .text()
            .await
            .map_err(|e| err(format!("create multipart: {e}")))?;
        let upload = tag(&xml, "UploadId", 0)
            .map(|t| unescape(t.0))
            .ok_or_else(|| err(format!("object store: no UploadId in {xml}")))?;
        let copied = async {
            let mut etags = Vec::with_capacity(parts.len());
            for (i, (source, range, _)) in parts.iter().enumerate() {
                let last = i + 1 == parts.len();
                let etag = if last && range.end - range.start < MIN_PART as u64 {
                    let bytes = self.read_range(source, range.end).await?;
                    self.put_part(dest, &upload, i + 1, bytes).await?
                } else {
                    self.copy_part(dest, &upload, i + 1, source, range.clone())
                        .await?
                };
                etags.push(etag);
            }
            let mut body = String::from("<CompleteMultipartUpload>");
            for (i, etag) in etags.iter().enumerate() {
                let etag = etag.replace('&', "&amp;").replace('"', "&quot;");
                body.push_str(&format!(
                    "<Part><PartNumber>{}</PartNumber><ETag>{etag}</ETag></Part>",
                    i + 1
                ));
            }
            body.push_str("</CompleteMultipartUpload>");
            let r = self
                .send(
                    self.request(
                        reqwest::Method::POST,
                        dest,
                        &[("uploadId", upload.clone())],
                        &[("content-length", body.len().to_string())],
                    )
                    .body(body),
                    "complete multipart upload",
                )
                .await?;
            let xml = r
                .text()
                .await
                .map_err(|e| err(format!("complete multipart: {e}")))?;
            if xml.contains("<Error>") {
                return Err(err(format!("object store (complete multipart): {xml}")));
            }
            Ok(())
        }
        .await;
        if copied.is_err() {
            // Parts of an abandoned multipart upload are billed until aborted.
            let _ = self
                .send(
                    self.request(reqwest::Method::DELETE, dest, &[("uploadId", upload)], &[]),
                    "abort multipart upload",
                )
                .await;
        }
        copied
    }
}

#[async_trait]
impl BlobStore for S3BlobStore {
    async fn upload_write(
        &self,
        id: &str,
        offset: u64,
        mut data: ByteStream,
        mut hasher: Option<Hasher>,
    ) -> Result<(u64, Option<Hasher>), BlobError> {
        let segs = self.cut(id, offset).await?;
        let end = segs.last().map_or(0, Segment::end);
        if end < offset {
            return Err(err(format!(
                "upload {id} holds {end} bytes, fewer than the offset {offset}"
            )));
        }
        let _permit = self
            .buffers
            .acquire()
            .await
            .map_err(|_| err("upload buffers closed"))?;
        // A short last segment is carried into the first new one.
        let (mut start, mut buf) = match segs.last() {
            Some(last) if (last.size as usize) < MIN_PART => {
                let mut buf = BytesMut::with_capacity(SEGMENT);
                self.read_into(&self.segment_key(id, last.start)?, last.size, &mut buf)
                    .await?;
                (last.start, buf)
            }
            _ => (end, BytesMut::with_capacity(SEGMENT)),
        };
        // Whether `buf` holds bytes not yet in the store.
        let mut dirty = false;
        let mut written = 0u64;
        while let Some(chunk) = data.next().await {
            let mut chunk = chunk.map_err(BlobError::Body)?;
            if let Some(h) = hasher.as_mut() {
                h.update(&chunk);
            }
            written += chunk.len() as u64;
            while !chunk.is_empty() {
                let room = SEGMENT - buf.len();
                let take = room.min(chunk.len());
                buf.extend_from_slice(&chunk.split_to(take));
                dirty = true;
                if buf.len() == SEGMENT {
                    let full = std::mem::replace(&mut buf, BytesMut::with_capacity(SEGMENT));
                    self.put(&self.segment_key(id, start)?, full.freeze())
                        .await?;
                    start += SEGMENT as u64;
                    dirty = false;
                }
            }
        }
        if dirty {
            self.put(&self.segment_key(id, start)?, buf.freeze())
                .await?;
        }
        Ok((written, hasher))
    }

    async fn upload_read(&self, id: &str, len: u64) -> Result<ByteStream, BlobError> {
        let segs = self.segments(id).await?;
        if len == 0 {
            return Ok(Box::pin(futures_util::stream::empty()));
        }
        if segs.is_empty() {
            return Err(BlobError::UploadNotFound);
        }
        let mut keys = Vec::new();
        for s in &segs {
            if s.start >= len {
                break;
            }
            keys.push((self.segment_key(id, s.start)?, s.size.min(len - s.start)));
        }
        let held = segs.last().map_or(0, Segment::end);
        let this = self.clone();
        let stream = futures_util::stream::iter(keys)
            .then(move |(key, n)| {
                let store = this.clone();
                async move { store.get(&key, 0..n).await }
            })
            .flat_map(|r| match r {
                Ok(s) => s,
                Err(e) => Box::pin(futures_util::stream::once(async move {
                    Err(io::Error::other(e.to_string()))
                })),
            });
        if held < len {
            let short = futures_util::stream::once(async move {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the upload holds {held} bytes, fewer than {len}"),
                ))
            });
            return Ok(Box::pin(stream.chain(short)));
        }
        Ok(Box::pin(stream))
    }

    async fn upload_commit(&self, id: &str, len: u64, digest: &Digest) -> Result<(), BlobError> {
        let dest = self.blob_key(digest);
        if self.stat(digest).await?.is_none() {
            if len == 0 {
                self.put(&dest, Bytes::new()).await?;
            } else {
                let mut parts = Vec::new();
                for s in self.segments(id).await? {
                    if s.start >= len {
                        break;
                    }
                    let key = self.segment_key(id, s.start)?;
                    parts.push((key, 0..s.size.min(len - s.start), s.size));
                }
                let held: u64 = parts.iter().map(|(_, r, _)| r.end).sum();
                if held < len {
                    return Err(if parts.is_empty() {
                        BlobError::UploadNotFound
                    } else {
                        err(format!("upload {id} holds {held} bytes, fewer than {len}"))
                    });
                }
                self.assemble(&dest, &parts).await?;
            }
        }
        self.upload_delete(id).await
    }

    async fn upload_truncate(&self, id: &str, len: u64) -> Result<(), BlobError> {
        self.cut(id, len).await.map(|_| ())
    }

    async fn upload_delete(&self, id: &str) -> Result<(), BlobError> {
        for s in self.segments(id).await?.iter().rev() {
            self.delete_key(&self.segment_key(id, s.start)?).await?;
        }
        Ok(())
    }

    async fn upload_ids(&self) -> Result<Vec<String>, BlobError> {
        let prefix = format!("{}uploads/", self.config.prefix);
        let mut ids: Vec<String> = self
            .list_objects(&prefix)
            .await?
            .into_iter()
            .filter_map(|o| {
                let rest = o.key.strip_prefix(&prefix)?;
                let id = rest.split_once('/')?.0;
                // Keys this store did not write are not uploads (and not swept).
                self.upload_prefix(id).is_ok().then(|| id.to_owned())
            })
            .collect();
        ids.dedup();
        Ok(ids)
    }

    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, BlobError> {
        match self
            .send(
                self.request(reqwest::Method::HEAD, &self.blob_key(digest), &[], &[]),
                "head",
            )
            .await
        {
            // The header, not `content_length()`: for a HEAD that is the (empty) body's.
            Ok(r) => r
                .headers()
                .get("content-length")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .map(Some)
                .ok_or_else(|| err("object store (head): no Content-Length")),
            Err(BlobError::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn read(&self, digest: &Digest, range: Range<u64>) -> Result<ByteStream, BlobError> {
        self.get(&self.blob_key(digest), range).await
    }

    fn upload_buffers(&self) -> (usize, usize) {
        (
            self.buffer_count - self.buffers.available_permits(),
            self.buffer_count,
        )
    }

    fn redirect_url(&self, digest: &Digest) -> Option<String> {
        self.config
            .redirect
            .then(|| self.presign(&self.blob_key(digest), PRESIGN_TTL))
    }

    async fn delete(&self, digest: &Digest) -> Result<(), BlobError> {
        self.delete_key(&self.blob_key(digest)).await
    }

    async fn list(&self) -> Result<Vec<(Digest, u64)>, BlobError> {
        let prefix = format!("{}blobs/", self.config.prefix);
        Ok(self
            .list_objects(&prefix)
            .await?
            .into_iter()
            .filter_map(|o| {
                let rest = o.key.strip_prefix(&prefix)?;
                let (alg, rest) = rest.split_once('/')?;
                let hex = rest.rsplit_once('/')?.1;
                let d: Digest = format!("{alg}:{hex}").parse().ok()?;
                (self.blob_key(&d) == o.key).then_some((d, o.size))
            })
            .collect())
    }

    async fn ready(&self) -> Result<(), BlobError> {
        let query = [
            ("list-type", "2".to_owned()),
            ("max-keys", "1".to_owned()),
            ("prefix", format!("{}blobs/", self.config.prefix)),
        ];
        self.send(
            self.request(reqwest::Method::GET, "", &query, &[]),
            "list objects",
        )
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testgarage;
    use super::*;

    fn store_on(bucket: &str, endpoint: &str, redirect: bool) -> S3BlobStore {
        S3BlobStore::new(
            S3Config {
                bucket: bucket.into(),
                endpoint: endpoint.into(),
                region: testgarage::REGION.into(),
                path_style: true,
                prefix: "registry/".into(),
                access_key_id: Some(testgarage::KEY_ID.into()),
                secret_access_key: Some(testgarage::SECRET.into()),
                redirect,
            },
            64,
        )
        .unwrap()
    }

    fn fresh() -> S3BlobStore {
        let (bucket, endpoint) = testgarage::bucket();
        store_on(&bucket, &endpoint, false)
    }

    fn body(parts: Vec<Vec<u8>>) -> ByteStream {
        Box::pin(futures_util::stream::iter(
            parts.into_iter().map(|p| Ok(Bytes::from(p))),
        ))
    }

    async fn collect(mut s: ByteStream) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c.unwrap());
        }
        out
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn dates_are_utc_civil_dates() {
        let t = UNIX_EPOCH + Duration::from_secs(1_440_938_160); // 2015-08-30T12:36:00Z
        assert_eq!(
            amz_dates(t),
            ("20150830T123600Z".to_owned(), "20150830".to_owned())
        );
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29T00:00:00Z
        assert_eq!(amz_dates(leap).1, "20000229");
        assert_eq!(encode("a b/c~d+é", true), "a%20b/c~d%2B%C3%A9");
        assert_eq!(encode("a/b", false), "a%2Fb");
    }

    /// Virtual-hosted addressing (the default): the bucket is in the host, but a copy's
    /// source still names it.
    #[test]
    fn a_copy_source_names_the_bucket_in_either_addressing() {
        for path_style in [false, true] {
            let s = S3BlobStore::new(
                S3Config {
                    bucket: "wharf-b".into(),
                    endpoint: "https://s3.example.com".into(),
                    region: "eu-west-1".into(),
                    path_style,
                    prefix: "p/".into(),
                    access_key_id: Some("k".into()),
                    secret_access_key: Some("s".into()),
                    redirect: false,
                },
                64,
            )
            .unwrap();
            assert_eq!(
                s.copy_source("p/uploads/u/00000000000000000000"),
                "/wharf-b/p/uploads/u/00000000000000000000"
            );
            let (origin, path) = if path_style {
                ("https://s3.example.com", "/wharf-b/k")
            } else {
                ("https://wharf-b.s3.example.com", "/k")
            };
            assert_eq!((s.origin.as_str(), s.path("k").as_str()), (origin, path));
        }
    }

    #[tokio::test]
    async fn s3_backend_passes_the_suite() {
        super::super::tests::suite(&fresh()).await;
    }

    /// Chunks smaller than S3's smallest part, chunks across segment boundaries, and a
    /// chunk taken by another replica: the upload holds exactly the bytes written, the
    /// registry can read it back to verify it, and the committed blob (a multipart upload of
    /// server-side copies) is the same bytes.
    #[tokio::test]
    async fn chunks_of_any_size_from_any_replica_make_one_blob() {
        let (bucket, endpoint) = testgarage::bucket();
        let a = store_on(&bucket, &endpoint, false);
        let b = store_on(&bucket, &endpoint, false);
        let chunks = [
            pattern(1024, 1),
            pattern(2 * 1024 * 1024, 2),
            pattern(3 * 1024 * 1024 + 7, 3),
            pattern(SEGMENT + 5 * 1024 * 1024, 4),
            pattern(100, 5),
        ];
        let mut offset = 0u64;
        let mut whole = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            // Every other chunk goes to the other replica.
            let store = if i % 2 == 0 { &a } else { &b };
            let (n, _) = store
                .upload_write("up-1", offset, body(vec![c.clone()]), None)
                .await
                .unwrap();
            assert_eq!(n, c.len() as u64);
            offset += n;
            whole.extend_from_slice(c);
        }
        let segs = a.segments("up-1").await.unwrap();
        let (last, rest) = segs.split_last().unwrap();
        assert!(rest.iter().all(|s| s.size as usize >= MIN_PART), "{segs:?}");
        assert!(last.size as usize <= SEGMENT);
        assert_eq!(last.end(), whole.len() as u64);
        let read = collect(b.upload_read("up-1", offset).await.unwrap()).await;
        assert!(read == whole, "the upload reads back as written");
        let digest = Digest::sha256_of(&whole);
        a.upload_commit("up-1", offset, &digest).await.unwrap();
        assert_eq!(a.stat(&digest).await.unwrap(), Some(whole.len() as u64));
        let back = collect(b.read(&digest, 0..offset).await.unwrap()).await;
        assert!(back == whole, "the blob is the bytes written");
        let mid = collect(a.read(&digest, 5_000_000..5_000_010).await.unwrap()).await;
        assert_eq!(mid, whole[5_000_000..5_000_010]);
        assert!(a.upload_ids().await.unwrap().is_empty());
        assert!(matches!(
            a.upload_read("up-1", 1).await,
            Err(BlobError::UploadNotFound)
        ));
    }

    /// A write at an offset inside the upload (a client resuming after a failure)
    /// discards what lay past it, across segments.
    #[tokio::test]
    async fn a_rewrite_at_an_offset_discards_the_tail_across_segments() {
        let s = fresh();
        let first = pattern(SEGMENT + 1000, 9);
        s.upload_write("up-2", 0, body(vec![first.clone()]), None)
            .await
            .unwrap();
        let again = pattern(10, 7);
        s.upload_write("up-2", 500, body(vec![again.clone()]), None)
            .await
            .unwrap();
        let mut want = first[..500].to_vec();
        want.extend_from_slice(&again);
        assert_eq!(
            collect(s.upload_read("up-2", 510).await.unwrap()).await,
            want
        );
        let segs = s.segments("up-2").await.unwrap();
        assert_eq!(segs.len(), 1, "{segs:?}");
        s.upload_delete("up-2").await.unwrap();
        assert!(s.segments("up-2").await.unwrap().is_empty());
    }

    /// With `redirect`, a blob's URL is a presigned GET anyone can follow until it
    /// expires; altered, it is refused.
    #[tokio::test]
    async fn presigned_urls_serve_the_blob_and_nothing_else() {
        let (bucket, endpoint) = testgarage::bucket();
        let s = store_on(&bucket, &endpoint, true);
        let data = b"presigned bytes".to_vec();
        let d = Digest::sha256_of(&data);
        s.upload_write("up-3", 0, body(vec![data.clone()]), None)
            .await
            .unwrap();
        s.upload_commit("up-3", data.len() as u64, &d)
            .await
            .unwrap();
        let url = s.redirect_url(&d).unwrap();
        let r = reqwest::get(&url).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap(), data);
        let ranged = reqwest::Client::new()
            .get(&url)
            .header("range", "bytes=4-9")
            .send()
            .await
            .unwrap();
        assert_eq!(ranged.status(), 206);
        assert_eq!(ranged.bytes().await.unwrap(), &data[4..10]);
        let other = Digest::sha256_of(b"another");
        let forged = url.replace(d.hex(), other.hex());
        assert_eq!(reqwest::get(&forged).await.unwrap().status(), 403);
        assert!(
            store_on(&bucket, &endpoint, false)
                .redirect_url(&d)
                .is_none()
        );
    }

    #[tokio::test]
    async fn wrong_credentials_are_an_error_not_a_missing_blob() {
        let (bucket, endpoint) = testgarage::bucket();
        let mut config = store_on(&bucket, &endpoint, false).config.clone();
        config.secret_access_key = Some("0".repeat(64));
        let s = S3BlobStore::new(config, 64).unwrap();
        let e = s.ready().await.unwrap_err().to_string();
        assert!(e.contains("403"), "{e}");
        assert!(s.stat(&Digest::sha256_of(b"x")).await.is_err());
    }
}
