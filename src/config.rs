//! Configuration: defaults, then the TOML file, then `WHARF_*` environment variables,
//! then flags. Each later source wins.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::auth::Secret;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:5000";
pub const DEFAULT_DATA: &str = "./wharf-data";
pub const DEFAULT_SERVICE: &str = "wharf";

/// The `serve` configuration, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: String,
    pub data: PathBuf,
    /// Metadata in PostgreSQL (`postgres://user:password@host:port/db`) instead of the
    /// embedded SQLite database under `data`: for several replicas sharing one database.
    pub database_url: Option<Secret>,
    /// Where blobs are kept (`[storage]`): under `data` (the default), or in an
    /// S3-compatible bucket.
    pub storage: Storage,
    /// The token service name (the `aud` of registry tokens).
    pub service: String,
    /// The URL clients reach the registry by, when a reverse proxy changes it.
    pub public_url: Option<String>,
    /// The first admin's password, used only when the registry has no users yet.
    pub admin_password: Option<Secret>,
    /// Serve HTTPS with this certificate chain and key (PEM files).
    pub tls: Option<TlsFiles>,
    /// Webhooks from the file (`[[webhooks]]`), kept in step with the database.
    pub webhooks: Vec<crate::events::WebhookConfig>,
    /// How webhook deliveries are retried (`[webhook_delivery]`).
    pub webhook_delivery: crate::events::DeliverySettings,
    /// Bounds against hostile or runaway clients (`[limits]`).
    pub limits: Limits,
    /// Where the access log goes: `stderr` (the default), `off`, or a file path.
    pub access_log: String,
    /// `text` (the default) or `json`.
    pub access_log_format: AccessLogFormat,
    /// Garbage collection: the grace delay and whether referrers go with their subject.
    pub gc: crate::store::gc::GcSettings,
    /// Time between the server's garbage collection passes (each preceded by a
    /// retention run when rules exist); zero turns them off.
    pub gc_interval: Duration,
    /// Retention rules of the file (`[[retention]]`).
    pub retention: Vec<crate::store::retention::RetentionRule>,
    /// Record when each manifest was last pulled (for `keep-pulled` rules); written in
    /// batches once a second.
    pub track_pulls: bool,
}

/// `[storage]`: `type = "fs"` (files under the data directory) or `type = "s3"` with
/// the bucket's settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Storage {
    #[default]
    Fs,
    S3(crate::store::blob::S3Config),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    #[default]
    Text,
    Json,
}

/// Bounds against hostile or runaway clients: `[limits]` in the config file. Each has a
/// default that suits one server; README.md lists them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// A refresh token (kept by `docker login`) unused this long stops working.
    #[serde(deserialize_with = "crate::time::deserialize_duration")]
    pub refresh_token_idle: Duration,
    /// A refresh token stops working this long after it was made.
    #[serde(deserialize_with = "crate::time::deserialize_duration")]
    pub refresh_token_lifetime: Duration,
    /// Password checks waiting for a core, at most; past it sign-ins get 503.
    pub password_checks_queued: usize,
    /// A request body of an authenticated caller that delivers less than 16 KiB (and
    /// does not end) in this long is cut off with 408.
    #[serde(deserialize_with = "crate::time::deserialize_duration")]
    pub body_idle_timeout: Duration,
    /// The same for a caller not (yet) authenticated, such as `POST /token`.
    #[serde(deserialize_with = "crate::time::deserialize_duration")]
    pub anonymous_body_timeout: Duration,
    /// A connection that reads and writes nothing for this long is closed (a client that
    /// stopped reading, an HTTP/2 connection that sends nothing).
    #[serde(deserialize_with = "crate::time::deserialize_duration")]
    pub connection_idle_timeout: Duration,
    /// Open connections at most; past it new ones get 503 and are closed.
    pub max_connections: usize,
    /// Open connections from one client address (IPv6: one /64) at most. Behind a
    /// reverse proxy every connection comes from the proxy: raise it to max_connections.
    pub max_connections_per_client: usize,
    /// Uploads writing at once (PATCH, PUT or POST with a body); past it 503.
    pub max_uploads: usize,
    /// Uploads one user may have writing at once; past it 503.
    pub max_uploads_per_user: usize,
    /// Memory for upload buffers in all, in MiB: writers wait for a buffer (the client
    /// is slowed down, not refused) when it is all in use.
    pub upload_memory_mib: usize,
}

