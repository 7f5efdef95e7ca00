//! Admin commands. They open the data directory directly (SQLite in WAL mode lets them
//! run beside a live server) and go through the same `Auth` the server uses.

use std::future::Future;
use std::io::Read;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Subcommand, ValueEnum};
use wharf::auth::{Auth, Level, Pattern, Scope, Secret, now_secs, secret};
use wharf::store::meta::auth::{AuthMeta, TokenRecord};
use wharf::store::meta::events::EventsMeta;
use wharf::store::policy::parse_tag_globs;
use wharf::store::{MetaStore, Store, open_backends};
use wharf::time::rfc3339;

use super::DataArgs;

pub struct Admin {
    auth: Auth,
    meta: Arc<dyn AuthMeta>,
    registry: Arc<dyn MetaStore>,
    /// The registry's store over the same data (garbage collection, repository deletes).
    store: Store,
    events: Arc<dyn EventsMeta>,
    /// The URL the registry is reached by, for test payloads.
    registry_url: String,
    actor: String,
}

type Job = Pin<Box<dyn Future<Output = anyhow::Result<()>>>>;

pub fn run(data: &DataArgs, job: impl FnOnce(Admin) -> Job) -> anyhow::Result<()> {
    let config = data.resolve()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (blobs, meta) = open_backends(
            &config.data,
            config.database_url.as_ref().map(|u| u.expose()),
            &config.storage,
            wharf::store::blob::DEFAULT_UPLOAD_MEMORY_MIB,
        )
        .await
        .with_context(|| match &config.database_url {
            Some(_) => "opening the database (database_url)".to_owned(),
            None => format!("opening {}", config.data.display()),
        })?;
        let store = Store::new(blobs, Arc::clone(&meta) as _).with_gc(config.gc.clone());
        let auth = Auth::with_settings(
            Arc::clone(&meta) as _,
            &config.data,
            &config.service,
            config.limits.auth(),
        )
        .await?;
        let actor = format!(
            "cli:{}",
            std::env::var("USER").unwrap_or_else(|_| "unknown".into())
        );
        let registry = Arc::clone(&meta) as Arc<dyn MetaStore>;
        let events = Arc::clone(&meta) as Arc<dyn EventsMeta>;
        let meta = meta as Arc<dyn AuthMeta>;
        let registry_url = config
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", config.listen));
        job(Admin {
            auth,
            meta,
            registry,
            store,
            events,
            registry_url,
            actor,
        })
        .await
    })
}

impl Admin {
    /// Records a change about to be made: written first, so a change is never made
    /// unrecorded (if the row cannot be written, the command fails and changes nothing).
    /// A change that then fails is recorded too, with [`Admin::failed`].
    async fn audit(
        &self,
        action: &str,
        repository: Option<&str>,
        detail: String,
    ) -> anyhow::Result<()> {
        self.auth
            .audit(Some(&self.actor), action, repository, Some(detail), None)
            .await
            .with_context(|| {
                format!("{action} cannot be written to the audit log, so it was not made")
            })
    }

    /// Records that a change recorded with [`Admin::audit`] did not happen, and passes
    /// its error on.
    async fn failed<T>(&self, action: &str, r: anyhow::Result<T>) -> anyhow::Result<T> {
        if let Err(e) = &r {
            let _ = self
                .auth
                .audit(
                    Some(&self.actor),
                    &format!("{action}.failed"),
                    None,
                    Some(format!("{e:#}")),
                    None,
                )
                .await;
        }
        r
    }
}

