//! The harness: a registry per test, each with its own data directory, on 127.0.0.1:0.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use wharf::config::Config;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The first admin's password in every test registry.
pub const ADMIN_PASSWORD: &str = "test-admin-password";

/// An HTTP client that sends `user:password` as Basic credentials on every request.
pub fn client_as(user: &str, password: &str) -> Client {
    basic_client(None, user, password)
}

/// A client sending Basic credentials whose connections come from `ip` (any address of
/// 127.0.0.0/8 is local), to play many clients at once.
pub fn client_from(ip: &str, user: &str, password: &str) -> Client {
    basic_client(Some(ip.parse().unwrap()), user, password)
}

fn basic_client(ip: Option<std::net::IpAddr>, user: &str, password: &str) -> Client {
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Basic {basic}").parse().unwrap(),
    );
    let mut b = Client::builder().default_headers(headers);
    if let Some(ip) = ip {
        b = b.local_address(ip);
    }
    b.build().unwrap()
}

/// A number from `/proc/PID/status` (`VmRSS:` in KiB, `Threads:`...).
pub fn proc_status(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap()
}

/// The status of `POST /v2/<repo>/blobs/uploads/` by `c`.
pub async fn start_upload(reg: &TestRegistry, c: &Client, repo: &str) -> StatusCode {
    c.post(reg.url(&format!("/v2/{repo}/blobs/uploads/")))
        .send()
        .await
        .unwrap()
        .status()
}

/// A client logged in as the admin.
pub fn admin_client() -> Client {
    client_as("admin", ADMIN_PASSWORD)
}

/// An in-process registry on its own runtime thread, stopped on drop.
pub struct TestRegistry {
    pub base: String,
    pub data: PathBuf,
    /// Logged in as admin.
    pub client: Client,
    /// No credentials.
    pub anon: Client,
    _dir: Option<tempfile::TempDir>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestRegistry {
    pub fn start() -> TestRegistry {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let mut r = TestRegistry::start_in(&data);
        r._dir = Some(dir);
        r
    }

    /// A registry whose configuration `tune` changes first.
    pub fn start_tuned(tune: impl FnOnce(&mut Config)) -> TestRegistry {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let mut r = TestRegistry::start_with(&data, tune);
        r._dir = Some(dir);
        r
    }

    /// A registry over `data` whose configuration `tune` changes first.
    pub fn start_tuned_in(data: &Path, tune: impl FnOnce(&mut Config)) -> TestRegistry {
        TestRegistry::start_with(data, tune)
    }

    /// Starts a registry over an existing data directory (to test restarts).
    pub fn start_in(data: &Path) -> TestRegistry {
        TestRegistry::start_with(data, |_| {})
    }

    fn start_with(data: &Path, tune: impl FnOnce(&mut Config)) -> TestRegistry {
        TestRegistry::start_at("127.0.0.1:0", data, tune)
    }

    /// A registry listening on `addr` (to stop and start it again where its clients
    /// look for it).
    pub fn start_at(addr: &str, data: &Path, tune: impl FnOnce(&mut Config)) -> TestRegistry {
        let std_listener = std::net::TcpListener::bind(addr).expect("bind");
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut config = Config::new(addr.to_string(), data);
        config.admin_password = Some(wharf::auth::Secret::new(ADMIN_PASSWORD));
        // Webhook retries in test time.
        config.webhook_delivery.poll_ms = 50;
        config.webhook_delivery.retry_initial_ms = 200;
        config.webhook_delivery.retry_max_ms = 1000;
        // The access log is tested where it is the subject; elsewhere it is noise.
        config.access_log = "off".into();
        tune(&mut config);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                wharf::server::serve(listener, config, async move {
                    let _ = rx.await;
                })
                .await
                .expect("server failed");
            });
        });
        wait_ready(&addr.to_string());
        TestRegistry {
            base: format!("http://{addr}"),
            data: data.to_owned(),
            client: admin_client(),
            anon: Client::new(),
            _dir: None,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// A handle on a registry running elsewhere (a [`Process`]) at `base`.
    pub fn attach(base: &str, data: &Path) -> TestRegistry {
        TestRegistry {
            base: base.to_owned(),
            data: data.to_owned(),
            client: admin_client(),
            anon: Client::new(),
            _dir: None,
            shutdown: None,
            thread: None,
        }
    }

    /// The same registry, used through `client`.
    pub fn with_client(mut self, client: Client) -> TestRegistry {
        self.client = client;
        self
    }

    /// Opens an upload in `repo` as the admin; returns its location.
    pub async fn open_upload(&self, repo: &str) -> String {
        let r = self
            .client
            .post(self.url(&format!("/v2/{repo}/blobs/uploads/")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED, "upload start");
        header(&r, "location").unwrap().to_owned()
    }

    /// The `host:port` clients name the registry by.
    pub fn host(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn stop(mut self) {
        self.shutdown_now();
    }

    /// Stops the registry and moves its data directory to `to` before the temporary
    /// directory holding it goes away.
    pub fn stop_keeping(mut self, to: &Path) {
        self.shutdown_now();
        std::fs::rename(&self.data, to).expect("move the data directory");
    }

    fn shutdown_now(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    pub async fn get(&self, path: &str) -> Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    pub async fn head(&self, path: &str) -> Response {
        self.client.head(self.url(path)).send().await.unwrap()
    }

    /// Pushes `data` as a blob of `repo` in one request; returns its digest.
    pub async fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = sha256(data);
        let r = self
            .client
            .post(self.url(&format!("/v2/{repo}/blobs/uploads/?digest={digest}")))
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "blob push: {}",
            r.text().await.unwrap()
        );
        digest
    }

    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> Response {
        self.client
            .put(self.url(&format!("/v2/{repo}/manifests/{reference}")))
            .header("content-type", media_type)
            .body(body.to_vec())
            .send()
            .await
            .unwrap()
    }

    /// Pushes a config and one layer, then an image manifest tagged `tag`; returns the
    /// manifest bytes and digest.
    pub async fn push_image(&self, repo: &str, tag: &str, seed: &str) -> (Vec<u8>, String) {
        let config = format!("{{\"architecture\":\"amd64\",\"os\":\"linux\",\"seed\":\"{seed}\"}}");
        let layer = format!("layer of {seed}").into_bytes();
        let c = self.push_blob(repo, config.as_bytes()).await;
        let l = self.push_blob(repo, &layer).await;
        let m = image_manifest((&c, config.len()), &[(&l, layer.len())]);
        let r = self.put_manifest(repo, tag, OCI_MANIFEST, &m).await;
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "manifest push: {}",
            r.text().await.unwrap()
        );
        let d = sha256(&m);
        (m, d)
    }

    /// Every blob file under the data directory.
    pub fn blob_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![self.data.join("blobs")];
        while let Some(d) = stack.pop() {
            if let Ok(rd) = std::fs::read_dir(&d) {
                for e in rd.flatten() {
                    let p = e.path();
                    if p.is_dir() {
                        stack.push(p)
                    } else {
                        out.push(p)
                    }
                }
            }
        }
        out
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.shutdown_now();
    }
}

