//! Hostile load: slow and stalled bodies, floods of connections and uploads, requests
//! hyper refuses, injected headers, and what stays bounded (threads, descriptors,
//! memory) while it lasts. Timings are never asserted; bounds and outcomes are.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::common::{
    ADMIN_PASSWORD, Process, TestRegistry, admin_client, error_of, header, proc_status,
};

fn basic() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("admin:{ADMIN_PASSWORD}"))
}

/// One answer read off a raw connection: status, headers (lowercased), body.
fn read_answer(r: &mut BufReader<TcpStream>) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no status line: {line:?}"))
        .parse()
        .unwrap();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap();
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map_or(0, |(_, v)| v.parse().unwrap());
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).unwrap();
    (status, headers, body)
}

fn has(headers: &[(String, String)], k: &str, v: &str) -> bool {
    headers
        .iter()
        .any(|(hk, hv)| hk == k && hv.eq_ignore_ascii_case(v))
}

/// A request rejected before its body was read leaves the connection usable: a 416
/// PATCH whose body is still arriving, then a 401 PUT with a body, then a POST, all on
/// one kept-alive connection.
#[tokio::test]
async fn a_request_refused_before_its_body_keeps_the_connection_usable() {
    let reg = TestRegistry::start();
    let loc = reg.open_upload("team/api").await;
    let host = reg.host().to_owned();
    let auth = basic();
    tokio::task::spawn_blocking(move || {
        let s = TcpStream::connect(&host).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        // Out of order: starts at 100 of an empty upload. Half the body now, half later.
        let body = vec![b'x'; 200_000];
        write!(
            w,
            "PATCH {loc} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Basic {auth}\r\nContent-Range: 100-{}\r\nContent-Length: {}\r\n\r\n",
            100 + body.len() - 1,
            body.len()
        )
        .unwrap();
        w.write_all(&body[..100_000]).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        w.write_all(&body[100_000..]).unwrap();
        let (status, headers, _) = read_answer(&mut r);
        assert_eq!(status, 416);
        assert!(!has(&headers, "connection", "close"), "{headers:?}");
        // Anonymous PUT with a body: 401, body drained.
        write!(
            w,
            "PUT /v2/team/api/manifests/x HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5000\r\n\r\n"
        )
        .unwrap();
        w.write_all(&[b'{'; 5000]).unwrap();
        let (status, headers, _) = read_answer(&mut r);
        assert_eq!(status, 401);
        assert!(!has(&headers, "connection", "close"), "{headers:?}");
        // The same connection still works.
        write!(
            w,
            "POST /v2/team/api/blobs/uploads/ HTTP/1.1\r\nHost: {host}\r\nAuthorization: Basic {auth}\r\nContent-Length: 0\r\n\r\n"
        )
        .unwrap();
        let (status, _, _) = read_answer(&mut r);
        assert_eq!(status, 202);
    })
    .await
    .unwrap();
}

/// Requests hyper refuses by itself get the OCI JSON error too, and a Host that is not
/// a host[:port] is refused instead of going into the challenge.
#[tokio::test]
async fn malformed_requests_and_injected_hosts_get_json_errors() {
    let reg = TestRegistry::start();
    let host = reg.host().to_owned();
    tokio::task::spawn_blocking(move || {
        let ask = |req: String| {
            let mut s = TcpStream::connect(&host).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(req.as_bytes()).unwrap();
            read_answer(&mut BufReader::new(s))
        };
        for (req, want) in [
            (format!("GET /v2/ HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"), 400),
            (format!("GET /v2/ HTTP/1.1\r\nHost: {host}\r\nContent-Length: -1\r\n\r\n"), 400),
            (format!("GET /{} HTTP/1.1\r\nHost: {host}\r\n\r\n", "a".repeat(70_000)), 414),
        ] {
            let (status, headers, body) = ask(req);
            assert_eq!(status, want);
            assert!(has(&headers, "content-type", "application/json"), "{headers:?}");
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert!(v["errors"][0]["code"].is_string(), "{v}");
            assert!(v["errors"][0]["message"].as_str().unwrap().len() > 10);
        }
        for bad in ["a\"b,realm=\"http://evil", "evil.example/path", "x y"] {
            let (status, headers, body) =
                ask(format!("GET /v2/ HTTP/1.1\r\nHost: {bad}\r\n\r\n"));
            assert_eq!(status, 400, "{bad}");
            assert!(
                !headers.iter().any(|(k, v)| k == "www-authenticate" && v.contains("evil")),
                "{headers:?}"
            );
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["errors"][0]["code"], "UNSUPPORTED");
        }
        // A good Host is used as it is.
        let (status, headers, _) = ask(format!("GET /v2/ HTTP/1.1\r\nHost: {host}\r\n\r\n"));
        assert_eq!(status, 401);
        assert!(has(
            &headers,
            "www-authenticate",
            &format!("Bearer realm=\"http://{host}/token\",service=\"wharf\"")
        ));
    })
    .await
    .unwrap();
}