#[derive(Subcommand, Debug)]
pub enum UserCmd {
    /// Create a user; prints a random password unless --password-stdin is given.
    Add {
        name: String,
        /// Give the user every right on every repository.
        #[arg(long)]
        admin: bool,
        /// Read the password from standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// List users.
    List,
    /// Remove a user, their tokens and grants.
    Remove { name: String },
    /// Set a new password (random unless --password-stdin); ends the user's sessions.
    Passwd {
        name: String,
        #[arg(long)]
        password_stdin: bool,
    },
}

fn valid_user_name(name: &str) -> anyhow::Result<()> {
    let ok = name.len() <= 64 && !name.contains('/') && wharf::oci::RepoName::parse(name).is_ok();
    if !ok {
        bail!(
            "invalid user name {name:?}: lowercase letters and digits, separated by '.', '_' or '-' (it is also the user's namespace)"
        );
    }
    Ok(())
}

fn new_password(from_stdin: bool) -> anyhow::Result<(Secret, bool)> {
    if !from_stdin {
        return Ok((Secret::new(secret::random_string(24)), true));
    }
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("reading the password from standard input")?;
    let pw = s.trim_end_matches(['\n', '\r']).to_owned();
    if pw.chars().count() < 8 {
        bail!("the password must have at least 8 characters");
    }
    Ok((Secret::new(pw), false))
}

pub async fn user(a: Admin, cmd: UserCmd) -> anyhow::Result<()> {
    match cmd {
        UserCmd::Add {
            name,
            admin,
            password_stdin,
        } => {
            valid_user_name(&name)?;
            let (pw, generated) = new_password(password_stdin)?;
            a.audit(
                "user.create",
                None,
                format!("{name}{}", if admin { " (admin)" } else { "" }),
            )
            .await?;
            let made = a
                .meta
                .user_create(&name, &secret::hash_password(pw.expose()), admin)
                .await;
            a.failed("user.create", made.map_err(Into::into)).await?;
            if generated {
                out!("{}", pw.expose());
                eprintln!("created user {name}; the password above is shown only once");
            } else {
                eprintln!("created user {name}");
            }
        }
        UserCmd::List => {
            out!("{:<24} {:<6} CREATED", "NAME", "ADMIN");
            for u in a.meta.user_list().await? {
                out!(
                    "{:<24} {:<6} {}",
                    u.name,
                    if u.admin { "yes" } else { "no" },
                    rfc3339(u.created_at)
                );
            }
        }
        UserCmd::Remove { name } => {
            a.audit("user.remove", None, name.clone()).await?;
            let removed = match a.meta.user_remove(&name).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(anyhow::anyhow!("no user {name}")),
                Err(e) => Err(e.into()),
            };
            a.failed("user.remove", removed).await?;
            eprintln!("removed user {name} with their tokens and grants");
        }
        UserCmd::Passwd {
            name,
            password_stdin,
        } => {
            let (pw, generated) = new_password(password_stdin)?;
            a.audit("user.passwd", None, name.clone()).await?;
            let changed = match a
                .meta
                .user_set_password(&name, &secret::hash_password(pw.expose()))
                .await
            {
                Ok(true) => Ok(()),
                Ok(false) => Err(anyhow::anyhow!("no user {name}")),
                Err(e) => Err(e.into()),
            };
            a.failed("user.passwd", changed).await?;
            if generated {
                out!("{}", pw.expose());
            }
            eprintln!("password of {name} changed; earlier logins of {name} are ended");
        }
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Create an access token; prints it once.
    Create {
        /// The user the token acts for.
        #[arg(long)]
        user: String,
        /// What the token may do: repository:<name, namespace/* or *>:<pull,push,delete>
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Lifetime: e.g. 30m, 12h, 90d, 1y, or never.
        #[arg(long, default_value = "90d")]
        expires: String,
        /// A name to recognise it by (e.g. ci, prod-server).
        #[arg(long)]
        name: String,
    },
    /// List tokens with their scopes, creation, last use and expiry.
    List {
        #[arg(long)]
        user: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token at once.
    Revoke { id: String },
}

/// Parses `30m`, `12h`, `90d`, `1y` or `never` into milliseconds.
pub fn parse_lifetime(s: &str) -> anyhow::Result<Option<i64>> {
    if s == "never" {
        return Ok(None);
    }
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 =
        n.parse().ok().filter(|n| *n > 0).with_context(|| {
            format!("invalid lifetime {s:?}: use e.g. 30m, 12h, 90d, 1y or never")
        })?;
    let unit_ms = match unit {
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "y" => 365 * 86_400_000,
        _ => bail!("invalid lifetime {s:?}: use e.g. 30m, 12h, 90d, 1y or never"),
    };
    Ok(Some(n.checked_mul(unit_ms).context("lifetime too long")?))
}

fn token_status(auth: &Auth, t: &TokenRecord, now_ms: i64) -> &'static str {
    if t.revoked_at.is_some() {
        "revoked"
    } else if t.expires_at.is_some_and(|e| e <= now_ms) {
        "expired"
    } else if !auth.token_live(t, now_ms) {
        "idle"
    } else {
        "active"
    }
}

pub async fn token(a: Admin, cmd: TokenCmd) -> anyhow::Result<()> {
    let now_ms = now_secs() * 1000;
    match cmd {
        TokenCmd::Create {
            user,
            scopes,
            expires,
            name,
        } => {
            let parsed: Vec<Scope> = scopes
                .iter()
                .map(|s| Scope::parse(s))
                .collect::<Result<_, _>>()?;
            let lifetime = parse_lifetime(&expires)?;
            a.auth.check_scopes_within(&user, &parsed).await?;
            let (id, token, hash) = secret::new_token();
            let record = TokenRecord {
                id: id.clone(),
                user_name: user.clone(),
                name: name.clone(),
                kind: "access".into(),
                secret_hash: hash,
                scopes: parsed.iter().map(ToString::to_string).collect(),
                created_at: now_ms,
                last_used_at: None,
                expires_at: lifetime.map(|l| now_ms + l),
                revoked_at: None,
            };
            a.audit(
                "token.create",
                None,
                format!("{id} {name} for {user}: {}", record.scopes.join(" ")),
            )
            .await?;
            let made = a.meta.token_create(&record).await;
            a.failed("token.create", made.map_err(Into::into)).await?;
            out!("{}", token.expose());
            eprintln!(
                "token {id} ({name}) for {user}, {}, expires {}; shown only this once",
                record.scopes.join(" "),
                record.expires_at.map_or("never".into(), rfc3339)
            );
        }
        TokenCmd::List { user, json } => {
            // Every credential: access tokens and the refresh tokens of `docker login`.
            let tokens: Vec<TokenRecord> = a.meta.token_list(user.as_deref()).await?;
            if json {
                let v: Vec<serde_json::Value> = tokens
                    .iter()
                    .map(|t| {
                        serde_json::json!({
                            "id": t.id, "user": t.user_name, "kind": t.kind, "name": t.name,
                            "scopes": if t.kind == "refresh" { vec!["all of the user's rights".to_owned()] } else { t.scopes.clone() },
                            "created": rfc3339(t.created_at),
                            "last_used": t.last_used_at.map(rfc3339),
                            "expires": t.expires_at.map(rfc3339),
                            "days_left": t.expires_at.map(|e| (e - now_ms).max(0) / 86_400_000),
                            "status": token_status(&a.auth, t, now_ms),
                        })
                    })
                    .collect();
                out!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                out!(
                    "{:<13} {:<12} {:<8} {:<14} {:<8} {:<21} {:<21} {:<21} {:<5} SCOPES",
                    "ID",
                    "USER",
                    "KIND",
                    "NAME",
                    "STATUS",
                    "CREATED",
                    "LAST USED",
                    "EXPIRES",
                    "LEFT"
                );
                for t in &tokens {
                    let scopes = if t.kind == "refresh" {
                        "(the user's rights)".to_owned()
                    } else {
                        t.scopes.join(" ")
                    };
                    out!(
                        "{:<13} {:<12} {:<8} {:<14} {:<8} {:<21} {:<21} {:<21} {:<5} {}",
                        t.id,
                        t.user_name,
                        t.kind,
                        t.name,
                        token_status(&a.auth, t, now_ms),
                        rfc3339(t.created_at),
                        t.last_used_at.map_or("never".into(), rfc3339),
                        t.expires_at.map_or("never".into(), rfc3339),
                        t.expires_at.map_or("-".into(), |e| format!(
                            "{}d",
                            (e - now_ms).max(0) / 86_400_000
                        )),
                        scopes
                    );
                }
            }
        }
        TokenCmd::Revoke { id } => {
            a.audit("token.revoke", None, id.clone()).await?;
            let revoked = match a.meta.token_revoke(&id, now_ms).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(anyhow::anyhow!("no active token {id}")),
                Err(e) => Err(e.into()),
            };
            a.failed("token.revoke", revoked).await?;
            eprintln!("revoked token {id}");
        }
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum RepoCmd {
    /// Make a repository or namespace (`team/*`) public (anonymous pull) or private.
    Visibility {
        pattern: String,
        visibility: Visibility,
    },
    /// Delete a repository: its tags, manifests and blob links. It leaves the catalog at
    /// once; its bytes are freed by garbage collection (`wharf gc`). Refused if an
    /// immutability policy protects one of its tags.
    Delete { name: String },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Visibility {
    Public,
    Private,
}

pub async fn repo(a: Admin, cmd: RepoCmd) -> anyhow::Result<()> {
    let (pattern, visibility) = match cmd {
        RepoCmd::Visibility {
            pattern,
            visibility,
        } => (pattern, visibility),
        RepoCmd::Delete { name } => return repo_delete(a, &name).await,
    };
    let p = Pattern::parse(&pattern)?;
    let public = matches!(visibility, Visibility::Public);
    let word = if public { "public" } else { "private" };
    a.audit("repo.visibility", Some(&p.to_string()), word.to_owned())
        .await?;
    let set = a.meta.visibility_set(&p.to_string(), public).await;
    a.failed("repo.visibility", set.map_err(Into::into)).await?;
    eprintln!("{p} is now {word}");
    Ok(())
}

async fn repo_delete(a: Admin, name: &str) -> anyhow::Result<()> {
    let repo = wharf::oci::RepoName::parse(name)
        .map_err(|e| anyhow::anyhow!("{name:?} is not a repository name: {e}"))?;
    let by = wharf::store::Who {
        actor: Some(a.actor.clone()),
        ..Default::default()
    };
    match a.store.repository_delete(&repo, &by).await {
        Ok(d) => {
            eprintln!(
                "deleted {repo}: {} tags, {} manifests, {} blob links; `wharf gc` frees the bytes no other repository holds (after the GC delay for links still in use elsewhere)",
                d.tags, d.manifests, d.links
            );
            Ok(())
        }
        Err(wharf::store::StoreError::NameUnknown) => bail!("no repository {repo}"),
        Err(e) => Err(e.into()),
    }
}

#[derive(clap::Args, Debug)]
pub struct GcArgs {
    /// Change nothing: report what a pass would remove.
    #[arg(long)]
    dry_run: bool,
    /// Print the report as JSON, with every item removed.
    #[arg(long)]
    json: bool,
}

/// Runs one garbage collection pass on the data directory, server running or not.
pub async fn gc(a: Admin, args: GcArgs) -> anyhow::Result<()> {
    let report = a.store.gc(args.dry_run, &a.actor).await?;
    if args.json {
        out!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let verb = if report.dry_run {
        "would remove"
    } else {
        "removed"
    };
    out!(
        "{verb} {} blobs ({}, {} bytes; {} files without metadata), {} blob links, {} manifests, {} uploads, {} repositories in {} ms",
        report.blobs,
        super::ci::human(report.bytes),
        report.bytes,
        report.orphan_files,
        report.links,
        report.manifests,
        report.uploads,
        report.repositories,
        report.duration_ms
    );
    if report.dry_run {
        for b in &report.removed.blobs {
            out!("blob      {}  {}", b.digest, b.size);
        }
        for l in &report.removed.links {
            out!("link      {}@{}", l.repository, l.digest);
        }
        for m in &report.removed.manifests {
            out!("manifest  {}@{}  ({})", m.repository, m.digest, m.reason);
        }
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// The storage directory of a CNCF registry (its `rootdirectory`, holding
    /// `docker/registry/v2`), read only.
    #[arg(long, value_name = "DIR")]
    from_distribution: std::path::PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Imports a CNCF registry's storage: every repository, blob, manifest and tag, digests
/// verified. Fails (exit 1, after importing everything else) if anything could not be.
pub async fn import(a: Admin, args: ImportArgs) -> anyhow::Result<()> {
    let by = wharf::store::Who {
        actor: Some(a.actor.clone()),
        credential: None,
        client: None,
    };
    let dir = &args.from_distribution;
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    wharf::store::import::distribution_root(dir)?;
    let json = args.json;
    a.audit(
        "import",
        None,
        format!("from distribution storage {}", dir.display()),
    )
    .await?;
    let result = wharf::store::import::import_distribution(&a.store, dir, &by, |repo, r| {
        if !json {
            eprintln!(
                "{repo}: done ({} repositories, {} blobs copied, {} manifests and {} tags imported so far)",
                r.repositories, r.blobs_copied, r.manifests_imported, r.tags_imported
            );
        }
    })
    .await;
    let report = a.failed("import", result.map_err(Into::into)).await?;
    a.audit(
        "import.done",
        None,
        format!(
            "{} repositories, {} blobs ({} bytes) copied, {} linked, {} present, {} missing, {} manifests ({} present), {} tags, {} moved, {} present, {} left as they are here, {} problems",
            report.repositories,
            report.blobs_copied,
            report.bytes_copied,
            report.blobs_linked,
            report.blobs_present,
            report.blobs_missing,
            report.manifests_imported,
            report.manifests_present,
            report.tags_imported,
            report.tags_moved,
            report.tags_present,
            report.kept.len(),
            report.problems.len()
        ),
    )
    .await?;
    if json {
        out!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        out!(
            "imported {} repositories: {} blobs copied ({}), {} linked, {} already here, {} gone from the source; {} manifests ({} already here); {} tags, {} moved, {} already here; {} left as they are here",
            report.repositories,
            report.blobs_copied,
            super::ci::human(report.bytes_copied),
            report.blobs_linked,
            report.blobs_present,
            report.blobs_missing,
            report.manifests_imported,
            report.manifests_present,
            report.tags_imported,
            report.tags_moved,
            report.tags_present,
            report.kept.len()
        );
        for k in &report.kept {
            out!("left as it is here: {}: {}", k.item, k.why);
        }
        for p in &report.problems {
            out!("not imported: {}: {}", p.item, p.reason);
        }
    }
    if !report.problems.is_empty() {
        bail!(
            "{} items could not be imported (listed in the report); the rest was",
            report.problems.len()
        );
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum RetentionCmd {
    /// Add a rule for a repository, `namespace/*` or `*`; give exactly one action. Only
    /// --keep-last (the tags past its count), --delete-older and --delete-untagged
    /// delete; the others protect.
    Set {
        pattern: String,
        /// Keep tags matching these globs (`v*,prod,staging,latest`).
        #[arg(long, value_name = "GLOBS")]
        keep: Option<String>,
        /// Keep the N most recently pushed tags matching --tags; delete the others
        /// matching.
        #[arg(long, value_name = "N", requires = "tags")]
        keep_last: Option<u32>,
        /// Delete tags matching --tags pushed longer ago than this (`7d`).
        #[arg(long, value_name = "AGE", requires = "tags")]
        delete_older: Option<String>,
        /// Delete manifests untagged for longer than this (`14d`): buildx cache,
        /// replaced `latest`s.
        #[arg(long, value_name = "AGE")]
        delete_untagged: Option<String>,
        /// Keep whatever was pulled within this (`30d`).
        #[arg(long, value_name = "AGE")]
        keep_pulled: Option<String>,
        /// The tag globs of --keep-last and --delete-older.
        #[arg(long, value_name = "GLOBS")]
        tags: Option<String>,
    },
    /// List the rules (the config file's and those added here).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a rule by its id.
    Remove { id: i64 },
    /// Apply the rules now: delete tags, condemn the manifests left untagged (garbage
    /// collection deletes them after gc_delay; `wharf tag restore` undoes until then).
    Run {
        /// Change nothing: print what a run would delete.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
}

pub async fn retention(a: Admin, cmd: RetentionCmd) -> anyhow::Result<()> {
    use wharf::store::retention::RuleConfig;
    match cmd {
        RetentionCmd::Set {
            pattern,
            keep,
            keep_last,
            delete_older,
            delete_untagged,
            keep_pulled,
            tags,
        } => {
            let split = |s: Option<String>| -> Vec<String> {
                s.map(|s| {
                    s.split(',')
                        .map(str::trim)
                        .filter(|g| !g.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
            };
            let mut rule = RuleConfig {
                repositories: pattern,
                tags: split(tags),
                keep: keep.map(|k| split(Some(k))),
                keep_last,
                delete_older_than: delete_older,
                delete_untagged_older_than: delete_untagged,
                keep_pulled_within: keep_pulled,
            }
            .to_rule()
            .map_err(|e| {
                anyhow::anyhow!("{}", e.to_string().replace("keep_last, delete_older_than, delete_untagged_older_than, keep_pulled_within", "--keep-last, --delete-older, --delete-untagged, --keep-pulled").replace("give exactly one of keep,", "give exactly one of --keep,").replace("(tags = [\"main-*\"])", "(--tags 'main-*')"))
            })?;
            rule.source = "cli".into();
            let what = format!("{}: {}", rule.repositories, rule.action);
            a.audit("retention.set", Some(&rule.repositories), what.clone())
                .await?;
            let id = a.registry.retention_rule_add(&rule, Some(&a.actor)).await;
            let id = a.failed("retention.set", id.map_err(Into::into)).await?;
            eprintln!("retention rule {id}: {what}");
            out!("{id}");
        }
        RetentionCmd::List { json } => {
            let rules = a.store.retention_rules().await?;
            if json {
                out!("{}", serde_json::to_string_pretty(&rules)?);
            } else {
                for r in rules {
                    let id = if r.id > 0 {
                        r.id.to_string()
                    } else {
                        "-".into()
                    };
                    out!(
                        "{id:<5} {:<7} {:<24} {}",
                        r.source,
                        r.repositories,
                        r.action
                    );
                }
            }
        }
        RetentionCmd::Remove { id } => {
            a.audit("retention.remove", None, id.to_string()).await?;
            if !a.registry.retention_rule_remove(id).await? {
                bail!("no retention rule {id} (rules of the config file are removed there)");
            }
            eprintln!("removed retention rule {id}");
        }
        RetentionCmd::Run { dry_run, json } => {
            let by = wharf::store::Who {
                actor: Some(a.actor.clone()),
                ..Default::default()
            };
            let report = a.store.retention_run(dry_run, &by).await?;
            if !dry_run {
                a.audit(
                    "retention.run",
                    None,
                    format!(
                        "{} tags deleted, {} manifests condemned, {} bytes to free",
                        report.tags, report.manifests, report.bytes
                    ),
                )
                .await?;
            }
            if json {
                out!("{}", serde_json::to_string_pretty(&report)?);
                return Ok(());
            }
            out!(
                "{:<28} {:<24} {:<19} {:>12}  RULE",
                "REPOSITORY",
                "TAG",
                "DIGEST",
                "BYTES FREED"
            );
            for d in &report.deletions {
                out!(
                    "{:<28} {:<24} {:<19} {:>12}  {}",
                    d.repository,
                    d.tag.as_deref().unwrap_or("(untagged)"),
                    d.digest.get(..19).unwrap_or(&d.digest),
                    d.bytes,
                    d.rule
                );
            }
            let verb = if dry_run { "would delete" } else { "deleted" };
            eprintln!(
                "{verb} {} tags and {} manifests ({} freed by garbage collection after the GC delay)",
                report.tags,
                report.manifests,
                super::ci::human(report.bytes)
            );
        }
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct DeploysArgs {
    #[arg(long)]
    json: bool,
    /// Forget everything an agent reported (one that was decommissioned): retention
    /// no longer spares its digests.
    #[arg(long, value_name = "AGENT")]
    forget: Option<String>,
}

/// What deploy agents report running where, and their rollback targets.
pub async fn deploys(a: Admin, args: DeploysArgs) -> anyhow::Result<()> {
    if let Some(agent) = args.forget {
        let by = wharf::store::Who {
            actor: Some(a.actor.clone()),
            ..Default::default()
        };
        let n = a.store.deployments_forget(&agent, &by).await?;
        if n == 0 {
            bail!("no agent {agent:?} has reported");
        }
        eprintln!("forgot {n} deployments reported by {agent}");
        return Ok(());
    }
    let rows = a.store.deployments().await?;
    if args.json {
        out!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    out!(
        "{:<16} {:<14} {:<14} {:<9} {:<28} {:<19} {:<20} {:<20} BY",
        "AGENT",
        "STACK",
        "SERVICE",
        "STATE",
        "REPOSITORY",
        "DIGEST",
        "DEPLOYED",
        "REPORTED"
    );
    for d in rows {
        out!(
            "{:<16} {:<14} {:<14} {:<9} {:<28} {:<19} {:<20} {:<20} {}",
            d.agent,
            d.stack,
            d.service,
            d.state,
            d.repository,
            d.digest.get(..19).unwrap_or(&d.digest),
            rfc3339(d.deployed_at),
            rfc3339(d.reported_at),
            d.reported_by.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct UsageArgs {
    /// Only this namespace (`team` for `team/api`).
    namespace: Option<String>,
    #[arg(long)]
    json: bool,
    /// Check that the counters equal a recomputation from scratch; fail if not.
    #[arg(long)]
    verify: bool,
}

/// Bytes (a blob counted once per namespace), blobs, tags, manifests, last push.
pub async fn usage(a: Admin, args: UsageArgs) -> anyhow::Result<()> {
    let rows = a
        .store
        .usage_report(args.namespace.as_deref(), args.verify)
        .await?;
    if args.json {
        out!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        out!(
            "{:<11} {:<32} {:>10} {:>6} {:>5} {:>9} {:<20} QUOTA",
            "KIND",
            "NAME",
            "SIZE",
            "BLOBS",
            "TAGS",
            "MANIFESTS",
            "LAST PUSH"
        );
        for r in &rows {
            let quota = r
                .quota
                .map(|q| {
                    format!(
                        "{} ({}%)",
                        wharf::store::meta::human_bytes(q),
                        r.bytes * 100 / q.max(1)
                    )
                })
                .unwrap_or_else(|| "-".into());
            out!(
                "{:<11} {:<32} {:>10} {:>6} {:>5} {:>9} {:<20} {quota}",
                r.kind,
                r.name,
                wharf::store::meta::human_bytes(r.bytes),
                r.blobs,
                r.tags,
                r.manifests,
                r.last_push.map(rfc3339).unwrap_or_else(|| "-".into())
            );
        }
    }
    if args.verify {
        eprintln!("the usage counters equal a recomputation from the blob links");
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum QuotaCmd {
    /// Limit a namespace (`team/*`, its blobs counted once) or a repository, e.g.
    /// `wharf quota set 'team/*' 50GiB`. Pushes past it are refused with DENIED.
    Set {
        target: String,
        size: String,
    },
    List {
        #[arg(long)]
        json: bool,
    },
    Remove {
        target: String,
    },
}

/// `50GiB`, `500MiB`, `2TB`, `1000000`.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: f64 = n.parse().map_err(|_| {
        anyhow::anyhow!("invalid size {s:?}: write a number and a unit, e.g. 50GiB, 500MiB")
    })?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "kB" | "KB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => bail!("invalid size {s:?}: units are B, KiB, MiB, GiB, TiB, kB, MB, GB, TB"),
    };
    let v = n * mult as f64;
    if !(1.0..9.0e18).contains(&v) {
        bail!("invalid size {s:?}: give at least one byte");
    }
    Ok(v as u64)
}

pub async fn quota(a: Admin, cmd: QuotaCmd) -> anyhow::Result<()> {
    match cmd {
        QuotaCmd::Set { target, size } => {
            let bytes = parse_size(&size)?;
            let target = quota_target(&target)?;
            a.audit("quota.set", Some(&target), format!("{bytes} bytes"))
                .await?;
            let r = a.store.quota_set(&target, bytes, Some(&a.actor)).await;
            a.failed("quota.set", r.map_err(Into::into)).await?;
            eprintln!(
                "quota of {target} set to {}",
                wharf::store::meta::human_bytes(bytes)
            );
        }
        QuotaCmd::List { json } => {
            let q = a.store.quotas().await?;
            if json {
                out!("{}", serde_json::to_string_pretty(&q)?);
            } else {
                for q in q {
                    out!(
                        "{:<32} {:>10} used {:>10} ({}%)",
                        q.target,
                        wharf::store::meta::human_bytes(q.bytes),
                        wharf::store::meta::human_bytes(q.used),
                        q.used * 100 / q.bytes.max(1)
                    );
                }
            }
        }
        QuotaCmd::Remove { target } => {
            let target = quota_target(&target)?;
            a.audit("quota.remove", Some(&target), String::new())
                .await?;
            if !a.store.quota_remove(&target).await? {
                bail!("no quota on {target}");
            }
            eprintln!("removed the quota of {target}");
        }
    }
    Ok(())
}

/// `team/*` or a repository name.
fn quota_target(t: &str) -> anyhow::Result<String> {
    match t.strip_suffix("/*") {
        Some(ns) if !ns.contains('/') && wharf::oci::RepoName::parse(ns).is_ok() => {
            Ok(t.to_owned())
        }
        Some(_) => bail!("{t:?}: a quota applies to a namespace (`team/*`) or a repository"),
        None => {
            wharf::oci::RepoName::parse(t).map_err(|e| {
                anyhow::anyhow!("{t:?} is not a repository name or `namespace/*`: {e}")
            })?;
            Ok(t.to_owned())
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum TagCmd {
    /// Point a deleted tag back at its manifest, while garbage collection has not taken
    /// it (`wharf tags list REPO --deleted` lists them).
    Restore {
        /// `namespace/name:tag`
        reference: String,
        /// Which of the tag's deleted versions, if it was deleted more than once.
        #[arg(long)]
        digest: Option<String>,
    },
}

pub async fn tag(a: Admin, cmd: TagCmd) -> anyhow::Result<()> {
    let TagCmd::Restore { reference, digest } = cmd;
    let (repo, tag) = reference
        .rsplit_once(':')
        .filter(|(r, _)| !r.is_empty())
        .with_context(|| format!("{reference:?}: give repository:tag, e.g. team/api:v1"))?;
    let repo = wharf::oci::RepoName::parse(repo)
        .map_err(|e| anyhow::anyhow!("{repo:?} is not a repository name: {e}"))?;
    if !wharf::oci::name::valid_tag(tag) {
        bail!("{tag:?} is not a tag: letters, digits, `_`, `.` and `-`, up to 128");
    }
    let digest: Option<wharf::oci::Digest> = digest
        .map(|d| {
            d.parse()
                .map_err(|e| anyhow::anyhow!("--digest {d:?}: {e}"))
        })
        .transpose()?;
    let by = wharf::store::Who {
        actor: Some(a.actor.clone()),
        ..Default::default()
    };
    let d = a
        .store
        .tag_restore(&repo, tag, digest.as_ref(), &by)
        .await?;
    eprintln!("restored {repo}:{tag} at {d}");
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Make matching tags immutable: once a tag exists it can be neither moved to another
    /// manifest nor deleted (e.g. `wharf policy immutable 'team/*' --tags 'v*,[0-9]*'`).
    Immutable {
        /// A repository, `namespace/*`, or `*`.
        pattern: String,
        /// Comma-separated tag globs: `*`, `?` and classes such as `[0-9]`.
        #[arg(long)]
        tags: String,
    },
    /// List the immutability policies.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a policy by its id.
    Remove { id: i64 },
}

pub async fn policy(a: Admin, cmd: PolicyCmd) -> anyhow::Result<()> {
    match cmd {
        PolicyCmd::Immutable { pattern, tags } => {
            let p = Pattern::parse(&pattern)?;
            let globs = parse_tag_globs(&tags)?;
            let what = format!("{p} tags {}", globs.join(","));
            a.audit("policy.immutable", Some(&p.to_string()), what.clone())
                .await?;
            let added = a
                .registry
                .policy_add(&p.to_string(), &globs, Some(&a.actor))
                .await;
            let id = a
                .failed("policy.immutable", added.map_err(Into::into))
                .await?;
            out!("{id}");
            eprintln!("policy {id}: existing tags of {what} can no longer be moved or deleted");
        }
        PolicyCmd::List { json } => {
            let list = a.registry.policies().await?;
            if json {
                let rows: Vec<_> = list
                    .iter()
                    .map(|p| {
                        serde_json::json!({
                            "id": p.id,
                            "repositories": p.repositories,
                            "tags": p.tags,
                            "created": rfc3339(p.created_at),
                            "created_by": p.created_by,
                        })
                    })
                    .collect();
                out!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                out!("{:<4} {:<24} {:<24} CREATED", "ID", "REPOSITORIES", "TAGS");
                for p in list {
                    out!(
                        "{:<4} {:<24} {:<24} {}",
                        p.id,
                        p.repositories,
                        p.tags.join(","),
                        rfc3339(p.created_at)
                    );
                }
            }
        }
        PolicyCmd::Remove { id } => {
            a.audit("policy.remove", None, id.to_string()).await?;
            let removed = match a.registry.policy_remove(id).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(anyhow::anyhow!("no policy {id}")),
                Err(e) => Err(e.into()),
            };
            a.failed("policy.remove", removed).await?;
            eprintln!("policy {id} removed");
        }
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct GrantArgs {
    user: String,
    /// A repository, `namespace/*`, or `*`.
    pattern: String,
    /// pull, push (includes pull), delete (includes push), admin, or none to remove.
    level: String,
}

pub async fn grant(a: Admin, g: GrantArgs) -> anyhow::Result<()> {
    let p = Pattern::parse(&g.pattern)?;
    if a.meta.user_get(&g.user).await?.is_none() {
        bail!("no user {}", g.user);
    }
    let level = match g.level.as_str() {
        "none" => None,
        other => Some(Level::parse(other).with_context(|| {
            format!("invalid level {other:?}: pull, push, delete, admin or none")
        })?),
    };
    a.audit(
        "grant",
        Some(&p.to_string()),
        format!("{} {}", g.user, g.level),
    )
    .await?;
    let changed = match level {
        None => match a.meta.grant_remove(&g.user, &p.to_string()).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(anyhow::anyhow!("{} has no grant on {p}", g.user)),
            Err(e) => Err(e.into()),
        },
        Some(level) => a
            .meta
            .grant_set(&g.user, &p.to_string(), level.name())
            .await
            .map_err(Into::into),
    };
    a.failed("grant", changed).await?;
    eprintln!("{} now has {} on {p}", g.user, g.level);
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    /// How many of the latest entries to show.
    #[arg(long, default_value_t = 50)]
    limit: u32,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub async fn audit(a: Admin, args: AuditArgs) -> anyhow::Result<()> {
    let entries = a.meta.audit_list(args.limit).await?;
    if args.json {
        let rows: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| {
                serde_json::json!({
                    "at": rfc3339(e.at), "action": e.action, "actor": e.actor,
                    "credential": e.credential, "repository": e.repository,
                    "client": e.client, "detail": e.detail,
                })
            })
            .collect();
        out!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    // Fields may hold what a client sent: control characters are shown escaped, so
    // nothing in the log can move the terminal's cursor or forge a line.
    let shown = |v: Option<String>, none: &str| -> String {
        let v = v.unwrap_or_else(|| none.to_owned());
        if v.chars().any(char::is_control) {
            v.chars()
                .map(|c| {
                    if c.is_control() {
                        c.escape_default().to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect()
        } else {
            v
        }
    };
    for e in entries {
        out!(
            "{}  {:<18} {:<16} {:<13} {:<24} {:<15} {}",
            rfc3339(e.at),
            shown(Some(e.action), "-"),
            shown(e.actor, "-"),
            shown(e.credential, "-"),
            shown(e.repository, "-"),
            shown(e.client, "-"),
            shown(e.detail, "")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes() {
        assert_eq!(parse_lifetime("never").unwrap(), None);
        assert_eq!(parse_lifetime("90d").unwrap(), Some(90 * 86_400_000));
        assert_eq!(parse_lifetime("30m").unwrap(), Some(1_800_000));
        for bad in ["", "d", "0d", "-1d", "10", "5w", "1.5d"] {
            assert!(parse_lifetime(bad).is_err(), "{bad}");
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum WebhookCmd {
    /// Send registry events to URL, signed with a secret (printed if generated).
    Add {
        url: String,
        /// The HMAC-SHA256 signing secret (at least 16 characters) [default: generated]
        #[arg(long)]
        secret: Option<String>,
        /// A repository, `namespace/*`, or `*`
        #[arg(long, default_value = "*")]
        repositories: String,
        /// Comma-separated tag globs (`*` for all)
        #[arg(long, default_value = "*")]
        tags: String,
        /// Comma-separated: push, tag, untag, delete
        #[arg(long, default_value = "push,tag")]
        actions: String,
        /// Payload: wharf, cncf (Distribution's envelope) or dockerhub (Docker Hub's push)
        #[arg(long, default_value = "wharf")]
        format: String,
    },
    /// List the webhooks (secrets are not shown).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a webhook and its delivery log.
    Remove { id: String },
    /// Send a signed test event now and show the answer.
    Test { id: String },
    /// The delivery log of a webhook, newest first.
    Deliveries {
        id: String,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
}

pub async fn webhook(a: Admin, cmd: WebhookCmd) -> anyhow::Result<()> {
    use wharf::events::{WebhookConfig, validate};
    let find = |id: String| {
        let events = Arc::clone(&a.events);
        async move {
            events
                .webhooks()
                .await?
                .into_iter()
                .find(|h| h.id == id)
                .with_context(|| format!("no webhook {id}"))
        }
    };
    match cmd {
        WebhookCmd::Add {
            url,
            secret,
            repositories,
            tags,
            actions,
            format,
        } => {
            let generated = secret.is_none();
            let secret = secret.unwrap_or_else(|| {
                let mut b = [0u8; 24];
                getrandom::fill(&mut b).expect("system randomness");
                hex::encode(b)
            });
            let split = |s: &str| -> Vec<String> {
                s.split(',')
                    .map(str::trim)
                    .filter(|x| !x.is_empty())
                    .map(str::to_owned)
                    .collect()
            };
            let config = WebhookConfig {
                url,
                secret: secret.clone(),
                repositories,
                tags: vec![tags],
                actions: split(&actions),
                format,
            };
            let mut id = [0u8; 6];
            getrandom::fill(&mut id).expect("system randomness");
            let record = validate(format!("wh-{}", hex::encode(id)), &config, "cli")?;
            a.audit("webhook.add", None, format!("{} {}", record.id, record.url))
                .await?;
            let added = a.events.webhook_put(&record).await;
            a.failed("webhook.add", added.map_err(Into::into)).await?;
            out!("{}", record.id);
            if generated {
                out!("{secret}");
                eprintln!(
                    "webhook {} added; its signing secret is shown above, only this once",
                    record.id
                );
            } else {
                eprintln!("webhook {} added", record.id);
            }
        }
        WebhookCmd::List { json } => {
            let hooks = a.events.webhooks().await?;
            if json {
                let rows: Vec<_> = hooks
                    .iter()
                    .map(|h| {
                        serde_json::json!({
                            "id": h.id, "url": h.url, "repositories": h.repositories,
                            "tags": h.tags, "actions": h.actions, "format": h.format,
                            "source": h.source, "created": rfc3339(h.created_at),
                        })
                    })
                    .collect();
                out!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                out!(
                    "{:<16} {:<8} {:<10} {:<14} {:<12} {:<12} URL",
                    "ID",
                    "SOURCE",
                    "FORMAT",
                    "REPOSITORIES",
                    "TAGS",
                    "ACTIONS"
                );
                for h in hooks {
                    out!(
                        "{:<16} {:<8} {:<10} {:<14} {:<12} {:<12} {}",
                        h.id,
                        h.source,
                        h.format,
                        h.repositories,
                        h.tags.join(","),
                        h.actions.join(","),
                        h.url
                    );
                }
            }
        }
        WebhookCmd::Remove { id } => {
            let hook = find(id.clone()).await?;
            if hook.source == "config" {
                bail!("webhook {id} comes from the config file; remove it there");
            }
            a.audit("webhook.remove", None, id.clone()).await?;
            let removed = a.events.webhook_remove(&id).await;
            a.failed("webhook.remove", removed.map_err(Into::into))
                .await?;
            eprintln!("webhook {id} removed");
        }
        WebhookCmd::Test { id } => {
            let hook = find(id).await?;
            let event = wharf::store::meta::EventRecord {
                id: 0,
                uuid: uuid::Uuid::new_v4().to_string(),
                at: wharf::store::meta::now_ms(),
                action: "ping".into(),
                repository: "wharf/test".into(),
                tag: Some("test".into()),
                digest: format!("sha256:{}", "0".repeat(64)),
                media_type: None,
                size: None,
                actor: Some(a.actor.clone()),
                quota: None,
                detail: None,
            };
            let http = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .build()?;
            match wharf::events::send(&http, &hook, &event, 0, &a.registry_url).await {
                Ok(code) if (200..300).contains(&code) => out!("{} answered {code}", hook.url),
                Ok(code) => bail!("{} answered {code}", hook.url),
                Err(e) => bail!("{} did not answer: {e}", hook.url),
            }
        }
        WebhookCmd::Deliveries { id, limit, json } => {
            find(id.clone()).await?;
            let list = a.events.deliveries(&id, limit).await?;
            if json {
                let rows: Vec<_> = list
                    .iter()
                    .map(|d| {
                        serde_json::json!({
                            "id": d.id, "event": d.event_uuid, "action": d.action,
                            "repository": d.repository, "tag": d.tag, "digest": d.digest,
                            "status": d.status, "attempts": d.attempts,
                            "response_code": d.response_code, "last_error": d.last_error,
                            "next_attempt": (d.status == "pending").then(|| rfc3339(d.next_attempt_at)),
                            "created": rfc3339(d.created_at), "updated": rfc3339(d.updated_at),
                        })
                    })
                    .collect();
                out!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                out!(
                    "{:<6} {:<8} {:<30} {:<10} {:>8} {:>5}  {:<20} LAST ERROR",
                    "ID",
                    "ACTION",
                    "REFERENCE",
                    "STATUS",
                    "ATTEMPTS",
                    "CODE",
                    "UPDATED"
                );
                for d in list {
                    let reference = match &d.tag {
                        Some(t) => format!("{}:{t}", d.repository),
                        None => format!(
                            "{}@{}",
                            d.repository,
                            d.digest.get(..19).unwrap_or(&d.digest)
                        ),
                    };
                    out!(
                        "{:<6} {:<8} {:<30} {:<10} {:>8} {:>5}  {:<20} {}",
                        d.id,
                        d.action,
                        reference,
                        d.status,
                        d.attempts,
                        d.response_code.map_or("-".to_owned(), |c| c.to_string()),
                        rfc3339(d.updated_at),
                        d.last_error.unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// The configuration file of the registry to copy to: `database_url` (PostgreSQL)
    /// and `[storage]` (S3, or files under its `data`).
    #[arg(long, value_name = "FILE")]
    to: std::path::PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Copies the embedded registry of `data` to the registry `--to` describes, verifying
/// every digest; fails (exit 1) if anything could not be copied, in which case the
/// destination's metadata is left as it was.
pub fn migrate(data: &crate::cli::DataArgs, args: MigrateArgs) -> anyhow::Result<()> {
    let source = data.resolve()?;
    if source.database_url.is_some() {
        bail!(
            "the source must be an embedded registry (its metadata in the data directory), but database_url is set for it"
        );
    }
    let dest = wharf::config::Config::resolve(Default::default(), Some(&args.to))?;
    let Some(url) = dest.database_url.clone() else {
        bail!(
            "{} sets no database_url: the registry to copy to keeps its metadata in PostgreSQL",
            args.to.display()
        );
    };
    let db = source.data.join("meta.db");
    if !db.is_file() {
        bail!("{} holds no registry (no meta.db)", source.data.display());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (source_blobs, _) = wharf::store::open_backends(
            &source.data,
            None,
            &source.storage,
            wharf::store::blob::DEFAULT_UPLOAD_MEMORY_MIB,
        )
        .await
        .with_context(|| format!("opening {}", source.data.display()))?;
        let dest_blobs: Arc<dyn wharf::store::BlobStore> = match &dest.storage {
            wharf::config::Storage::Fs => Arc::new(
                wharf::store::FsBlobStore::open(&dest.data)
                    .with_context(|| format!("opening {}", dest.data.display()))?,
            ),
            wharf::config::Storage::S3(s3) => Arc::new(
                wharf::store::blob::S3BlobStore::new(
                    s3.clone(),
                    wharf::store::blob::DEFAULT_UPLOAD_MEMORY_MIB,
                )
                .map_err(|e| anyhow::anyhow!("[storage] of {}: {e}", args.to.display()))?,
            ),
        };
        dest_blobs
            .ready()
            .await
            .map_err(|e| anyhow::anyhow!("the destination storage is not usable: {e}"))?;
        let started = std::time::Instant::now();
        let report = wharf::store::migrate::migrate(
            &db,
            source_blobs.as_ref(),
            url.expose(),
            dest_blobs.as_ref(),
        )
        .await?;
        if args.json {
            out!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            out!(
                "copied {} blobs ({}), {} already there; {} rows written, {} deleted, in {} ms",
                report.blobs_copied,
                wharf::store::meta::human_bytes(report.bytes_copied),
                report.blobs_present,
                report.rows,
                report.rows_deleted,
                started.elapsed().as_millis()
            );
        }
        for p in &report.problems {
            eprintln!("wharf: {p}");
        }
        if !report.problems.is_empty() {
            bail!(
                "{} problems; nothing of the metadata was switched",
                report.problems.len()
            );
        }
        Ok(())
    })
}
