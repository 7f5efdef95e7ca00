//! The registry with its metadata in PostgreSQL (`database_url`): a real PostgreSQL the
//! harness starts (`testdb`), the docker CLI against it, several replicas on one
//! database, and a database that goes away and comes back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::common::{ADMIN_PASSWORD, TestRegistry, error_of, nonce, run, wharf_cmd};
use crate::docker_cli::{Docker, busybox_context};

/// A new database on the test cluster (started on first use), from any context.
pub fn database() -> String {
    std::thread::spawn(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(crate::testdb::database())
    })
    .join()
    .unwrap()
}

fn on(url: &str) -> impl FnOnce(&mut wharf::config::Config) + '_ {
    move |c| c.database_url = Some(wharf::auth::Secret::new(url))
}

#[test]
fn docker_pushes_pulls_and_runs_through_a_registry_on_postgresql() {
    let url = database();
    let reg = TestRegistry::start_tuned(on(&url));
    let ctx = tempfile::tempdir().unwrap();
    let nonce = nonce();
    busybox_context(ctx.path(), &format!("hello from postgres {nonce}"));
    let image = format!("{}/pg/busybox-{nonce}:v1", reg.host());
    let d = Docker::new();
    d.login(reg.host(), "admin", ADMIN_PASSWORD);
    run(d.cmd().args(["build", "-q", "-t", &image]).arg(ctx.path()));
    let pushed = run(d.cmd().args(["push", &image]));
    assert!(pushed.contains("digest: sha256:"), "{pushed}");
    run(d.cmd().args(["rmi", "-f", &image]));
    run(d.cmd().args(["pull", &image]));
    let out = run(d.cmd().args(["run", "--rm", &image]));
    assert_eq!(out.trim(), format!("hello from postgres {nonce}"));
    let again = run(d.cmd().args(["push", &image]));
    assert!(again.contains("Layer already exists"), "{again}");
    run(d.cmd().args(["rmi", "-f", &image]));

    // Nothing was written to an SQLite database: the metadata is in PostgreSQL, and the
    // admin commands find it there through WHARF_DATABASE_URL.
    assert!(!reg.data.join("meta.db").exists());
    let usage = run(wharf_cmd(&reg.data)
        .env("WHARF_DATABASE_URL", &url)
        .args(["usage", "--json"]));
    let usage: Value = serde_json::from_str(&usage).unwrap();
    assert!(
        usage.to_string().contains(&format!("pg/busybox-{nonce}")),
        "{usage}"
    );
    run(wharf_cmd(&reg.data)
        .env("WHARF_DATABASE_URL", &url)
        .args(["usage", "--verify"]));
    // A pass of the collector on the same database while the server runs: nothing of
    // the tagged image goes.
    let gc = run(wharf_cmd(&reg.data)
        .env("WHARF_DATABASE_URL", &url)
        .env("WHARF_GC_DELAY", "0s")
        .args(["gc", "--json"]));
    let gc: Value = serde_json::from_str(&gc).unwrap();
    assert_eq!(gc["blobs"], 0, "{gc}");
    run(d.cmd().args(["pull", &image]));
    run(d.cmd().args(["rmi", "-f", &image]));
}

