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
        None => {
            log::info!(
                "stitch listening on {}, upstream {}, storage {}",
                config.listen,
                config.upstream,
                config.storage.dir.display()
            );
            match stitch::server::run(&config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("stitch: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn origin(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map_or_else(|| "embedded default".into(), |p| p.display().to_string())
}
