//! Access control over HTTP: challenges, the token endpoint, 401 versus 403, access
//! tokens and their scopes, revocation, JWT checks, rate limits, visibility, audit.

use std::io::Write;
use std::process::Stdio;

use base64::Engine as _;
use reqwest::{Client, StatusCode};
use serde_json::Value;

use crate::common::{
    ADMIN_PASSWORD, Process, TestRegistry, add_user, bearer, claims_of, client_as, error_of,
    header, start_upload, token, wharf, wharf_cmd, wharf_fails, wharf_stdin,
};

#[tokio::test]
async fn anonymous_callers_are_challenged_and_repositories_are_private_by_default() {
    let reg = TestRegistry::start();
    reg.push_image("team/api", "v1", "x").await;
    let base = &reg.base;

    let r = reg.anon.get(reg.url("/v2/")).send().await.unwrap();
    assert_eq!(
        header(&r, "www-authenticate"),
        Some(format!("Bearer realm=\"{base}/token\",service=\"wharf\"").as_str())
    );
    assert_eq!(
        error_of(r).await,
        (StatusCode::UNAUTHORIZED, "UNAUTHORIZED".to_owned())
    );

    let r = reg
        .anon
        .get(reg.url("/v2/team/api/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(&r, "www-authenticate"),
        Some(
            format!(
                "Bearer realm=\"{base}/token\",service=\"wharf\",scope=\"repository:team/api:pull\""
            )
            .as_str()
        )
    );
    assert_eq!(error_of(r).await.0, StatusCode::UNAUTHORIZED);
    let r = reg
        .anon
        .post(reg.url("/v2/team/api/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert!(
        header(&r, "www-authenticate")
            .unwrap()
            .ends_with("scope=\"repository:team/api:pull,push\"")
    );
    // An anonymous token grants nothing on a private repository.
    let anon_bearer = bearer(&reg, &reg.anon, &["repository:team/api:pull"]).await;
    let r = anon_bearer
        .get(reg.url("/v2/team/api/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // The catalog shows an anonymous caller nothing private.
    let r: Value = reg
        .anon
        .get(reg.url("/v2/_catalog"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["repositories"], serde_json::json!([]));
    // Basic credentials straight on /v2/ work (curl -u).
    assert_eq!(
        reg.client
            .get(reg.url("/v2/"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let wrong = client_as("admin", "wrong password");
    let r = wrong.get(reg.url("/v2/")).send().await.unwrap();
    assert_eq!(error_of(r).await.1, "UNAUTHORIZED");
}

#[tokio::test]
async fn token_endpoint_get_and_oauth_post_with_refresh_tokens() {
    let reg = TestRegistry::start();
    let r = token(&reg, &reg.client, &["repository:team/api:pull,push"]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["token"], body["access_token"]);
    assert_eq!(body["expires_in"], 300);
    assert!(body["issued_at"].as_str().unwrap().ends_with('Z'));
    // Its claims name what was granted.
    let t = body["token"].as_str().unwrap();
    let claims: Value = claims_of(t);
    assert_eq!(claims["access"][0]["name"], "team/api");
    assert_eq!(
        claims["access"][0]["actions"],
        serde_json::json!(["pull", "push"])
    );

    let b = bearer(&reg, &reg.client, &["repository:team/api:pull,push"]).await;
    assert_eq!(
        start_upload(&reg, &b, "team/api").await,
        StatusCode::ACCEPTED
    );
    // The token covers only the repository it names.
    let r = b
        .post(reg.url("/v2/team/other/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(
        header(&r, "www-authenticate")
            .unwrap()
            .contains("error=\"insufficient_scope\"")
    );

    // OAuth2 form, as `docker login` sends it, with a refresh token.
    let form = [
        ("grant_type", "password"),
        ("username", "admin"),
        ("password", ADMIN_PASSWORD),
        ("service", "wharf"),
        ("client_id", "docker"),
        ("access_type", "offline"),
        ("scope", "repository:team/api:pull"),
    ];
    let body: Value = reg
        .anon
        .post(reg.url("/token"))
        .form(&form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["token_type"], "Bearer");
    let refresh = body["refresh_token"].as_str().unwrap().to_owned();
    let form = [
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh.as_str()),
        ("service", "wharf"),
        ("scope", "repository:team/api:pull"),
    ];
    let r = reg
        .anon
        .post(reg.url("/token"))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.json::<Value>().await.unwrap()["access_token"].is_string());

    // Bad input.
    let r = reg
        .anon
        .post(reg.url("/token"))
        .form(&[
            ("grant_type", "password"),
            ("username", "admin"),
            ("password", "nope"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(r).await,
        (StatusCode::UNAUTHORIZED, "UNAUTHORIZED".to_owned())
    );
    let r = reg
        .anon
        .post(reg.url("/token"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.0, StatusCode::BAD_REQUEST);
    let r = reg
        .anon
        .post(reg.url("/token"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", "wharf_aaaaaaaaaaaa_bogus"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = reg
        .client
        .get(reg.url("/token?service=another-registry"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // A password change ends earlier logins: refresh tokens and JWTs.
    wharf_stdin(
        &reg,
        &["user", "passwd", "admin", "--password-stdin"],
        "a brand new password",
    );
    let form = [
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh.as_str()),
        ("service", "wharf"),
    ];
    assert_eq!(
        reg.anon
            .post(reg.url("/token"))
            .form(&form)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        start_upload(&reg, &b, "team/api").await,
        StatusCode::UNAUTHORIZED
    );
    // The old password was just verified (and remembered), yet fails at once.
    let r = reg.client.get(reg.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let new = client_as("admin", "a brand new password");
    assert_eq!(
        new.get(reg.url("/v2/")).send().await.unwrap().status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn authenticated_but_not_allowed_is_403_denied() {
    let reg = TestRegistry::start();
    reg.push_image("team/api", "v1", "x").await;
    add_user(&reg, "bob", "bob's password");
    wharf(&reg, &["grant", "bob", "team/*", "pull"]);
    let bob = client_as("bob", "bob's password");

    assert_eq!(
        bob.get(reg.url("/v2/team/api/manifests/v1"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let (s, code) = error_of(
        bob.post(reg.url("/v2/team/api/blobs/uploads/"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, code.as_str()), (StatusCode::FORBIDDEN, "DENIED"));
    let (s, code) = error_of(
        bob.delete(reg.url("/v2/team/api/manifests/v1"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, code.as_str()), (StatusCode::FORBIDDEN, "DENIED"));
    // Bob's own namespace is his.
    assert_eq!(
        start_upload(&reg, &bob, "bob/tool").await,
        StatusCode::ACCEPTED
    );

    // A token asked for pull,push gets only pull; pushing with it is 403, not a loop of 401s.
    let body: Value = token(&reg, &bob, &["repository:team/api:pull,push"])
        .await
        .json()
        .await
        .unwrap();
    let claims: Value = claims_of(body["token"].as_str().unwrap());
    assert_eq!(claims["access"][0]["actions"], serde_json::json!(["pull"]));
    let b = bearer(&reg, &bob, &["repository:team/api:pull,push"]).await;
    let (s, code) = error_of(
        b.post(reg.url("/v2/team/api/blobs/uploads/"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, code.as_str()), (StatusCode::FORBIDDEN, "DENIED"));

    // Bob's catalog lists only what he may pull.
    reg.push_image("other/secret", "v1", "y").await;
    let cat: Value = bob
        .get(reg.url("/v2/_catalog"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cat["repositories"], serde_json::json!(["team/api"]));
    // A removed grant applies at once.
    wharf(&reg, &["grant", "bob", "team/*", "none"]);
    assert_eq!(
        bob.get(reg.url("/v2/team/api/manifests/v1"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn access_tokens_are_scoped_revocable_and_never_exceed_their_owner() {
    let reg = TestRegistry::start();
    reg.push_image("team/api", "v1", "x").await;
    reg.push_image("other/api", "v1", "y").await;
    let token_str = wharf(
        &reg,
        &[
            "token",
            "create",
            "--user",
            "admin",
            "--scope",
            "repository:team/*:pull",
            "--expires",
            "90d",
            "--name",
            "deploy",
        ],
    );
    let tok = token_str.trim();
    assert!(tok.starts_with("wharf_"), "{tok}");
    let t = client_as("admin", tok);

    assert_eq!(
        t.get(reg.url("/v2/team/api/manifests/v1"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    // A pull token cannot push or delete.
    assert_eq!(
        start_upload(&reg, &t, "team/api").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        t.delete(reg.url("/v2/team/api/manifests/v1"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::FORBIDDEN
    );
    // Nor reach outside team/*, by any spelling.
    for path in [
        "/v2/other/api/manifests/v1",
        "/v2/team/manifests/v1",
        "/v2/teamx/api/manifests/v1",
    ] {
        assert_eq!(
            t.get(reg.url(path)).send().await.unwrap().status(),
            StatusCode::FORBIDDEN,
            "{path}"
        );
    }
    for path in [
        "/v2/Team/api/manifests/v1",
        "/v2/team%2F..%2Fother/api/manifests/v1",
        "/v2/team./api/manifests/v1",
        "/v2/team/api./manifests/v1",
    ] {
        assert_eq!(
            t.get(reg.url(path)).send().await.unwrap().status(),
            StatusCode::BAD_REQUEST,
            "{path}"
        );
    }
    let raw = {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(reg.host()).unwrap();
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("admin:{tok}"));
        write!(s, "GET /v2/team/../other/api/manifests/v1 HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {basic}\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    // Through the token endpoint too: it asks for push, gets pull only.
    let body: Value = token(
        &reg,
        &t,
        &["repository:team/api:pull,push", "repository:other/api:pull"],
    )
    .await
    .json()
    .await
    .unwrap();
    let claims: Value = claims_of(body["token"].as_str().unwrap());
    assert_eq!(claims["access"][0]["actions"], serde_json::json!(["pull"]));
    assert_eq!(claims["access"][1]["actions"], serde_json::json!([]));

    // Listed with name, scopes, created, last used, expiry.
    let list: Value = serde_json::from_str(&wharf(&reg, &["token", "list", "--json"])).unwrap();
    let entry = &list[0];
    assert_eq!(entry["name"], "deploy");
    assert_eq!(
        entry["scopes"],
        serde_json::json!(["repository:team/*:pull"])
    );
    assert!(entry["last_used"].is_string());
    assert!(entry["expires"].is_string());
    assert_eq!(entry["status"], "active");
    assert!(
        !wharf(&reg, &["token", "list"]).contains(tok.rsplit('_').next().unwrap()),
        "the secret must never be listed"
    );

    // Revocation applies at once, to the token and to JWTs obtained with it earlier.
    let jwt_client = bearer(&reg, &t, &["repository:team/api:pull"]).await;
    assert_eq!(
        jwt_client
            .get(reg.url("/v2/team/api/manifests/v1"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let id = entry["id"].as_str().unwrap();
    wharf(&reg, &["token", "revoke", id]);
    assert_eq!(
        t.get(reg.url("/v2/team/api/manifests/v1"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        jwt_client
            .get(reg.url("/v2/team/api/manifests/v1"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    wharf_fails(&reg, &["token", "revoke", id]);
}

#[tokio::test]
async fn token_scopes_beyond_the_owner_and_bad_cli_input_are_refused() {
    let reg = TestRegistry::start();
    add_user(&reg, "carol", "carol's password");
    wharf(&reg, &["grant", "carol", "team/*", "pull"]);
    let err = wharf_fails(
        &reg,
        &[
            "token",
            "create",
            "--user",
            "carol",
            "--scope",
            "repository:team/*:pull,push",
            "--name",
            "x",
        ],
    );
    assert!(err.contains("exceeds"), "{err}");
    let err = wharf_fails(
        &reg,
        &[
            "token",
            "create",
            "--user",
            "carol",
            "--scope",
            "repository:*:pull",
            "--name",
            "x",
        ],
    );
    assert!(err.contains("exceeds"), "{err}");
    wharf(
        &reg,
        &[
            "token",
            "create",
            "--user",
            "carol",
            "--scope",
            "repository:team/api:pull",
            "--name",
            "ok",
        ],
    );
    wharf(
        &reg,
        &[
            "token",
            "create",
            "--user",
            "carol",
            "--scope",
            "repository:carol/*:pull,push,delete",
            "--name",
            "own",
        ],
    );
    for args in [
        &[
            "token",
            "create",
            "--user",
            "carol",
            "--scope",
            "team/*:pull",
            "--name",
            "x",
        ][..],
        &[
            "token",
            "create",
            "--user",
            "carol",
            "--scope",
            "repository:team/*:fly",
            "--name",
            "x",
        ],
        &[
            "token",
            "create",
            "--user",
            "carol",
            "--scope",
            "repository:team/*:pull",
            "--expires",
            "soon",
            "--name",
            "x",
        ],
        &[
            "token",
            "create",
            "--user",
            "nobody",
            "--scope",
            "repository:nobody/*:pull",
            "--name",
            "x",
        ],
        &["user", "add", "Bad/Name"],
        &["user", "add", "carol"],
        &["user", "remove", "nobody"],
        &["grant", "carol", "team/../x", "pull"],
        &["grant", "carol", "team/*", "fly"],
        &["grant", "nobody", "team/*", "pull"],
        &["repo", "visibility", "team/*", "sideways"],
    ] {
        wharf_fails(&reg, args);
    }
    // A short password is refused.
    let out = {
        let mut child = wharf_cmd(&reg.data)
            .args(["user", "add", "dave", "--password-stdin"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"short").unwrap();
        child.wait_with_output().unwrap()
    };
    assert!(!out.status.success());
    let users = wharf(&reg, &["user", "list"]);
    assert!(
        users.contains("carol") && !users.contains("dave"),
        "{users}"
    );
}

#[tokio::test]
async fn public_repositories_pull_anonymously_but_never_push() {
    let reg = TestRegistry::start();
    let (m, _) = reg.push_image("pub/tool", "v1", "x").await;
    reg.push_image("team/api", "v1", "y").await;
    wharf(&reg, &["repo", "visibility", "pub/*", "public"]);

    let r = reg
        .anon
        .get(reg.url("/v2/pub/tool/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap(), m);
    let b = bearer(&reg, &reg.anon, &["repository:pub/tool:pull,push"]).await;
    assert_eq!(
        b.get(reg.url("/v2/pub/tool/manifests/v1"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        start_upload(&reg, &b, "pub/tool").await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        start_upload(&reg, &reg.anon, "pub/tool").await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        reg.anon
            .get(reg.url("/v2/team/api/manifests/v1"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    let cat: Value = reg
        .anon
        .get(reg.url("/v2/_catalog"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cat["repositories"], serde_json::json!(["pub/tool"]));
    // The most specific rule wins.
    wharf(&reg, &["repo", "visibility", "pub/tool", "private"]);
    assert_eq!(
        reg.anon
            .get(reg.url("/v2/pub/tool/manifests/v1"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
}

/// Forged, foreign, expired and algorithm-swapped JWTs are refused.
#[tokio::test]
async fn bad_jwts_are_refused() {
    use wharf::auth::jwt::{AccessEntry, Claims, ISSUER, sign};
    let reg = TestRegistry::start();
    reg.push_image("team/api", "v1", "x").await;
    let key: Vec<u8> = rusqlite::Connection::open(reg.data.join("meta.db"))
        .unwrap()
        .query_row(
            "SELECT value FROM settings WHERE name = 'jwt_key'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let now = wharf::auth::now_secs();
    // The admin's generation, as a real token carries it.
    let real: Value = token(&reg, &reg.client, &[]).await.json().await.unwrap();
    let generation = claims_of(real["token"].as_str().unwrap())["gen"]
        .as_i64()
        .unwrap();
    let base = Claims {
        iss: ISSUER.into(),
        sub: "admin".into(),
        aud: "wharf".into(),
        exp: now + 300,
        nbf: now,
        iat: now,
        jti: "x".into(),
        access: vec![AccessEntry {
            kind: "repository".into(),
            name: "team/api".into(),
            actions: vec!["pull".into()],
        }],
        generation,
        tid: None,
    };
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let payload = b64(&serde_json::to_vec(&base).unwrap());
    let mut tokens = vec![
        sign(&key, &base), // control: accepted
        format!("{}.{payload}.", b64(br#"{"alg":"none","typ":"JWT"}"#)),
        format!(
            "{}.{payload}.{}",
            b64(br#"{"alg":"RS256"}"#),
            sign(&key, &base).rsplit('.').next().unwrap()
        ),
        sign(b"0123456789abcdef0123456789abcdef", &base),
    ];
    for change in [
        |c: &mut Claims| c.aud = "another-registry".into(),
        |c: &mut Claims| c.iss = "someone".into(),
        |c: &mut Claims| c.exp -= 1000,
        |c: &mut Claims| c.generation = 99,
        |c: &mut Claims| c.sub = "ghost".into(),
    ] {
        let mut c = base.clone();
        change(&mut c);
        tokens.push(sign(&key, &c));
    }
    for (i, t) in tokens.iter().enumerate() {
        let r = reg
            .anon
            .get(reg.url("/v2/team/api/manifests/v1"))
            .bearer_auth(t)
            .send()
            .await
            .unwrap();
        let want = if i == 0 {
            StatusCode::OK
        } else {
            StatusCode::UNAUTHORIZED
        };
        assert_eq!(r.status(), want, "token {i}");
    }
}

#[tokio::test]
async fn failed_logins_are_rate_limited_per_client_without_locking_out_the_user() {
    let reg = TestRegistry::start();
    let from = |ip: &str| {
        Client::builder()
            .local_address(ip.parse::<std::net::IpAddr>().unwrap())
            .build()
            .unwrap()
    };
    let attacker = from("127.0.0.2");
    let mut last = None;
    for _ in 0..6 {
        let r = attacker
            .get(reg.url("/v2/"))
            .basic_auth("admin", Some("guess"))
            .send()
            .await
            .unwrap();
        last = Some((r.status(), header(&r, "retry-after").map(str::to_owned), r));
    }
    let (status, retry, r) = last.unwrap();
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(retry.unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(error_of(r).await.1, "TOOMANYREQUESTS");
    // Even the right password is refused from there, for now...
    let r = attacker
        .get(reg.url("/v2/"))
        .basic_auth("admin", Some(ADMIN_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    // ...while the real user elsewhere logs in.
    let r = from("127.0.0.3")
        .get(reg.url("/v2/"))
        .basic_auth("admin", Some(ADMIN_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

/// Two servers on one database (replicas behind a load balancer): an attacker
/// alternating between them gets the guesses one server would allow, not twice as many.
#[tokio::test]
async fn failed_logins_are_counted_across_processes_on_one_database() {
    let a = TestRegistry::start();
    let b = TestRegistry::start_tuned_in(&a.data, |_| {});
    // The shared windows are whole minutes: keep the attempts within one.
    let into_minute = wharf::time::now_ms() % 60_000;
    if into_minute > 45_000 {
        tokio::time::sleep(std::time::Duration::from_millis(
            (60_100 - into_minute) as u64,
        ))
        .await;
    }
    let attacker = Client::builder()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let guess = |reg: &TestRegistry| {
        attacker
            .get(reg.url("/v2/"))
            .basic_auth("admin", Some("guess"))
            .send()
    };
    // Five failures, the limit per (client, user), split between the two.
    for reg in [&a, &b, &a, &b, &a] {
        assert_eq!(guess(reg).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    }
    // Either one now refuses the sixth, though neither saw five itself.
    for reg in [&b, &a] {
        let r = guess(reg).await.unwrap();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        let wait: u64 = header(&r, "retry-after").unwrap().parse().unwrap();
        assert!((1..=60).contains(&wait), "{wait}");
    }
    // The admin elsewhere is not locked out.
    let r = b.client.get(b.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn audit_log_records_who_did_what_where_from() {
    let reg = TestRegistry::start();
    reg.push_image("team/api", "v1", "x").await;
    reg.client
        .delete(reg.url("/v2/team/api/manifests/v1"))
        .send()
        .await
        .unwrap();
    client_as("admin", "wrong")
        .get(reg.url("/v2/"))
        .send()
        .await
        .unwrap();
    token(&reg, &reg.client, &["repository:team/api:pull"]).await;
    add_user(&reg, "erin", "erin's password");
    wharf(&reg, &["grant", "erin", "team/*", "push"]);
    wharf(&reg, &["repo", "visibility", "team/*", "public"]);
    wharf(
        &reg,
        &[
            "token",
            "create",
            "--user",
            "erin",
            "--scope",
            "repository:team/*:push",
            "--name",
            "ci",
        ],
    );
    // Refused requests are written once a second.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let log = wharf(&reg, &["audit", "--limit", "100"]);
    for (action, needle) in [
        ("push", "team/api"),
        ("delete.tag", "team/api"),
        ("login.failed", "127.0.0.1"),
        ("login", "admin"),
        ("user.create", "erin"),
        ("grant", "erin push"),
        ("repo.visibility", "public"),
        ("token.create", "ci for erin"),
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains(&format!(" {action} ")) && l.contains(needle)),
            "{action} {needle} missing:\n{log}"
        );
    }
}

/// The first start makes `admin` with a random password, printed once; secrets never
/// appear in logs.
#[tokio::test]
async fn first_start_prints_a_random_admin_password_once_and_logs_no_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let read_log = |p: &mut Process| {
        let pid = p.child.id().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        p.child.wait().unwrap();
        p.log()
    };
    let mut p = Process::start_with(&data, &[("WHARF_LOG", "debug")], &["WHARF_ADMIN_PASSWORD"]);
    // Give the first-start line time to be written before stopping.
    let c = client_as("admin", "not it");
    let _ = c.get(format!("{}/v2/", p.base)).send().await.unwrap();
    let log = read_log(&mut p);
    let line = log
        .lines()
        .find(|l| l.contains("created user admin with password"))
        .expect(&log);
    let password = line
        .split("password ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    assert!(password.len() >= 16);

    let mut p = Process::start_with(&data, &[("WHARF_LOG", "debug")], &["WHARF_ADMIN_PASSWORD"]);
    let admin = client_as("admin", &password);
    assert_eq!(
        admin
            .get(format!("{}/v2/", p.base))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let r = admin
        .get(format!("{}/token?scope=repository:admin/x:pull", p.base))
        .send()
        .await
        .unwrap();
    let jwt = r.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let wrong = client_as("admin", "a wrong secret value");
    let r = wrong.get(format!("{}/v2/", p.base)).send().await.unwrap();
    let body = r.text().await.unwrap();
    assert!(!body.contains("a wrong secret value"));
    let log = read_log(&mut p);
    assert!(!log.contains("created user admin"), "printed again:\n{log}");
    for secret in [password.as_str(), jwt.as_str(), "a wrong secret value"] {
        assert!(!log.contains(secret), "secret in the log:\n{log}");
    }
}

#[tokio::test]
async fn an_expired_access_token_is_refused() {
    use wharf::store::meta::auth::{AuthMeta, TokenRecord};
    let reg = TestRegistry::start();
    reg.push_image("team/api", "v1", "x").await;
    let (_, meta) = wharf::store::open_local_backends(&reg.data).unwrap();
    let now_ms = wharf::auth::now_secs() * 1000;
    let mut tokens = Vec::new();
    for (name, expires_at) in [("live", now_ms + 60_000), ("stale", now_ms - 1)] {
        let (id, token, hash) = wharf::auth::secret::new_token();
        meta.token_create(&TokenRecord {
            id,
            user_name: "admin".into(),
            name: name.into(),
            kind: "access".into(),
            secret_hash: hash,
            scopes: vec!["repository:team/*:pull".into()],
            created_at: now_ms - 120_000,
            last_used_at: None,
            expires_at: Some(expires_at),
            revoked_at: None,
        })
        .await
        .unwrap();
        tokens.push(token);
    }
    let live = client_as("admin", tokens[0].expose());
    let stale = client_as("admin", tokens[1].expose());
    assert_eq!(
        live.get(reg.url("/v2/team/api/manifests/v1"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let (s, code) = error_of(
        stale
            .get(reg.url("/v2/team/api/manifests/v1"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, code.as_str()),
        (StatusCode::UNAUTHORIZED, "UNAUTHORIZED")
    );
    assert_eq!(
        token(&reg, &stale, &["repository:team/api:pull"])
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    let list = wharf(&reg, &["token", "list"]);
    assert!(
        list.lines()
            .any(|l| l.contains("stale") && l.contains("expired")),
        "{list}"
    );
}
