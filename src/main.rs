//! The `keygate` command: `serve --config FILE`, `serve --dev [--upstream URL]`,
//! `check-config FILE`, `migrate`, `explain --config FILE METHOD PATH`,
//! `import --admin URL --file FILE`. Config errors print on stderr and exit 64 before anything starts;
//! `--help` lists the environment variables and exit codes.

use clap::{ArgGroup, CommandFactory, Parser, Subcommand};
use keygate::config::Config;
use keygate::App;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

// mimalloc: size classes without glibc's per-block header and per-thread free lists
// without arena locks. A cached key is a dozen small allocations (moka's entry, the
// identity): this cuts their RSS, and the per-request allocations of the HTTP stack are
// cheaper (see benches/RESULTS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// What `--help` adds below the options: the environment and the exit codes.
const ENVIRONMENT: &str = "\
Environment:
  KEYGATE_ROOT_TOKEN    the admin API's root token, >= 16 characters (the variable is
                        named by admin.root_token_env; else admin.root_token_file)
  KEYGATE_PEPPER        HMAC pepper for key digests (named by keys.pepper_env)
  KEYGATE_ADMIN_TOKEN   import: the admin token sent (else KEYGATE_ROOT_TOKEN)
  KEYGATE_REDIS_URL     one Redis server, replacing store.redis's mode
  KEYGATE_REDIS_SENTINEL_NODES, KEYGATE_REDIS_SENTINEL_MASTER
                        sentinels (host:port, comma-separated) and the master name
  KEYGATE_REDIS_CLUSTER_NODES
                        Redis Cluster seed URLs, comma-separated
  KEYGATE_UPSTREAM      overrides proxy.upstream
  KEYGATE_PROXY_LISTEN  overrides proxy.listen
  KEYGATE_ADMIN_LISTEN  overrides admin.listen
  KEYGATE_LOG           log filter, e.g. info or info,keygate::access=off (else RUST_LOG;
                        default info)
  KEYGATE_LOG_FORMAT    json for one JSON object per line (default text)

Exit codes:
  0   stopped by SIGTERM or Ctrl-C after draining; check-config: the file is valid;
      explain: a route matches
  1   could not start (a port in use, an unreadable certificate, ...) or the proxy
      stopped serving without being asked to; explain: no route matches, or the
      method or path is refused
  2   bad command line
  1   import: a line failed, the file is bad, or the admin API refused or was unreachable
  64  the config file is invalid (the message names file, line and field)";

#[derive(Parser)]
#[command(
    name = "keygate",
    version,
    about = "API-key authentication sidecar and reverse proxy",
    after_help = ENVIRONMENT
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy and admin listeners, from a config file or in dev mode.
    #[command(
        group(ArgGroup::new("source").required(true).args(["config", "dev"])),
        after_help = ENVIRONMENT
    )]
    Serve {
        /// The YAML config file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Try it out: in-memory keys, a printed root token, built-in config.
        #[arg(long)]
        dev: bool,
        /// With --dev: the app to protect (default: a built-in echo server). With
        /// --config, set proxy.upstream (or KEYGATE_UPSTREAM) instead.
        #[arg(long)]
        upstream: Option<String>,
    },
    /// Copy every key from a standalone Redis into the store of a config file (for
    /// example a Redis Cluster, whose layout differs). Safe to run again.
    Migrate {
        /// The Redis the keys are in now, `redis://host:port/db`.
        #[arg(long)]
        from: String,
        /// Their namespace there (default: the config's `store.redis.namespace`).
        #[arg(long)]
        from_namespace: Option<String>,
        /// The config whose store receives the keys.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Import keys made before keygate from a JSON-lines file (one entry of
    /// `POST /v1/api-keys/import` a line) through a running keygate's admin API. The
    /// token is KEYGATE_ADMIN_TOKEN (else KEYGATE_ROOT_TOKEN): root, or a key with
    /// `keys:write`.
    Import {
        /// The admin API, e.g. http://127.0.0.1:9901.
        #[arg(long)]
        admin: String,
        /// The keys, one JSON object a line.
        #[arg(long)]
        file: PathBuf,
        /// Import into this tenant (X-Tenant-ID; the root token only, or a key's own).
        #[arg(long)]
        tenant: Option<String>,
        /// Entries per call (1 to 1000).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..=1000))]
        batch: u16,
    },
    /// Validate a config file and print its compiled route table.
    CheckConfig {
        /// The YAML config file.
        file: PathBuf,
    },
    /// Show how a config routes a request, offline (no key is checked, no store read):
    /// the normalised path, the route it matches and what that route requires.
    Explain {
        /// The YAML config file.
        #[arg(long, short)]
        config: PathBuf,
        /// The request's method, as sent (`GET`).
        method: String,
        /// The request's path, as sent (`/users/%2e%2e/admin`).
        path: String,
    },
}