/// Waits until the registry answers an admin's `GET /v2/` with 200: the store is open
/// and the first admin exists.
fn wait_ready(host: &str) {
    use base64::Engine as _;
    use std::io::{Read, Write};
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("admin:{ADMIN_PASSWORD}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(host) {
            let req = format!(
                "GET /v2/ HTTP/1.1\r\nHost: {host}\r\nAuthorization: Basic {basic}\r\nConnection: close\r\n\r\n"
            );
            let mut out = String::new();
            if s.write_all(req.as_bytes()).is_ok()
                && s.read_to_string(&mut out).is_ok()
                && out.starts_with("HTTP/1.1 200")
            {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the registry did not become ready"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `len` bytes of a pattern that depends on `seed`.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A body that sends `first` at once and then stalls forever, so the server is killed
/// with the request half-received.
pub fn stalling_body(first: Vec<u8>) -> reqwest::Body {
    let s = futures_util::stream::unfold(Some(first), |state| async move {
        match state {
            Some(b) => Some((Ok::<_, std::io::Error>(b), None)),
            None => {
                tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                None
            }
        }
    });
    reqwest::Body::wrap_stream(s)
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

pub fn image_manifest(config: (&str, usize), layers: &[(&str, usize)]) -> Vec<u8> {
    let layers: Vec<Value> = layers
        .iter()
        .map(|(d, s)| json!({"mediaType": OCI_LAYER, "digest": d, "size": s}))
        .collect();
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config.0, "size": config.1},
        "layers": layers,
    }))
    .unwrap()
}

/// Writes an OCI image layout at `layout` holding one image (a config, no layers) tagged
/// `v1`; returns its manifest bytes and digest.
pub fn one_image_layout(layout: &Path) -> (Vec<u8>, String) {
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    let put = |data: &[u8]| {
        let d = sha256(data);
        std::fs::write(layout.join("blobs/sha256").join(&d[7..]), data).unwrap();
        d
    };
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let c = put(config);
    let m = image_manifest((&c, config.len()), &[]);
    let md = put(&m);
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let index = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": OCI_MANIFEST, "digest": md, "size": m.len(),
        "annotations": {"org.opencontainers.image.ref.name": "v1"}}]});
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    (m, md)
}

/// Status and OCI error code of an error answer; asserts the body is the OCI format.
pub async fn error_of(r: Response) -> (StatusCode, String) {
    let status = r.status();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let body: Value = r.json().await.expect("error body is JSON");
    assert_eq!(ct.as_deref(), Some("application/json"));
    let code = body["errors"][0]["code"]
        .as_str()
        .expect("errors[0].code")
        .to_owned();
    assert!(
        body["errors"][0]["message"].is_string(),
        "message missing: {body}"
    );
    (status, code)
}

