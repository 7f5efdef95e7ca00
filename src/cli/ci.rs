//! The CI commands: `wharf tags` (compute, and `list`), `wharf promote`.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Subcommand, ValueEnum};
use wharf::auth::Secret;
use wharf::ci::promote::{Outcome, promote};
use wharf::ci::tags::{self, GitContext, TagRules};
use wharf::client::{Client, Given, ImageRef, creds};
use wharf::time::rfc3339;

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct TagsArgs {
    #[command(subcommand)]
    sub: Option<TagsSub>,
    #[command(flatten)]
    compute: ComputeArgs,
}

#[derive(Subcommand, Debug)]
enum TagsSub {
    /// List a repository's tags with digest, size, platforms and push time.
    List(ListArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Format {
    /// One reference (or tag) a line.
    Text,
    /// Appends `tags`, `labels` and `version` to `$GITHUB_OUTPUT`.
    Github,
    Json,
}

/// Computes the tags of this build from CI's environment, flags or the git checkout.
#[derive(clap::Args, Debug)]
struct ComputeArgs {
    /// The git ref built: refs/heads/<branch>, refs/tags/<tag>, refs/pull/<n>/merge (a
    /// bare name is a branch) [default: from CI's environment or the checkout]
    #[arg(long = "ref", value_name = "REF")]
    git_ref: Option<String>,
    /// The commit built [default: from CI's environment or the checkout]
    #[arg(long)]
    sha: Option<String>,
    /// The CI event (push, pull_request, workflow_dispatch, ...): a pull_request event
    /// must come with a refs/pull/<n>/... ref
    #[arg(long)]
    event: Option<String>,
    /// The repository the tags are for (`registry/namespace/name`), repeatable; without
    /// it, bare tags are printed
    #[arg(long, value_name = "REPOSITORY")]
    image: Vec<String>,
    /// Output format
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Map a branch to tags: `main=latest,prod` (repeatable; replaces that branch's rule)
    #[arg(long, value_name = "BRANCH=TAGS")]
    branch_tag: Vec<String>,
    /// No `<branch>-<sha>` commit tag
    #[arg(long)]
    no_sha: bool,
    /// Commit tags end with the build's unix time: `<branch>-<sha>-<time>`
    #[arg(long)]
    sortable: bool,
    /// Characters of the commit in the commit tag
    #[arg(long, value_name = "N")]
    sha_length: Option<usize>,
    /// Keep the `v` of version tags (v1.2.3, v1.2, v1)
    #[arg(long)]
    keep_v: bool,
    /// A v0.x.y release also moves `0`
    #[arg(long)]
    major_zero: bool,
    /// A release does not move `latest`
    #[arg(long)]
    no_latest: bool,
    /// Branches without a rule get no branch tag
    #[arg(long)]
    no_other_branches: bool,
    /// An extra tag (repeatable)
    #[arg(long = "tag", value_name = "TAG")]
    raw: Vec<String>,
    /// Put before every tag
    #[arg(long, allow_hyphen_values = true)]
    prefix: Option<String>,
    /// Put after every tag (e.g. -arm64)
    #[arg(long, allow_hyphen_values = true)]
    suffix: Option<String>,
    /// The source repository URL for the `source` label [default: from CI or the remote]
    #[arg(long, value_name = "URL")]
    source: Option<String>,
    /// The git checkout to read when there is no CI environment
    #[arg(long, value_name = "DIR", default_value = ".")]
    dir: PathBuf,
}

/// Where the registry is and who the client is.
#[derive(clap::Args, Debug, Clone)]
pub struct RegistryArgs {
    /// The registry (`host:port` or a URL) when references do not name it
    #[arg(long, env = "WHARF_REGISTRY", value_name = "URL")]
    registry: Option<String>,
    /// User name (else WHARF_USERNAME, else docker's config)
    #[arg(long, short = 'u')]
    username: Option<String>,
    /// Read the password or access token from standard input
    #[arg(long)]
    password_stdin: bool,
    /// The password or access token (visible to other users of this machine; prefer
    /// --password-stdin or WHARF_PASSWORD)
    #[arg(long, short = 'p', conflicts_with = "password_stdin")]
    password: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// `[registry/]namespace/name`
    repository: String,
    /// Print JSON (the API's `results`, every page)
    #[arg(long)]
    json: bool,
    /// List the tags deleted (by hand or by retention) that `wharf tag restore` can
    /// bring back: their manifest is still stored
    #[arg(long, conflicts_with = "untagged")]
    deleted: bool,
    /// List the manifests with no tag (index children, referrers, builds whose tag
    /// moved on), with when they lost their tag and whether retention condemned them
    #[arg(long)]
    untagged: bool,
    #[command(flatten)]
    registry: RegistryArgs,
}

#[derive(clap::Args, Debug)]
pub struct PromoteArgs {
    /// What to promote: `[registry/]repo:tag` or `repo@sha256:...`
    source: String,
    /// The tag to point at it: `[registry/]repo:tag`, or just a tag of the same repository
    target: String,
    /// Show what would change, change nothing
    #[arg(long)]
    dry_run: bool,
    /// Print the outcome as JSON
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    registry: RegistryArgs,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

pub fn tags_cmd(args: TagsArgs, config: Option<&std::path::Path>) -> anyhow::Result<()> {
    match args.sub {
        Some(TagsSub::List(l)) => list(l),
        None => compute(args.compute, config),
    }
}

fn rules(a: &ComputeArgs, config: Option<&std::path::Path>) -> anyhow::Result<TagRules> {
    let mut r = wharf::config::tag_rules(config)?;
    for bt in &a.branch_tag {
        let (branch, tags) = bt
            .split_once('=')
            .with_context(|| format!("--branch-tag {bt:?}: expected BRANCH=TAG[,TAG...]"))?;
        let tags: Vec<String> = tags
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect();
        if branch.is_empty() {
            bail!("--branch-tag {bt:?}: the branch is empty");
        }
        r.branches.insert(branch.to_owned(), tags);
    }
    r.sha &= !a.no_sha;
    r.sortable |= a.sortable;
    if let Some(n) = a.sha_length {
        r.sha_length = n;
    }
    r.keep_v |= a.keep_v;
    r.major_zero |= a.major_zero;
    r.semver_latest &= !a.no_latest;
    r.other_branches &= !a.no_other_branches;
    r.raw.extend(a.raw.iter().cloned());
    if let Some(p) = &a.prefix {
        r.prefix = p.clone();
    }
    if let Some(s) = &a.suffix {
        r.suffix = s.clone();
    }
    Ok(r)
}

fn context(a: &ComputeArgs) -> anyhow::Result<GitContext> {
    let given_ref = a.git_ref.as_deref().map(tags::parse_ref).transpose()?;
    let mut ctx = match (&given_ref, &a.sha) {
        (Some(r), Some(sha)) => GitContext {
            git_ref: r.clone(),
            sha: sha.clone(),
            source: None,
        },
        _ => match tags::context_from_env(&|k| std::env::var(k).ok())? {
            Some(c) => c,
            None => tags::context_from_git(&a.dir)?,
        },
    };
    if let Some(r) = given_ref {
        ctx.git_ref = r;
    }
    if let Some(sha) = &a.sha {
        ctx.sha = sha.clone();
    }
    if let Some(s) = &a.source {
        ctx.source = tags::clean_source(s).or_else(|| Some(s.clone()));
    }
    if let Some(e) = &a.event {
        if e.starts_with("pull_request") && !matches!(ctx.git_ref, tags::GitRef::PullRequest(_)) {
            bail!("--event {e} needs the pull request's ref: --ref refs/pull/<number>/merge");
        }
    }
    Ok(ctx)
}

fn compute(a: ComputeArgs, config: Option<&std::path::Path>) -> anyhow::Result<()> {
    let rules = rules(&a, config)?;
    let ctx = context(&a)?;
    let now = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(s) if !s.is_empty() => s
            .trim()
            .parse::<i64>()
            .with_context(|| format!("SOURCE_DATE_EPOCH {s:?} is not a unix time"))?,
        _ => wharf::auth::now_secs(),
    };
    let computed = tags::compute(&ctx, &rules, now)?;
    let mut images = Vec::new();
    for image in &a.image {
        let r =
            ImageRef::parse(image, Some("latest")).with_context(|| format!("--image {image:?}"))?;
        if image.contains('@') || r.to_string() != format!("{image}:latest") {
            bail!("--image {image:?} must name a repository without a tag or digest");
        }
        images.push(image.trim_end_matches('/').to_owned());
    }
    let references: Vec<String> = if images.is_empty() {
        computed.tags.clone()
    } else {
        images
            .iter()
            .flat_map(|i| computed.tags.iter().map(move |t| format!("{i}:{t}")))
            .collect()
    };
    let labels = tags::labels(&ctx, &computed, &rfc3339(now * 1000));
    match a.format {
        Format::Text => {
            for r in &references {
                out!("{r}");
            }
        }
        Format::Json => {
            let labels: serde_json::Map<String, serde_json::Value> = labels
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            let out = serde_json::json!({
                "tags": computed.tags,
                "references": references,
                "version": computed.version,
                "ref": ctx.git_ref,
                "sha": ctx.sha,
                "labels": labels,
            });
            out!("{}", serde_json::to_string_pretty(&out)?);
        }
        Format::Github => {
            let path = std::env::var_os("GITHUB_OUTPUT")
                .filter(|p| !p.is_empty())
                .context("--format github writes to $GITHUB_OUTPUT, which is not set")?;
            let delimiter = format!("wharf_{}", uuid::Uuid::new_v4().simple());
            let mut text = String::new();
            let mut multi = |name: &str, lines: &[String]| {
                text.push_str(&format!("{name}<<{delimiter}\n"));
                for l in lines {
                    text.push_str(l);
                    text.push('\n');
                }
                text.push_str(&format!("{delimiter}\n"));
            };
            multi("tags", &references);
            let label_lines: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            multi("labels", &label_lines);
            text.push_str(&format!("version={}\n", computed.version));
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .with_context(|| format!("writing {}", PathBuf::from(&path).display()))?;
            for r in &references {
                out!("{r}");
            }
        }
    }
    Ok(())
}

/// Resolves which registry the references name and connects to it with credentials.
fn connect(args: &RegistryArgs, refs: &[&ImageRef], scopes: Vec<String>) -> anyhow::Result<Client> {
    let mut named: Option<&str> = None;
    for r in refs {
        if let Some(reg) = r.registry.as_deref() {
            if named.is_some_and(|n| n != reg) {
                bail!(
                    "the references name two registries ({} and {reg}): wharf promotes within one registry",
                    named.unwrap_or_default()
                );
            }
            named = Some(reg);
        }
    }
    let registry = match (named, args.registry.as_deref()) {
        (Some(n), _) => n.to_owned(),
        (None, Some(r)) => r.to_owned(),
        (None, None) => bail!(
            "which registry? name it in the reference (127.0.0.1:5000/team/api:tag), with --registry, or in WHARF_REGISTRY"
        ),
    };
    let (_, host) = wharf::client::endpoint(&registry)?;
    let password = if args.password_stdin {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the password from standard input")?;
        let s = s.trim_end_matches(['\n', '\r']).to_owned();
        if s.is_empty() {
            bail!("--password-stdin read an empty password");
        }
        Some(Secret::new(s))
    } else {
        args.password.clone().map(Secret::new)
    };
    let given = Given {
        username: args.username.clone(),
        password,
    };
    let found = creds::resolve(&host, &given)?;
    // With an explicit http(s):// in --registry and no name in the references, keep its scheme.
    let target = match (named, args.registry.as_deref()) {
        (None, Some(r)) => r.to_owned(),
        _ => registry,
    };
    let mut client = Client::new(&target, found.map(|(c, _)| c))?;
    for s in scopes {
        client = client.with_scope(s);
    }
    Ok(client)
}

pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn list(a: ListArgs) -> anyhow::Result<()> {
    // A repository has no tag; parse it as one to read the registry part.
    if a.repository.contains('@')
        || a.repository
            .rsplit('/')
            .next()
            .is_some_and(|l| l.contains(':'))
    {
        bail!("give a repository without tag or digest, e.g. team/api");
    }
    let r = ImageRef::parse(&a.repository, Some("latest"))?;
    // Deleted tags are listed for those who may push (like restoring them).
    let actions = if a.deleted { "pull,push" } else { "pull" };
    let client = connect(
        &a.registry,
        &[&r],
        vec![format!("repository:{}:{actions}", r.repo)],
    )?;
    runtime()?.block_on(async {
        if a.untagged {
            let v = client.tags_listing(&r.repo, "untagged").await?;
            let results = v
                .get("results")
                .and_then(|r| r.as_array())
                .context("the untagged answer has no results")?;
            if a.json {
                out!("{}", serde_json::to_string_pretty(results)?);
                return Ok(());
            }
            out!(
                "{:<19} {:>10}  {:<20} {:<20} {:<8} COLLECTED AFTER",
                "DIGEST",
                "SIZE",
                "PUSHED",
                "UNTAGGED",
                "IN INDEX"
            );
            let s = |v: &serde_json::Value, k: &str| {
                v.get(k).and_then(|x| x.as_str()).unwrap_or("-").to_owned()
            };
            for m in results {
                let digest = s(m, "digest");
                out!(
                    "{:<19} {:>10}  {:<20} {:<20} {:<8} {}",
                    digest.get(..19).unwrap_or(&digest),
                    m.get("size").and_then(|x| x.as_u64()).unwrap_or(0),
                    s(m, "pushed_at"),
                    s(m, "untagged_at"),
                    if m.get("in_index").and_then(|x| x.as_bool()) == Some(true) {
                        "yes"
                    } else {
                        "no"
                    },
                    s(m, "collected_after")
                );
            }
            return Ok(());
        }
        if a.deleted {
            let v = client.tags_listing(&r.repo, "deleted").await?;
            let results = v
                .get("results")
                .and_then(|r| r.as_array())
                .context("the deleted tags answer has no results")?;
            if a.json {
                out!("{}", serde_json::to_string_pretty(results)?);
                return Ok(());
            }
            out!(
                "{:<24} {:<19} {:<20} {:<20} {:<20} REASON",
                "TAG",
                "DIGEST",
                "DELETED",
                "BY",
                "COLLECTED AFTER"
            );
            let s = |v: &serde_json::Value, k: &str| {
                v.get(k).and_then(|x| x.as_str()).unwrap_or("-").to_owned()
            };
            for t in results {
                let digest = s(t, "digest");
                out!(
                    "{:<24} {:<19} {:<20} {:<20} {:<20} {}",
                    s(t, "name"),
                    digest.get(..19).unwrap_or(&digest),
                    s(t, "deleted_at"),
                    s(t, "deleted_by"),
                    s(t, "collected_after"),
                    s(t, "reason")
                );
            }
            return Ok(());
        }
        let mut all = Vec::new();
        let mut page = 1;
        loop {
            let v = client.tag_page(&r.repo, page, 100, "-last_updated").await?;
            let results = v
                .get("results")
                .and_then(|r| r.as_array())
                .context("the tags answer has no results")?;
            all.extend(results.iter().cloned());
            if v.get("next").is_none_or(|n| n.is_null()) || results.is_empty() {
                break;
            }
            page += 1;
        }
        if a.json {
            out!("{}", serde_json::to_string_pretty(&all)?);
            return Ok(());
        }
        out!(
            "{:<24} {:<19} {:>10}  {:<28} PUSHED",
            "TAG",
            "DIGEST",
            "SIZE",
            "PLATFORMS"
        );
        for t in &all {
            let s = |k: &str| t.get(k).and_then(|v| v.as_str()).unwrap_or("");
            let digest = s("digest");
            let short = digest.get(..19).unwrap_or(digest);
            let platforms: Vec<&str> = t
                .get("platforms")
                .and_then(|p| p.as_array())
                .map(|p| p.iter().filter_map(|x| x.as_str()).collect())
                .unwrap_or_default();
            let platforms = if platforms.is_empty() {
                "-".to_owned()
            } else {
                platforms.join(",")
            };
            let size = t.get("size").and_then(|v| v.as_u64()).unwrap_or(0);
            out!(
                "{:<24} {:<19} {:>10}  {:<28} {}",
                s("name"),
                short,
                human(size),
                platforms,
                s("last_pushed")
            );
        }
        Ok(())
    })
}

pub fn promote_cmd(a: PromoteArgs) -> anyhow::Result<()> {
    let source = ImageRef::parse(&a.source, None)?;
    let target = if !a.target.contains(['/', ':', '@']) {
        // Just a tag: the same repository.
        ImageRef::parse(&format!("{}:{}", source.repo, a.target), None).map(|mut t| {
            t.registry = source.registry.clone();
            t
        })?
    } else {
        ImageRef::parse(&a.target, None)?
    };
    if target.tag().is_none() {
        bail!("the target {target} must name a tag");
    }
    let mut scopes = vec![format!("repository:{}:pull", source.repo)];
    scopes.push(format!("repository:{}:pull,push", target.repo));
    let client = connect(&a.registry, &[&source, &target], scopes)?;
    let outcome: Outcome = runtime()?.block_on(promote(&client, &source, &target, a.dry_run))?;
    if a.json {
        out!("{}", serde_json::to_string_pretty(&outcome)?);
        return Ok(());
    }
    let verb = match (outcome.changed(), a.dry_run) {
        (false, _) => "already at",
        (true, true) => "would move to",
        (true, false) => "moved to",
    };
    out!("{} {verb} {}", outcome.target, outcome.digest);
    match &outcome.previous {
        Some(p) if outcome.changed() => out!("  previous {p}"),
        Some(_) => {}
        None => out!("  previous none (a new tag)"),
    }
    if outcome.mounted_blobs + outcome.copied_manifests > 0 {
        let would = if a.dry_run { "would mount" } else { "mounted" };
        out!(
            "  {would} {} blob(s) and {} manifest(s) from {} (no layer bytes moved)",
            outcome.mounted_blobs,
            outcome.copied_manifests,
            source.repo
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::human(999), "999 B");
        assert_eq!(super::human(1_500), "1.5 kB");
        assert_eq!(super::human(210_000_000), "210.0 MB");
    }
}
