//! The tags of one build, computed from its git context.
//!
//! The context comes from CI's environment (GitHub Actions, GitLab CI), flags, or the
//! local checkout; the rules (a `[tags]` table in `wharf.toml`, flags over it) turn it
//! into tags. A context that cannot be read, or a rule that would make an invalid tag,
//! is an error: a build never goes out with no tags or a malformed one.

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::oci::name::valid_tag;

/// How tags are made. Every field has a default; `wharf.toml` may set any of them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TagRules {
    /// Branches mapped to environment tags. Default: `main` → `latest`, `prod`;
    /// `staging` → `staging`; `develop` → `dev`.
    pub branches: BTreeMap<String, Vec<String>>,
    /// Any other branch is tagged with its name, made a valid tag (`feature/x` →
    /// `feature-x`).
    pub other_branches: bool,
    /// A commit tag on every branch build: `<branch>-<sha7>`.
    pub sha: bool,
    /// How many characters of the commit the commit tag keeps.
    pub sha_length: usize,
    /// Make the commit tag sortable: `<branch>-<sha7>-<unix time>`.
    pub sortable: bool,
    /// A release `v1.2.3` also moves `latest`.
    pub semver_latest: bool,
    /// A `v0.x.y` release also moves `0` (by default it does not: 0.x is unstable).
    pub major_zero: bool,
    /// Keep the `v` of a version tag (`v1.2.3`, `v1.2`, `v1`).
    pub keep_v: bool,
    /// A pull request build is tagged `pr-<number>`.
    pub pull_requests: bool,
    /// Extra tags added to every build.
    pub raw: Vec<String>,
    /// Put before / after every tag (e.g. suffix `-arm64`).
    pub prefix: String,
    pub suffix: String,
}

impl Default for TagRules {
    fn default() -> Self {
        let mut branches = BTreeMap::new();
        branches.insert("main".into(), vec!["latest".into(), "prod".into()]);
        branches.insert("staging".into(), vec!["staging".into()]);
        branches.insert("develop".into(), vec!["dev".into()]);
        TagRules {
            branches,
            other_branches: true,
            sha: true,
            sha_length: 7,
            sortable: false,
            semver_latest: true,
            major_zero: false,
            keep_v: false,
            pull_requests: true,
            raw: Vec::new(),
            prefix: String::new(),
            suffix: String::new(),
        }
    }
}

/// What was built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "name", rename_all = "snake_case")]
pub enum GitRef {
    Branch(String),
    Tag(String),
    PullRequest(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitContext {
    pub git_ref: GitRef,
    /// The full commit id (hex).
    pub sha: String,
    /// Where the source lives (for the `source` label), credentials removed.
    pub source: Option<String>,
}

/// The tags of a build and its version (for the `version` label).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Computed {
    pub tags: Vec<String>,
    pub version: String,
}

/// Parses a full git ref (`refs/heads/x`, `refs/tags/x`, `refs/pull/<n>/merge`,
/// `refs/merge-requests/<n>/head`); a bare name is a branch.
pub fn parse_ref(r: &str) -> anyhow::Result<GitRef> {
    let r = r.trim();
    let bad = || {
        anyhow::anyhow!(
            "cannot read the git ref {r:?}: expected refs/heads/<branch>, refs/tags/<tag> or refs/pull/<number>/merge"
        )
    };
    if r.is_empty() {
        return Err(bad());
    }
    if let Some(b) = r.strip_prefix("refs/heads/") {
        return if b.is_empty() {
            Err(bad())
        } else {
            Ok(GitRef::Branch(b.to_owned()))
        };
    }
    if let Some(t) = r.strip_prefix("refs/tags/") {
        return if t.is_empty() {
            Err(bad())
        } else {
            Ok(GitRef::Tag(t.to_owned()))
        };
    }
    for prefix in ["refs/pull/", "refs/merge-requests/"] {
        if let Some(rest) = r.strip_prefix(prefix) {
            let n = rest.split('/').next().unwrap_or("");
            return n
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .map(GitRef::PullRequest)
                .ok_or_else(bad);
        }
    }
    if r.starts_with("refs/") || r.contains("..") || r.contains(' ') {
        return Err(bad());
    }
    Ok(GitRef::Branch(r.to_owned()))
}

fn check_sha(sha: &str) -> anyhow::Result<String> {
    let sha = sha.trim().to_ascii_lowercase();
    if sha.len() < 7 || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!(
            "cannot read the commit {sha:?}: expected a hexadecimal commit id of at least 7 characters"
        );
    }
    Ok(sha)
}