/// A body that trickles in is cut off with 408, for an authenticated upload and for the
/// unauthenticated token endpoint; nothing past what was acknowledged is kept.
#[tokio::test]
async fn trickled_bodies_are_cut_off() {
    let reg = TestRegistry::start_tuned(|c| {
        c.limits.body_idle_timeout = Duration::from_secs(1);
        c.limits.anonymous_body_timeout = Duration::from_millis(500);
    });
    let trickle = || {
        let s = futures_util::stream::unfold(0u32, |i| async move {
            if i == 100 {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            Some((
                Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"x")),
                i + 1,
            ))
        });
        reqwest::Body::wrap_stream(s)
    };
    let loc = reg.open_upload("team/api").await;
    let r = reg
        .client
        .patch(reg.url(&loc))
        .header("content-length", "100")
        .body(trickle())
        .send()
        .await;
    if let Ok(r) = r {
        assert_eq!(r.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(header(&r, "connection"), Some("close"));
    }
    assert_eq!(header(&reg.get(&loc).await, "range"), Some("0-0"));
    let r = reg
        .anon
        .post(reg.url("/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("content-length", "100")
        .body(trickle())
        .send()
        .await;
    if let Ok(r) = r {
        assert_eq!(
            r.status(),
            StatusCode::REQUEST_TIMEOUT,
            "the token form is cut off"
        );
    }
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// A metric's value from `/metrics`.
async fn metric(base: &str, name: &str) -> u64 {
    let text = admin_client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
        .parse()
        .unwrap()
}

/// Stalled uploads hold no threads and no upload memory; past `max_uploads` uploads
/// and past `max_connections` connections get a clear 503; the open-file limit is
/// raised; and memory comes back after a burst of pushes.
#[tokio::test]
async fn stalled_uploads_and_connection_floods_stay_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("wharf.toml");
    std::fs::write(
        &config,
        "[limits]\nmax_uploads = 20\nmax_connections = 60\nbody_idle_timeout = \"8s\"\n",
    )
    .unwrap();
    let p = Process::start_with(
        &dir.path().join("data"),
        &[("WHARF_CONFIG", config.to_str().unwrap())],
        &[],
    );
    let pid = p.child.id();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let nofile: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        nofile[3], nofile[4],
        "the soft open-file limit is raised to the hard one"
    );

    let client = admin_client();
    assert_eq!(
        client
            .get(format!("{}/v2/", p.base))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let (threads0, fds0, rss0) = (
        proc_status(pid, "Threads:"),
        fds(pid),
        proc_status(pid, "VmRSS:"),
    );

    // 20 uploads that send 300 KiB and stall.
    let mut stalled = Vec::new();
    for _ in 0..20 {
        let r = client
            .post(format!("{}/v2/team/api/blobs/uploads/", p.base))
            .send()
            .await
            .unwrap();
        let loc = header(&r, "location").unwrap().to_owned();
        let url = format!("{}{loc}", p.base);
        let c = client.clone();
        stalled.push(tokio::spawn(async move {
            c.patch(url)
                .header("content-length", (10u64 << 20).to_string())
                .body(crate::common::stalling_body(vec![7u8; 300 << 10]))
                .send()
                .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(metric(&p.base, "wharf_uploads_writing").await, 20);
    assert_eq!(
        metric(&p.base, "wharf_upload_buffers_in_use").await,
        0,
        "a stalled upload holds no buffer"
    );
    let threads = proc_status(pid, "Threads:");
    assert!(
        threads <= threads0 + 8,
        "threads {threads0} -> {threads} for 20 stalled uploads"
    );
    let open = fds(pid);
    assert!(open <= fds0 + 3 * 20 + 8, "descriptors {fds0} -> {open}");
    // The 21st upload gets a clear 503.
    let r = client
        .post(format!(
            "{}/v2/team/api/blobs/uploads/?digest={}",
            p.base,
            crate::common::sha256(b"one more")
        ))
        .body(&b"one more"[..])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(header(&r, "retry-after").is_some());
    assert!(error_of(r).await.1 == "TOOMANYREQUESTS");
    for s in stalled {
        s.abort();
    }

    // Connections: past 60 open, new ones are answered 503 and closed.
    let host = p.base.trim_start_matches("http://").to_owned();
    let (refused_at, status, body) = tokio::task::spawn_blocking(move || {
        let mut idle = Vec::new();
        for i in 0..100 {
            let s = TcpStream::connect(&host).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let mut probe = [0u8; 1];
            match s.peek(&mut probe) {
                Ok(n) if n > 0 => {
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    let (status, _, body) = read_answer(&mut BufReader::new(s));
                    return (i, status, body);
                }
                _ => idle.push(s), // accepted: it waits for a request
            }
        }
        panic!("100 connections were all accepted past max_connections = 60");
    })
    .await
    .unwrap();
    assert!(
        refused_at >= 50,
        "refused after only {refused_at} connections"
    );
    assert_eq!(status, 503);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["errors"][0]["code"], "TOOMANYREQUESTS");

    // A burst of pushes, then memory comes back.
    let mut pushes = Vec::new();
    for i in 0..16u8 {
        let (c, base) = (client.clone(), p.base.clone());
        pushes.push(tokio::spawn(async move {
            let data = crate::common::pattern(8 << 20, i);
            let d = crate::common::sha256(&data);
            c.post(format!("{base}/v2/team/burst/blobs/uploads/?digest={d}"))
                .body(data)
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    let mut created = 0;
    for t in pushes {
        match t.await.unwrap() {
            StatusCode::CREATED => created += 1,
            StatusCode::SERVICE_UNAVAILABLE => {}
            other => panic!("{other}"),
        }
    }
    assert!(created > 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let rss = proc_status(pid, "VmRSS:");
        if rss <= rss0 + rss0 / 10 + 2048 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "RSS {rss0} KiB before, {rss} KiB 30 s after the burst"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// CPU seconds a process has used (user and system), from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// Anonymous catalog requests over 100 000 private repositories list only the public
/// ones, page by page, and each costs the server about as much as a page, not a scan of
/// every repository (the work is asserted as CPU time with a margin of 10 or more).
#[tokio::test]
async fn the_catalog_over_many_private_repositories_costs_a_page() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        // Create the database, then fill it directly: 100 000 private repositories, and
        // a few public ones among them.
        let p = Process::start(&data);
        drop(p);
        let db = rusqlite::Connection::open(data.join("meta.db")).unwrap();
        db.execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000)
             INSERT INTO repositories (name, created_at) SELECT printf('private/r%06d', i), 0 FROM n;
             INSERT INTO repositories (name, created_at) VALUES ('pub/a', 0), ('pub/b', 0), ('pub/c', 0), ('zz/open', 0);
             INSERT INTO manifests (repository, digest, media_type, size, content, created_at)
                 SELECT name, 'sha256:' || printf('%064d', 0), 'application/vnd.oci.image.manifest.v1+json', 2, x'7b7d', 0 FROM repositories;
             INSERT INTO visibility (pattern, public, updated_at) VALUES ('pub/*', 1, 0), ('zz/open', 1, 0);
             UPDATE auth_state SET generation = generation + 1;",
        )
        .unwrap();
    }
    let p = Process::start(&data);
    let anon = reqwest::Client::new();
    let get = |path: String| {
        let anon = anon.clone();
        async move {
            let r = anon.get(path).send().await.unwrap();
            let link = header(&r, "link").map(str::to_owned);
            (r.json::<Value>().await.unwrap(), link)
        }
    };
    let (all, _) = get(format!("{}/v2/_catalog", p.base)).await;
    assert_eq!(
        all["repositories"],
        serde_json::json!(["pub/a", "pub/b", "pub/c", "zz/open"])
    );
    let (page, link) = get(format!("{}/v2/_catalog?n=2", p.base)).await;
    assert_eq!(page["repositories"], serde_json::json!(["pub/a", "pub/b"]));
    assert!(link.unwrap().contains("last=pub%2Fb"));
    let (page, _) = get(format!("{}/v2/_catalog?n=2&last=pub/b", p.base)).await;
    assert_eq!(
        page["repositories"],
        serde_json::json!(["pub/c", "zz/open"])
    );

    let before = cpu_seconds(p.child.id());
    for _ in 0..100 {
        get(format!("{}/v2/_catalog?n=100", p.base)).await;
    }
    let used = cpu_seconds(p.child.id()) - before;
    assert!(
        used < 2.0,
        "100 anonymous catalog requests used {used:.2} CPU seconds of the server"
    );
}

/// One user's slow uploads cannot take every upload place: past `max_uploads_per_user`
/// theirs get 503, while others push on.
#[tokio::test]
async fn one_user_cannot_hold_every_upload_place() {
    let reg = TestRegistry::start_tuned(|c| {
        c.limits.max_uploads_per_user = 5;
        // The stalled bodies end soon after the test has what it needs.
        c.limits.body_idle_timeout = Duration::from_secs(2);
    });
    crate::common::add_user(&reg, "mallory", "mallory-password");
    let mallory = crate::common::client_as("mallory", "mallory-password");
    let mut stalled = Vec::new();
    for _ in 0..5 {
        let r = mallory
            .post(reg.url("/v2/mallory/x/blobs/uploads/"))
            .send()
            .await
            .unwrap();
        let url = reg.url(header(&r, "location").unwrap());
        let c = mallory.clone();
        stalled.push(tokio::spawn(async move {
            c.patch(url)
                .header("content-length", (10u64 << 20).to_string())
                .body(crate::common::stalling_body(vec![1u8; 1000]))
                .send()
                .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let d = crate::common::sha256(b"sixth");
    let r = mallory
        .post(reg.url(&format!("/v2/mallory/x/blobs/uploads/?digest={d}")))
        .body(&b"sixth"[..])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("mallory")
    );
    reg.push_blob("team/api", b"admin pushes on").await;
    for s in stalled {
        s.abort();
    }
}

/// Guesses whose clients hang up while the password is being hashed still count as
/// failures: hanging up gives back neither the failed-login place nor the core.
#[tokio::test]
async fn hanging_up_during_the_password_check_does_not_undo_the_failure() {
    let reg = TestRegistry::start();
    crate::common::add_user(&reg, "bob", "bob-password-1");
    let host = reg.host().to_owned();
    tokio::task::spawn_blocking(move || {
        use base64::Engine as _;
        let mut open = Vec::new();
        for i in 0..30 {
            let cred = base64::engine::general_purpose::STANDARD.encode(format!("bob:guess{i}"));
            let mut s = TcpStream::connect(&host).unwrap();
            write!(
                s,
                "GET /v2/ HTTP/1.1\r\nHost: {host}\r\nAuthorization: Basic {cred}\r\n\r\n"
            )
            .unwrap();
            open.push(s);
        }
        // The checks are under way (hashing, or queued for a core): all hang up.
        std::thread::sleep(Duration::from_millis(30));
        drop(open);
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = crate::common::client_as("bob", "bob-password-1")
        .get(reg.url("/v2/"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the guesses of clients that hung up were given back"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await; // refusals are written each second
    let log: Vec<Value> = serde_json::from_str(&crate::common::wharf(
        &reg,
        &["audit", "--json", "--limit", "100"],
    ))
    .unwrap();
    assert!(
        log.iter()
            .any(|e| e["action"] == "login.failed" && e["actor"] == "bob")
    );
}

/// A client that stops reading an answer, and a connection that never sends a request,
/// are closed once idle; one address cannot take every connection.
#[tokio::test]
async fn idle_connections_are_closed_and_one_address_has_a_share() {
    let reg = TestRegistry::start_tuned(|c| {
        c.limits.connection_idle_timeout = Duration::from_secs(1);
        c.limits.max_connections_per_client = 10;
    });
    let data = crate::common::pattern(32 << 20, 3);
    let digest = reg.push_blob("team/api", &data).await;
    let host = reg.host().to_owned();
    let auth = basic();
    tokio::task::spawn_blocking(move || {
        // Ask for 32 MiB and read nothing: the socket fills, the server stalls, then
        // closes.
        let mut s = TcpStream::connect(&host).unwrap();
        write!(
            s,
            "GET /v2/team/api/blobs/{digest} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Basic {auth}\r\n\r\n"
        )
        .unwrap();
        std::thread::sleep(Duration::from_secs(4));
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut total = 0usize;
        let mut buf = vec![0u8; 1 << 20];
        let ended = loop {
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => total += n,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
                Err(_) => break false,
            }
        };
        assert!(ended, "the stalled download's connection was not closed");
        assert!(total < 32 << 20, "the whole blob arrived ({total} bytes)");

        // Ten connections from 127.0.0.1 are its share; the eleventh is refused, while
        // another address is served.
        let idle: Vec<TcpStream> = (0..10).map(|_| TcpStream::connect(&host).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(200));
        let s = TcpStream::connect(&host).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let (status, _, _) = read_answer(&mut BufReader::new(s));
        assert_eq!(status, 503);
        let other = std::net::TcpStream::connect_timeout(&host.parse().unwrap(), Duration::from_secs(5));
        drop(other);
        drop(idle);
    })
    .await
    .unwrap();
    // Another address gets in (the share is per client).
    let c = reqwest::Client::builder()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    assert_eq!(
        c.get(reg.url("/v2/")).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
}

/// Bounds that make no sense are refused before any arithmetic: a Content-Range of the
/// whole u64 range, a user name of 100 KB.
#[tokio::test]
async fn absurd_ranges_and_names_get_clear_errors() {
    let reg = TestRegistry::start();
    let loc = reg.open_upload("team/api").await;
    let r = reg
        .client
        .patch(reg.url(&loc))
        .header("content-range", "0-18446744073709551615")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.0, StatusCode::BAD_REQUEST);
    let huge = "a".repeat(100_000);
    let r = crate::common::client_as(&huge, "wharf_AAAAAAAAAAAA_x")
        .get(reg.url("/v2/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let log = crate::common::wharf(&reg, &["audit", "--json", "--limit", "100"]);
    assert!(
        !log.contains(&huge[..1000]),
        "the name went into the audit log"
    );
    // Control characters that reach the log are shown escaped.
    crate::common::client_as("bad\u{1b}[2Jname", "x")
        .get(reg.url("/v2/"))
        .send()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let text = crate::common::wharf(&reg, &["audit", "--limit", "100"]);
    assert!(!text.contains('\u{1b}'), "{text}");
}

/// One user's logins keep at most 20 refresh tokens; the oldest go.
#[tokio::test]
async fn refresh_tokens_per_user_are_bounded() {
    let reg = TestRegistry::start();
    for _ in 0..25 {
        let r = reg
            .anon
            .post(reg.url("/token"))
            .form(&[
                ("grant_type", "password"),
                ("username", "admin"),
                ("password", ADMIN_PASSWORD),
                ("access_type", "offline"),
                ("service", "wharf"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    let listed: Vec<Value> = serde_json::from_str(&crate::common::wharf(
        &reg,
        &["token", "list", "--user", "admin", "--json"],
    ))
    .unwrap();
    let active = listed
        .iter()
        .filter(|t| t["kind"] == "refresh" && t["status"] == "active")
        .count();
    assert_eq!(active, wharf::auth::REFRESH_PER_USER);
}
