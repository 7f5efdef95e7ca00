//! Registry events to webhooks: signed, filtered, in three payload formats, retried and
//! logged, and not lost across a crash.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use serde_json::Value;
use sha2::Sha256;

use crate::common::*;

/// What a receiver got: headers (lowercase names) and body.
#[derive(Clone, Debug)]
pub struct Received {
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// An HTTP endpoint on 127.0.0.1 that records every request and answers with the
/// queued statuses (then 200).
pub struct Receiver {
    pub url: String,
    got: Arc<Mutex<Vec<(String, Received)>>>,
    pub answers: Arc<Mutex<VecDeque<u16>>>,
    _thread: std::thread::JoinHandle<()>,
}

impl Receiver {
    pub fn start() -> Receiver {
        Receiver::start_on(0)
    }

    pub fn start_on(port: u16) -> Receiver {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind receiver");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let got: Arc<Mutex<Vec<(String, Received)>>> = Arc::default();
        let answers: Arc<Mutex<VecDeque<u16>>> = Arc::default();
        let (g, a) = (Arc::clone(&got), Arc::clone(&answers));
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
                    let (g, a) = (Arc::clone(&g), Arc::clone(&a));
                    async move {
                        let path = req.uri().path().to_owned();
                        let headers = req
                            .headers()
                            .iter()
                            .map(|(k, v)| {
                                (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned())
                            })
                            .collect();
                        let body = axum::body::to_bytes(req.into_body(), 1 << 20)
                            .await
                            .unwrap()
                            .to_vec();
                        g.lock().unwrap().push((path, Received { headers, body }));
                        let code = a.lock().unwrap().pop_front().unwrap_or(200);
                        axum::http::StatusCode::from_u16(code).unwrap()
                    }
                });
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        Receiver {
            url: format!("http://127.0.0.1:{port}"),
            got,
            answers,
            _thread: thread,
        }
    }

    /// Requests to `path` so far.
    pub fn at(&self, path: &str) -> Vec<Received> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// Waits (up to 15 s) until `path` got `n` requests.
    pub fn wait_for(&self, path: &str, n: usize) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let got = self.at(path);
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{path} got {} of {n} requests",
                got.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Checks `Wharf-Signature` over the body with `secret`.
pub fn verify(r: &Received, secret: &str) {
    let sig = r.header("wharf-signature").expect("signed");
    let (t, v1) = sig.split_once(",v1=").unwrap();
    let t = t.strip_prefix("t=").unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&r.body);
    assert_eq!(hex::encode(mac.finalize().into_bytes()), v1, "signature");
    let age = wharf::auth::now_secs() - t.parse::<i64>().unwrap();
    assert!((0..60).contains(&age), "timestamp {t}");
}

fn add_hook(reg: &TestRegistry, args: &[&str]) -> (String, String) {
    let out = run(wharf_cmd(&reg.data).args(["webhook", "add"]).args(args));
    let mut lines = out.lines();
    let id = lines.next().unwrap().to_owned();
    let secret = lines.next().unwrap_or("").to_owned();
    (id, secret)
}

