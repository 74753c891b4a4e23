//! `stitch`: run the proxy, or check a configuration file.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use stitch::Config;

/// jemalloc: its threads allocate without contending on shared arena locks (glibc's malloc
/// parked the proxy's worker threads on them: about a tenth of the pass-through rate), and a
/// background thread gives freed memory back to the system within about a second (glibc
/// needed `malloc_trim`), so memory after a burst of clients returns near where it started.
/// `_RJEM_MALLOC_CONF` in the environment overrides these settings (jemalloc's `MALLOC_CONF`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8; 60] =
    b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

#[derive(Parser)]
#[command(
    version,
    about = "Resumable uploads for applications that were never built for them"
)]
struct Cli {
    /// YAML configuration; without it, the embedded default (conf/stitch.yaml) runs.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Run in the background, writing the process id to `process.pid_file`.
    #[arg(long, short)]
    daemon: bool,
    /// Take over the listeners of the Stitch running with the same `process.upgrade_socket`
    /// (send it SIGQUIT: it hands them over and drains), for a restart without downtime.
    #[arg(long, short)]
    upgrade: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Check the configuration (--config, or the embedded default) and exit: 0 when Stitch
    /// would run with it, otherwise non-zero with the first error, naming the key and line.
    Check,
    /// Run Stitch in front of a small demo application (on the configured upstream address).
    Demo {
        /// Where npm installed resumablejs, @flowjs/flow.js and tus-js-client (default: the
        /// source tree's tests/browser/node_modules, wherever Stitch is started from).
        #[arg(long)]
        node_modules: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match &cli.config {
        Some(path) => Config::from_file(path),
        None => Ok(Config::embedded_default()),
    };
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            eprintln!("stitch: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !matches!(cli.command, Some(Command::Check)) {
        if let Err(e) = stitch::logging::init(&config.log) {
            eprintln!("stitch: {e}");
            return ExitCode::FAILURE;
        }
    }
    match cli.command {
        Some(Command::Check) => {
            for warning in config.warnings() {
                eprintln!("warning: {warning}");
            }
            let routes = config.routes.len();
            let plural = if routes == 1 { "" } else { "s" };
            println!("{}: ok, {routes} upload route{plural}", origin(&cli.config));
            ExitCode::SUCCESS
        }
        Some(Command::Demo { node_modules }) => {
            finish(stitch::demo::run(&config, node_modules.as_deref()))
        }
        None => {
            let started = format!(
                "stitch listening on {}, upstream {}, storage {}",
                config.listen,
                config.upstream,
                config.storage.describe()
            );
            let launch = stitch::server::Launch {
                daemon: cli.daemon,
                upgrade: cli.upgrade,
            };
            finish(stitch::server::run_as(&config, launch, move || {
                tracing::info!("{started}")
            }))
        }
    }
}

fn finish(result: Result<(), impl std::fmt::Display>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stitch: {e}");
            ExitCode::FAILURE
        }
    }
}

fn origin(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map_or_else(|| "embedded default".into(), |p| p.display().to_string())
}
