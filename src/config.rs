//! Configuration: defaults, then the TOML file, then `WHARF_*` environment variables,
//! then flags. Each later source wins.

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:5000";
pub const DEFAULT_DATA: &str = "./wharf-data";

/// The `serve` configuration, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: String,
    pub data: PathBuf,
}

/// What the TOML file may set. Unknown keys are an error, so a typo is not ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data: Option<PathBuf>,
}

/// Values given on the command line (or, through clap, by their environment variables).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub data: Option<PathBuf>,
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
}

impl Config {
    /// Resolves flags (already merged with their env vars) over the file over defaults.
    pub fn resolve(flags: Overrides, file: Option<&Path>) -> Result<Config, ConfigError> {
        let file_cfg = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                toml::from_str::<FileConfig>(&text).map_err(|source| ConfigError::Parse {
                    path: path.to_owned(),
                    source,
                })?
            }
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
        Ok(Config { listen, data })
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
            "listen = \"127.0.0.1:6000\"\ndata = \"/srv/wharf\"\n",
        )
        .unwrap();

        let d = Config::resolve(Overrides::default(), None).unwrap();
        assert_eq!(
            d,
            Config {
                listen: DEFAULT_LISTEN.into(),
                data: DEFAULT_DATA.into()
            }
        );

        let f = Config::resolve(Overrides::default(), Some(&file)).unwrap();
        assert_eq!(
            f,
            Config {
                listen: "127.0.0.1:6000".into(),
                data: "/srv/wharf".into()
            }
        );

        let o = Overrides {
            listen: Some("0.0.0.0:7000".into()),
            data: None,
        };
        let c = Config::resolve(o, Some(&file)).unwrap();
        assert_eq!(
            c,
            Config {
                listen: "0.0.0.0:7000".into(),
                data: "/srv/wharf".into()
            }
        );
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
                data: None,
            },
            None,
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::Listen(_)));
        let e = Config::resolve(Overrides::default(), Some(&dir.path().join("missing.toml")))
            .unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
    }
}
