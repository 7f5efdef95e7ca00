//! Subcommands. Nothing else depends on this module.

/// `println!` for command output: a reader that goes away (`wharf audit | head`) ends
/// the command quietly instead of a panic.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!($($arg)*))
    };
}

mod admin;
mod agent;
mod ci;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wharf::auth::Secret;
use wharf::config::{Config, Overrides};

#[derive(Parser, Debug)]
#[command(
    name = "wharf",
    version,
    about = "A self-hosted container registry and deploy pipeline"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the registry.
    Serve(ServeArgs),
    /// The tags of this build, from CI's git context (`wharf tags list` lists a
    /// repository's tags).
    Tags(Box<ci::TagsArgs>),
    /// Point a tag at the exact image another reference names, on the registry, without
    /// moving layer bytes (`wharf promote team/api:staging team/api:prod`).
    Promote(ci::PromoteArgs),
    /// Run the deploy agent on a server: follow tags, redeploy compose stacks, check
    /// health, roll back.
    Agent(agent::AgentArgs),
    /// Talk to the deploy agent: status, history, deploy now, roll back.
    Deploy(agent::DeployArgs),
    /// Manage users (works on the data directory, server running or not).
    #[command(subcommand)]
    User(admin::UserCmd),
    /// Manage access tokens for CI and servers.
    #[command(subcommand)]
    Token(admin::TokenCmd),
    /// Repository settings.
    #[command(subcommand)]
    Repo(admin::RepoCmd),
    /// Webhooks: registry events sent, signed, to your endpoints.
    #[command(subcommand)]
    Webhook(admin::WebhookCmd),
    /// Tag immutability policies.
    #[command(subcommand)]
    Policy(admin::PolicyCmd),
    /// Give a user a permission level on a repository or namespace (`team/*`).
    Grant(admin::GrantArgs),
    /// Show the audit log: logins, token and permission changes, pushes, deletes.
    Audit(admin::AuditArgs),
    /// Garbage collection: remove now what nothing references (blobs, links, orphaned
    /// referrers, expired uploads, empty repositories), server running or not.
    Gc(admin::GcArgs),
    /// Retention rules: which tags and untagged manifests are deleted, which are kept.
    #[command(subcommand)]
    Retention(admin::RetentionCmd),
    /// What deploy agents report running where (retention never deletes those digests).
    Deploys(admin::DeploysArgs),
    /// Storage used per namespace and repository, with quotas.
    Usage(admin::UsageArgs),
    /// Storage quotas per namespace (`team/*`) or repository.
    #[command(subcommand)]
    Quota(admin::QuotaCmd),
    /// Tags: restore one deleted by hand or by retention.
    #[command(subcommand)]
    Tag(admin::TagCmd),
    /// Copy another registry's storage into this one (`--from-distribution DIR`: the
    /// CNCF registry's filesystem storage), server running or not; run again to resume
    /// or to copy what changed since.
    Import(admin::ImportArgs),
    /// Copy this embedded registry (SQLite and blob files) to PostgreSQL and S3 (or
    /// other storage), as the configuration file `--to` names them; run again to copy
    /// only what changed since, then switch.
    Migrate(admin::MigrateArgs),
}

/// Where the data directory is, for the admin commands.
#[derive(clap::Args, Debug, Clone)]
pub struct DataArgs {
    /// Directory holding blobs and metadata [default: ./wharf-data]
    #[arg(long, env = "WHARF_DATA", value_name = "DIR", global = true)]
    data: Option<PathBuf>,
    /// TOML configuration file
    #[arg(long, env = "WHARF_CONFIG", value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Garbage collection keeps what became unreferenced less than this long ago (24h,
    /// 30m, 0s) [default: 24h]
    #[arg(long, env = "WHARF_GC_DELAY", value_name = "DURATION", global = true, value_parser = wharf::time::parse_duration)]
    gc_delay: Option<std::time::Duration>,
    /// Metadata in PostgreSQL instead of the data directory's SQLite database
    /// (postgres://USER:PASSWORD@HOST:PORT/DATABASE)
    #[arg(
        long,
        env = "WHARF_DATABASE_URL",
        value_name = "URL",
        global = true,
        hide_env_values = true
    )]
    database_url: Option<String>,
}

