//! Attacks on a running registry, each from the attacker's side: escalation of scoped
//! credentials, reads across repositories, floods of logins, slow and huge bodies,
//! injected headers, and what the audit log records of them.

use std::time::Duration;

use reqwest::{Client, StatusCode};
use serde_json::Value;

use crate::common::{
    TestRegistry, add_user, bearer, claims_of, client_as, client_from, header, proc_status,
    start_upload, token, wharf,
};

/// `docker login`'s request: the OAuth2 password grant, asking for a refresh token.
async fn password_grant(
    reg: &TestRegistry,
    user: &str,
    password: &str,
    scope: &str,
) -> reqwest::Response {
    reg.anon
        .post(reg.url("/token"))
        .form(&[
            ("grant_type", "password"),
            ("username", user),
            ("password", password),
            ("access_type", "offline"),
            ("service", "wharf"),
            ("client_id", "docker"),
            ("scope", scope),
        ])
        .send()
        .await
        .unwrap()
}

async fn refresh_grant(reg: &TestRegistry, refresh: &str, scope: &str) -> reqwest::Response {
    reg.anon
        .post(reg.url("/token"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh),
            ("service", "wharf"),
            ("client_id", "docker"),
            ("scope", scope),
        ])
        .send()
        .await
        .unwrap()
}

fn create_token(reg: &TestRegistry, user: &str, scope: &str, expires: &str) -> String {
    wharf(
        reg,
        &[
            "token",
            "create",
            "--user",
            user,
            "--scope",
            scope,
            "--name",
            "ci",
            "--expires",
            expires,
        ],
    )
    .trim()
    .to_owned()
}

fn token_list(reg: &TestRegistry, user: &str) -> Vec<Value> {
    serde_json::from_str(&wharf(reg, &["token", "list", "--user", user, "--json"])).unwrap()
}

fn bearer_client(jwt: &str) -> Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {jwt}").parse().unwrap(),
    );
    Client::builder().default_headers(h).build().unwrap()
}

