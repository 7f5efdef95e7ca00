//! Three `wharf serve` replicas on one PostgreSQL and one Garage bucket, behind nginx
//! (Debian's) in round robin, so that consecutive requests of one push land on
//! different replicas: docker, skopeo, chunked uploads, mounts, referrers, tag
//! listings and webhooks through the load balancer, and a replica killed mid-push.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::*;
use crate::docker_cli::{Docker, busybox_context};

pub struct Cluster {
    /// Through nginx, logged in as admin.
    pub lb: TestRegistry,
    pub replicas: Vec<Option<Process>>,
    pub database_url: String,
    nginx: Child,
    pub dir: tempfile::TempDir,
    config: PathBuf,
}

impl Cluster {
    pub fn start(n: usize) -> Cluster {
        require_tool("nginx", "apt-get install -y nginx-light");
        let database_url = crate::postgres::database();
        let (bucket, endpoint) = crate::testgarage::bucket();
        let dir = tempfile::tempdir().unwrap();
        let lb_port = free_port();
        let lb = format!("http://127.0.0.1:{lb_port}");
        let config = dir.path().join("wharf.toml");
        std::fs::write(
            &config,
            format!(
                "public_url = \"{lb}\"\n\
                 [limits]\nmax_connections_per_client = 4096\n\
                 [storage]\ntype = \"s3\"\nbucket = \"{bucket}\"\nendpoint = \"{endpoint}\"\n\
                 region = \"{}\"\npath_style = true\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
                crate::testgarage::REGION,
                crate::testgarage::KEY_ID,
                crate::testgarage::SECRET
            ),
        )
        .unwrap();
        let mut cluster = Cluster {
            lb: TestRegistry::attach(&lb, &dir.path().join("lb")),
            replicas: Vec::new(),
            database_url,
            nginx: Command::new("true").spawn().unwrap(),
            config,
            dir,
        };
        for i in 0..n {
            let p = cluster.start_replica(i);
            cluster.replicas.push(Some(p));
        }
        cluster.nginx = cluster.start_nginx(lb_port);
        cluster
    }

    fn start_replica(&self, i: usize) -> Process {
        let data = self.dir.path().join(format!("replica{i}"));
        Process::start_with(
            &data,
            &[
                ("WHARF_DATABASE_URL", self.database_url.as_str()),
                ("WHARF_CONFIG", self.config.to_str().unwrap()),
                ("WHARF_ACCESS_LOG", "stderr"),
                ("WHARF_GC_DELAY", "24h"),
            ],
            &[],
        )
    }

