//! `wharf tags` as a CI job runs it: from GitHub's or GitLab's environment, from flags,
//! or from the git checkout, with its three output formats.

use std::process::Command;

use serde_json::Value;

use crate::common::run;

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

fn tags() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wharf"));
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap())
        .env("HOME", std::env::temp_dir())
        .arg("tags");
    c
}

#[test]
fn github_actions_output_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("github_output");
    std::fs::write(&output, "earlier=1\n").unwrap();
    let out = run(tags()
        .current_dir(dir.path())
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_EVENT_NAME", "push")
        .env("GITHUB_REF", "refs/tags/v1.0.1")
        .env("GITHUB_REF_NAME", "v1.0.1")
        .env("GITHUB_SHA", SHA)
        .env("GITHUB_SERVER_URL", "https://github.com")
        .env("GITHUB_REPOSITORY", "team/api")
        .env("GITHUB_OUTPUT", &output)
        .env("SOURCE_DATE_EPOCH", "1790000000")
        .args([
            "--format",
            "github",
            "--image",
            "reg.example.com/team/api",
            "--image",
            "127.0.0.1:5000/team/api",
        ]));
    assert_eq!(out.lines().count(), 8, "{out}");
    let written = std::fs::read_to_string(&output).unwrap();
    assert!(written.starts_with("earlier=1\n"), "appends: {written}");
    // Multi-line values with a delimiter that is not in the values.
    let delimiter = written
        .lines()
        .find_map(|l| l.strip_prefix("tags<<"))
        .expect("tags<<DELIMITER")
        .to_owned();
    let block = |name: &str| -> Vec<String> {
        let start = written.find(&format!("{name}<<{delimiter}\n")).unwrap()
            + name.len()
            + delimiter.len()
            + 3;
        let end = start + written[start..].find(&format!("\n{delimiter}\n")).unwrap();
        written[start..end].lines().map(str::to_owned).collect()
    };
    assert_eq!(
        block("tags"),
        [
            "reg.example.com/team/api:1.0.1",
            "reg.example.com/team/api:1.0",
            "reg.example.com/team/api:1",
            "reg.example.com/team/api:latest",
            "127.0.0.1:5000/team/api:1.0.1",
            "127.0.0.1:5000/team/api:1.0",
            "127.0.0.1:5000/team/api:1",
            "127.0.0.1:5000/team/api:latest",
        ]
    );
    let labels = block("labels");
    for want in [
        format!("org.opencontainers.image.revision={SHA}"),
        "org.opencontainers.image.version=1.0.1".into(),
        "org.opencontainers.image.created=2026-09-21T14:13:20Z".into(),
        "org.opencontainers.image.source=https://github.com/team/api".into(),
        "org.opencontainers.image.ref.name=v1.0.1".into(),
    ] {
        assert!(labels.contains(&want), "{want} not in {labels:?}");
    }
    assert!(written.contains("\nversion=1.0.1\n"), "{written}");
}

