//! Logging through `tracing`: readable lines on a terminal, or one JSON object per line. Every
//! request on an upload route runs in a span with its route and protocol, and the upload (a
//! short hash of its key: never a file name or identifier) and part once known; Pingora's own
//! `log` records are taken in too.

use crate::config::{LogConfig, LogFormat};
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// Installs the process's subscriber. `RUST_LOG`, when set, overrides `log.level`.
pub fn init(config: &LogConfig) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(filter) if !filter.is_empty() => EnvFilter::try_new(&filter),
        _ => EnvFilter::try_new(&config.level),
    }
    .map_err(|e| format!("log.level: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let installed = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    installed.map_err(|e| format!("cannot start logging: {e}"))
}