pub fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).map(|v| v.to_str().unwrap())
}

/// Fails with a clear message when a tool the test needs is missing.
pub fn require_tool(tool: &str, install: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        found,
        "this test needs `{tool}` on PATH; install it with: {install}"
    );
}

/// A command for the wharf binary's admin subcommands on `data`.
/// A loopback port nothing listens on (free when asked; a test binds it soon after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wharf_cmd(data: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wharf"));
    c.env("WHARF_DATA", data).env_remove("WHARF_CONFIG");
    c
}

/// A string unique to this run (hex nanoseconds), for image contents and names that no
/// cache of an earlier run may stand in for.
pub fn nonce() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// Runs `cmd` with `input` on its standard input; returns its whole output.
pub fn output_with_stdin(cmd: &mut Command, input: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `wharf` binary running as its own process, for crash and signal tests. Its
/// stderr is read as it comes (a chatty server must never block on a full pipe) and
/// kept: [`Process::log`].
pub struct Process {
    pub child: Child,
    pub base: String,
    log: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Process {
    pub fn start(data: &Path) -> Process {
        Process::start_with(data, &[], &[])
    }

    /// Starts with extra environment variables, and without those named in `remove`.
    pub fn start_with(data: &Path, env: &[(&str, &str)], remove: &[&str]) -> Process {
        // Pick a free port, then hand it to the process.
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wharf"));
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data"])
            .arg(data)
            .env_remove("WHARF_CONFIG")
            .env("WHARF_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("WHARF_ACCESS_LOG", "off")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        for k in remove {
            cmd.env_remove(k);
        }
        let mut child = cmd.spawn().expect("start wharf");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let reader = child.stderr.take().map(|mut err| {
            let log = std::sync::Arc::clone(&log);
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = std::io::Read::read(&mut err, &mut buf) {
                    if n == 0 {
                        break;
                    }
                    log.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            })
        });
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        // The port accepts connections once bound, before the server has opened its
        // data and reads from them: wait until a request gets an answer (over TLS, a
        // plain request gets an alert or a close, which is an answer too).
        loop {
            use std::io::{Read as _, Write as _};
            let answered = std::net::TcpStream::connect(("127.0.0.1", port))
                .and_then(|mut c| {
                    c.set_read_timeout(Some(Duration::from_secs(2)))?;
                    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
                    let mut head = [0u8; 12];
                    match c.read(&mut head) {
                        Ok(_) => Ok(true),
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            Ok(false)
                        }
                        Err(_) => Ok(true),
                    }
                })
                .unwrap_or(false);
            if answered {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("wharf exited at start ({status})");
            }
            assert!(Instant::now() < deadline, "wharf did not start answering");
            std::thread::sleep(Duration::from_millis(20));
        }
        Process {
            child,
            base,
            log,
            reader,
        }
    }

    /// What the process wrote to stderr, once it has exited (call after `wait`).
    pub fn log(&mut self) -> String {
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
    }

    /// What the process wrote to stderr so far (it may still be running).
    pub fn log_so_far(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- access control: admin commands, tokens ----

/// The (unverified) claims of a registry JWT, to see what it grants.
pub fn claims_of(jwt: &str) -> Value {
    use base64::Engine as _;
    let payload = jwt.split('.').nth(1).expect("a JWT has three parts");
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

/// Runs a wharf admin command on the registry's data directory; returns stdout.
pub fn wharf(reg: &TestRegistry, args: &[&str]) -> String {
    run(wharf_cmd(&reg.data).args(args))
}

pub fn wharf_stdin(reg: &TestRegistry, args: &[&str], input: &str) -> String {
    let out = output_with_stdin(wharf_cmd(&reg.data).args(args), input);
    assert!(
        out.status.success(),
        "wharf {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A wharf admin command that must fail; returns its stderr.
pub fn wharf_fails(reg: &TestRegistry, args: &[&str]) -> String {
    let out = wharf_cmd(&reg.data)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "wharf {args:?} succeeded");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.trim().is_empty());
    err
}

pub fn add_user(reg: &TestRegistry, name: &str, password: &str) {
    wharf_stdin(reg, &["user", "add", name, "--password-stdin"], password);
}

pub async fn token(reg: &TestRegistry, client: &Client, scopes: &[&str]) -> reqwest::Response {
    let mut url = reqwest::Url::parse(&reg.url("/token")).unwrap();
    url.query_pairs_mut().append_pair("service", "wharf");
    for s in scopes {
        url.query_pairs_mut().append_pair("scope", s);
    }
    client.get(url).send().await.unwrap()
}

pub async fn bearer(reg: &TestRegistry, client: &Client, scopes: &[&str]) -> Client {
    let r = token(reg, client, scopes).await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    let t = body["token"].as_str().unwrap().to_owned();
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {t}").parse().unwrap(),
    );
    Client::builder().default_headers(h).build().unwrap()
}