impl Default for Limits {
    fn default() -> Self {
        let auth = crate::auth::AuthSettings::default();
        Limits {
            refresh_token_idle: auth.refresh_idle,
            refresh_token_lifetime: auth.refresh_lifetime,
            password_checks_queued: auth.password_queue,
            body_idle_timeout: Duration::from_secs(30),
            anonymous_body_timeout: Duration::from_secs(5),
            connection_idle_timeout: crate::idle::IDLE,
            max_connections: 4096,
            max_connections_per_client: 512,
            max_uploads: 256,
            max_uploads_per_user: 64,
            upload_memory_mib: 256,
        }
    }
}

impl Limits {
    pub fn auth(&self) -> crate::auth::AuthSettings {
        crate::auth::AuthSettings {
            refresh_idle: self.refresh_token_idle,
            refresh_lifetime: self.refresh_token_lifetime,
            password_queue: self.password_checks_queued,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What the TOML file may set. Unknown keys are an error, so a typo is not ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data: Option<PathBuf>,
    database_url: Option<String>,
    storage: Option<Storage>,
    service: Option<String>,
    public_url: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    /// The rules of `wharf tags`.
    tags: Option<crate::ci::tags::TagRules>,
    #[serde(default)]
    webhooks: Vec<crate::events::WebhookConfig>,
    webhook_delivery: Option<crate::events::DeliverySettings>,
    limits: Option<Limits>,
    access_log: Option<String>,
    access_log_format: Option<AccessLogFormat>,
    #[serde(default, deserialize_with = "optional_duration")]
    gc_delay: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    gc_interval: Option<Duration>,
    delete_referrers: Option<bool>,
    #[serde(default)]
    retention: Vec<crate::store::retention::RuleConfig>,
    track_pulls: Option<bool>,
}

fn optional_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    crate::time::deserialize_duration(d).map(Some)
}

/// Values given on the command line (or, through clap, by their environment variables).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub data: Option<PathBuf>,
    pub database_url: Option<Secret>,
    pub service: Option<String>,
    pub public_url: Option<String>,
    pub admin_password: Option<Secret>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub access_log: Option<String>,
    pub access_log_format: Option<AccessLogFormat>,
    pub gc_delay: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid listen address {0:?}: expected HOST:PORT, e.g. 127.0.0.1:5000")]
    Listen(String),
    #[error("invalid public_url {0:?}: expected http://... or https://...")]
    PublicUrl(String),
    #[error("TLS needs both a certificate (--tls-cert) and a key (--tls-key)")]
    Tls,
    #[error("invalid database_url: expected postgres://USER:PASSWORD@HOST:PORT/DATABASE")]
    DatabaseUrl,
    #[error("[[retention]] in the config file: {0}")]
    Retention(#[from] crate::store::retention::RuleError),
}

/// The `[tags]` rules of a config file: the given one, else `./wharf.toml` if present,
/// else the defaults.
pub fn tag_rules(file: Option<&Path>) -> Result<crate::ci::tags::TagRules, ConfigError> {
    let default = Path::new("wharf.toml");
    let path = match file {
        Some(p) => p,
        None if default.is_file() => default,
        None => return Ok(Default::default()),
    };
    Ok(read_file(path)?.tags.unwrap_or_default())
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str::<FileConfig>(&text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source,
    })
}

