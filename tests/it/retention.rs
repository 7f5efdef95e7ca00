//! Retention through `wharf retention`, the registry API and `wharf gc`: each rule kind,
//! the dry run equal to the run, restore within the delay and not after it.

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::common::*;

fn cli_json(reg: &TestRegistry, args: &[&str]) -> Value {
    serde_json::from_str(&wharf(reg, args)).expect("JSON")
}

fn planned(report: &Value) -> BTreeSet<(String, String, String)> {
    report["deletions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["repository"].as_str().unwrap().to_owned(),
                d["tag"].as_str().unwrap_or("(untagged)").to_owned(),
                d["digest"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn tags_of(reg: &TestRegistry, repo: &str) -> Vec<String> {
    let v: Value = reg
        .get(&format!("/v2/{repo}/tags/list"))
        .await
        .json()
        .await
        .unwrap();
    v["tags"]
        .as_array()
        .map(|a| a.iter().map(|t| t.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn retention_rules_delete_what_they_name_and_a_tag_can_be_restored_within_the_delay() {
    let reg = TestRegistry::start_tuned(|c| c.gc_interval = Duration::ZERO);
    let repo = "ret/app";
    let mut digest = std::collections::HashMap::new();
    // Old pull-request and untagged builds first, then the rest.
    for t in ["pr-1", "old-untagged"] {
        let (_, d) = reg.push_image(repo, t, t).await;
        digest.insert(t, d);
    }
    let r = reg
        .client
        .delete(reg.url(&format!("/v2/{repo}/manifests/old-untagged")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    // Ages are in seconds here: the old builds are 6 s older than the rest, and the
    // rules' limit (5 s) lies well between.
    tokio::time::sleep(Duration::from_millis(6000)).await;
    for t in ["v1", "main-1", "main-2", "main-3", "main-4", "pr-2"] {
        let (_, d) = reg.push_image(repo, t, t).await;
        digest.insert(t, d);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // main-1 is pulled: a keep-pulled rule keeps it although keep-last would not.
    let pulled = reg.get(&format!("/v2/{repo}/manifests/main-1")).await;
    assert_eq!(pulled.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1500)).await; // the server writes pulls each second

    // No rule: nothing to delete. A keep rule alone deletes nothing either.
    assert!(
        planned(&cli_json(
            &reg,
            &["retention", "run", "--dry-run", "--json"]
        ))
        .is_empty()
    );
    wharf(&reg, &["retention", "set", "ret/*", "--keep", "v*"]);
    assert!(
        planned(&cli_json(
            &reg,
            &["retention", "run", "--dry-run", "--json"]
        ))
        .is_empty()
    );
    wharf(
        &reg,
        &[
            "retention",
            "set",
            "ret/*",
            "--keep-last",
            "2",
            "--tags",
            "main-*",
        ],
    );
    wharf(
        &reg,
        &[
            "retention",
            "set",
            "ret/*",
            "--delete-older",
            "5s",
            "--tags",
            "pr-*",
        ],
    );
    wharf(
        &reg,
        &["retention", "set", "ret/*", "--delete-untagged", "5s"],
    );
    wharf(&reg, &["retention", "set", "ret/*", "--keep-pulled", "1h"]);
    let listed = wharf(&reg, &["retention", "list"]);
    for want in [
        "keep v*",
        "keep-last 2 main-*",
        "delete pr-* older than 5s",
        "delete untagged older than 5s",
        "keep pulled within 1h",
    ] {
        assert!(listed.contains(want), "{listed}");
    }
    // Bad rules are refused with a reason, and add nothing.
    for (args, says) in [
        (vec!["retention", "set", "ret/*"], "exactly one"),
        (
            vec![
                "retention",
                "set",
                "ret/*",
                "--keep",
                "v*",
                "--delete-untagged",
                "1d",
            ],
            "exactly one",
        ),
        (
            vec!["retention", "set", "ret/*", "--delete-untagged", "soon"],
            "soon",
        ),
        (
            vec!["retention", "set", "Bad Name", "--keep", "v*"],
            "Bad Name",
        ),
        (vec!["retention", "set", "ret/*", "--keep", "v/*"], "v/*"),
    ] {
        let err = wharf_fails(&reg, &args);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert_eq!(wharf(&reg, &["retention", "list"]), listed);

    let dry = cli_json(&reg, &["retention", "run", "--dry-run", "--json"]);
    let want: BTreeSet<(String, String, String)> = [
        ("main-2", "main-2"),
        ("pr-1", "pr-1"),
        ("(untagged)", "main-2"),
        ("(untagged)", "pr-1"),
        ("(untagged)", "old-untagged"),
    ]
    .iter()
    .map(|(t, d)| (repo.to_owned(), (*t).to_owned(), digest[d].clone()))
    .collect();
    assert_eq!(planned(&dry), want, "{dry:#}");
    assert!(dry["bytes"].as_u64().unwrap() > 0);
    let table = wharf(&reg, &["retention", "run", "--dry-run"]);
    assert!(table.starts_with("REPOSITORY"), "{table}");
    assert!(
        table.contains("keep-last 2 main-*") && table.contains("delete pr-* older than 5s"),
        "{table}"
    );
    assert_eq!(
        tags_of(&reg, repo).await.len(),
        7,
        "a dry run deletes nothing"
    );

    let real = cli_json(&reg, &["retention", "run", "--json"]);
    assert_eq!(
        planned(&real),
        planned(&dry),
        "the run deletes what the dry run said"
    );
    assert_eq!(
        (real["tags"].as_u64(), real["manifests"].as_u64()),
        (Some(2), Some(3))
    );
    let mut left = tags_of(&reg, repo).await;
    left.sort();
    assert_eq!(left, ["main-1", "main-3", "main-4", "pr-2", "v1"]);
    let audit = wharf(&reg, &["audit", "--json"]);
    assert!(
        audit.contains("retention.delete.tag") && audit.contains("retention.run"),
        "{audit}"
    );
    // A second run finds nothing more.
    assert!(planned(&cli_json(&reg, &["retention", "run", "--json"])).is_empty());

    // The deleted tags are listed, and one comes back while its manifest is kept.
    let deleted = run(wharf_cmd(&reg.data)
        .args([
            "tags",
            "list",
            &format!("{}/{repo}", reg.host()),
            "--deleted",
            "--json",
        ])
        .env("WHARF_USERNAME", "admin")
        .env("WHARF_PASSWORD", ADMIN_PASSWORD)
        .env("DOCKER_CONFIG", "/nonexistent"));
    let deleted: Value = serde_json::from_str(&deleted).unwrap();
    let names: BTreeSet<&str> = deleted
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["main-2", "old-untagged", "pr-1"].into());
    assert!(
        deleted
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["reason"].as_str().unwrap().contains("keep-last"))
    );
    // The untagged manifests are listed, with when the condemned ones will go.
    let untagged = run(wharf_cmd(&reg.data)
        .args([
            "tags",
            "list",
            &format!("{}/{repo}", reg.host()),
            "--untagged",
            "--json",
        ])
        .env("WHARF_USERNAME", "admin")
        .env("WHARF_PASSWORD", ADMIN_PASSWORD)
        .env("DOCKER_CONFIG", "/nonexistent"));
    let untagged: Value = serde_json::from_str(&untagged).unwrap();
    let condemned: BTreeSet<&str> = untagged
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["collected_after"].is_string())
        .map(|m| m["digest"].as_str().unwrap())
        .collect();
    assert_eq!(
        condemned,
        [
            digest["main-2"].as_str(),
            digest["pr-1"].as_str(),
            digest["old-untagged"].as_str()
        ]
        .into(),
        "{untagged:#}"
    );
    let kept = cli_json(&reg, &["gc", "--json", "--gc-delay", "1h"]);
    assert_eq!(
        kept["manifests"], 0,
        "condemned manifests wait for the delay: {kept}"
    );
    wharf(&reg, &["tag", "restore", &format!("{repo}:pr-1")]);
    assert_eq!(
        reg.get(&format!("/v2/{repo}/manifests/pr-1"))
            .await
            .status(),
        StatusCode::OK
    );
    let err = wharf_fails(&reg, &["tag", "restore", &format!("{repo}:pr-1")]);
    assert!(err.contains("exists"), "{err}");
    let err = wharf_fails(&reg, &["tag", "restore", &format!("{repo}:never")]);
    assert!(err.contains("no deleted tag"), "{err}");
    let err = wharf_fails(&reg, &["tag", "restore", "no-tag-given"]);
    assert!(err.contains("repository:tag"), "{err}");

    // Past the delay, the pass deletes the condemned manifests and their bytes; then
    // nothing can be restored.
    let files = reg.blob_files().len();
    let gone = cli_json(&reg, &["gc", "--json", "--gc-delay", "0s"]);
    assert_eq!(gone["manifests"], 2, "main-2 and old-untagged: {gone}");
    assert!(reg.blob_files().len() < files);
    for t in ["main-2", "old-untagged"] {
        let err = wharf_fails(&reg, &["tag", "restore", &format!("{repo}:{t}")]);
        assert!(
            err.contains("garbage collected") || err.contains("no deleted tag"),
            "{t}: {err}"
        );
        assert_eq!(
            reg.get(&format!("/v2/{repo}/manifests/{}", digest[t]))
                .await
                .status(),
            StatusCode::NOT_FOUND
        );
    }
    for t in ["v1", "main-1", "main-3", "main-4", "pr-1", "pr-2"] {
        crate::gc::assert_pullable(&reg, repo, t).await;
    }
    // Rules are removed by id.
    let id = listed
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    wharf(&reg, &["retention", "remove", &id]);
    let err = wharf_fails(&reg, &["retention", "remove", &id]);
    assert!(err.contains("no retention rule"), "{err}");
}

/// `POST /api/v1/deploys` from the attacker's side: it needs a login and pull on every
/// repository it names; bad reports change nothing; one user's report never removes
/// what another user reported (so a reader can add protection, never take it away).
#[tokio::test]
async fn deploy_reports_need_pull_and_never_remove_what_another_reported() {
    let reg = TestRegistry::start_tuned(|c| c.gc_interval = Duration::ZERO);
    let (_, d1) = reg.push_image("team/api", "v1", "one").await;
    let (_, d2) = reg.push_image("team/api", "v2", "two").await;
    let (_, secret) = reg.push_image("private/x", "v1", "x").await;
    add_user(&reg, "agent", "agent-password-1");
    add_user(&reg, "mallory", "mallory-password-1");
    wharf(&reg, &["grant", "agent", "team/*", "pull"]);
    wharf(&reg, &["grant", "mallory", "team/*", "pull"]);
    let agent = client_as("agent", "agent-password-1");
    let mallory = client_as("mallory", "mallory-password-1");
    let report = |digest: &str, repo: &str| {
        serde_json::json!({"agent": "web-1", "stack": "web", "services": [
            {"service": "api", "repository": repo, "digest": digest, "state": "running", "deployed_at": 1}
        ]})
    };
    let post = |c: &reqwest::Client, body: Value| {
        let c = c.clone();
        let url = reg.url("/api/v1/deploys");
        async move { c.post(url).json(&body).send().await.unwrap() }
    };
    let r = post(&agent, report(&d1, "team/api")).await;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());

    // Anonymous: 401. A repository the caller may not pull: 403, nothing recorded.
    let r = post(&reqwest::Client::new(), report(&d1, "team/api")).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let (status, code) = error_of(post(&mallory, report(&secret, "private/x")).await).await;
    assert_eq!((status, code.as_str()), (StatusCode::FORBIDDEN, "DENIED"));
    // Malformed reports: 400 with the OCI error body.
    for bad in [
        serde_json::json!({"agent": "web-1"}),
        serde_json::json!({"agent": "", "stack": "web", "services": []}),
        serde_json::json!({"agent": "a", "stack": "web", "services": [{"service": "api", "repository": "team/api", "digest": "sha256:nope", "state": "running", "deployed_at": 1}]}),
        serde_json::json!({"agent": "a", "stack": "web", "services": [{"service": "api", "repository": "team/api", "digest": d1, "state": "dead", "deployed_at": 1}]}),
        serde_json::json!({"agent": "a", "stack": "web", "services": [{"service": "api", "repository": "Bad Name", "digest": d1, "state": "running", "deployed_at": 1}]}),
    ] {
        let (status, _) = error_of(post(&agent, bad.clone()).await).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    }
    // Mallory reports the same agent and stack with another digest: her rows are
    // added, the agent's stay.
    let r = post(&mallory, report(&d2, "team/api")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = post(
        &mallory,
        serde_json::json!({"agent": "web-1", "stack": "web", "services": []}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let rows: Value = serde_json::from_str(&wharf(&reg, &["deploys", "--json"])).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (rows[0]["digest"].as_str(), rows[0]["reported_by"].as_str()),
        (Some(d1.as_str()), Some("agent"))
    );
    // The listing over the API shows only what the caller may pull.
    let listed: Value = agent
        .get(reg.url("/api/v1/deploys"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["deployments"].as_array().unwrap().len(), 1);
    // Deleted tags are listed for those who may push, not for readers.
    let r = mallory
        .get(reg.url("/api/v1/repositories/team/api/tags?deleted=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = mallory
        .get(reg.url("/api/v1/repositories/team/api/tags?untagged=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (status, code) = error_of(
        mallory
            .get(reg.url("/api/v1/repositories/team/api/tags?untagged=maybe"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "UNSUPPORTED")
    );
    // Retention spares the reported digest; forgetting the agent lifts that.
    wharf(
        &reg,
        &[
            "retention",
            "set",
            "team/*",
            "--delete-older",
            "1ms",
            "--tags",
            "v*",
        ],
    );
    let plan: Value =
        serde_json::from_str(&wharf(&reg, &["retention", "run", "--dry-run", "--json"])).unwrap();
    let tags: Vec<&str> = plan["deletions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["tag"].as_str())
        .collect();
    assert_eq!(tags, ["v2"]);
    let err = wharf_fails(&reg, &["deploys", "--forget", "nobody"]);
    assert!(err.contains("no agent"), "{err}");
    wharf(&reg, &["deploys", "--forget", "web-1"]);
    let plan: Value =
        serde_json::from_str(&wharf(&reg, &["retention", "run", "--dry-run", "--json"])).unwrap();
    assert_eq!(plan["tags"], 2);
}
