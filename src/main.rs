//! The `portcullis` command: flags, logging, configuration, then serve (or a helper command).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use portcullis::bootstrap;
use portcullis::config::{Config, FlagOverrides, LogFormat, DEFAULT_CONFIG_FILE};
use portcullis::server::Server;
use portcullis::shutdown::Shutdown;

#[derive(Parser)]
#[command(name = "portcullis", version, about = "A hardened TLS gateway")]
struct Cli {
    /// Configuration file (default: ./portcullis.toml when it exists).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Overrides server.listen.
    #[arg(long, global = true)]
    listen: Option<SocketAddr>,
    /// Overrides admin.listen.
    #[arg(long, global = true)]
    admin_listen: Option<SocketAddr>,
    /// Overrides log.format.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    /// Overrides log.level (a tracing filter such as "info" or "portcullis=debug").
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default). With no configuration, bootstraps a development setup first.
    Serve,
    /// Certificate helpers.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Token helpers.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Validate the configuration, print the effective one, exit 0 (valid) or 1.
    CheckConfig,
    /// Exit 0 when the admin /healthz answers 200 (for Docker's HEALTHCHECK).
    Healthcheck {
        /// Default: /healthz on admin.listen, from the configuration file (if any), the
        /// environment (PORTCULLIS_ADMIN_LISTEN) and --admin-listen.
        #[arg(long)]
        url: Option<String>,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Generate a CA, a server certificate and a client certificate.
    Generate {
        /// Output folder.
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Server names (DNS names or IP addresses); default localhost, 127.0.0.1, ::1.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Replace existing files (by default nothing is written when any exists: a
        /// replaced CA key orphans every certificate it signed).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a fresh token and its [[auth.tokens]] entry.
    New {
        #[arg(long)]
        name: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("portcullis: {}", said_once(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes, each said once. Many messages already include their cause
/// (`"cannot listen on {addr}: {source}"`); `{:#}` would then print it a second time.
fn said_once(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let flags = FlagOverrides {
        listen: cli.listen,
        admin_listen: cli.admin_listen,
        log_format: cli.log_format,
        log_level: cli.log_level.clone(),
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(cli.config, &flags),
        Command::CheckConfig => check_config(cli.config, &flags),
        Command::Healthcheck { url } => Ok(healthcheck(url, cli.config, &flags)),
        Command::Certs {
            command: CertsCommand::Generate { out, sans, force },
        } => {
            let sans = if sans.is_empty() {
                bootstrap::default_sans()
            } else {
                sans
            };
            let existing = if force {
                bootstrap::Existing::Replace
            } else {
                bootstrap::Existing::Refuse
            };
            let paths = bootstrap::generate_certs_with(&out, &sans, existing)?;
            println!("CA:     {}", paths.ca_cert.display());
            println!(
                "server: {} {}",
                paths.server_cert.display(),
                paths.server_key.display()
            );
            println!(
                "client: {} {}",
                paths.client_cert.display(),
                paths.client_key.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Token {
            command: TokenCommand::New { name },
        } => {
            let (token, digest) = bootstrap::new_token();
            println!(
                "token: {token}\n\n# add to portcullis.toml:\n{}",
                bootstrap::token_entry(&name, &digest)
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The configuration file to use: `--config`, else `./portcullis.toml` if present.
fn config_path(explicit: Option<PathBuf>) -> Option<PathBuf> {
    explicit.or_else(|| {
        Path::new(DEFAULT_CONFIG_FILE)
            .exists()
            .then(|| PathBuf::from(DEFAULT_CONFIG_FILE))
    })
}

fn check_config(path: Option<PathBuf>, flags: &FlagOverrides) -> anyhow::Result<ExitCode> {
    let path = config_path(path);
    let result = Config::load(path.as_deref(), std::env::vars(), flags)
        .map_err(anyhow::Error::from)
        .and_then(|config| {
            portcullis::gateway::Gateway::new(config.clone(), Shutdown::new())?;
            Ok(config)
        });
    match result {
        Ok(config) => {
            if let Some(warning) = config.unknown_env_warning() {
                eprintln!("warning: {warning}");
            }
            print!("{}", config.to_toml());
            eprintln!("configuration OK");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("configuration invalid: {}", said_once(&e));
            Ok(ExitCode::FAILURE)
        }
    }
}

/// How long a health check may take before it counts as failed.
const HEALTHCHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

fn healthcheck(url: Option<String>, config: Option<PathBuf>, flags: &FlagOverrides) -> ExitCode {
    let url = url.unwrap_or_else(|| healthz_url(config, flags));
    match http_status(&url) {
        Ok(200) => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("healthcheck: {url} answered {status}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("healthcheck: {url}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The admin `/healthz` URL as `serve` would listen: the configuration file if there is
/// one, then the `PORTCULLIS_*` variables (`PORTCULLIS_ADMIN_LISTEN` in a container) and the
/// flags. An unspecified address (`0.0.0.0`, `[::]`) is probed on loopback.
fn healthz_url(config: Option<PathBuf>, flags: &FlagOverrides) -> String {
    let admin = match Config::load(config_path(config).as_deref(), std::env::vars(), flags) {
        Ok(config) => config.admin.listen,
        Err(e) => {
            eprintln!("healthcheck: configuration not loaded ({e}); probing the default address");
            portcullis::config::AdminSection::default().listen
        }
    };
    if admin.ip().is_unspecified() {
        format!("http://127.0.0.1:{}/healthz", admin.port())
    } else {
        format!("http://{admin}/healthz")
    }
}

/// The status code of a plain-HTTP GET: enough for a health check in an image that has no
/// curl and no shell.
fn http_status(url: &str) -> anyhow::Result<u16> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("only http:// URLs are supported"))?;
    let (authority, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(a, p)| (a, format!("/{p}")));
    let addr = authority
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{authority} does not resolve"))?;
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, HEALTHCHECK_TIMEOUT)?;
    tcp.set_read_timeout(Some(HEALTHCHECK_TIMEOUT))?;
    tcp.set_write_timeout(Some(HEALTHCHECK_TIMEOUT))?;
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 64];
    let n = tcp.read(&mut head)?;
    let line = String::from_utf8_lossy(&head[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("not an HTTP response"))
}

fn serve(explicit: Option<PathBuf>, flags: &FlagOverrides) -> anyhow::Result<ExitCode> {
    let dev = if explicit.is_none() {
        Some(bootstrap::dev_setup(Path::new("."))?)
    } else {
        None
    };
    let path = config_path(explicit);
    let config = Config::load(path.as_deref(), std::env::vars(), flags)?;
    init_logging(&config);
    portcullis::descriptors::check_at_start(&config);
    if let Some(warning) = config.unknown_env_warning() {
        tracing::warn!("{warning}");
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.server.workers > 0 {
        runtime.worker_threads(config.server.workers);
    }
    let runtime = runtime.enable_all().build()?;
    runtime.block_on(async move {
        if config.auth.mode == portcullis::config::AuthMode::None {
            tracing::warn!("auth.mode = \"none\": every command is served unauthenticated");
        }
        let shutdown = Shutdown::new();
        shutdown.listen_for_signals()?;
        let server = Server::bind(config, shutdown)?;
        if let Some(dev) = &dev {
            print!("{}", bootstrap::dev_instructions(dev, server.local_addr()?));
        }
        tracing::info!(listen = %server.local_addr()?, admin = %server.admin_addr()?, "portcullis serving");
        // On a worker thread, not this one (block_on's): the accept loop then hands each
        // connection's task to its own worker's queue instead of waking another thread for
        // every connection (a futex wake and two context switches each, measured with
        // `strace -c` and `perf`).
        tokio::spawn(server.run()).await?;
        anyhow::Ok(())
    })?;
    // Connections are done; a blocking task still running (a reload stuck on a file) is
    // left behind rather than waited for.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(ExitCode::SUCCESS)
}

/// Logs to stderr in the configured format, every line a peer can cause rate-limited
/// ([`portcullis::logging::LineLimit`]), `log` records of the libraries (rustls) included.
fn init_logging(config: &Config) {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let format = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let format = match config.log.format {
        LogFormat::Json => format.json().boxed(),
        LogFormat::Text => format.boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(portcullis::logging::LineLimit)
        .with(format)
        .init();
}
