//! `stitch`: run the proxy, or check a configuration file.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use stitch::Config;

#[derive(Parser)]
#[command(
    version,
    about = "Resumable uploads for applications that were never built for them"
)]
struct Cli {
    /// YAML configuration; without it, the embedded default (conf/stitch.yaml) runs.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration and exit (non-zero with the first error).
    Check,
    /// Run Stitch in front of a small demo application (on the configured upstream address).
    Demo {
        /// Where npm installed resumablejs and @flowjs/flow.js.
        #[arg(long, default_value = "tests/browser/node_modules")]
        node_modules: PathBuf,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
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
    match cli.command {
        Some(Command::Check) => {
            println!(
                "{}: ok, {} upload routes",
                origin(&cli.config),
                config.routes.len()
            );
            ExitCode::SUCCESS
        }
        Some(Command::Demo { node_modules }) => finish(stitch::demo::run(&config, &node_modules)),
        None => {
            log::info!(
                "stitch listening on {}, upstream {}, storage {}",
                config.listen,
                config.upstream,
                config.storage.dir.display()
            );
            finish(stitch::server::run(&config))
        }
    }
}

fn finish(result: Result<(), stitch::server::StartError>) -> ExitCode {
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
