//! A throwaway PostgreSQL cluster for the tests: `initdb` into a temporary directory and
//! `postgres` on a free loopback port, as the `postgres` user when the tests run as
//! root. One per test process, stopped when the process ends; each test gets a
//! database of its own.
//!
//! Shared with the integration tests (`tests/it/main.rs` includes this file).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

struct Cluster {
    port: u16,
    _dir: tempfile::TempDir,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();

fn bin(name: &str) -> Result<PathBuf, String> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect())
        .unwrap_or_default();
    if let Ok(dirs) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = dirs.flatten().map(|d| d.path()).collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev().map(|v| v.join("bin").join(name)));
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        format!(
            "these tests need PostgreSQL's `{name}`: install it with apt-get install -y postgresql"
        )
    })
}

/// Whether to run as the `postgres` user (PostgreSQL refuses to run as root).
fn as_postgres() -> Result<bool, String> {
    if !rustix::process::geteuid().is_root() {
        return Ok(false);
    }
    let known = Command::new("id")
        .arg("-u")
        .arg("postgres")
        .output()
        .is_ok_and(|o| o.status.success());
    if known {
        Ok(true)
    } else {
        Err("running as root, these tests need the `postgres` user (apt-get install -y postgresql creates it)".into())
    }
}

/// `program` run through util-linux's `setpriv`: as `postgres` if `as_postgres`, and
/// killed when the thread that spawns it ends if `tied`.
fn command(program: PathBuf, as_postgres: bool, tied: bool) -> Command {
    let mut c = Command::new("setpriv");
    if as_postgres {
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ]);
        c.arg("setpriv");
    }
    if tied {
        c.args(["--pdeathsig", "KILL"]);
    }
    c.arg("--").arg(program);
    c
}

/// Removes the clusters of test processes that have ended (the server dies with its
/// process, its directory stays): each directory names its owner's pid.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with("wharf-pg-") {
            continue;
        }
        let owner = std::fs::read_to_string(e.path().join("owner"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok());
        let gone = match owner {
            Some(pid) => !Path::new(&format!("/proc/{pid}")).exists(),
            // Not yet claimed: only once clearly abandoned.
            None => e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(600)),
        };
        if gone {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn start() -> Result<Cluster, String> {
    let who = as_postgres()?;
    let (initdb, postgres) = (bin("initdb")?, bin("postgres")?);
    sweep_stale();
    let dir = tempfile::Builder::new()
        .prefix("wharf-pg-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    std::fs::write(dir.path().join("owner"), std::process::id().to_string())
        .map_err(|e| e.to_string())?;
    if who {
        let out = Command::new("chown")
            .arg("postgres:")
            .arg(dir.path())
            .output()
            .map_err(|e| format!("chown: {e}"))?;
        if !out.status.success() {
            return Err(format!("chown: {}", String::from_utf8_lossy(&out.stderr)));
        }
    }
    let data = dir.path().join("data");
    let out = command(initdb, who, false)
        .arg("-D")
        .arg(&data)
        .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
        .output()
        .map_err(|e| format!("initdb: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        l.local_addr().map_err(|e| e.to_string())?.port()
    };
    // Spawned from a thread that lives as long as the process, so that the
    // parent-death signal (sent when the spawning thread ends) stops the server
    // only when the tests are over.
    let (tx, rx) = std::sync::mpsc::channel();
    let sockets = dir.path().to_owned();
    let log_path = dir.path().join("postgres.log");
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        let mut c = command(postgres, who, true);
        c.arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&sockets)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "max_connections=200"])
            .stdout(Stdio::null())
            .stderr(log);
        let child = c.spawn();
        let _ = tx.send(child.map(|_| ()).map_err(|e| format!("postgres: {e}")));
        loop {
            std::thread::park();
        }
    });
    rx.recv().map_err(|e| e.to_string())??;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(format!("postgres did not start within 30 s: {log}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Cluster { port, _dir: dir })
}

/// The URL of a new, empty database on the cluster (started on first use).
pub(crate) async fn database() -> String {
    let cluster = CLUSTER
        .get_or_init(start)
        .as_ref()
        .unwrap_or_else(|e| panic!("{e}"));
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let base = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port);
    // The server accepts TCP before it accepts logins: retry briefly.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (client, conn) = loop {
        match tokio_postgres::connect(&base, tokio_postgres::NoTls).await {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot connect to the test cluster: {e}"),
        }
    };
    tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    format!("postgres://postgres@127.0.0.1:{}/{name}", cluster.port)
}