const EX_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Serve {
        dev: false,
        upstream: Some(_),
        ..
    } = &cli.command
    {
        // clap's `requires` is met by a flag's default, so this is checked here.
        let mut cli = Cli::command();
        cli.build(); // names the subcommand `keygate serve` in the usage line
        let serve = cli.find_subcommand_mut("serve").cloned();
        serve
            .unwrap_or(cli)
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--upstream works with --dev only; with --config, set proxy.upstream in the \
                 file (or KEYGATE_UPSTREAM)",
            )
            .exit();
    }
    // Held to the end of main: dropping it writes the lines still queued.
    let _logging = keygate::logging::init();
    match cli.command {
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(c) => {
                println!("{}: OK", file.display());
                print!("{}", c.live.policy.describe());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EX_CONFIG)
            }
        },
        Command::Explain {
            config,
            method,
            path,
        } => explain(&config, &method, &path),
        Command::Serve {
            config,
            dev,
            upstream,
        } => match runtime() {
            Ok(r) => r.block_on(serve(config, dev, upstream)),
            Err(code) => code,
        },
        Command::Migrate {
            from,
            from_namespace,
            config,
        } => match runtime() {
            Ok(r) => r.block_on(migrate(from, from_namespace, config)),
            Err(code) => code,
        },
        Command::Import {
            admin,
            file,
            tenant,
            batch,
        } => match runtime() {
            Ok(r) => r.block_on(import(admin, file, tenant, batch.into())),
            Err(code) => code,
        },
    }
}