    fn start_nginx(&self, port: u16) -> Child {
        let d = self.dir.path().join("nginx");
        std::fs::create_dir_all(&d).unwrap();
        let servers: String = self
            .replicas
            .iter()
            .flatten()
            .map(|p| {
                format!(
                    "    server {} max_fails=0;\n",
                    p.base.trim_start_matches("http://")
                )
            })
            .collect();
        let conf = d.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
                 error_log {d}/error.log warn;\nevents {{ worker_connections 1024; }}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
                 fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
                 upstream wharf {{\n{servers}  }}\n\
                 server {{\n    listen 127.0.0.1:{port};\n    client_max_body_size 0;\n\
                 proxy_request_buffering off;\n    proxy_buffering off;\n    proxy_http_version 1.1;\n\
                 proxy_set_header Connection \"\";\n    proxy_set_header Host $http_host;\n\
                 proxy_read_timeout 300s;\n    proxy_send_timeout 300s;\n\
                 location / {{ proxy_pass http://wharf; }}\n  }}\n}}\n",
                d = d.display()
            ),
        )
        .unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(&d)
            .arg("-e")
            .arg(d.join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    /// The access-log lines of each replica that contain `needle`.
    pub fn served(&self, needle: &str) -> Vec<usize> {
        self.replicas
            .iter()
            .map(|p| {
                p.as_ref().map_or(0, |p| {
                    p.log_so_far()
                        .lines()
                        .filter(|l| l.contains(needle))
                        .count()
                })
            })
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.nginx.kill();
        let _ = self.nginx.wait();
    }
}

#[test]
fn docker_and_skopeo_push_and_pull_through_nginx_over_three_replicas() {
    let c = Cluster::start(3);
    let host = c.lb.host().to_owned();
    let ctx = tempfile::tempdir().unwrap();
    let nonce = nonce();
    busybox_context(ctx.path(), &format!("hello from three replicas {nonce}"));
    let image = format!("{host}/team/lb-{nonce}:v1");
    let d = Docker::new();
    d.login(&host, "admin", ADMIN_PASSWORD);
    run(d.cmd().args(["build", "-q", "-t", &image]).arg(ctx.path()));
    let pushed = run(d.cmd().args(["push", &image]));
    assert!(pushed.contains("digest: sha256:"), "{pushed}");
    run(d.cmd().args(["rmi", "-f", &image]));
    run(d.cmd().args(["pull", &image]));
    let out = run(d.cmd().args(["run", "--rm", &image]));
    assert_eq!(out.trim(), format!("hello from three replicas {nonce}"));
    run(d.cmd().args(["rmi", "-f", &image]));
    // Every replica took part.
    let served = c.served(&format!("team/lb-{nonce}"));
    assert!(
        served.iter().all(|&n| n > 0),
        "requests per replica: {served:?}"
    );

    require_tool("skopeo", "apt-get install -y skopeo");
    let creds = format!("admin:{ADMIN_PASSWORD}");
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let (manifest, _) = one_image_layout(&layout);
    run(Command::new("skopeo")
        .args(["copy", "--dest-tls-verify=false", "--dest-creds", &creds])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://{host}/team/skopeo:v1")));
    let raw = run(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        "--creds",
        &creds,
        &format!("docker://{host}/team/skopeo:v1"),
    ]));
    assert_eq!(sha256(raw.as_bytes()), sha256(&manifest));
    let back = work.path().join("back");
    run(Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false", "--src-creds", &creds])
        .arg(format!("docker://{host}/team/skopeo:v1"))
        .arg(format!("oci:{}:img", back.display())));
}

/// POST, three PATCHes and the PUT of one upload, each on the next replica; then a
/// mount, a referrer, and the tag listing, all through the load balancer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_spread_over_three_replicas_and_the_api_through_the_balancer() {
    let c = tokio::task::spawn_blocking(|| Cluster::start(3))
        .await
        .unwrap();
    let reg = &c.lb;
    let data = pattern(7 * 1024 * 1024 + 11, 3);
    let digest = sha256(&data);
    let r = reg
        .client
        .post(reg.url("/v2/team/big/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let mut location = r.headers()["location"].to_str().unwrap().to_owned();
    let id = location
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    for w in [0, 2_000_000, 2_100_000, data.len()].windows(2) {
        let r = reg
            .client
            .patch(reg.url(location.trim_start_matches(&reg.base)))
            .header("content-type", "application/octet-stream")
            .header("content-range", format!("{}-{}", w[0], w[1] - 1))
            .body(data[w[0]..w[1]].to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        location = r.headers()["location"].to_str().unwrap().to_owned();
    }
    let path = location.trim_start_matches(&reg.base).to_owned();
    let sep = if path.contains('?') { '&' } else { '?' };
    let r = reg
        .client
        .put(reg.url(&format!("{path}{sep}digest={digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    // The PATCHes and the PUT name the upload (the POST's answer does).
    let served = c.served(&id);
    assert_eq!(served.iter().sum::<usize>(), 4, "{served:?}");
    assert!(
        served.iter().all(|&n| n >= 1),
        "each replica took part of the upload: {served:?}"
    );
    let got = reg
        .get(&format!("/v2/team/big/blobs/{digest}"))
        .await
        .bytes()
        .await
        .unwrap();
    assert!(got == data, "the blob is whole");

    // A mount from another repository, then an image using it, a referrer of it, and
    // pages of tags.
    let r = reg
        .client
        .post(reg.url(&format!(
            "/v2/team/other/blobs/uploads/?mount={digest}&from=team/big"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let cd = reg.push_blob("team/other", &config).await;
    let m = image_manifest((&cd, config.len()), &[(&digest, data.len())]);
    let md = sha256(&m);
    for t in ["a", "b", "c", "d"] {
        reg.put_manifest("team/other", t, OCI_MANIFEST, &m).await;
    }
    let sig = b"signature".to_vec();
    let sd = reg.push_blob("team/other", &sig).await;
    let empty = reg.push_blob("team/other", b"{}").await;
    let referrer = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.sig",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": sd, "size": sig.len()}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": md, "size": m.len()}
    }))
    .unwrap();
    reg.put_manifest("team/other", &sha256(&referrer), OCI_MANIFEST, &referrer)
        .await;
    let refs: Value = reg
        .get(&format!("/v2/team/other/referrers/{md}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(refs["manifests"][0]["digest"], sha256(&referrer));
    let page: Value = reg
        .get("/v2/team/other/tags/list?n=2&last=a")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["tags"], json!(["b", "c"]));
}

/// Pushes through three replicas reach a webhook once each: every replica fans out and
/// sends, but each event is delivered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_delivered_exactly_once_from_three_replicas() {
    let rx = crate::webhooks::Receiver::start();
    let c = tokio::task::spawn_blocking(|| Cluster::start(3))
        .await
        .unwrap();
    let out = wharf_cmd(&c.dir.path().join("admin"))
        .env("WHARF_DATABASE_URL", &c.database_url)
        .args([
            "webhook",
            "add",
            &format!("{}/hook", rx.url),
            "--actions",
            "push",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for i in 0..12 {
        c.lb.push_image("team/hooked", &format!("t{i}"), &format!("hook {i}"))
            .await;
    }
    let got = tokio::task::spawn_blocking(move || {
        let got = rx.wait_for("/hook", 12);
        // Anything sent twice would come within a few polls.
        std::thread::sleep(Duration::from_secs(2));
        (got, rx.at("/hook"))
    })
    .await
    .unwrap();
    let (_, all) = got;
    let mut tags: Vec<String> = all
        .iter()
        .map(|r| {
            let v = r.json();
            v["events"][0]["target"]["tag"]
                .as_str()
                .or_else(|| v["tag"].as_str())
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    tags.sort();
    let mut want: Vec<String> = (0..12).map(|i| format!("t{i}")).collect();
    want.sort();
    assert_eq!(tags, want, "each push once: {all:?}");
}

/// A replica killed with SIGKILL in the middle of a docker push: the push is retried
/// through the balancer (to the replicas left) and the image is whole.
#[test]
fn a_replica_killed_mid_push_loses_nothing_acknowledged() {
    let mut c = Cluster::start(3);
    let host = c.lb.host().to_owned();
    let ctx = tempfile::tempdir().unwrap();
    let nonce = nonce();
    busybox_context(ctx.path(), &format!("killed {nonce}"));
    // A larger layer, so that the push is still going when the replica dies.
    std::fs::write(ctx.path().join("big"), pattern(40 * 1024 * 1024, 9)).unwrap();
    let dockerfile = std::fs::read_to_string(ctx.path().join("Dockerfile")).unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!("{dockerfile}COPY big /big\n"),
    )
    .unwrap();
    let image = format!("{host}/team/killed-{nonce}:v1");
    let d = Docker::new();
    d.login(&host, "admin", ADMIN_PASSWORD);
    run(d.cmd().args(["build", "-q", "-t", &image]).arg(ctx.path()));
    let mut push = d
        .cmd()
        .args(["push", &image])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    c.replicas[1].take().unwrap().kill9();
    let first = push.wait().unwrap();
    // The push may have failed over the dead replica's requests; pushing again
    // completes it (nginx sends the retries to the two left).
    if !first.success() {
        let mut tries = 0;
        loop {
            let out = d.cmd().args(["push", &image]).output().unwrap();
            if out.status.success() {
                break;
            }
            tries += 1;
            assert!(tries < 5, "{}", String::from_utf8_lossy(&out.stderr));
        }
    }
    run(d.cmd().args(["rmi", "-f", &image]));
    run(d.cmd().args(["pull", &image]));
    let out = run(d.cmd().args(["run", "--rm", &image, "cat", "/message"]));
    assert_eq!(out.trim(), format!("killed {nonce}"));
    let digest = run(d.cmd().args(["run", "--rm", &image, "sha256sum", "/big"]));
    assert_eq!(
        digest.split_whitespace().next().unwrap(),
        sha256(&pattern(40 * 1024 * 1024, 9)).trim_start_matches("sha256:")
    );
    run(d.cmd().args(["rmi", "-f", &image]));
}