/// Makes a branch or git tag name a valid image tag: characters other than letters,
/// digits, `.`, `_` and `-` become `-`, leading `.` and `-` go, and it is cut to `max`.
pub fn sanitize(name: &str, max: usize) -> Option<String> {
    let mapped: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = mapped.trim_start_matches(['.', '-']);
    let cut: String = trimmed.chars().take(max).collect();
    let cut = cut.trim_end_matches(['.', '-']).to_owned();
    (!cut.is_empty()).then_some(cut)
}

/// A semantic version `[v]MAJOR.MINOR.PATCH[-pre][+build]`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Semver {
    v: bool,
    major: u64,
    minor: u64,
    patch: u64,
    pre: Option<String>,
    build: Option<String>,
}

fn parse_semver(s: &str) -> Option<Semver> {
    let (v, rest) = match s.strip_prefix(['v', 'V']) {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (rest, build) = match rest.split_once('+') {
        Some((r, b)) => (r, Some(b.to_owned())),
        None => (rest, None),
    };
    let (core, pre) = match rest.split_once('-') {
        Some((c, p)) => (c, Some(p.to_owned())),
        None => (rest, None),
    };
    let num = |p: &str| -> Option<u64> {
        if p.is_empty()
            || (p.len() > 1 && p.starts_with('0'))
            || !p.chars().all(|c| c.is_ascii_digit())
        {
            return None;
        }
        p.parse().ok()
    };
    let mut parts = core.split('.');
    let (major, minor, patch) = (
        num(parts.next()?)?,
        num(parts.next()?)?,
        num(parts.next()?)?,
    );
    if parts.next().is_some() {
        return None;
    }
    let ident_ok = |s: &str| {
        !s.is_empty()
            && s.split('.')
                .all(|i| !i.is_empty() && i.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
    };
    if pre.as_deref().is_some_and(|p| !ident_ok(p))
        || build.as_deref().is_some_and(|b| !ident_ok(b))
    {
        return None;
    }
    Some(Semver {
        v,
        major,
        minor,
        patch,
        pre,
        build,
    })
}

/// Computes the tags of a build. `now` (unix seconds) is used by sortable commit tags.
pub fn compute(ctx: &GitContext, rules: &TagRules, now: i64) -> anyhow::Result<Computed> {
    let sha = check_sha(&ctx.sha)?;
    if rules.sha_length < 7 || rules.sha_length > 40 {
        bail!(
            "sha_length must be between 7 and 40, not {}",
            rules.sha_length
        );
    }
    let short = &sha[..rules.sha_length.min(sha.len())];
    let mut tags: Vec<String> = Vec::new();
    let version = match &ctx.git_ref {
        GitRef::Branch(branch) => {
            // Room for `-<sha>-<unix time>` after the branch within 128 characters.
            let name = sanitize(branch, 128 - rules.sha_length - 12).with_context(|| {
                format!("the branch {branch:?} has no character usable in a tag")
            })?;
            match rules.branches.get(branch) {
                Some(mapped) => tags.extend(mapped.iter().cloned()),
                None if rules.other_branches => tags.push(name.clone()),
                None => {}
            }
            if rules.sha {
                tags.push(if rules.sortable {
                    format!("{name}-{short}-{now}")
                } else {
                    format!("{name}-{short}")
                });
            }
            name
        }
        GitRef::Tag(tag) => match parse_semver(tag) {
            Some(sv) => {
                let v = if rules.keep_v && sv.v { "v" } else { "" };
                let mut full = format!("{v}{}.{}.{}", sv.major, sv.minor, sv.patch);
                if let Some(pre) = &sv.pre {
                    full.push('-');
                    full.push_str(pre);
                }
                if let Some(build) = &sv.build {
                    // `+` cannot appear in a tag.
                    full.push('_');
                    full.push_str(build);
                }
                tags.push(full.clone());
                if sv.pre.is_none() {
                    tags.push(format!("{v}{}.{}", sv.major, sv.minor));
                    if sv.major > 0 || rules.major_zero {
                        tags.push(format!("{v}{}", sv.major));
                    }
                    if rules.semver_latest {
                        tags.push("latest".into());
                    }
                }
                full
            }
            None => {
                let name = sanitize(tag, 128).with_context(|| {
                    format!("the git tag {tag:?} has no character usable in a tag")
                })?;
                tags.push(name.clone());
                name
            }
        },
        GitRef::PullRequest(n) => {
            let name = format!("pr-{n}");
            if rules.pull_requests {
                tags.push(name.clone());
            }
            name
        }
    };
    tags.extend(rules.raw.iter().cloned());
    let mut out: Vec<String> = Vec::with_capacity(tags.len());
    for t in tags {
        let t = format!("{}{t}{}", rules.prefix, rules.suffix);
        if !valid_tag(&t) {
            bail!(
                "the rules make the tag {t:?}, which is not a valid tag (up to 128 letters, digits, '_', '.' and '-', not starting with '.' or '-')"
            );
        }
        if !out.contains(&t) {
            out.push(t);
        }
    }
    if out.is_empty() {
        bail!("the rules give this build no tag; add a branch mapping or a raw tag");
    }
    Ok(Computed { tags: out, version })
}

/// The OCI annotations/labels of the build.
pub fn labels(ctx: &GitContext, computed: &Computed, created: &str) -> Vec<(String, String)> {
    let ref_name = match &ctx.git_ref {
        GitRef::Branch(b) | GitRef::Tag(b) => b.clone(),
        GitRef::PullRequest(n) => format!("pr-{n}"),
    };
    let mut l = vec![
        (
            "org.opencontainers.image.created".to_owned(),
            created.to_owned(),
        ),
        (
            "org.opencontainers.image.revision".to_owned(),
            ctx.sha.to_ascii_lowercase(),
        ),
        (
            "org.opencontainers.image.version".to_owned(),
            computed.version.clone(),
        ),
        ("org.opencontainers.image.ref.name".to_owned(), ref_name),
    ];
    if let Some(s) = &ctx.source {
        l.push(("org.opencontainers.image.source".to_owned(), s.clone()));
    }
    l
}

/// Removes credentials from a remote URL and turns `git@host:owner/repo.git` into
/// `https://host/owner/repo`.
pub fn clean_source(url: &str) -> Option<String> {
    let url = url.trim();
    if url.is_empty() {
        return None;
    }
    let https = if let Some(rest) = url.strip_prefix("git@") {
        let (host, path) = rest.split_once(':')?;
        format!("https://{host}/{path}")
    } else if let Some((scheme, rest)) = url.split_once("://") {
        let rest = match rest.split_once('/') {
            Some((authority, path)) => {
                let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
                format!("{host}/{path}")
            }
            None => rest.rsplit_once('@').map_or(rest, |(_, h)| h).to_owned(),
        };
        let scheme = if scheme == "ssh" || scheme == "git" {
            "https"
        } else {
            scheme
        };
        format!("{scheme}://{rest}")
    } else {
        return None;
    };
    Some(
        https
            .trim_end_matches(".git")
            .trim_end_matches('/')
            .to_owned(),
    )
}

/// The context CI's environment describes, read through `env`; None outside CI.
pub fn context_from_env(
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<Option<GitContext>> {
    let get = |k: &str| env(k).filter(|v| !v.is_empty());
    if get("GITHUB_ACTIONS").is_some() || get("GITHUB_REF").is_some() {
        let sha = get("GITHUB_SHA").context("GITHUB_SHA is not set")?;
        let event = get("GITHUB_EVENT_NAME").unwrap_or_default();
        let git_ref = get("GITHUB_REF").context("GITHUB_REF is not set")?;
        let mut parsed = parse_ref(&git_ref)?;
        if event.starts_with("pull_request") && !matches!(parsed, GitRef::PullRequest(_)) {
            // pull_request_target runs on the base branch's ref: the number is in the
            // event payload. Never tag a pull request as its base branch.
            let n = get("GITHUB_EVENT_PATH")
                .and_then(|p| std::fs::read(p).ok())
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v.get("number").and_then(|n| n.as_u64()))
                .with_context(|| format!("a {event} build on {git_ref}: cannot find the pull request number (GITHUB_EVENT_PATH)"))?;
            parsed = GitRef::PullRequest(n);
        }
        let source = match (get("GITHUB_SERVER_URL"), get("GITHUB_REPOSITORY")) {
            (Some(server), Some(repo)) => clean_source(&format!("{server}/{repo}")),
            _ => None,
        };
        return Ok(Some(GitContext {
            git_ref: parsed,
            sha,
            source,
        }));
    }
    if get("GITLAB_CI").is_some() || get("CI_COMMIT_SHA").is_some() {
        let sha = get("CI_COMMIT_SHA").context("CI_COMMIT_SHA is not set")?;
        let git_ref = if let Some(n) = get("CI_MERGE_REQUEST_IID") {
            GitRef::PullRequest(
                n.parse()
                    .ok()
                    .with_context(|| format!("cannot read CI_MERGE_REQUEST_IID {n:?}"))?,
            )
        } else if let Some(t) = get("CI_COMMIT_TAG") {
            GitRef::Tag(t)
        } else if let Some(b) = get("CI_COMMIT_BRANCH").or_else(|| get("CI_COMMIT_REF_NAME")) {
            GitRef::Branch(b)
        } else {
            bail!(
                "GitLab CI: none of CI_COMMIT_TAG, CI_COMMIT_BRANCH, CI_MERGE_REQUEST_IID is set"
            );
        };
        let source = get("CI_PROJECT_URL").and_then(|u| clean_source(&u));
        return Ok(Some(GitContext {
            git_ref,
            sha,
            source,
        }));
    }
    Ok(None)
}

/// The context of the local checkout in `dir`.
pub fn context_from_git(dir: &std::path::Path) -> anyhow::Result<GitContext> {
    let git = |args: &[&str]| -> Option<String> {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    let sha = git(&["rev-parse", "HEAD"]).with_context(|| {
        format!(
            "no CI environment and no git commit in {}: give --ref and --sha",
            dir.display()
        )
    })?;
    let git_ref = if let Some(b) = git(&["symbolic-ref", "-q", "--short", "HEAD"]) {
        GitRef::Branch(b)
    } else if let Some(t) = git(&["describe", "--exact-match", "--tags", "HEAD"]) {
        GitRef::Tag(t)
    } else {
        bail!("HEAD is detached and no tag points at it: give --ref");
    };
    let source = git(&["config", "--get", "remote.origin.url"]).and_then(|u| clean_source(&u));
    Ok(GitContext {
        git_ref,
        sha,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "abc1234def5678abc1234def5678abc1234def56";

    fn ctx(r: &str) -> GitContext {
        GitContext {
            git_ref: parse_ref(r).unwrap(),
            sha: SHA.into(),
            source: None,
        }
    }

    fn tags_with(r: &str, rules: &TagRules) -> Vec<String> {
        compute(&ctx(r), rules, 1_790_000_000).unwrap().tags
    }

    fn tags(r: &str) -> Vec<String> {
        tags_with(r, &TagRules::default())
    }

    /// Every rule, and the examples of the pipelines wharf replaces.
    #[test]
    fn tag_table() {
        let d = TagRules::default();
        let sortable = TagRules {
            sortable: true,
            ..d.clone()
        };
        let keep_v = TagRules {
            keep_v: true,
            ..d.clone()
        };
        let zero = TagRules {
            major_zero: true,
            ..d.clone()
        };
        let no_latest = TagRules {
            semver_latest: false,
            ..d.clone()
        };
        let arm = TagRules {
            suffix: "-arm64".into(),
            ..d.clone()
        };
        let prefixed = TagRules {
            prefix: "api-".into(),
            raw: vec!["edge".into()],
            ..d.clone()
        };
        let no_sha = TagRules {
            sha: false,
            ..d.clone()
        };
        let only_mapped = TagRules {
            other_branches: false,
            ..d.clone()
        };
        let long_sha = TagRules {
            sha_length: 12,
            ..d.clone()
        };
        let table: Vec<(&str, &TagRules, &[&str])> = vec![
            // Branches mapped to environments, each with its commit tag.
            ("refs/heads/main", &d, &["latest", "prod", "main-abc1234"]),
            ("refs/heads/staging", &d, &["staging", "staging-abc1234"]),
            ("refs/heads/develop", &d, &["dev", "develop-abc1234"]),
            // Any other branch: its name, made a valid tag.
            (
                "refs/heads/feature/x",
                &d,
                &["feature-x", "feature-x-abc1234"],
            ),
            (
                "refs/heads/Fix_Bug#12",
                &d,
                &["Fix_Bug-12", "Fix_Bug-12-abc1234"],
            ),
            ("refs/heads/-weird.", &d, &["weird", "weird-abc1234"]),
            ("refs/heads/feature/x", &only_mapped, &["feature-x-abc1234"]),
            ("refs/heads/main", &no_sha, &["latest", "prod"]),
            (
                "refs/heads/main",
                &long_sha,
                &["latest", "prod", "main-abc1234def56"],
            ),
            // Sortable commit tags for tools that pick the newest.
            (
                "refs/heads/main",
                &sortable,
                &["latest", "prod", "main-abc1234-1790000000"],
            ),
            // Releases: the seeds' v1.0.1 → 1.0.1, 1.0, 1, latest; never a `-abc1234`.
            ("refs/tags/v1.0.1", &d, &["1.0.1", "1.0", "1", "latest"]),
            ("refs/tags/v1.0.0", &d, &["1.0.0", "1.0", "1", "latest"]),
            ("refs/tags/v2.0.0", &d, &["2.0.0", "2.0", "2", "latest"]),
            ("refs/tags/1.1.0", &d, &["1.1.0", "1.1", "1", "latest"]),
            (
                "refs/tags/v1.0.1",
                &keep_v,
                &["v1.0.1", "v1.0", "v1", "latest"],
            ),
            ("refs/tags/v1.0.1", &no_latest, &["1.0.1", "1.0", "1"]),
            // Pre-releases move nothing else.
            ("refs/tags/v1.3.0-rc.1", &d, &["1.3.0-rc.1"]),
            ("refs/tags/v1.3.0-rc.1", &keep_v, &["v1.3.0-rc.1"]),
            // 0.x does not move `0` unless asked.
            ("refs/tags/v0.4.2", &d, &["0.4.2", "0.4", "latest"]),
            ("refs/tags/v0.4.2", &zero, &["0.4.2", "0.4", "0", "latest"]),
            // Build metadata cannot use `+` in a tag.
            (
                "refs/tags/v1.2.3+build.7",
                &d,
                &["1.2.3_build.7", "1.2", "1", "latest"],
            ),
            // Not semver: the tag name itself.
            ("refs/tags/release-2026-11", &d, &["release-2026-11"]),
            ("refs/tags/v1.2", &d, &["v1.2"]),
            ("refs/tags/v01.2.3", &d, &["v01.2.3"]),
            // Pull requests.
            ("refs/pull/42/merge", &d, &["pr-42"]),
            ("refs/merge-requests/7/head", &d, &["pr-7"]),
            // Prefix, suffix and raw tags apply to every tag.
            (
                "refs/heads/main",
                &arm,
                &["latest-arm64", "prod-arm64", "main-abc1234-arm64"],
            ),
            (
                "refs/tags/v1.0.1",
                &prefixed,
                &["api-1.0.1", "api-1.0", "api-1", "api-latest", "api-edge"],
            ),
            // A bare name is a branch.
            ("main", &d, &["latest", "prod", "main-abc1234"]),
        ];
        for (r, rules, want) in table {
            assert_eq!(tags_with(r, rules), want, "{r}");
        }
    }

    #[test]
    fn versions_and_labels() {
        let c = compute(&ctx("refs/tags/v1.0.1"), &TagRules::default(), 0).unwrap();
        assert_eq!(c.version, "1.0.1");
        let mut g = ctx("refs/tags/v1.0.1");
        g.source = Some("https://github.com/team/api".into());
        let l = labels(&g, &c, "2026-11-23T00:00:00Z");
        let get = |k: &str| l.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("org.opencontainers.image.revision"), Some(SHA));
        assert_eq!(get("org.opencontainers.image.version"), Some("1.0.1"));
        assert_eq!(get("org.opencontainers.image.ref.name"), Some("v1.0.1"));
        assert_eq!(
            get("org.opencontainers.image.created"),
            Some("2026-11-23T00:00:00Z")
        );
        assert_eq!(
            get("org.opencontainers.image.source"),
            Some("https://github.com/team/api")
        );
        assert_eq!(
            compute(&ctx("refs/heads/feature/x"), &TagRules::default(), 0)
                .unwrap()
                .version,
            "feature-x"
        );
        assert_eq!(
            compute(&ctx("refs/pull/3/merge"), &TagRules::default(), 0)
                .unwrap()
                .version,
            "pr-3"
        );
    }

    #[test]
    fn bad_input_is_an_error_never_an_empty_list() {
        for r in [
            "",
            "refs/heads/",
            "refs/tags/",
            "refs/pull/x/merge",
            "refs/pull/0/merge",
            "refs/remotes/origin/main",
            "a..b",
        ] {
            assert!(parse_ref(r).is_err(), "{r:?}");
        }
        let mut c = ctx("refs/heads/main");
        for sha in ["", "abc", "not-a-sha-at-all", "abc123g"] {
            c.sha = sha.into();
            assert!(compute(&c, &TagRules::default(), 0).is_err(), "{sha:?}");
        }
        let slash = TagRules {
            prefix: "team/".into(),
            ..TagRules::default()
        };
        let e = compute(&ctx("refs/heads/main"), &slash, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("team/latest"), "{e}");
        let dot = TagRules {
            prefix: ".".into(),
            ..TagRules::default()
        };
        assert!(compute(&ctx("refs/heads/main"), &dot, 0).is_err());
        let nothing = TagRules {
            other_branches: false,
            sha: false,
            ..TagRules::default()
        };
        assert!(compute(&ctx("refs/heads/feature"), &nothing, 0).is_err());
        assert!(compute(&ctx("refs/heads/###"), &TagRules::default(), 0).is_err());
        let short = TagRules {
            sha_length: 3,
            ..TagRules::default()
        };
        assert!(compute(&ctx("refs/heads/main"), &short, 0).is_err());
    }

    #[test]
    fn long_branch_names_stay_valid() {
        let long = format!("refs/heads/{}", "x".repeat(300));
        let t = tags(&long);
        assert!(t.iter().all(|t| valid_tag(t)), "{t:?}");
        let sortable = TagRules {
            sortable: true,
            ..TagRules::default()
        };
        assert!(tags_with(&long, &sortable).iter().all(|t| valid_tag(t)));
    }

    #[test]
    fn ci_environments() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let gh = context_from_env(&env(&[
            ("GITHUB_ACTIONS", "true"),
            ("GITHUB_REF", "refs/heads/develop"),
            ("GITHUB_REF_NAME", "develop"),
            ("GITHUB_SHA", SHA),
            ("GITHUB_EVENT_NAME", "push"),
            ("GITHUB_SERVER_URL", "https://github.com"),
            ("GITHUB_REPOSITORY", "team/api"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(gh.git_ref, GitRef::Branch("develop".into()));
        assert_eq!(gh.source.as_deref(), Some("https://github.com/team/api"));
        let pr = context_from_env(&env(&[
            ("GITHUB_ACTIONS", "true"),
            ("GITHUB_REF", "refs/pull/17/merge"),
            ("GITHUB_SHA", SHA),
            ("GITHUB_EVENT_NAME", "pull_request"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(pr.git_ref, GitRef::PullRequest(17));
        // pull_request_target runs on the base branch: without the event payload it is
        // an error, never `latest`/`prod`.
        assert!(
            context_from_env(&env(&[
                ("GITHUB_ACTIONS", "true"),
                ("GITHUB_REF", "refs/heads/main"),
                ("GITHUB_SHA", SHA),
                ("GITHUB_EVENT_NAME", "pull_request_target"),
            ]))
            .is_err()
        );
        assert!(
            context_from_env(&env(&[
                ("GITHUB_ACTIONS", "true"),
                ("GITHUB_REF", "refs/heads/main")
            ]))
            .is_err()
        );
        let gl = context_from_env(&env(&[
            ("GITLAB_CI", "true"),
            ("CI_COMMIT_SHA", SHA),
            ("CI_COMMIT_TAG", "v1.0.1"),
            ("CI_COMMIT_REF_NAME", "v1.0.1"),
            ("CI_PROJECT_URL", "https://gitlab.example.com/team/api"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(gl.git_ref, GitRef::Tag("v1.0.1".into()));
        let mr = context_from_env(&env(&[
            ("GITLAB_CI", "true"),
            ("CI_COMMIT_SHA", SHA),
            ("CI_MERGE_REQUEST_IID", "9"),
            ("CI_COMMIT_REF_NAME", "feature"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(mr.git_ref, GitRef::PullRequest(9));
        let branch = context_from_env(&env(&[
            ("GITLAB_CI", "true"),
            ("CI_COMMIT_SHA", SHA),
            ("CI_COMMIT_BRANCH", "main"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(branch.git_ref, GitRef::Branch("main".into()));
        assert!(context_from_env(&env(&[])).unwrap().is_none());
    }

    #[test]
    fn sources_lose_their_credentials() {
        assert_eq!(
            clean_source("https://x-access-token:ghs_secret@github.com/team/api.git").as_deref(),
            Some("https://github.com/team/api")
        );
        assert_eq!(
            clean_source("git@github.com:team/api.git").as_deref(),
            Some("https://github.com/team/api")
        );
        assert_eq!(
            clean_source("ssh://git@gitlab.example.com/team/api").as_deref(),
            Some("https://gitlab.example.com/team/api")
        );
        assert_eq!(clean_source("/local/path"), None);
    }
}
