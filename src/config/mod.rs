//! The YAML configuration, turned into ONE validated [`Config`] when it is loaded.
//!
//! Every check that can fail happens while deserializing, so serde_yaml's error names the key and
//! the line. Unknown keys are errors: a typo must never silently change behaviour.

mod route;
mod units;

pub use route::{Authorize, Cors, FieldPolicy, ForwardConfig, Limits, PathMatch, Route, Scope};
pub use units::{ByteSize, Span};

use units::{above_zero, at_least_a_second, at_least_one, header_size, some_at_least_one};

use serde::{Deserialize, Deserializer};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The embedded default: what `stitch` runs without `--config`.
pub const DEFAULT_CONFIG: &str = include_str!("../../conf/stitch.yaml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where browsers connect. A host name is resolved once, when the config is loaded.
    #[serde(default = "default_listen", deserialize_with = "resolve_listen")]
    pub listen: SocketAddr,
    /// The existing application. A host name is resolved once, when the config is loaded.
    #[serde(default = "default_upstream", deserialize_with = "resolve_address")]
    pub upstream: SocketAddr,
    /// Worker threads for the proxy; defaults to the number of cores.
    #[serde(default, deserialize_with = "some_at_least_one")]
    pub threads: Option<usize>,
    /// How long a connection to the upstream may take to open.
    #[serde(default = "default_connect_timeout", deserialize_with = "above_zero")]
    pub connect_timeout: Span,
    /// How long a graceful shutdown (SIGTERM) waits for requests in flight.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: Span,
    /// Limits on client connections (slow, idle and too many clients).
    #[serde(default)]
    pub connections: ConnectionLimits,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// The operators' listener: Prometheus metrics, health and readiness (off when absent).
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// Running in the background (`--daemon`) and handing the listeners over (`--upgrade`).
    #[serde(default)]
    pub process: ProcessConfig,
    #[serde(default, deserialize_with = "route::routes_in_order")]
    pub routes: Vec<Route>,
}

/// `metrics:`: a listener of its own, never the public one.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawMetrics")]
pub struct MetricsConfig {
    /// `/metrics` (Prometheus text), `/healthz`, `/readyz` and `/uploads` are served here.
    pub listen: SocketAddr,
    /// The bearer token `/uploads` (the listing) requires, if any.
    pub token: Option<String>,
    /// Whether the listing shows file names.
    pub file_names: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    #[serde(deserialize_with = "resolve_listen")]
    listen: SocketAddr,
    #[serde(default)]
    token: Option<String>,
    /// The environment variable that holds the token (keeps it out of the file).
    #[serde(default)]
    token_env: Option<String>,
    #[serde(default)]
    file_names: bool,
}

impl TryFrom<RawMetrics> for MetricsConfig {
    type Error = String;

    fn try_from(raw: RawMetrics) -> Result<Self, String> {
        let token = match (raw.token, raw.token_env) {
            (Some(_), Some(_)) => return Err("give token or token_env, not both".into()),
            (Some(token), None) => Some(token),
            (None, Some(name)) => match std::env::var(&name) {
                Ok(token) => Some(token),
                Err(_) => {
                    return Err(format!(
                        "token_env names {name}, which is not set in the environment"
                    ))
                }
            },
            (None, None) => None,
        };
        if token.as_ref().is_some_and(|t| t.trim().is_empty()) {
            return Err("the listing's token is empty".into());
        }
        Ok(MetricsConfig {
            listen: raw.listen,
            token,
            file_names: raw.file_names,
        })
    }
}

/// `process:`: where a background Stitch writes its process id, and the socket through which a
/// new Stitch takes the listeners of a running one (a zero-downtime restart).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessConfig {
    /// Written by `stitch --daemon` (a service manager reads it).
    #[serde(default = "default_pid_file")]
    pub pid_file: PathBuf,
    /// `stitch --upgrade` waits here for the running Stitch's listeners, which it sends on
    /// SIGQUIT. Both processes must name the same path.
    #[serde(default = "default_upgrade_socket")]
    pub upgrade_socket: PathBuf,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        ProcessConfig {
            pid_file: default_pid_file(),
            upgrade_socket: default_upgrade_socket(),
        }
    }
}