fn deliveries(data: &std::path::Path, id: &str) -> Vec<Value> {
    let out = run(wharf_cmd(data).args(["webhook", "deliveries", id, "--json"]));
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn events_reach_webhooks_signed_filtered_and_in_each_format() {
    let reg = TestRegistry::start();
    let rx = Receiver::start();
    let secret = "s3cret-s3cret-s3cret";
    let (prod_hook, _) = add_hook(
        &reg,
        &[
            &format!("{}/prod", rx.url),
            "--secret",
            secret,
            "--repositories",
            "team/*",
            "--tags",
            "prod,v*",
        ],
    );
    let (_, cncf_secret) = add_hook(
        &reg,
        &[
            &format!("{}/cncf", rx.url),
            "--format",
            "cncf",
            "--actions",
            "push,tag,untag,delete",
        ],
    );
    assert_eq!(cncf_secret.len(), 48, "a generated secret is printed once");
    add_hook(&reg, &[&format!("{}/hub", rx.url), "--format", "dockerhub"]);

    // A push of :staging: the CNCF and Docker Hub hooks hear of it, not the prod one.
    let (manifest, digest) = reg.push_image("team/api", "staging", "one").await;
    let cncf = rx.wait_for("/cncf", 1);
    verify(&cncf[0], &cncf_secret);
    let e = &cncf[0].json()["events"][0];
    assert_eq!(
        cncf[0].header("content-type"),
        Some("application/vnd.docker.distribution.events.v1+json")
    );
    assert_eq!(e["action"], "push");
    assert_eq!(e["target"]["repository"], "team/api");
    assert_eq!(e["target"]["tag"], "staging");
    assert_eq!(e["target"]["digest"], digest.as_str());
    assert_eq!(e["target"]["size"], manifest.len());
    assert_eq!(e["actor"]["name"], "admin");
    assert_eq!(cncf[0].header("wharf-event-id"), e["id"].as_str());
    let hub = rx.wait_for("/hub", 1);
    let h = hub[0].json();
    assert_eq!(h["push_data"]["tag"], "staging");
    assert_eq!(h["push_data"]["pusher"], "admin");
    assert_eq!(
        h["repository"]["repo_name"],
        format!("{}/team/api", reg.host())
    );

    // Promotion to prod (the same manifest under a new tag) is a `tag` event.
    let r = reg
        .put_manifest("team/api", "prod", OCI_MANIFEST, &manifest)
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let prod = rx.wait_for("/prod", 1);
    verify(&prod[0], secret);
    let p = prod[0].json();
    assert_eq!(p["action"], "tag");
    assert_eq!(p["tag"], "prod");
    assert_eq!(p["digest"], digest.as_str());
    assert_eq!(p["reference"], format!("{}/team/api:prod", reg.host()));
    assert_eq!(prod[0].header("wharf-event"), Some("tag"));
    // A re-push that changes nothing is no event.
    reg.put_manifest("team/api", "prod", OCI_MANIFEST, &manifest)
        .await;
    // Deleting the tag: the CNCF hook (which asked for it) hears `delete`.
    let r = reg
        .client
        .delete(reg.url("/v2/team/api/manifests/staging"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let cncf = rx.wait_for("/cncf", 3);
    assert_eq!(cncf[2].json()["events"][0]["action"], "delete");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        rx.at("/prod").len(),
        1,
        "no event for a re-push that changed nothing"
    );
    assert_eq!(
        rx.at("/hub").len(),
        2,
        "Docker Hub's format carries pushes only"
    );

    let log = deliveries(&reg.data, &prod_hook);
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["status"], "delivered");
    assert_eq!(log[0]["response_code"], 200);
    assert_eq!(log[0]["attempts"], 1);
    let list: Value = serde_json::from_str(&run(
        wharf_cmd(&reg.data).args(["webhook", "list", "--json"])
    ))
    .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 3);
    assert!(
        !list.to_string().contains(secret),
        "list never shows secrets"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_deliveries_are_retried_with_backoff_and_logged() {
    let reg = TestRegistry::start();
    let rx = Receiver::start();
    rx.answers.lock().unwrap().extend([500, 503]);
    let (flaky, _) = add_hook(&reg, &[&format!("{}/flaky", rx.url)]);
    // A receiver that is down: nothing listens on this port.
    let dead_port = free_port();
    let (dead, _) = add_hook(&reg, &[&format!("http://127.0.0.1:{dead_port}/hook")]);
    reg.push_image("team/api", "prod", "one").await;

    let got = rx.wait_for("/flaky", 3);
    // Every attempt carries the same event id, for de-duplication.
    let ids: Vec<_> = got
        .iter()
        .map(|r| r.header("wharf-event-id").unwrap().to_owned())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = deliveries(&reg.data, &flaky);
        if log[0]["status"] == "delivered" || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(log[0]["status"], "delivered");
    assert_eq!(log[0]["attempts"], 3);
    assert_eq!(log[0]["response_code"], 200);

    let deadline = Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = deliveries(&reg.data, &dead);
        if log[0]["attempts"].as_i64().unwrap() >= 2 || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(log[0]["status"], "pending");
    assert!(log[0]["attempts"].as_i64().unwrap() >= 2, "{log:?}");
    assert!(
        log[0]["last_error"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("connect"),
        "{log:?}"
    );
    assert!(log[0]["next_attempt"].is_string());
    let table = run(wharf_cmd(&reg.data).args(["webhook", "deliveries", &dead]));
    assert!(
        table.contains("team/api:prod") && table.contains("pending"),
        "{table}"
    );

    // `webhook test` reports the dead endpoint with a non-zero exit; a live one answers.
    let out = wharf_cmd(&reg.data)
        .args(["webhook", "test", &dead])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("did not answer"));
    let out = run(wharf_cmd(&reg.data).args(["webhook", "test", &flaky]));
    assert!(out.contains("answered 200"), "{out}");
    let ping = rx.at("/flaky").pop().unwrap();
    assert_eq!(ping.json()["action"], "ping");

    // Bad input: refused, nothing stored.
    for args in [
        vec!["webhook", "add", "ftp://x"],
        vec![
            "webhook",
            "add",
            "http://127.0.0.1:1/x",
            "--secret",
            "short",
        ],
        vec![
            "webhook",
            "add",
            "http://127.0.0.1:1/x",
            "--actions",
            "pull",
        ],
        vec![
            "webhook",
            "add",
            "http://127.0.0.1:1/x",
            "--format",
            "slack",
        ],
        vec!["webhook", "remove", "wh-nothing"],
        vec!["webhook", "deliveries", "wh-nothing"],
    ] {
        let out = wharf_cmd(&reg.data).args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).starts_with("wharf: "));
    }
    let list: Value = serde_json::from_str(&run(
        wharf_cmd(&reg.data).args(["webhook", "list", "--json"])
    ))
    .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    run(wharf_cmd(&reg.data).args(["webhook", "remove", &dead]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_receiver_has_a_bounded_queue_that_drops_the_oldest() {
    let reg = TestRegistry::start_tuned(|c| {
        c.webhook_delivery.max_pending = 3;
        // Slow retries: the queue fills before anything could be delivered.
        c.webhook_delivery.retry_initial_ms = 60_000;
    });
    let dead_port = free_port();
    let (dead, _) = add_hook(&reg, &[&format!("http://127.0.0.1:{dead_port}/hook")]);
    for i in 0..7 {
        reg.push_image("team/api", &format!("t{i}"), &format!("seed {i}"))
            .await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = deliveries(&reg.data, &dead);
        if log.len() == 7 || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(log.len(), 7, "{log:#?}");
    let by_tag = |status: &str| {
        let mut tags: Vec<String> = log
            .iter()
            .filter(|d| d["status"] == status)
            .map(|d| d["tag"].as_str().unwrap().to_owned())
            .collect();
        tags.sort();
        tags
    };
    // Never more than three waiting; the newest are kept, the oldest dropped and said so.
    assert_eq!(by_tag("pending"), ["t4", "t5", "t6"], "{log:#?}");
    assert_eq!(by_tag("failed"), ["t0", "t1", "t2", "t3"], "{log:#?}");
    for d in log.iter().filter(|d| d["status"] == "failed") {
        assert!(
            d["last_error"].as_str().unwrap().contains("queue full"),
            "{d}"
        );
    }
}

#[test]
fn an_event_survives_a_crash_before_it_is_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let config = dir.path().join("wharf.toml");
    std::fs::write(
        &config,
        format!(
            "[[webhooks]]\nurl = \"http://127.0.0.1:{port}/deploy\"\nsecret = \"config-secret-0123\"\ntags = [\"prod\"]\n\n\
             [webhook_delivery]\nretry_initial_ms = 100\nretry_max_ms = 300\npoll_ms = 50\n"
        ),
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    let p = Process::start_with(&data, &[("WHARF_CONFIG", cfg)], &[]);
    let reg = TestRegistry::attach(&p.base, &data);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(reg.push_image("team/api", "prod", "one"));
    let hooks: Value = serde_json::from_str(&run(wharf_cmd(&data)
        .env("WHARF_CONFIG", cfg)
        .args(["webhook", "list", "--json"])))
    .unwrap();
    let id = hooks[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(hooks[0]["source"], "config");
    // Wait for a failed attempt (nothing listens yet), then crash the registry.
    let deadline = Instant::now() + Duration::from_secs(10);
    let event = loop {
        let log = deliveries(&data, &id);
        if log
            .first()
            .is_some_and(|d| d["attempts"].as_i64().unwrap() >= 1)
        {
            break log[0]["event"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "no attempt was made");
        std::thread::sleep(Duration::from_millis(20));
    };
    p.kill9();
    let rx = Receiver::start_on(port);
    let p = Process::start_with(&data, &[("WHARF_CONFIG", cfg)], &[]);
    let got = rx.wait_for("/deploy", 1);
    verify(&got[0], "config-secret-0123");
    assert_eq!(got[0].header("wharf-event-id"), Some(event.as_str()));
    assert_eq!(got[0].json()["tag"], "prod");
    drop(p);
}