impl DataArgs {
    pub(crate) fn resolve(&self) -> anyhow::Result<Config> {
        let o = Overrides {
            data: self.data.clone(),
            database_url: self.database_url.clone().map(Secret::new),
            gc_delay: self.gc_delay,
            ..Overrides::default()
        };
        Ok(Config::resolve(o, self.config.as_deref())?)
    }
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:5000]
    #[arg(long, env = "WHARF_LISTEN", value_name = "ADDR")]
    listen: Option<String>,
    /// Token service name [default: wharf]
    #[arg(long, env = "WHARF_SERVICE", value_name = "NAME")]
    service: Option<String>,
    /// URL clients reach the registry by, when a reverse proxy sits in front
    #[arg(long, env = "WHARF_PUBLIC_URL", value_name = "URL")]
    public_url: Option<String>,
    /// Serve HTTPS with this PEM certificate chain (needs --tls-key)
    #[arg(long, env = "WHARF_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert
    #[arg(long, env = "WHARF_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Where the access log goes: stderr, off, or a file [default: stderr]
    #[arg(long, env = "WHARF_ACCESS_LOG", value_name = "WHERE")]
    access_log: Option<String>,
    /// The access log's format [default: text]
    #[arg(long, env = "WHARF_ACCESS_LOG_FORMAT", value_name = "FORMAT")]
    access_log_format: Option<wharf::config::AccessLogFormat>,
}

/// Writes one line of output; exits 0 at once if the reader has gone (a closed pipe).
pub(crate) fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_fmt(args).and_then(|()| o.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("wharf: cannot write the output: {e}");
        std::process::exit(1);
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WHARF_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Serve(args) => serve(args, cli.data),
        Command::Agent(a) => agent::agent(a, cli.data.config.as_deref()),
        Command::Deploy(a) => agent::deploy(a),
        Command::Tags(a) => ci::tags_cmd(*a, cli.data.config.as_deref()),
        Command::Promote(a) => ci::promote_cmd(a),
        Command::User(c) => admin::run(&cli.data, |a| Box::pin(admin::user(a, c))),
        Command::Token(c) => admin::run(&cli.data, |a| Box::pin(admin::token(a, c))),
        Command::Repo(c) => admin::run(&cli.data, |a| Box::pin(admin::repo(a, c))),
        Command::Webhook(c) => admin::run(&cli.data, |a| Box::pin(admin::webhook(a, c))),
        Command::Policy(c) => admin::run(&cli.data, |a| Box::pin(admin::policy(a, c))),
        Command::Grant(c) => admin::run(&cli.data, |a| Box::pin(admin::grant(a, c))),
        Command::Audit(c) => admin::run(&cli.data, |a| Box::pin(admin::audit(a, c))),
        Command::Gc(c) => admin::run(&cli.data, |a| Box::pin(admin::gc(a, c))),
        Command::Retention(c) => admin::run(&cli.data, |a| Box::pin(admin::retention(a, c))),
        Command::Tag(c) => admin::run(&cli.data, |a| Box::pin(admin::tag(a, c))),
        Command::Deploys(c) => admin::run(&cli.data, |a| Box::pin(admin::deploys(a, c))),
        Command::Usage(c) => admin::run(&cli.data, |a| Box::pin(admin::usage(a, c))),
        Command::Quota(c) => admin::run(&cli.data, |a| Box::pin(admin::quota(a, c))),
        Command::Import(c) => admin::run(&cli.data, |a| Box::pin(admin::import(a, c))),
        Command::Migrate(c) => admin::migrate(&cli.data, c),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wharf: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs, data: DataArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        listen: args.listen,
        data: data.data,
        database_url: data.database_url.map(Secret::new),
        service: args.service,
        public_url: args.public_url,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        access_log: args.access_log,
        access_log_format: args.access_log_format,
        gc_delay: data.gc_delay,
        admin_password: std::env::var("WHARF_ADMIN_PASSWORD")
            .ok()
            .filter(|p| !p.is_empty())
            .map(Secret::new),
    };
    let config = Config::resolve(overrides, data.config.as_deref())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let shutdown = shutdown_signal()?;
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        wharf::server::serve(listener, config, shutdown).await?;
        Ok(())
    })
}

/// Installs the SIGINT and SIGTERM handlers now (before the port opens, so no signal
/// can arrive unhandled) and returns the future that completes on either.
pub(crate) fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn verify_cli() {
        super::Cli::command().debug_assert();
    }
}