#[test]
fn gitlab_flags_and_the_local_checkout() {
    let out = run(tags()
        .env("GITLAB_CI", "true")
        .env("CI_COMMIT_SHA", SHA)
        .env("CI_COMMIT_BRANCH", "feature/login")
        .env("CI_PROJECT_URL", "https://gitlab.example.com/team/api")
        .args(["--format", "json"]));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["tags"],
        serde_json::json!(["feature-login", "feature-login-0123456"])
    );
    assert_eq!(
        v["labels"]["org.opencontainers.image.source"],
        "https://gitlab.example.com/team/api"
    );

    // Flags alone, with rules from flags.
    let out = run(tags().args([
        "--ref",
        "refs/heads/main",
        "--sha",
        SHA,
        "--branch-tag",
        "main=latest,prod,stable",
        "--suffix",
        "-arm64",
        "--tag",
        "edge",
    ]));
    assert_eq!(
        out,
        "latest-arm64\nprod-arm64\nstable-arm64\nmain-0123456-arm64\nedge-arm64\n"
    );

    // A [tags] table in wharf.toml.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("wharf.toml"), "[tags]\nsortable = true\n").unwrap();
    let out = run(tags()
        .current_dir(dir.path())
        .env("SOURCE_DATE_EPOCH", "1790000000")
        .args(["--ref", "refs/heads/develop", "--sha", SHA]));
    assert_eq!(out, "dev\ndevelop-0123456-1790000000\n");

    // The local checkout: branch and commit from git.
    let repo = tempfile::tempdir().unwrap();
    let git = |args: &[&str]| {
        run(Command::new("git")
            .arg("-C")
            .arg(repo.path())
            .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
            .args(args))
    };
    git(&["init", "-q", "-b", "staging"]);
    git(&["commit", "-q", "--allow-empty", "-m", "one"]);
    git(&[
        "remote",
        "add",
        "origin",
        "https://ci:secret-token@git.example.com/team/api.git",
    ]);
    let head = git(&["rev-parse", "HEAD"]);
    let out = run(tags()
        .arg("--dir")
        .arg(repo.path())
        .args(["--format", "json"]));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["tags"],
        serde_json::json!(["staging", format!("staging-{}", &head[..7])])
    );
    // The remote's credentials never reach a label.
    assert_eq!(
        v["labels"]["org.opencontainers.image.source"],
        "https://git.example.com/team/api"
    );
    git(&["tag", "v2.1.0"]);
    git(&["checkout", "-q", "--detach"]);
    let out = run(tags().arg("--dir").arg(repo.path()));
    assert_eq!(out, "2.1.0\n2.1\n2\nlatest\n");
}

#[test]
fn unreadable_context_or_invalid_tags_fail_with_a_message() {
    let empty = tempfile::tempdir().unwrap();
    let output = empty.path().join("out");
    for (args, env, want) in [
        (
            vec!["--ref", "refs/remotes/x", "--sha", SHA],
            vec![],
            "cannot read the git ref",
        ),
        (
            vec!["--ref", "refs/heads/main", "--sha", "xyz"],
            vec![],
            "cannot read the commit",
        ),
        (
            vec!["--ref", "refs/heads/main", "--sha", SHA, "--prefix", "a b"],
            vec![],
            "not a valid tag",
        ),
        (
            vec![
                "--ref",
                "refs/heads/main",
                "--sha",
                SHA,
                "--image",
                "team/api:v1",
            ],
            vec![],
            "without a tag",
        ),
        (
            vec![
                "--ref",
                "refs/heads/main",
                "--sha",
                SHA,
                "--event",
                "pull_request",
            ],
            vec![],
            "refs/pull",
        ),
        (
            vec![
                "--ref",
                "refs/heads/main",
                "--sha",
                SHA,
                "--format",
                "github",
            ],
            vec![],
            "GITHUB_OUTPUT",
        ),
        (vec!["--dir"], vec![], "a value is required"),
        (vec![], vec![], "no CI environment and no git commit"),
        (
            vec![],
            vec![("GITHUB_ACTIONS", "true"), ("GITHUB_SHA", SHA)],
            "GITHUB_REF is not set",
        ),
        (
            vec!["--format", "github"],
            vec![
                ("GITHUB_ACTIONS", "true"),
                ("GITHUB_REF", "refs/heads/main"),
                ("GITHUB_SHA", SHA),
                ("GITHUB_EVENT_NAME", "pull_request_target"),
            ],
            "pull request number",
        ),
    ] {
        let mut c = tags();
        c.current_dir(empty.path())
            .args(["--dir", empty.path().to_str().unwrap()])
            .args(&args);
        for (k, v) in &env {
            c.env(k, v);
        }
        if env.is_empty() {
            c.env("GITHUB_OUTPUT", "");
        } else {
            c.env("GITHUB_OUTPUT", &output);
        }
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(out.stdout.is_empty(), "{args:?} printed tags");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert!(
        !output.exists(),
        "nothing written to GITHUB_OUTPUT on failure"
    );
}