/// Hole 1: a scoped access token used as `docker login`'s password gets no refresh
/// token (it keeps its scopes, expiry and revocation); a password login's refresh token
/// is listed, revocable one by one, expires when idle, is no Basic password, and the
/// audit log says which credential made it.
#[tokio::test]
async fn a_scoped_token_never_becomes_a_refresh_token_with_more_rights() {
    let reg = TestRegistry::start_tuned(|c| {
        c.limits.refresh_token_idle = Duration::from_secs(3);
    });
    add_user(&reg, "alice", "alice-password-1");
    let pull_only = create_token(&reg, "alice", "repository:alice/*:pull", "90d");

    // The escalation attempt: a pull-only token as the password, asking for offline
    // access and push.
    let r = password_grant(&reg, "alice", &pull_only, "repository:alice/app:pull,push").await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert!(
        body.get("refresh_token").is_none(),
        "a token login must not get a refresh token: {body}"
    );
    let access = claims_of(body["access_token"].as_str().unwrap());
    assert_eq!(access["access"][0]["actions"], serde_json::json!(["pull"]));
    assert_eq!(
        start_upload(
            &reg,
            &bearer_client(body["access_token"].as_str().unwrap()),
            "alice/app"
        )
        .await,
        StatusCode::FORBIDDEN
    );
    // Only the access token exists: nothing new was minted.
    let listed = token_list(&reg, "alice");
    assert_eq!(listed.len(), 1, "{listed:?}");

    // A password login gets a refresh token, listed with its kind.
    let r = password_grant(
        &reg,
        "alice",
        "alice-password-1",
        "repository:alice/app:pull,push",
    )
    .await;
    let body: Value = r.json().await.unwrap();
    let refresh = body["refresh_token"]
        .as_str()
        .expect("refresh token")
        .to_owned();
    let listed = token_list(&reg, "alice");
    let row = listed
        .iter()
        .find(|t| t["kind"] == "refresh")
        .unwrap_or_else(|| panic!("refresh token not listed: {listed:?}"));
    let refresh_id = row["id"].as_str().unwrap().to_owned();
    assert!(refresh.contains(&refresh_id));
    assert!(
        row["expires"].is_string(),
        "a refresh token has an absolute expiry: {row}"
    );
    // It is not a Basic password.
    let r = client_as("alice", &refresh)
        .get(reg.url("/v2/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // The audit log says which credential made it, and from where.
    let log = wharf(&reg, &["audit", "--json", "--limit", "100"]);
    let log: Vec<Value> = serde_json::from_str(&log).unwrap();
    assert!(
        log.iter().any(|e| e["action"] == "token.create"
            && e["credential"] == "password"
            && e["detail"].as_str().unwrap().contains(&refresh_id)
            && e["client"] == "127.0.0.1"),
        "{log:?}"
    );

    // Exchanged for a JWT, then revoked alone: the refresh token and its JWTs stop.
    let r = refresh_grant(&reg, &refresh, "repository:alice/app:pull,push").await;
    assert_eq!(r.status(), StatusCode::OK);
    let jwt = r.json::<Value>().await.unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        start_upload(&reg, &bearer_client(&jwt), "alice/app").await,
        StatusCode::ACCEPTED
    );
    wharf(&reg, &["token", "revoke", &refresh_id]);
    assert_eq!(
        refresh_grant(&reg, &refresh, "repository:alice/app:pull")
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        start_upload(&reg, &bearer_client(&jwt), "alice/app").await,
        StatusCode::UNAUTHORIZED
    );
    // The access token was not touched by that.
    assert_eq!(
        client_as("alice", &pull_only)
            .get(reg.url("/v2/"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );

    // An unused refresh token expires (idle limit 3 s here).
    let r = password_grant(&reg, "alice", "alice-password-1", "").await;
    let idle = r.json::<Value>().await.unwrap()["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(
        refresh_grant(&reg, &idle, "").await.status(),
        StatusCode::UNAUTHORIZED
    );

    // An admin's scoped token is no way to admin rights either.
    let admin_pull = create_token(&reg, "admin", "repository:team/*:pull", "1d");
    let r = password_grant(&reg, "admin", &admin_pull, "repository:team/api:push").await;
    let body: Value = r.json().await.unwrap();
    assert!(body.get("refresh_token").is_none());
    let r = client_as("admin", &admin_pull)
        .get(reg.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
}

/// Hole 9: rights taken away hold at the next request, for JWTs too (also ones made
/// from an access token, and anonymous ones), and a removed user's JWT never works for
/// a new user of the same name.
#[tokio::test]
async fn rights_taken_away_are_gone_at_the_next_request() {
    let reg = TestRegistry::start();
    reg.push_image("team/api", "v1", "x").await;
    reg.push_image("pub/base", "v1", "p").await;
    add_user(&reg, "dave", "dave-password-1");
    wharf(&reg, &["grant", "dave", "team/*", "delete"]);
    wharf(&reg, &["repo", "visibility", "pub/*", "public"]);
    let dave = client_as("dave", "dave-password-1");
    let scope = "repository:team/api:pull,push,delete";
    let jwt = bearer(&reg, &dave, &[scope]).await;
    let tok = create_token(&reg, "dave", "repository:team/*:pull,push,delete", "1d");
    let tok_jwt = bearer(&reg, &client_as("dave", &tok), &[scope]).await;
    let anon_jwt = bearer(&reg, &reg.anon, &["repository:pub/base:pull"]).await;
    for c in [&jwt, &tok_jwt] {
        assert_eq!(
            start_upload(&reg, c, "team/api").await,
            StatusCode::ACCEPTED
        );
    }
    let pull = |c: Client, path: &'static str| {
        let url = reg.url(path);
        async move { c.get(url).send().await.unwrap().status() }
    };
    assert_eq!(
        pull(anon_jwt.clone(), "/v2/pub/base/manifests/v1").await,
        StatusCode::OK
    );

    wharf(&reg, &["grant", "dave", "team/*", "none"]);
    for c in [&jwt, &tok_jwt] {
        assert_eq!(
            start_upload(&reg, c, "team/api").await,
            StatusCode::FORBIDDEN
        );
        let r = c
            .delete(reg.url("/v2/team/api/manifests/v1"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::FORBIDDEN,
            "delete after the grant was taken away"
        );
        assert_eq!(
            pull(c.clone(), "/v2/team/api/manifests/v1").await,
            StatusCode::FORBIDDEN
        );
    }
    assert_eq!(
        reg.get("/v2/team/api/manifests/v1").await.status(),
        StatusCode::OK
    );

    wharf(&reg, &["repo", "visibility", "pub/*", "private"]);
    assert_eq!(
        pull(anon_jwt, "/v2/pub/base/manifests/v1").await,
        StatusCode::UNAUTHORIZED
    );

    // A removed user's JWT does not work for a new user of the same name.
    wharf(&reg, &["grant", "dave", "team/*", "pull"]);
    let old = bearer(&reg, &dave, &["repository:team/api:pull"]).await;
    assert_eq!(
        pull(old.clone(), "/v2/team/api/manifests/v1").await,
        StatusCode::OK
    );
    wharf(&reg, &["user", "remove", "dave"]);
    add_user(&reg, "dave", "dave-password-2");
    wharf(&reg, &["grant", "dave", "team/*", "pull"]);
    assert_eq!(
        pull(old, "/v2/team/api/manifests/v1").await,
        StatusCode::UNAUTHORIZED
    );
    let new = bearer(
        &reg,
        &client_as("dave", "dave-password-2"),
        &["repository:team/api:pull"],
    )
    .await;
    assert_eq!(pull(new, "/v2/team/api/manifests/v1").await, StatusCode::OK);
}

/// Hole 3: wrong passwords sent all at once are counted as they arrive: no more get
/// checked than the limit allows.
#[tokio::test]
async fn simultaneous_wrong_passwords_are_limited_like_sequential_ones() {
    let reg = TestRegistry::start();
    add_user(&reg, "bob", "bob-password-1");
    let mut tasks = Vec::new();
    for i in 0..60 {
        let c = client_as("bob", &format!("guess-{i}"));
        let url = reg.url("/v2/");
        tasks.push(tokio::spawn(async move {
            c.get(url).send().await.unwrap().status()
        }));
    }
    let mut checked = 0;
    let mut limited = 0;
    for t in tasks {
        match t.await.unwrap() {
            StatusCode::UNAUTHORIZED => checked += 1,
            StatusCode::TOO_MANY_REQUESTS => limited += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert!(
        checked <= wharf::auth::limiter::PER_CLIENT_USER,
        "{checked} guesses were checked, over the limit of {}",
        wharf::auth::limiter::PER_CLIENT_USER
    );
    assert_eq!(checked + limited, 60);
    // Even the right password now waits: the limit holds.
    let r = client_as("bob", "bob-password-1")
        .get(reg.url("/v2/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(header(&r, "retry-after").is_some());
}

/// Hole 7: failures from ten other addresses do not lock the user out of their usual
/// address, their access tokens, or `docker login` there; an unknown address waits.
#[tokio::test]
async fn an_attack_from_elsewhere_does_not_lock_out_the_user() {
    let reg = TestRegistry::start();
    add_user(&reg, "carol", "carol-password-1");
    let tok = create_token(&reg, "carol", "repository:carol/*:pull,push", "1d");
    let usual = client_from("127.0.0.1", "carol", "carol-password-1");
    assert_eq!(
        usual.get(reg.url("/v2/")).send().await.unwrap().status(),
        StatusCode::OK
    );
    // 10 addresses, 5 failures each: the per-user limit (50 a minute) is reached.
    for a in 2..12 {
        let attacker = client_from(&format!("127.0.0.{a}"), "carol", "wrong-password");
        for _ in 0..5 {
            let s = attacker.get(reg.url("/v2/")).send().await.unwrap().status();
            assert!(s == StatusCode::UNAUTHORIZED || s == StatusCode::TOO_MANY_REQUESTS);
        }
    }
    let stranger = client_from("127.0.0.50", "carol", "carol-password-1");
    assert_eq!(
        stranger.get(reg.url("/v2/")).send().await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS,
        "an address carol never used is slowed down with the attack"
    );
    // Her usual address: password, docker login, and her CI token from anywhere.
    assert_eq!(
        usual.get(reg.url("/v2/")).send().await.unwrap().status(),
        StatusCode::OK
    );
    let r = reg
        .anon
        .post(reg.url("/token"))
        .form(&[
            ("grant_type", "password"),
            ("username", "carol"),
            ("password", "carol-password-1"),
            ("service", "wharf"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let ci = client_from("127.0.0.60", "carol", &tok);
    for _ in 0..20 {
        assert_eq!(
            ci.get(reg.url("/v2/")).send().await.unwrap().status(),
            StatusCode::OK
        );
    }
    // Access tokens are not subject to the password limiter at all: wrong ones are
    // refused, never rate limited, and do not count against the password.
    let bad_tok = client_from(
        "127.0.0.70",
        "carol",
        "wharf_aaaaaaaaaaaa_bbbbbbbbbbbbbbbbbbbb",
    );
    for _ in 0..30 {
        assert_eq!(
            bad_tok.get(reg.url("/v2/")).send().await.unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
    }
}

/// The number of threads of this process (the registry runs in it).
fn threads() -> usize {
    proc_status(std::process::id(), "Threads:") as usize
}

/// Hole 4: 700 simultaneous bad logins from many addresses hold no pool thread while
/// they wait; past a short queue they are answered 503 at once; token traffic goes on.
#[tokio::test]
async fn a_flood_of_bad_logins_holds_no_threads_and_spares_token_traffic() {
    let reg = TestRegistry::start();
    let tok = create_token(&reg, "admin", "repository:team/*:pull,push", "1d");
    let before = threads();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(threads(), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let mut flood = Vec::new();
    for i in 0..700 {
        // 50 addresses, distinct users: under every failed-login limit.
        let c = client_from(
            &format!("127.0.1.{}", 2 + i % 50),
            &format!("u{i}"),
            "wrong",
        );
        let url = reg.url("/v2/");
        flood.push(tokio::spawn(async move {
            let r = c.get(url).send().await.unwrap();
            (r.status(), r.headers().get("retry-after").is_some())
        }));
    }
    // Meanwhile a push with an access token.
    let ci = client_as("admin", &tok);
    let digest = crate::common::sha256(b"pushed during the flood");
    let r = ci
        .post(reg.url(&format!("/v2/team/app/blobs/uploads/?digest={digest}")))
        .body(&b"pushed during the flood"[..])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let (mut refused, mut overloaded) = (0, 0);
    for t in flood {
        match t.await.unwrap() {
            (StatusCode::UNAUTHORIZED, _) => refused += 1,
            (StatusCode::SERVICE_UNAVAILABLE, true) => overloaded += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    assert_eq!(refused + overloaded, 700);
    assert!(overloaded > 0, "the queue of password checks is bounded");
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        peak <= before + 24,
        "threads went from {before} to {peak} during the flood"
    );
}

/// The credential behind every change is in the audit log; refused logins are there
/// too, but a flood of them adds a bounded number of rows.
#[tokio::test]
async fn the_audit_log_names_credentials_and_bounds_failures() {
    let reg = TestRegistry::start();
    let tok = create_token(&reg, "admin", "repository:team/*:pull,push,delete", "1d");
    let tok_id = token_list(&reg, "admin")[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ci = TestRegistry::attach(&reg.base, &reg.data).with_client(client_as("admin", &tok));
    ci.push_image("team/api", "v1", "audited").await;
    let r = ci
        .client
        .delete(reg.url("/v2/team/api/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let forged = bearer_client("eyJhbGciOiJIUzI1NiJ9.e30.c2lnbmF0dXJl");
    for _ in 0..50 {
        forged.get(reg.url("/v2/")).send().await.unwrap();
    }
    for i in 0..300 {
        client_from(
            &format!("127.0.2.{}", 2 + i % 200),
            &format!("nobody{i}"),
            "x",
        )
        .get(reg.url("/v2/"))
        .send()
        .await
        .unwrap();
    }
    // Refusals are written once a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let log: Vec<Value> =
        serde_json::from_str(&wharf(&reg, &["audit", "--json", "--limit", "10000"])).unwrap();
    let find = |action: &'static str| log.iter().filter(move |e| e["action"] == action);
    assert!(
        find("push").any(|e| e["credential"] == tok_id.as_str() && e["client"] == "127.0.0.1"),
        "{log:?}"
    );
    assert!(find("delete.tag").any(|e| e["credential"] == tok_id.as_str()));
    assert!(
        find("token.refused").count() >= 1,
        "a forged JWT is recorded"
    );
    assert_eq!(
        find("token.refused").count(),
        1,
        "its repeats are aggregated"
    );
    let failed = find("login.failed").count();
    assert!(
        (1..=wharf::auth::audit::ROWS_PER_MINUTE as usize).contains(&failed),
        "{failed} rows for 300 failed logins"
    );
    assert!(find("audit.aggregated").count() <= 1);
    drop(ci);
}

/// The listing commands end quietly when their reader goes away.
#[tokio::test]
async fn listing_commands_survive_a_closed_pipe() {
    let reg = TestRegistry::start();
    // Far more output than a pipe holds, so the writer meets the closed pipe.
    {
        let db = rusqlite::Connection::open(reg.data.join("meta.db")).unwrap();
        db.execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000)
             INSERT INTO audit_log (at, actor, action, detail) SELECT i, 'x', 'test', 'row ' || i FROM n",
        )
        .unwrap();
    }
    let bin = env!("CARGO_BIN_EXE_wharf");
    let mut child = std::process::Command::new(bin)
        .args(["audit", "--limit", "5000"])
        .env("WHARF_DATA", &reg.data)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
}

// ---- the store: uploads, deletes, leftovers ----

/// Hole 2: an upload whose file is gone while its row remains (a failure between the
/// rename into place and the commit) finishes only with the digest its own bytes were
/// verified to have: never as another repository's private blob of the same size.
#[tokio::test]
async fn an_upload_finishes_only_as_the_blob_its_own_bytes_are() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let reg = TestRegistry::start_in(&data);
    let secret = crate::common::pattern(4096, 7);
    let victim = reg.push_blob("victim/app", &secret).await;
    add_user(&reg, "mallory", "mallory-password");
    let mallory = client_as("mallory", "mallory-password");
    let r = mallory
        .post(reg.url("/v2/mallory/x/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let loc = header(&r, "location").unwrap().to_owned();
    let id = loc.rsplit('/').next().unwrap().to_owned();
    let r = mallory
        .patch(reg.url(&loc))
        .body(vec![0u8; secret.len()])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    // The window: the upload's file is gone, its row remains; and the server has
    // restarted (or another replica answers), so no running hash of the upload is at
    // hand either.
    reg.stop();
    std::fs::remove_file(data.join("uploads").join(&id)).unwrap();
    let reg = TestRegistry::start_in(&data);
    let r = mallory
        .put(reg.url(&format!("{loc}?digest={victim}")))
        .send()
        .await
        .unwrap();
    assert!(!r.status().is_success(), "finished as someone else's blob");
    let r = mallory
        .get(reg.url(&format!("/v2/mallory/x/blobs/{victim}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // The recovery this path exists for still works: bytes verified and renamed into
    // place (the server records the digest first), then a crash before the commit.
    let mine = crate::common::pattern(4096, 9);
    let digest = crate::common::sha256(&mine);
    let loc = reg.open_upload("team/api").await;
    let id = loc.rsplit('/').next().unwrap().to_owned();
    reg.client
        .patch(reg.url(&loc))
        .body(mine.clone())
        .send()
        .await
        .unwrap();
    let hex = &digest["sha256:".len()..];
    let dir = reg.data.join("blobs/sha256").join(&hex[..2]);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::rename(reg.data.join("uploads").join(&id), dir.join(hex)).unwrap();
    reg.stop();
    // The digest is recorded before the rename, as the server does: it is also the
    // upload's claim, which keeps garbage collection (its pass at start) off the file.
    rusqlite::Connection::open(data.join("meta.db"))
        .unwrap()
        .execute(
            "UPDATE uploads SET digest = ?1 WHERE id = ?2",
            [&digest, &id],
        )
        .unwrap();
    let reg = TestRegistry::start_in(&data);
    // Naming the victim's blob (same size, present) is still refused.
    let r = reg
        .client
        .put(reg.url(&format!("{loc}?digest={victim}")))
        .send()
        .await
        .unwrap();
    assert!(!r.status().is_success());
    let r = reg
        .client
        .put(reg.url(&format!("{loc}?digest={digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let got = reg
        .get(&format!("/v2/team/api/blobs/{digest}"))
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(&got[..], &mine[..]);
}

fn rss_kib(pid: u32) -> u64 {
    proc_status(pid, "VmRSS:")
}

/// Hole 5: requests for upload ids that do not exist keep nothing in memory.
#[tokio::test]
async fn requests_for_uploads_that_do_not_exist_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let p = crate::common::Process::start(&dir.path().join("data"));
    let client = crate::common::admin_client();
    let base = p.base.clone();
    let round = |n: usize| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let mut tasks = Vec::new();
            for w in 0..16 {
                let (client, base) = (client.clone(), base.clone());
                tasks.push(tokio::spawn(async move {
                    for i in 0..n / 16 {
                        let url =
                            format!("{base}/v2/team/api/blobs/uploads/{}", uuid::Uuid::new_v4());
                        let req = match (w + i) % 3 {
                            0 => client.patch(url).body("x"),
                            1 => {
                                client.put(format!("{url}?digest={}", crate::common::sha256(b"x")))
                            }
                            _ => client.delete(url),
                        };
                        let r = req.send().await.unwrap();
                        assert_eq!(r.status(), StatusCode::NOT_FOUND);
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        }
    };
    round(3_000).await;
    let before = rss_kib(p.child.id());
    round(30_000).await;
    let after = rss_kib(p.child.id());
    assert!(
        after < before + 4 * 1024,
        "RSS grew from {before} KiB to {after} KiB over 30 000 requests for nothing"
    );
}

/// Hole 10: a delete that would leave a tagged manifest incomplete is refused, naming
/// the tag (and the policy that protects it); tags, then manifests, then blobs still
/// deletes everything.
#[tokio::test]
async fn nothing_a_tag_needs_can_be_deleted_under_it() {
    use crate::common::{OCI_INDEX, OCI_MANIFEST, image_manifest};
    let reg = TestRegistry::start();
    let (m1, d1) = reg.push_image("team/app", "v1", "one").await;
    let layer = crate::common::sha256(b"layer of one");
    wharf(&reg, &["policy", "immutable", "team/*", "--tags", "v*"]);
    let r = reg
        .client
        .delete(reg.url(&format!("/v2/team/app/blobs/{layer}")))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["errors"][0]["code"], "DENIED");
    assert_eq!(body["errors"][0]["detail"]["tag"], "v1");
    let msg = body["errors"][0]["message"].as_str().unwrap();
    assert!(msg.contains("\"v1\"") && msg.contains("policy"), "{msg}");
    assert_eq!(
        reg.get(&format!("/v2/team/app/blobs/{layer}"))
            .await
            .status(),
        StatusCode::OK
    );

    // A child of a tagged index.
    let (child, child_digest) = reg.push_image("team/app", "tmp", "two").await;
    reg.client
        .delete(reg.url("/v2/team/app/manifests/tmp"))
        .send()
        .await
        .unwrap();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": child_digest, "size": child.len(),
                       "platform": {"os": "linux", "architecture": "amd64"}}],
    }))
    .unwrap();
    let r = reg.put_manifest("team/app", "v2", OCI_INDEX, &index).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = reg
        .client
        .delete(reg.url(&format!("/v2/team/app/manifests/{child_digest}")))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["errors"][0]["detail"]["tag"], "v2");
    assert_eq!(
        reg.get(&format!("/v2/team/app/manifests/{child_digest}"))
            .await
            .status(),
        StatusCode::OK
    );
    let _ = (m1, d1, image_manifest);

    // Without a policy: the error names the tag; tags, manifests, blobs deletes all.
    let (_, d) = reg.push_image("scratch/app", "latest", "three").await;
    let layer3 = crate::common::sha256(b"layer of three");
    let r = reg
        .client
        .delete(reg.url(&format!("/v2/scratch/app/blobs/{layer3}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["detail"]["tag"], "latest");
    assert!(body["errors"][0]["detail"]["policy"].is_null());
    for path in [
        "/v2/scratch/app/manifests/latest".to_owned(),
        format!("/v2/scratch/app/manifests/{d}"),
        format!("/v2/scratch/app/blobs/{layer3}"),
    ] {
        let r = reg.client.delete(reg.url(&path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED, "{path}");
    }
}

/// An upload never written to finishes as the empty blob; a manifest sent as a type
/// that is not a manifest type is refused.
#[tokio::test]
async fn an_empty_upload_is_the_empty_blob_and_manifests_need_their_type() {
    let reg = TestRegistry::start();
    let empty = crate::common::sha256(b"");
    let loc = reg.open_upload("team/api").await;
    let r = reg
        .client
        .put(reg.url(&format!("{loc}?digest={empty}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = reg.head(&format!("/v2/team/api/blobs/{empty}")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-length"), Some("0"));

    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let c = reg.push_blob("team/api", config).await;
    let m = crate::common::image_manifest((&c, config.len()), &[]);
    let r = reg.put_manifest("team/api", "v1", "text/plain", &m).await;
    assert_eq!(
        crate::common::error_of(r).await,
        (StatusCode::BAD_REQUEST, "MANIFEST_INVALID".to_owned())
    );
    assert_eq!(
        reg.get("/v2/team/api/manifests/v1").await.status(),
        StatusCode::NOT_FOUND
    );
}

/// A PATCH cut off part way leaves no more bytes on disk than were acknowledged.
#[tokio::test]
async fn a_chunk_cut_off_part_way_is_cut_back_at_once() {
    let reg = TestRegistry::start();
    let loc = reg.open_upload("team/api").await;
    let id = loc.rsplit('/').next().unwrap().to_owned();
    let r = reg
        .client
        .patch(reg.url(&loc))
        .body(crate::common::pattern(1 << 20, 1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    // 9 MiB of a declared 10, then the body fails.
    let parts = (0..9)
        .map(|i| Ok::<_, std::io::Error>(crate::common::pattern(1 << 20, i)))
        .chain(std::iter::once(Err(std::io::Error::other("cut"))));
    let r = reg
        .client
        .patch(reg.url(&loc))
        .header("content-length", (10u64 << 20).to_string())
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            parts,
        )))
        .send()
        .await;
    assert!(r.is_err() || !r.unwrap().status().is_success());
    let file = reg.data.join("uploads").join(&id);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let len = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        if len == 1 << 20 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the upload file holds {len} bytes, 1 MiB was acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = reg.get(&loc).await;
    assert_eq!(header(&r, "range"), Some("0-1048575"));
}

/// A tmpfs of `mib` MiB mounted for a test, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(mib: u32) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs to fill its disk and must run as root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk { dir }
    }

    fn fill(&self) -> std::path::PathBuf {
        let filler = self.dir.path().join("filler");
        let _ = std::process::Command::new("dd")
            .args(["if=/dev/zero", "bs=1M", "count=1000"])
            .arg(format!("of={}", filler.display()))
            .stderr(std::process::Stdio::null())
            .status();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// A full disk: writes answer 507 with a message a user acts on, and change nothing;
/// a login whose audit row cannot be written is refused; all works again once there
/// is room.
#[tokio::test]
async fn a_full_disk_is_said_plainly_and_fails_closed() {
    let disk = SmallDisk::mount(48);
    let data = disk.dir.path().join("data");
    let reg = TestRegistry::start_tuned_in(&data, |_| {});
    reg.push_image("team/api", "v1", "before").await;
    let filler = disk.fill();

    let blob = crate::common::pattern(4 << 20, 5);
    let digest = crate::common::sha256(&blob);
    let r = reg
        .client
        .post(reg.url(&format!("/v2/team/api/blobs/uploads/?digest={digest}")))
        .body(blob.clone())
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{body}");
    assert_eq!(body["errors"][0]["code"], "UNKNOWN");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("storage is full"),
        "{body}"
    );
    // A login that cannot be audited gets no token.
    let r = token(
        &reg,
        &client_as("admin", crate::common::ADMIN_PASSWORD),
        &[],
    )
    .await;
    assert!(
        !r.status().is_success(),
        "a login was answered without its audit row"
    );
    // Nothing was changed: no upload rows, no blob.
    std::fs::remove_file(&filler).unwrap();
    let rows: i64 = rusqlite::Connection::open(data.join("meta.db"))
        .unwrap()
        .query_row("SELECT count(*) FROM uploads", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 0, "a failed write left upload rows");
    assert_eq!(
        reg.head(&format!("/v2/team/api/blobs/{digest}"))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    // With room again, the same push works and what was there is intact.
    let r = reg
        .client
        .post(reg.url(&format!("/v2/team/api/blobs/uploads/?digest={digest}")))
        .body(blob)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        reg.get("/v2/team/api/manifests/v1").await.status(),
        StatusCode::OK
    );
    assert_eq!(
        token(
            &reg,
            &client_as("admin", crate::common::ADMIN_PASSWORD),
            &[]
        )
        .await
        .status(),
        StatusCode::OK
    );
    drop(reg);
}

// ---- logs, files and schemes ----

/// The access log has one line per request, pulls included: method, path, status,
/// bytes, duration, user, credential, client.
#[tokio::test]
async fn the_access_log_records_every_request_with_its_credential() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let l = log.clone();
    let reg = TestRegistry::start_tuned(move |c| {
        c.access_log = l.to_str().unwrap().to_owned();
        c.access_log_format = wharf::config::AccessLogFormat::Json;
    });
    let (m, _) = reg.push_image("team/api", "v1", "logged").await;
    let tok = create_token(&reg, "admin", "repository:team/*:pull", "1d");
    let tok_id = token_list(&reg, "admin")[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = client_as("admin", &tok)
        .get(reg.url("/v2/team/api/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    reg.anon
        .get(reg.url("/v2/team/api/manifests/v1"))
        .send()
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let lines: Vec<Value> = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines
            .iter()
            .filter(|l| l["path"] == "/v2/team/api/manifests/v1")
            .count()
            >= 3
        {
            break lines;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let pull = lines
        .iter()
        .find(|l| l["method"] == "GET" && l["credential"] == tok_id.as_str())
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!(pull["status"], 200);
    assert_eq!(pull["user"], "admin");
    assert_eq!(pull["client"], "127.0.0.1");
    assert_eq!(pull["bytes"], m.len());
    assert!(pull["duration_ms"].is_number());
    assert!(lines.iter().any(|l| l["status"] == 401
        && l["user"].is_null()
        && l["path"] == "/v2/team/api/manifests/v1"));
    assert!(
        lines
            .iter()
            .any(|l| l["method"] == "PUT" && l["credential"] == "password")
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&log).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "the access log is private");
}

/// The data directory and everything in it is private; one left readable by others is
/// put right at start, with a log line.
#[tokio::test]
async fn the_data_directory_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let reg = TestRegistry::start();
    reg.push_image("team/api", "v1", "private").await;
    assert_eq!(mode(&reg.data), 0o700);
    assert_eq!(mode(&reg.data.join("meta.db")), 0o600);
    for f in reg.blob_files() {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
        assert_eq!(mode(f.parent().unwrap()), 0o700);
    }
    let data = reg.data.clone();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("data");
    reg.stop_keeping(&copy);
    // Opened up by hand (or by an older version), then started again.
    for e in walk(&copy) {
        let m = if e.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&e, std::fs::Permissions::from_mode(m)).unwrap();
    }
    let p = crate::common::Process::start(&copy);
    let reg = TestRegistry::attach(&p.base, &copy);
    assert_eq!(
        reg.get("/v2/team/api/manifests/v1").await.status(),
        StatusCode::OK
    );
    for e in walk(&copy) {
        let want = if e.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode(&e), want, "{}", e.display());
    }
    let mut p = p;
    let _ = p.child.kill();
    let _ = p.child.wait();
    let err = p.log();
    assert!(err.contains("readable by other users"), "{err}");
    let _ = data;
}

fn walk(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![root.to_owned()];
    let mut i = 0;
    while i < out.len() {
        if out[i].is_dir() {
            for e in std::fs::read_dir(&out[i]).unwrap() {
                out.push(e.unwrap().path());
            }
        }
        i += 1;
    }
    out
}

/// The `Bearer` scheme is matched without regard to case, as HTTP says.
#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let reg = TestRegistry::start();
    reg.push_image("team/api", "v1", "x").await;
    let r = token(&reg, &reg.client, &["repository:team/api:pull"]).await;
    let jwt = r.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    for scheme in ["Bearer", "bearer", "BEARER", "BeArEr"] {
        let r = reg
            .anon
            .get(reg.url("/v2/team/api/manifests/v1"))
            .header("authorization", format!("{scheme} {jwt}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{scheme}");
    }
}