fn default_pid_file() -> PathBuf {
    "/tmp/stitch.pid".into()
}

fn default_upgrade_socket() -> PathBuf {
    "/tmp/stitch-upgrade.sock".into()
}

/// How Stitch logs: one line per event, with the request's route, protocol, upload and part.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (readable on a terminal) or `json` (one object per line, for log collectors).
    #[serde(default)]
    pub format: LogFormat,
    /// The level (`error`, `warn`, `info`, `debug`, `trace`) or a `tracing` filter such as
    /// `info,pingora=warn`; `RUST_LOG` overrides it.
    #[serde(default = "default_log_level", deserialize_with = "log_filter")]
    pub level: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: default_log_level(),
        }
    }
}

fn log_filter<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let text = String::deserialize(d)?;
    // A bare word is a valid filter (everything from that target), but one that is not a
    // level is a typo that would silence every log line.
    // (With a level beside it, `info,stitch` means what it says.)
    const LEVELS: [&str; 12] = [
        "trace", "debug", "info", "warn", "error", "off", "0", "1", "2", "3", "4", "5",
    ];
    let directives: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    let is_level = |d: &&str| LEVELS.contains(&d.to_ascii_lowercase().as_str());
    if !directives.iter().any(is_level) {
        if let Some(word) = directives.iter().find(|d| !d.contains('=')) {
            return Err(serde::de::Error::custom(format!(
                "{word:?} is not a log level (trace, debug, info, warn, error, off); a \
                 filter is a level and TARGET=LEVEL pairs, such as info,pingora=warn"
            )));
        }
    }
    tracing_subscriber::EnvFilter::try_new(&text)
        .map(|_| text)
        .map_err(|e| serde::de::Error::custom(format!("not a log level or filter: {e}")))
}

fn default_log_level() -> String {
    "info".into()
}

/// Where uploads are kept, and for how long.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawStorage")]
pub struct StorageConfig {
    pub engine: EngineConfig,
    /// Unfinished uploads with no activity for this long are deleted.
    pub upload_ttl: Duration,
    /// How long the upstream's answer to a finished upload is kept and replayed.
    pub result_ttl: Duration,
}

/// The storage engines (see `store::open`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineConfig {
    /// Local disk: blobs, state and locks in one directory. `fsync`: every part is fsynced
    /// before it is reported stored (safe against power loss); without it parts are still
    /// published atomically, which is safe against process crashes.
    Fs { dir: PathBuf, fsync: bool },
    /// This process's memory: nothing survives a restart (tests).
    Memory,
}

impl Default for StorageConfig {
    fn default() -> Self {
        RawStorage::default()
            .try_into()
            .expect("the defaults are valid")
    }
}

