//! skopeo copies a multi-platform index (amd64 + arm64) into wharf and back out.

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::common::{
    ADMIN_PASSWORD, OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST, TestRegistry, require_tool,
    run, sha256,
};

fn write_blob(layout: &Path, data: &[u8]) -> String {
    let d = sha256(data);
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(d.trim_start_matches("sha256:")), data).unwrap();
    d
}

/// A gzipped tar holding one file, made with the system's tar.
fn layer(work: &Path, arch: &str) -> (Vec<u8>, String) {
    let root = work.join(format!("root-{arch}"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("arch"), arch).unwrap();
    let tar = work.join(format!("{arch}.tar"));
    run(Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&root)
        .arg("."));
    let raw = std::fs::read(&tar).unwrap();
    run(Command::new("gzip").arg("-n").arg("-f").arg(&tar));
    (
        std::fs::read(work.join(format!("{arch}.tar.gz"))).unwrap(),
        sha256(&raw),
    )
}

/// An OCI layout holding one index tagged `multi`; returns the index bytes.
pub(crate) fn multi_arch_layout(layout: &Path, work: &Path) -> Vec<u8> {
    std::fs::create_dir_all(layout).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let mut entries = Vec::new();
    for arch in ["amd64", "arm64"] {
        let (gz, diff_id) = layer(work, arch);
        let l = write_blob(layout, &gz);
        let config = serde_json::to_vec(&json!({
            "architecture": arch, "os": "linux",
            "config": {"Cmd": ["/arch"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]}
        }))
        .unwrap();
        let c = write_blob(layout, &config);
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": c, "size": config.len()},
            "layers": [{"mediaType": OCI_LAYER, "digest": l, "size": gz.len()}]
        }))
        .unwrap();
        let m = write_blob(layout, &manifest);
        entries.push(
            json!({"mediaType": OCI_MANIFEST, "digest": m, "size": manifest.len(),
                            "platform": {"architecture": arch, "os": "linux"}}),
        );
    }
    let index = serde_json::to_vec(
        &json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}),
    )
    .unwrap();
    let i = write_blob(layout, &index);
    let top = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": OCI_INDEX, "digest": i, "size": index.len(),
        "annotations": {"org.opencontainers.image.ref.name": "multi"}}]});
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    index
}

fn skopeo() -> Command {
    require_tool("skopeo", "apt-get install -y skopeo");
    let mut c = Command::new("skopeo");
    c.stderr(Stdio::piped());
    c
}

#[test]
fn skopeo_copies_a_multi_platform_index_both_ways() {
    let reg = TestRegistry::start();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let index = multi_arch_layout(&layout, work.path());
    let dest = format!("docker://{}/team/multi:v1", reg.host());
    let creds = format!("admin:{ADMIN_PASSWORD}");

    run(skopeo()
        .args([
            "copy",
            "--all",
            "--dest-tls-verify=false",
            "--dest-creds",
            &creds,
        ])
        .arg(format!("oci:{}:multi", layout.display()))
        .arg(&dest));
    let raw = run(skopeo().args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        "--creds",
        &creds,
        &dest,
    ]));
    assert_eq!(
        sha256(raw.as_bytes()),
        sha256(&index),
        "the index was changed on the way in"
    );

    for arch in ["amd64", "arm64"] {
        let info: Value = serde_json::from_str(&run(skopeo().args([
            "--override-arch",
            arch,
            "--override-os",
            "linux",
            "inspect",
            "--tls-verify=false",
            "--creds",
            &creds,
            &dest,
        ])))
        .unwrap();
        assert_eq!(info["Architecture"], arch);
    }

    let out = work.path().join("out");
    run(skopeo()
        .args([
            "copy",
            "--all",
            "--src-tls-verify=false",
            "--src-creds",
            &creds,
            &dest,
        ])
        .arg(format!("oci:{}:pulled", out.display())));
    let top: Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    assert_eq!(top["manifests"][0]["digest"], sha256(&index));
    // Every blob the source layout had came back byte for byte.
    for e in std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .flatten()
    {
        let copy = out.join("blobs/sha256").join(e.file_name());
        assert_eq!(
            std::fs::read(&copy).unwrap(),
            std::fs::read(e.path()).unwrap(),
            "{:?}",
            e.file_name()
        );
    }
}