impl Config {
    /// The defaults, with `listen` and `data` given (for tests and embedding).
    pub fn new(listen: impl Into<String>, data: impl Into<PathBuf>) -> Config {
        Config {
            listen: listen.into(),
            data: data.into(),
            database_url: None,
            storage: Storage::Fs,
            service: DEFAULT_SERVICE.to_owned(),
            public_url: None,
            admin_password: None,
            tls: None,
            webhooks: Vec::new(),
            webhook_delivery: Default::default(),
            limits: Limits::default(),
            access_log: "stderr".to_owned(),
            access_log_format: AccessLogFormat::Text,
            gc: Default::default(),
            gc_interval: crate::store::gc::DEFAULT_GC_INTERVAL,
            retention: Vec::new(),
            track_pulls: true,
        }
    }

    /// Resolves flags (already merged with their env vars) over the file over defaults.
    pub fn resolve(flags: Overrides, file: Option<&Path>) -> Result<Config, ConfigError> {
        let file_cfg = match file {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let listen = flags
            .listen
            .or(file_cfg.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        if !listen.contains(':')
            || listen
                .rsplit_once(':')
                .is_none_or(|(_, p)| p.parse::<u16>().is_err())
        {
            return Err(ConfigError::Listen(listen));
        }
        let data = flags
            .data
            .or(file_cfg.data)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA));
        let database_url = flags
            .database_url
            .or(file_cfg.database_url.map(Secret::new))
            .filter(|u| !u.expose().is_empty());
        if let Some(u) = &database_url {
            let u = u.expose();
            if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
                return Err(ConfigError::DatabaseUrl);
            }
        }
        let service = flags
            .service
            .or(file_cfg.service)
            .unwrap_or_else(|| DEFAULT_SERVICE.to_owned());
        let public_url = flags.public_url.or(file_cfg.public_url);
        if let Some(u) = &public_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(ConfigError::PublicUrl(u.clone()));
            }
        }
        let tls = match (
            flags.tls_cert.or(file_cfg.tls_cert),
            flags.tls_key.or(file_cfg.tls_key),
        ) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            _ => return Err(ConfigError::Tls),
        };
        Ok(Config {
            listen,
            data,
            database_url,
            storage: file_cfg.storage.unwrap_or_default(),
            service,
            public_url,
            admin_password: flags.admin_password,
            tls,
            webhooks: file_cfg.webhooks,
            webhook_delivery: file_cfg.webhook_delivery.unwrap_or_default(),
            limits: file_cfg.limits.unwrap_or_default(),
            access_log: flags
                .access_log
                .or(file_cfg.access_log)
                .unwrap_or_else(|| "stderr".to_owned()),
            access_log_format: flags
                .access_log_format
                .or(file_cfg.access_log_format)
                .unwrap_or_default(),
            gc: crate::store::gc::GcSettings {
                delay: flags
                    .gc_delay
                    .or(file_cfg.gc_delay)
                    .unwrap_or(crate::store::gc::DEFAULT_GC_DELAY),
                delete_referrers: file_cfg.delete_referrers.unwrap_or(true),
            },
            gc_interval: file_cfg
                .gc_interval
                .unwrap_or(crate::store::gc::DEFAULT_GC_INTERVAL),
            retention: file_cfg
                .retention
                .iter()
                .map(|r| r.to_rule())
                .collect::<Result<_, _>>()?,
            track_pulls: file_cfg.track_pulls.unwrap_or(true),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_flags_over_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("wharf.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:6000\"\ndata = \"/srv/wharf\"\nservice = \"reg\"\npublic_url = \"https://reg.example\"\n",
        )
        .unwrap();

        let d = Config::resolve(Overrides::default(), None).unwrap();
        assert_eq!(d, Config::new(DEFAULT_LISTEN, DEFAULT_DATA));

        let f = Config::resolve(Overrides::default(), Some(&file)).unwrap();
        let mut want = Config::new("127.0.0.1:6000", "/srv/wharf");
        want.service = "reg".into();
        want.public_url = Some("https://reg.example".into());
        assert_eq!(f, want);

        let o = Overrides {
            listen: Some("0.0.0.0:7000".into()),
            service: Some("x".into()),
            ..Overrides::default()
        };
        let c = Config::resolve(o, Some(&file)).unwrap();
        assert_eq!(
            (
                c.listen.as_str(),
                c.data.to_str().unwrap(),
                c.service.as_str()
            ),
            ("0.0.0.0:7000", "/srv/wharf", "x")
        );
    }

    #[test]
    fn gc_settings_from_file_and_flag() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("wharf.toml");
        let d = Config::resolve(Overrides::default(), None).unwrap();
        assert_eq!(d.gc.delay, Duration::from_secs(86_400));
        assert_eq!(d.gc_interval, Duration::from_secs(3600));
        assert!(d.gc.delete_referrers);
        std::fs::write(
            &file,
            "gc_delay = \"30m\"\ngc_interval = \"5m\"\ndelete_referrers = false\n",
        )
        .unwrap();
        let f = Config::resolve(Overrides::default(), Some(&file)).unwrap();
        assert_eq!(f.gc.delay, Duration::from_secs(1800));
        assert_eq!(f.gc_interval, Duration::from_secs(300));
        assert!(!f.gc.delete_referrers);
        let o = Overrides {
            gc_delay: Some(Duration::ZERO),
            ..Overrides::default()
        };
        assert_eq!(
            Config::resolve(o, Some(&file)).unwrap().gc.delay,
            Duration::ZERO
        );
        std::fs::write(
            &file,
            "[[retention]]\nrepositories = \"team/*\"\ntags = [\"pr-*\"]\ndelete_older_than = \"7d\"\n",
        )
        .unwrap();
        let r = Config::resolve(Overrides::default(), Some(&file)).unwrap();
        assert_eq!(r.retention.len(), 1);
        assert_eq!(
            r.retention[0].to_string(),
            "config rule (team/*: delete pr-* older than 7d)"
        );
        std::fs::write(
            &file,
            "[[retention]]\nrepositories = \"team/*\"\nkeep_last = 3\n",
        )
        .unwrap();
        let e = Config::resolve(Overrides::default(), Some(&file)).unwrap_err();
        assert!(e.to_string().contains("tags"), "{e}");
        std::fs::write(&file, "gc_delay = \"soon\"\n").unwrap();
        let e = Config::resolve(Overrides::default(), Some(&file)).unwrap_err();
        assert!(e.to_string().contains("gc_delay"), "{e}");
    }

    #[test]
    fn bad_config_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("wharf.toml");
        std::fs::write(&file, "lissten = \"x\"\n").unwrap();
        let e = Config::resolve(Overrides::default(), Some(&file)).unwrap_err();
        assert!(e.to_string().contains("lissten"), "{e}");
        let e = Config::resolve(
            Overrides {
                listen: Some("nowhere".into()),
                ..Overrides::default()
            },
            None,
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::Listen(_)));
        let e = Config::resolve(
            Overrides {
                public_url: Some("reg.example".into()),
                ..Overrides::default()
            },
            None,
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::PublicUrl(_)));
        let e = Config::resolve(Overrides::default(), Some(&dir.path().join("missing.toml")))
            .unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
    }

    #[test]
    fn tag_rules_from_the_tags_table() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("wharf.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:6000\"\n[tags]\nsortable = true\nsuffix = \"-arm64\"\n[tags.branches]\nmain = [\"prod\"]\n",
        )
        .unwrap();
        let r = tag_rules(Some(&file)).unwrap();
        assert!(r.sortable);
        assert_eq!(r.suffix, "-arm64");
        assert_eq!(r.branches.get("main").unwrap(), &vec!["prod".to_owned()]);
        // A table given replaces the default mapping; other defaults stay.
        assert!(!r.branches.contains_key("develop"));
        assert!(r.sha);
        std::fs::write(&file, "[tags]\nshaa = true\n").unwrap();
        let e = tag_rules(Some(&file)).unwrap_err().to_string();
        assert!(e.contains("shaa"), "{e}");
    }
}