impl StorageConfig {
    /// Where uploads are kept, for people.
    pub fn describe(&self) -> String {
        match &self.engine {
            EngineConfig::Fs { dir, .. } => dir.display().to_string(),
            EngineConfig::Memory => "memory (nothing survives a restart)".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    #[serde(default)]
    engine: EngineName,
    dir: Option<PathBuf>,
    fsync: Option<bool>,
    #[serde(default = "default_upload_ttl", deserialize_with = "at_least_a_second")]
    upload_ttl: Span,
    #[serde(default = "default_result_ttl", deserialize_with = "at_least_a_second")]
    result_ttl: Span,
}

impl Default for RawStorage {
    fn default() -> Self {
        RawStorage {
            engine: EngineName::Fs,
            dir: None,
            fsync: None,
            upload_ttl: default_upload_ttl(),
            result_ttl: default_result_ttl(),
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum EngineName {
    #[default]
    Fs,
    Memory,
}

impl TryFrom<RawStorage> for StorageConfig {
    type Error = String;

    fn try_from(raw: RawStorage) -> Result<Self, String> {
        let engine = match raw.engine {
            EngineName::Fs if raw.dir.as_ref().is_some_and(|d| d.as_os_str().is_empty()) => {
                return Err("storage.dir is empty: name a directory".into())
            }
            EngineName::Fs => EngineConfig::Fs {
                dir: raw.dir.unwrap_or_else(default_storage_dir),
                fsync: raw.fsync.unwrap_or(true),
            },
            EngineName::Memory if raw.dir.is_some() || raw.fsync.is_some() => {
                return Err("storage.dir and storage.fsync belong to `engine: fs`".into())
            }
            EngineName::Memory => EngineConfig::Memory,
        };
        Ok(StorageConfig {
            engine,
            upload_ttl: raw.upload_ttl.0,
            result_ttl: raw.result_ttl.0,
        })
    }
}

/// Limits on client connections; see `proxy::connections` for how each is enforced.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawConnectionLimits")]
pub struct ConnectionLimits {
    /// Connections open at once; more are answered 503 and closed.
    pub max: usize,
    /// Connections open at once from one client address (`None`: no limit, the default,
    /// since behind a load balancer or TLS terminator every client has its address).
    pub max_per_client: Option<usize>,
    /// From a request's first byte to the end of its header.
    pub header_timeout: Duration,
    /// How long a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// How long a request body may send nothing.
    pub body_timeout: Duration,
    /// Largest request header (request line and header fields); larger ones get 431.
    pub max_header_size: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        RawConnectionLimits::default()
            .try_into()
            .expect("the defaults are valid")
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConnectionLimits {
    #[serde(default = "default_max_connections", deserialize_with = "at_least_one")]
    max: usize,
    #[serde(default, deserialize_with = "some_at_least_one")]
    max_per_client: Option<usize>,
    #[serde(
        default = "default_header_timeout",
        deserialize_with = "at_least_a_second"
    )]
    header_timeout: Span,
    #[serde(
        default = "default_idle_timeout",
        deserialize_with = "at_least_a_second"
    )]
    idle_timeout: Span,
    #[serde(
        default = "default_body_timeout",
        deserialize_with = "at_least_a_second"
    )]
    body_timeout: Span,
    #[serde(default = "default_max_header_size", deserialize_with = "header_size")]
    max_header_size: ByteSize,
}

impl Default for RawConnectionLimits {
    fn default() -> Self {
        RawConnectionLimits {
            max: default_max_connections(),
            max_per_client: None,
            header_timeout: default_header_timeout(),
            idle_timeout: default_idle_timeout(),
            body_timeout: default_body_timeout(),
            max_header_size: default_max_header_size(),
        }
    }
}

impl TryFrom<RawConnectionLimits> for ConnectionLimits {
    type Error = String;

    fn try_from(raw: RawConnectionLimits) -> Result<Self, String> {
        let max_header_size = usize::try_from(raw.max_header_size.0).unwrap_or(usize::MAX);
        Ok(ConnectionLimits {
            max: raw.max,
            max_per_client: raw.max_per_client,
            header_timeout: raw.header_timeout.0,
            idle_timeout: raw.idle_timeout.0,
            body_timeout: raw.body_timeout.0,
            max_header_size,
        })
    }
}

/// A config that failed to load, with serde_yaml's key path and line in the message.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