#[test]
fn a_database_url_that_is_not_postgres_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = wharf_cmd(dir.path())
        .env("WHARF_DATABASE_URL", "mysql://root@localhost/wharf")
        .args(["usage"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid database_url"), "{err}");
    // Unreachable: a plain message and a failure, not a hang.
    let port = crate::common::free_port();
    let started = Instant::now();
    let out = wharf_cmd(dir.path())
        .env(
            "WHARF_DATABASE_URL",
            format!("postgres://wharf@127.0.0.1:{port}/wharf"),
        )
        .args(["usage"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot be reached"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// Two replicas on one database and one blob directory: what one stores the other
/// serves, a token one issues the other accepts (the signing key is in the database),
/// and a delete through one is seen by the other at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_one_database_serve_each_others_writes_and_tokens() {
    let url = database();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (a, b) = {
        let (u1, u2) = (url.clone(), url.clone());
        let d1 = data.clone();
        let d2 = data.clone();
        // Started at once, as a deployment starts them: one creates the admin and the
        // signing key, the other finds them.
        let ta = std::thread::spawn(move || TestRegistry::start_tuned_in(&d1, on(&u1)));
        let tb = std::thread::spawn(move || TestRegistry::start_tuned_in(&d2, on(&u2)));
        (ta.join().unwrap(), tb.join().unwrap())
    };
    let (manifest, digest) = a.push_image("team/app", "v1", "replicas").await;
    let r = b.get("/v2/team/app/manifests/v1").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap(), manifest);
    let catalog: Value = b.get("/v2/_catalog").await.json().await.unwrap();
    assert_eq!(catalog["repositories"], serde_json::json!(["team/app"]));

    // A bearer token from A works on B.
    let token: Value = a
        .client
        .get(a.url("/token?service=wharf&scope=repository:team/app:pull"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["token"].as_str().unwrap().to_owned();
    let r = b
        .anon
        .get(b.url(&format!("/v2/team/app/manifests/{digest}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // A delete through B: A no longer serves the tag.
    let r = b
        .client
        .delete(b.url("/v2/team/app/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(
        a.get("/v2/team/app/manifests/v1").await.status(),
        StatusCode::NOT_FOUND
    );
}

/// A TCP relay between the registry and PostgreSQL that can be cut (every connection
/// dropped, new ones closed at once) and restored: the database going away, as a
/// restart, a failover or a network partition makes it.
struct Relay {
    port: u16,
    down: Arc<AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Relay {
    async fn start(to: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let (cut, cuts) = tokio::sync::watch::channel(0u64);
        let is_down = Arc::clone(&down);
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if is_down.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let mut cuts = cuts.clone();
                // Only cuts after this connection was made end it.
                cuts.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        Relay { port, down, cut }
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            self.cut.send_modify(|n| *n += 1);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_goes_away_answers_503_and_the_registry_recovers_by_itself() {
    let url = database();
    // postgres://postgres@127.0.0.1:PORT/NAME
    let (head, name) = url.rsplit_once('/').unwrap();
    let port: u16 = head.rsplit_once(':').unwrap().1.parse().unwrap();
    let relay = Relay::start(port).await;
    let relayed = format!("postgres://postgres@127.0.0.1:{}/{name}", relay.port);
    let reg = {
        let relayed = relayed.clone();
        tokio::task::spawn_blocking(move || TestRegistry::start_tuned(on(&relayed)))
            .await
            .unwrap()
    };
    let (manifest, _) = reg.push_image("team/db", "v1", "outage").await;
    assert_eq!(
        reg.get("/v2/team/db/manifests/v1").await.status(),
        StatusCode::OK
    );

    relay.set_down(true);
    let started = Instant::now();
    let r = reg.get("/v2/team/db/manifests/v1").await;
    let (status, code) = error_of(r).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{code}");
    assert_eq!(code, "UNAVAILABLE");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "answered in {:?}",
        started.elapsed()
    );
    let ready = reg.anon.get(reg.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = ready.json().await.unwrap();
    let database = &body["errors"][0]["detail"]["database"];
    assert!(database.as_str().is_some_and(|d| d != "ok"), "{body}");
    // A push meanwhile is refused the same way, and stores nothing half.
    let r = reg
        .client
        .post(reg.url("/v2/team/db/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);

    relay.set_down(false);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = reg.get("/v2/team/db/manifests/v1").await;
        if r.status() == StatusCode::OK {
            assert_eq!(r.bytes().await.unwrap(), manifest);
            break;
        }
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(Instant::now() < deadline, "the registry did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Readiness is answered from a check at most a second old.
    while reg
        .anon
        .get(reg.url("/readyz"))
        .send()
        .await
        .unwrap()
        .status()
        != StatusCode::OK
    {
        assert!(Instant::now() < deadline, "/readyz did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And writes work again.
    reg.push_image("team/db", "v2", "after").await;
}
