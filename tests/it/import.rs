//! `wharf import --from-distribution`: a storage directory written by the CNCF registry
//! (Debian's `docker-registry`, pushed to by skopeo) comes into wharf with every tag,
//! digest for digest; a second run copies only what changed; what cannot be imported is
//! named and the rest is.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;
use crate::skopeo::multi_arch_layout;

/// The CNCF registry on loopback, storing under `root`; stopped on drop.
struct Cncf {
    child: Child,
    host: String,
}

impl Cncf {
    fn start(root: &Path, work: &Path) -> Cncf {
        require_tool("docker-registry", "apt-get install -y docker-registry");
        let port = free_port();
        let cfg = work.join("registry.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: import-test\n",
                root.display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the CNCF registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Cncf {
            child,
            host: format!("127.0.0.1:{port}"),
        }
    }
}

impl Drop for Cncf {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn skopeo(args: &[&str]) -> String {
    require_tool("skopeo", "apt-get install -y skopeo");
    run(Command::new("skopeo").args(args).stderr(Stdio::piped()))
}

fn push(layout: &Path, tag: &str, dest: &str) {
    skopeo(&[
        "copy",
        "--all",
        "--dest-tls-verify=false",
        &format!("oci:{}:{tag}", layout.display()),
        &format!("docker://{dest}"),
    ]);
}

/// The raw manifest of `image` and its digest.
fn raw(image: &str, creds: Option<&str>) -> String {
    let mut args = vec!["inspect", "--raw", "--tls-verify=false"];
    if let Some(c) = creds {
        args.extend(["--creds", c]);
    }
    let image = format!("docker://{image}");
    args.push(&image);
    sha256(skopeo(&args).as_bytes())
}

fn import(reg: &TestRegistry, dir: &Path) -> Value {
    let out = wharf(
        reg,
        &[
            "import",
            "--from-distribution",
            dir.to_str().unwrap(),
            "--json",
        ],
    );
    serde_json::from_str(&out).unwrap()
}

#[test]
fn a_cncf_registry_storage_is_imported_with_every_tag_then_only_what_changed() {
    let work = tempfile::tempdir().unwrap();
    let store = work.path().join("cncf-data");
    let cncf = Cncf::start(&store, work.path());
    let multi = work.path().join("multi");
    multi_arch_layout(&multi, work.path());
    let single = work.path().join("single");
    one_image_layout(&single);
    // Nested repositories (`team` and `team/api`), the same blobs in several, an index.
    let tags = [
        ("multi", "team/multi:v1"),
        ("multi", "team/api:v1"),
        ("v1", "team/api:latest"),
        ("v1", "team:base"),
        ("v1", "other/app:1.0"),
    ];
    for (src, dest) in tags {
        let layout = if src == "multi" { &multi } else { &single };
        push(layout, src, &format!("{}/{dest}", cncf.host));
    }

    let reg = TestRegistry::start();
    let creds = format!("admin:{ADMIN_PASSWORD}");
    let first = import(&reg, &store);
    assert_eq!(first["repositories"], 4, "{first}");
    assert_eq!(first["problems"], serde_json::json!([]), "{first}");
    assert_eq!(first["tags_imported"], 5, "{first}");
    // The multi-arch image's 2 layers and 2 configs are copied once and linked into
    // team/api; the single image's config once, linked twice.
    assert_eq!(first["blobs_copied"], 5, "{first}");
    assert_eq!(first["blobs_linked"], 6, "{first}");
    // 3 + 3 (the index and its platforms) + 1 + 1 + 1.
    assert_eq!(first["manifests_imported"], 9, "{first}");
    for (_, image) in tags {
        assert_eq!(
            raw(&format!("{}/{image}", reg.host()), Some(&creds)),
            raw(&format!("{}/{image}", cncf.host), None),
            "{image}"
        );
    }
    // Every platform pulls back whole.
    let out = work.path().join("pulled");
    skopeo(&[
        "copy",
        "--all",
        "--src-tls-verify=false",
        "--src-creds",
        &creds,
        &format!("docker://{}/team/api:v1", reg.host()),
        &format!("oci:{}:back", out.display()),
    ]);
    for e in std::fs::read_dir(multi.join("blobs/sha256"))
        .unwrap()
        .flatten()
    {
        assert_eq!(
            std::fs::read(out.join("blobs/sha256").join(e.file_name())).unwrap(),
            std::fs::read(e.path()).unwrap()
        );
    }
    let catalog = wharf(&reg, &["audit", "--json"]);
    assert!(catalog.contains("\"import.done\""), "{catalog}");

    // Again: nothing to do.
    let again = import(&reg, &store);
    assert_eq!(again["blobs_copied"], 0, "{again}");
    assert_eq!(again["manifests_imported"], 0, "{again}");
    assert_eq!(again["tags_imported"], 0, "{again}");
    assert_eq!(again["tags_present"], 5, "{again}");

    // The source moves on before the switch: `latest` moves; only that comes over.
    push(&multi, "multi", &format!("{}/team/api:latest", cncf.host));
    let moved = import(&reg, &store);
    assert_eq!(moved["tags_moved"], 1, "{moved}");
    assert_eq!(moved["blobs_copied"], 0, "{moved}");
    assert_eq!(moved["manifests_imported"], 0, "{moved}");
    assert_eq!(
        raw(&format!("{}/team/api:latest", reg.host()), Some(&creds)),
        raw(&format!("{}/team/multi:v1", cncf.host), None)
    );

    // Changes made here after the import stay, whatever the source still says: a tag
    // moved here, and an image deleted here (its manifest and tag).
    let single_digest = raw(&format!("{}/team:base", cncf.host), None);
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        &creds,
        &format!("oci:{}:v1", single.display()),
        &format!("docker://{}/team/multi:v1", reg.host()),
    ]);
    skopeo(&[
        "delete",
        "--tls-verify=false",
        "--creds",
        &creds,
        &format!("docker://{}/other/app:1.0", reg.host()),
    ]);
    let after = import(&reg, &store);
    assert_eq!(after["tags_moved"], 0, "{after}");
    assert_eq!(after["tags_imported"], 0, "{after}");
    assert_eq!(after["manifests_imported"], 0, "{after}");
    let kept: Vec<&str> = after["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["item"].as_str().unwrap())
        .collect();
    assert!(kept.contains(&"team/multi:v1"), "{after}");
    assert!(kept.contains(&"other/app:1.0"), "{after}");
    assert!(kept.iter().any(|k| k.starts_with("other/app@")), "{after}");
    assert_eq!(
        raw(&format!("{}/team/multi:v1", reg.host()), Some(&creds)),
        single_digest,
        "the tag moved here stays"
    );
    let multi_digest = raw(&format!("{}/team/multi:v1", cncf.host), None);
    drop(cncf);

    // A source damaged by hand (a layer's data gone): the import names what it could
    // not bring and brings the rest, and fails.
    let layers = store.join("docker/registry/v2/repositories/other/app/_layers/sha256");
    let config = std::fs::read_dir(&layers)
        .unwrap()
        .flatten()
        .next()
        .unwrap();
    let hex = config.file_name().to_string_lossy().into_owned();
    let copy = store.join("docker/registry/v2/repositories/broken");
    run(Command::new("cp")
        .arg("-r")
        .arg(store.join("docker/registry/v2/repositories/other/app"))
        .arg(&copy));
    std::fs::remove_dir_all(
        store
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(&hex),
    )
    .unwrap();
    // A link planted as a symbolic link to a file elsewhere is not followed, and its
    // content is not shown.
    let planted = store.join("docker/registry/v2/repositories/broken/_manifests/tags/planted");
    std::fs::create_dir_all(planted.join("current")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", planted.join("current/link")).unwrap();
    let reg2 = TestRegistry::start();
    // Links left dangling by the source's garbage collection are no problem by
    // themselves: a storage whose only dangling links no manifest needs imports cleanly.
    let clean = work.path().join("clean");
    run(Command::new("cp").arg("-r").arg(&store).arg(&clean));
    let v2 = clean.join("docker/registry/v2");
    std::fs::remove_dir_all(v2.join("repositories/broken")).unwrap();
    std::fs::remove_dir_all(v2.join("repositories/other")).unwrap();
    std::fs::remove_dir_all(v2.join("repositories/team/_manifests")).unwrap();
    std::fs::remove_dir_all(v2.join("repositories/team/api/_manifests/revisions")).unwrap();
    std::fs::remove_dir_all(v2.join("repositories/team/api/_manifests/tags")).unwrap();
    let reg3 = TestRegistry::start();
    let r = import(&reg3, &clean);
    assert_eq!(r["problems"], serde_json::json!([]), "{r}");
    assert_eq!(r["blobs_missing"], 2, "{r}");
    assert_eq!(r["tags_imported"], 1, "{r}");
    let out = wharf_cmd(&reg2.data)
        .args(["import", "--from-distribution", store.to_str().unwrap()])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success(), "{stdout}");
    assert!(stderr.contains("could not be imported"), "{stderr}");
    assert!(
        stdout.contains("not imported: broken:planted:")
            && stdout.contains("a symbolic link (not followed)")
            && !stdout.contains("root:"),
        "{stdout}"
    );
    assert!(
        stdout.contains("not imported: broken@sha256:")
            && stdout.contains(&format!("its blob sha256:{hex} is missing from the source")),
        "{stdout}"
    );
    // The multi-arch image did not need that blob: it is all here.
    assert_eq!(
        raw(&format!("{}/team/multi:v1", reg2.host()), Some(&creds)),
        multi_digest
    );
}

#[test]
fn import_refuses_what_is_not_a_cncf_registry_storage_and_changes_nothing() {
    let reg = TestRegistry::start();
    let err = wharf_fails(&reg, &["import", "--from-distribution", "/nonexistent/x"]);
    assert!(err.contains("is not a directory"), "{err}");
    let empty = tempfile::tempdir().unwrap();
    let err = wharf_fails(
        &reg,
        &[
            "import",
            "--from-distribution",
            empty.path().to_str().unwrap(),
        ],
    );
    assert!(
        err.contains("is not the storage of a CNCF registry"),
        "{err}"
    );
    let audit = wharf(&reg, &["audit", "--json"]);
    assert!(!audit.contains("\"import"), "{audit}");
}