impl Config {
    pub fn from_yaml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        // An empty file is an empty mapping: every default, no routes.
        let text = if text.trim().is_empty() { "{}" } else { text };
        let config: Config = serde_yaml::from_str(text).map_err(|e| ConfigError::Invalid {
            origin: origin.to_string(),
            message: plain_message(&e.to_string(), text),
        })?;
        config
            .check_routes()
            .map_err(|message| ConfigError::Invalid {
                origin: origin.to_string(),
                message,
            })?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_yaml(&text, &path.display().to_string())
    }

    pub fn embedded_default() -> Config {
        Config::from_yaml(DEFAULT_CONFIG, "embedded default")
            .expect("the embedded default config is valid")
    }

    /// Checks that need more than one part of the file at a time.
    fn check_routes(&self) -> Result<(), String> {
        if let Some(metrics) = &self.metrics {
            let same_port = metrics.listen.port() == self.listen.port() && self.listen.port() != 0;
            let overlap = metrics.listen.ip() == self.listen.ip()
                || metrics.listen.ip().is_unspecified()
                || self.listen.ip().is_unspecified();
            if same_port && overlap {
                return Err(format!(
                    "metrics.listen ({}) is the public listener's address (`listen`): the \
                     operators' listener needs an address of its own",
                    metrics.listen
                ));
            }
        }
        for (i, route) in self.routes.iter().enumerate() {
            for (j, earlier) in self.routes[..i].iter().enumerate() {
                if route.id == earlier.id {
                    return Err(format!(
                        "routes[{i}]: same path, match and host as routes[{j}]; \
                         the second one could never be reached"
                    ));
                }
                let taken = route.shadowed_by(earlier);
                if !taken.is_empty() {
                    let methods: Vec<&str> = taken.iter().map(|m| m.as_str()).collect();
                    return Err(format!(
                        "routes[{i}] ({}) would never get its {} requests: routes[{j}] ({}) \
                         comes first and covers its path (the first route that matches a \
                         request takes it); list routes[{i}] first",
                        route.label,
                        methods.join(", "),
                        earlier.label
                    ));
                }
            }
        }
        Ok(())
    }

    /// What is valid but probably not what the operator meant.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.routes.is_empty() {
            warnings.push(
                "no upload routes: Stitch passes every request through to the upstream \
                 (pass-through only)"
                    .to_string(),
            );
        }
        for route in self.routes.iter().filter(|r| r.scope.is_none()) {
            warnings.push(format!(
                "route {}: no `scope`, so every client shares one namespace of upload \
                 identifiers; set `scope: {{ cookie: NAME }}` or `{{ header: NAME }}` to keep \
                 users apart",
                route.id
            ));
        }
        warnings
    }

    pub fn threads(&self) -> usize {
        self.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
    }
}

fn resolve_address<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    parse_address(&text, "upstream").map_err(serde::de::Error::custom)
}

fn resolve_listen<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    parse_address(&text, "listen").map_err(serde::de::Error::custom)
}

/// Resolves `host:port` (an IP address or a host name) once, at load time: Pingora panics on
/// an address it cannot use.
pub fn parse_address(text: &str, what: &str) -> Result<SocketAddr, String> {
    if !text.contains(':') {
        return Err(format!(
            "{what} address {text:?} needs a port, e.g. \"127.0.0.1:8080\" or \"localhost:8080\""
        ));
    }
    text.to_socket_addrs()
        .map_err(|e| format!("cannot resolve {what} address {text:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{what} address {text:?} resolves to nothing"))
}