/// `keygate import`: exit 0 when every line imported, 1 otherwise, 2 without a token.
async fn import(admin: String, file: PathBuf, tenant: Option<String>, batch: usize) -> ExitCode {
    use keygate::loader::{self, Job, LoadError, Report};
    let Some(token) = ["KEYGATE_ADMIN_TOKEN", "KEYGATE_ROOT_TOKEN"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|t| !t.is_empty()))
    else {
        eprintln!(
            "error: set KEYGATE_ADMIN_TOKEN (or KEYGATE_ROOT_TOKEN) to a token with keys:write"
        );
        return ExitCode::from(2);
    };
    #[allow(
        clippy::disallowed_methods,
        reason = "a one-shot CLI reading its input file once"
    )]
    let read = std::fs::read_to_string(&file)
        .map_err(|e| LoadError::Setup(format!("{}: {e}", file.display())))
        .and_then(|text| loader::read_lines(&text));
    let entries = match read {
        Ok(entries) => entries,
        Err(LoadError::BadLines(bad)) => {
            for b in &bad {
                eprintln!("{}:{}: {}", file.display(), b.line, b.message);
            }
            eprintln!("error: {} bad line(s); nothing was imported", bad.len());
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let job = Job {
        admin,
        token,
        tenant,
        batch,
    };
    let summary = |r: &Report| {
        for w in &r.warnings {
            eprintln!("line {}: warning {}: {}", w.line, w.code, w.message);
        }
        for f in &r.failed {
            println!("line {}: {}: {}", f.line, f.code, f.message);
        }
        println!("{} imported, {} failed", r.imported, r.failed.len());
    };
    let ran = loader::run(&job, entries, |sent, total, r| {
        eprintln!(
            "import: {sent}/{total} lines sent, {} imported, {} failed",
            r.imported,
            r.failed.len()
        );
    })
    .await;
    match ran {
        Ok(r) => {
            summary(&r);
            if r.failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(LoadError::Stopped { message, report }) => {
            summary(&report);
            eprintln!("error: {message}; the lines after the last progress line were not imported");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `keygate explain`: exit 0 when a route matches, 1 when none does or the method or
/// path is refused, 2 for a method that is no HTTP method, 64 for a bad config.
fn explain(file: &std::path::Path, method: &str, path: &str) -> ExitCode {
    let config = match Config::load(file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let method = match keygate::explain::parse_method(method) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: METHOD: {e}");
            return ExitCode::from(2);
        }
    };
    let e = keygate::explain::route_only(&config.live.policy, &method, path);
    println!("{method} {path}");
    println!(
        "normalized path: {}",
        e.normalized_path.as_deref().unwrap_or("-")
    );
    match &e.route {
        Some(r) => println!(
            "route: {} (auth: {}, scopes: [{}], publishable keys: {})",
            r.name,
            r.auth,
            r.scopes.join(" "),
            if r.allow_publishable {
                "allowed"
            } else {
                "refused"
            }
        ),
        None => println!("route: -"),
    }
    for reason in &e.reasons {
        println!("  - {reason}");
    }
    if e.decision.allowed {
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "error: the proxy answers {} {} to this request, before any key is looked at",
        e.decision.status.unwrap_or(0),
        e.decision.code
    );
    ExitCode::FAILURE
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}

/// `keygate migrate`: exit 0 when every key is in the target, 1 otherwise.
async fn migrate(from: String, from_namespace: Option<String>, config: PathBuf) -> ExitCode {
    use keygate::store::redis::{RedisSettings, RedisStore};
    let config = match Config::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let keygate::config::StoreConfig::Redis(to) = &config.fixed.store else {
        eprintln!("error: the config's store is in memory; migrate into store.redis");
        return ExitCode::from(EX_CONFIG);
    };
    let namespace = from_namespace.unwrap_or_else(|| to.namespace.clone());
    let source =
        RedisSettings::standalone(&from, &namespace, to.timeout.max(Duration::from_secs(2)));
    let from_shown = source.display_url();
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let opened = RedisStore::connect(&source)
        .map_err(anyhow::Error::from)
        .and_then(|s| {
            Ok((
                s,
                keygate::app::connect_store(&config.fixed.store, stopped)?,
            ))
        });
    let (source, target) = match opened {
        Ok(pair) => pair,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = ready(&source, &*target).await {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let shown = |r: &keygate::store::copy::CopyReport| {
        format!(
            "{} copied, {} already there, {} failed",
            r.copied, r.present, r.failed
        )
    };
    let copied = keygate::store::copy::copy_records(&source, &*target, |r| {
        eprintln!("migrate: {}", shown(r));
    })
    .await;
    match copied {
        Ok(r) => {
            println!("{from_shown} -> {}: {}", to.display_url(), shown(&r));
            if r.failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: reading {from_shown}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Both stores answer (the target may need a moment: Sentinel names its primary first).
async fn ready(
    source: &keygate::store::redis::RedisStore,
    target: &dyn keygate::store::KeyStore,
) -> Result<(), String> {
    use keygate::store::KeyStore;
    source
        .ping()
        .await
        .map_err(|e| format!("the source Redis: {e}"))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match target.ping().await {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(format!("the config's store: {e}"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// `--dev`: the built-in config, with the echo upstream unless `--upstream` names one;
/// also what the banner shows (root token, upstream).
async fn dev_config(
    upstream: Option<String>,
) -> Result<(Config, Option<(String, String)>), ExitCode> {
    let upstream = match upstream {
        Some(u) => u,
        None => match keygate::dev::spawn_echo_upstream(([127, 0, 0, 1], 0).into()).await {
            Ok(addr) => format!("http://{addr}"),
            Err(e) => {
                eprintln!("error: cannot start the echo upstream: {e}");
                return Err(ExitCode::FAILURE);
            }
        },
    };
    let token = std::env::var("KEYGATE_ROOT_TOKEN")
        .ok()
        .filter(|t| t.len() >= 16)
        .unwrap_or_else(keygate::dev::root_token);
    match keygate::dev::config(&upstream, &token) {
        Ok(c) => Ok((c, Some((token, upstream)))),
        Err(e) => {
            eprintln!("error: {e}");
            Err(ExitCode::from(EX_CONFIG))
        }
    }
}

async fn serve(config: Option<PathBuf>, dev: bool, upstream: Option<String>) -> ExitCode {
    let reload_path = if dev { None } else { config.clone() };
    let loaded = if dev {
        dev_config(upstream).await
    } else {
        let path = config.expect("clap requires --config without --dev");
        Config::load(&path).map(|c| (c, None)).map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::from(EX_CONFIG)
        })
    };
    let (config, banner) = match loaded {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let app = match App::build(config).await {
        Ok(a) => match reload_path {
            Some(p) => a.reload_from(p),
            None => a,
        },
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if let Some((token, upstream)) = banner {
        println!("keygate dev mode (in-memory keys; they vanish on exit)");
        println!("  proxy:      http://{}  ->  {upstream}", app.proxy_addr);
        println!("  admin:      http://{}", app.admin_addr);
        println!("  root token: {token}");
        println!("  try:        curl -s -X POST http://{}/v1/keys -H \"Authorization: Bearer {token}\" -H 'Content-Type: application/json' -d '{{\"label\":\"demo\",\"scopes\":[\"users:read\"]}}'", app.admin_addr);
    }
    app.log_started();
    let handle = app.shutdown_handle();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down: draining connections");
        handle.shutdown();
    });
    match app.run_until_stopped().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
