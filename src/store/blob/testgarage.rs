//! A throwaway Garage (the self-hosted S3-compatible store) for the tests: one node, in a
//! temporary directory, on free loopback ports, started on first use and stopped when
//! the test process ends. Each test gets a bucket of its own.
//!
//! Shared with the integration tests (`tests/it/main.rs` includes this file).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The cluster's key, allowed on every bucket the tests make.
pub(crate) const KEY_ID: &str = "GK0123456789abcdef01234567";
pub(crate) const SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
/// The region Garage answers as.
pub(crate) const REGION: &str = "garage";

struct Node {
    config: PathBuf,
    s3_port: u16,
    _dir: tempfile::TempDir,
}

static NODE: OnceLock<Result<Node, String>> = OnceLock::new();

fn garage_bin() -> Result<PathBuf, String> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("garage"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin/garage"));
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        "these tests need Garage's `garage` binary: install it with `cargo install garage --locked` (.ci/run does)".to_owned()
    })
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// Runs `garage -c CONFIG args...`; its stdout, or an error with its output.
fn garage(config: &std::path::Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(garage_bin()?)
        .arg("-c")
        .arg(config)
        .args(args)
        .output()
        .map_err(|e| format!("garage {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "garage {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `garage args...` again until it succeeds (the node takes a moment to accept
/// commands, and a layout to settle), for at most 30 s.
fn garage_retrying(config: &std::path::Path, args: &[&str]) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match garage(config, args) {
            Ok(out) => return Ok(out),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn start() -> Result<Node, String> {
    let bin = garage_bin()?;
    let dir = tempfile::Builder::new()
        .prefix("wharf-garage-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let (rpc, s3, admin) = (free_port()?, free_port()?, free_port()?);
    let config = dir.path().join("garage.toml");
    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    std::fs::write(
        &config,
        format!(
            "metadata_dir = \"{meta}\"\n\
             data_dir = \"{data}\"\n\
             db_engine = \"sqlite\"\n\
             metadata_fsync = false\n\
             data_fsync = false\n\
             replication_factor = 1\n\
             rpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_secret = \"{secret}\"\n\
             [s3_api]\n\
             s3_region = \"{REGION}\"\n\
             api_bind_addr = \"127.0.0.1:{s3}\"\n\
             root_domain = \".s3.garage.localhost\"\n\
             [admin]\n\
             api_bind_addr = \"127.0.0.1:{admin}\"\n",
            meta = dir.path().join("meta").display(),
            data = dir.path().join("data").display(),
        ),
    )
    .map_err(|e| e.to_string())?;
    // Spawned from a thread that lives as long as the process, so that the
    // parent-death signal stops the node only when the tests are over.
    let (tx, rx) = std::sync::mpsc::channel();
    let log = std::fs::File::create(dir.path().join("garage.log")).map_err(|e| e.to_string())?;
    let cfg = config.clone();
    std::thread::spawn(move || {
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .arg(bin)
            .arg("-c")
            .arg(&cfg)
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn();
        let _ = tx.send(child.map(|_| ()).map_err(|e| format!("garage server: {e}")));
        loop {
            std::thread::park();
        }
    });
    rx.recv().map_err(|e| e.to_string())??;
    let id = garage_retrying(&config, &["node", "id", "-q"])?;
    let id = id.trim().split('@').next().unwrap_or_default().to_owned();
    garage_retrying(&config, &["layout", "assign", "-z", "dc1", "-c", "1G", &id])?;
    garage_retrying(&config, &["layout", "apply", "--version", "1"])?;
    garage_retrying(
        &config,
        &[
            "key",
            "import",
            "--yes",
            "-n",
            "wharf-tests",
            KEY_ID,
            SECRET,
        ],
    )?;
    Ok(Node {
        config,
        s3_port: s3,
        _dir: dir,
    })
}

/// A new, empty bucket on the node (started on first use) that [`KEY_ID`] may read and
/// write; returns its name and the S3 endpoint.
pub(crate) fn bucket() -> (String, String) {
    let node = NODE
        .get_or_init(start)
        .as_ref()
        .unwrap_or_else(|e| panic!("{e}"));
    let name = format!("t-{}", uuid::Uuid::new_v4().simple());
    garage_retrying(&node.config, &["bucket", "create", &name]).unwrap_or_else(|e| panic!("{e}"));
    garage_retrying(
        &node.config,
        &[
            "bucket", "allow", "--read", "--write", "--owner", &name, "--key", KEY_ID,
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    (name, format!("http://127.0.0.1:{}", node.s3_port))
}

/// A Garage cluster of three nodes on loopback with replication factor 3, for the
/// fault tests: a node can be stopped while the others serve. Stopped when dropped.
/// (Used by `tests/it` only.)
#[allow(dead_code)]
pub(crate) struct Cluster3 {
    nodes: Vec<Option<std::process::Child>>,
    /// The S3 endpoint of each node.
    pub(crate) endpoints: Vec<String>,
    pub(crate) bucket: String,
    _dir: tempfile::TempDir,
}

#[allow(dead_code)]
impl Cluster3 {
    pub(crate) fn start() -> Cluster3 {
        let bin = garage_bin().unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::Builder::new()
            .prefix("wharf-garage3-")
            .tempdir()
            .unwrap();
        let secret = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let mut nodes = Vec::new();
        let mut configs = Vec::new();
        let mut endpoints = Vec::new();
        let mut rpcs = Vec::new();
        for i in 0..3 {
            let (rpc, s3, admin) = (
                free_port().unwrap(),
                free_port().unwrap(),
                free_port().unwrap(),
            );
            let node = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&node).unwrap();
            let config = node.join("garage.toml");
            std::fs::write(
                &config,
                format!(
                    "metadata_dir = \"{meta}\"\ndata_dir = \"{data}\"\ndb_engine = \"sqlite\"\n\
                     metadata_fsync = false\ndata_fsync = false\nreplication_factor = 3\n\
                     rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\n\
                     rpc_secret = \"{secret}\"\n[s3_api]\ns3_region = \"{REGION}\"\n\
                     api_bind_addr = \"127.0.0.1:{s3}\"\nroot_domain = \".s3.garage.localhost\"\n\
                     [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
                    meta = node.join("meta").display(),
                    data = node.join("data").display(),
                ),
            )
            .unwrap();
            let log = std::fs::File::create(node.join("garage.log")).unwrap();
            let child = Command::new(&bin)
                .arg("-c")
                .arg(&config)
                .arg("server")
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("garage server");
            nodes.push(Some(child));
            configs.push(config);
            endpoints.push(format!("http://127.0.0.1:{s3}"));
            rpcs.push(rpc);
        }
        let ids: Vec<String> = configs
            .iter()
            .map(|c| {
                let id =
                    garage_retrying(c, &["node", "id", "-q"]).unwrap_or_else(|e| panic!("{e}"));
                id.trim().split('@').next().unwrap_or_default().to_owned()
            })
            .collect();
        for (i, id) in ids.iter().enumerate().skip(1) {
            garage_retrying(
                &configs[0],
                &["node", "connect", &format!("{id}@127.0.0.1:{}", rpcs[i])],
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }
        for (i, id) in ids.iter().enumerate() {
            garage_retrying(
                &configs[0],
                &["layout", "assign", "-z", &format!("dc{i}"), "-c", "1G", id],
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }
        garage_retrying(&configs[0], &["layout", "apply", "--version", "1"])
            .unwrap_or_else(|e| panic!("{e}"));
        garage_retrying(
            &configs[0],
            &[
                "key",
                "import",
                "--yes",
                "-n",
                "wharf-tests",
                KEY_ID,
                SECRET,
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let bucket = "wharf".to_owned();
        garage_retrying(&configs[0], &["bucket", "create", &bucket])
            .unwrap_or_else(|e| panic!("{e}"));
        garage_retrying(
            &configs[0],
            &[
                "bucket", "allow", "--read", "--write", "--owner", &bucket, "--key", KEY_ID,
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        Cluster3 {
            nodes,
            endpoints,
            bucket,
            _dir: dir,
        }
    }

    /// Stops node `i` (SIGKILL).
    pub(crate) fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Cluster3 {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.stop(i);
        }
    }
}