/// serde's messages in words a person configuring a proxy uses: no Rust type names, and the
/// line of a duplicate key (serde names the key only).
fn plain_message(message: &str, text: &str) -> String {
    static TYPE_NAMES: std::sync::LazyLock<[(regex::Regex, &str); 5]> =
        std::sync::LazyLock::new(|| {
            let re = |pattern: &str| regex::Regex::new(pattern).expect("a valid pattern");
            [
                (
                    re(r"expected (usize|u64|u32|u16|u8|i64|i32)\b"),
                    "expected a whole number",
                ),
                (
                    re(r"expected struct RawRoute\b"),
                    "expected a route (a mapping with `path:` and `protocol:`)",
                ),
                (
                    re(r"expected struct \w+"),
                    "expected a mapping of keys and values",
                ),
                (re(r"expected a sequence"), "expected a list"),
                (
                    re(r"expected (a )?(borrowed )?str(ing)?\b"),
                    "expected text",
                ),
            ]
        });
    let mut message = message.to_string();
    for (pattern, words) in TYPE_NAMES.iter() {
        message = pattern.replace_all(&message, *words).into_owned();
    }
    if let Some(index) = message
        .strip_prefix("routes: routes[")
        .and_then(|rest| rest.split_once("]: "))
        .and_then(|(index, _)| index.parse::<usize>().ok())
    {
        if let Some(line) = route_line(text, index) {
            let without_location = message.split(" at line ").next().unwrap_or("").to_string();
            // serde names the list (`routes: routes[1]: ...`): the index says it better.
            let without_location = without_location
                .strip_prefix("routes: ")
                .unwrap_or(&without_location)
                .to_string();
            message = format!("{without_location} at line {line}");
        }
    }
    // An unknown key at the top level comes without a location: its line is found.
    if !message.contains(" at line ") {
        if let Some(key) = message
            .split_once("unknown field `")
            .and_then(|(_, rest)| rest.split_once('`'))
            .map(|(key, _)| key.to_string())
        {
            let line = text.lines().position(|line| {
                line.strip_prefix(key.as_str())
                    .is_some_and(|r| r.trim_start().starts_with(':'))
            });
            if let Some(line) = line {
                message = format!("{message} at line {}", line + 1);
            }
        }
    }
    if let Some(key) = message
        .split_once("duplicate field `")
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(key, _)| key.to_string())
    {
        if let Some(line) = duplicate_key_line(text, &key) {
            let without_location = message.split(" at line ").next().unwrap_or("").to_string();
            message = format!("{without_location} at line {line}");
        }
    }
    message
}

/// The line where route number `index` (from 0) of a block list under a top-level `routes:`
/// starts; none for a list written in flow style (`routes: [...]`).
fn route_line(text: &str, index: usize) -> Option<usize> {
    let mut lines = text.lines().enumerate();
    lines.find(|(_, line)| {
        let content = line.split('#').next().unwrap_or("").trim_end();
        matches!(
            content,
            "routes:" | "\"routes\":" | "'routes':" | "routes :"
        )
    })?;
    let mut item_indent = None;
    let mut seen = 0;
    for (number, line) in lines {
        let content = line.trim_start();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let indent = line.len() - content.len();
        if indent == 0 && !content.starts_with('-') {
            return None; // the next top-level key
        }
        if content.starts_with("- ") || content == "-" {
            match item_indent {
                None => item_indent = Some(indent),
                Some(first) if first != indent => continue,
                Some(_) => {}
            }
            if seen == index {
                return Some(number + 1);
            }
            seen += 1;
        }
    }
    None
}

/// The line of the second `key:` at the same indentation as an earlier one, with no line of
/// smaller indentation between them (the same block mapping).
fn duplicate_key_line(text: &str, key: &str) -> Option<usize> {
    let mut seen: Vec<usize> = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let content = line.trim_start();
        let indent = line.len() - content.len();
        let content = content.strip_prefix("- ").unwrap_or(content);
        let indent = if line.trim_start().starts_with("- ") {
            indent + 2
        } else {
            indent
        };
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        seen.retain(|&i| i <= indent);
        if line.trim_start().starts_with("- ") {
            seen.retain(|&i| i < indent);
        }
        let is_key = content
            .strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with(':'));
        if is_key {
            if seen.contains(&indent) {
                return Some(number + 1);
            }
            seen.push(indent);
        }
    }
    None
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_upstream() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 3000))
}
fn default_connect_timeout() -> Span {
    Span(Duration::from_secs(5))
}
fn default_shutdown_grace() -> Span {
    Span(Duration::from_secs(10))
}
fn default_storage_dir() -> PathBuf {
    PathBuf::from("./stitch-data")
}
fn default_upload_ttl() -> Span {
    Span(Duration::from_secs(24 * 3600))
}
fn default_result_ttl() -> Span {
    Span(Duration::from_secs(3600))
}
fn default_max_connections() -> usize {
    10_000
}
fn default_header_timeout() -> Span {
    Span(Duration::from_secs(20))
}
fn default_idle_timeout() -> Span {
    Span(Duration::from_secs(60))
}
fn default_body_timeout() -> Span {
    Span(Duration::from_secs(60))
}
fn default_max_header_size() -> ByteSize {
    ByteSize(64 << 10)
}
