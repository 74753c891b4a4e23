//! One upload route: which requests it intercepts, which protocol they speak, and how the finished
//! file is handed to the upstream.

use super::units::{above_zero, ByteSize, Span};
use crate::protocol::chunk::RawParamNames;
use crate::protocol::tus::RawTusOptions;
use crate::protocol::{ProtocolConfig, ProtocolName, RawProtocolOptions};
use http::Method;
use regex::Regex;
use serde::Deserialize;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MatchKind {
    /// `path` itself and everything below it (`/upload`, `/upload/x`, not `/uploads`).
    #[default]
    Prefix,
    Exact,
    Regex,
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
    Regex(Regex),
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            PathMatch::Regex(r) => r.is_match(path),
            PathMatch::Prefix(p) if p.ends_with('/') => path.starts_with(p.as_str()),
            PathMatch::Prefix(p) => {
                path == p || (path.starts_with(p.as_str()) && path[p.len()..].starts_with('/'))
            }
        }
    }
}

/// Which of the application's own fields (not protocol parameters) reach the upstream.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "serde_yaml::Value")]
pub enum FieldPolicy {
    /// `all` or `none`.
    Keyword(FieldKeyword),
    /// Only these names.
    Only(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKeyword {
    All,
    None,
}

impl TryFrom<serde_yaml::Value> for FieldPolicy {
    type Error = String;

    fn try_from(value: serde_yaml::Value) -> Result<FieldPolicy, String> {
        let wrong = || "expected `all`, `none` or a list of field names".to_string();
        match value {
            serde_yaml::Value::String(word) => match word.as_str() {
                "all" => Ok(FieldPolicy::Keyword(FieldKeyword::All)),
                "none" => Ok(FieldPolicy::Keyword(FieldKeyword::None)),
                _ => Err(wrong()),
            },
            serde_yaml::Value::Sequence(names) => names
                .into_iter()
                .map(|name| match name {
                    serde_yaml::Value::String(name) => Ok(name),
                    _ => Err(wrong()),
                })
                .collect::<Result<_, _>>()
                .map(FieldPolicy::Only),
            _ => Err(wrong()),
        }
    }
}

impl FieldPolicy {
    pub fn allows(&self, name: &str) -> bool {
        match self {
            FieldPolicy::Keyword(FieldKeyword::All) => true,
            FieldPolicy::Keyword(FieldKeyword::None) => false,
            FieldPolicy::Only(names) => names.iter().any(|n| n == name),
        }
    }
}

/// What makes an upload private to one user: a cookie or a request header whose value is part of
/// the upload's key. Requests without it share one anonymous scope.
///
/// On a tus route, a metadata value (`{ metadata: token }`) can be the scope instead: every
/// creation must carry it; requests need no cookie or header, since the upload's URL (128 random
/// bits) and, for a finalize request, the value of the `tus.finalize` key (`token` by default)
/// are what find an upload (a server-to-server flow such as Wix's).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawScope")]
pub enum Scope {
    Cookie(String),
    Header(String),
    Metadata(String),
}

/// `{ cookie: NAME }`, `{ header: NAME }` or `{ metadata: KEY }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScope {
    cookie: Option<String>,
    header: Option<String>,
    metadata: Option<String>,
}

impl TryFrom<RawScope> for Scope {
    type Error = String;

    fn try_from(raw: RawScope) -> Result<Scope, String> {
        match (raw.cookie, raw.header, raw.metadata) {
            (Some(cookie), None, None) if !cookie.is_empty() => Ok(Scope::Cookie(cookie)),
            (None, Some(header), None) => http::HeaderName::from_bytes(header.as_bytes())
                .map(|name| Scope::Header(name.as_str().to_string()))
                .map_err(|_| format!("scope.header: {header:?} is not a header name")),
            (None, None, Some(key)) if !key.is_empty() && !key.contains([',', ' ']) => {
                Ok(Scope::Metadata(key))
            }
            _ => Err(
                "scope takes exactly one of `cookie: NAME`, `header: NAME` or `metadata: KEY`"
                    .into(),
            ),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawLimits")]
pub struct Limits {
    /// Largest file a client may declare.
    pub max_file_size: ByteSize,
    /// Largest single chunk (bytes of one request).
    pub max_chunk_size: ByteSize,
}

impl Default for Limits {
    fn default() -> Self {
        RawLimits::default()
            .try_into()
            .expect("the defaults are valid")
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_file_size: Option<ByteSize>,
    max_chunk_size: Option<ByteSize>,
}

impl TryFrom<RawLimits> for Limits {
    type Error = String;

    fn try_from(raw: RawLimits) -> Result<Limits, String> {
        let max_file_size = raw.max_file_size.unwrap_or(default_max_file_size());
        // A chunk is never larger than the file: the default follows a smaller max_file_size.
        let max_chunk_size = raw
            .max_chunk_size
            .unwrap_or(default_max_chunk_size().min(max_file_size.max(ByteSize(1))));
        if max_chunk_size.0 == 0 {
            return Err("limits.max_chunk_size must be above zero".into());
        }
        if max_chunk_size > max_file_size.max(ByteSize(1)) {
            return Err(format!(
                "limits.max_chunk_size ({} bytes) is larger than limits.max_file_size ({} bytes): \
                 no chunk could ever be that large",
                max_chunk_size.0, max_file_size.0
            ));
        }
        Ok(Limits {
            max_file_size,
            max_chunk_size,
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    path: Option<String>,
    #[serde(default = "default_field")]
    field: String,
    #[serde(default = "default_fields")]
    fields: FieldPolicy,
    #[serde(default = "default_headers")]
    headers: Vec<String>,
    #[serde(default)]
    protocol_fields: bool,
    #[serde(default = "default_forward_timeout", deserialize_with = "above_zero")]
    timeout: Span,
    #[serde(default = "default_retry_pause", deserialize_with = "above_zero")]
    retry_pause: Span,
    #[serde(default = "default_wait", deserialize_with = "above_zero")]
    wait: Span,
    early: Option<RawEarly>,
}

/// `forward.early`: `true`, `false`, or its settings.
#[derive(Debug, Clone)]
enum RawEarly {
    On(bool),
    Settings(EarlySettings),
}

impl<'de> Deserialize<'de> for RawEarly {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RawEarly, D::Error> {
        struct Either;
        impl<'de> serde::de::Visitor<'de> for Either {
            type Value = RawEarly;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("`true`, `false` or settings such as `{ stall: 10s, streams: 8 }`")
            }
            fn visit_bool<E>(self, on: bool) -> Result<RawEarly, E> {
                Ok(RawEarly::On(on))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<RawEarly, A::Error> {
                EarlySettings::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RawEarly::Settings)
            }
        }
        d.deserialize_any(Either)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct EarlySettings {
    #[serde(default = "default_early_stall", deserialize_with = "above_zero")]
    stall: Span,
    #[serde(default = "default_early_streams")]
    streams: usize,
}

impl Default for RawForward {
    fn default() -> Self {
        RawForward {
            path: None,
            field: default_field(),
            fields: default_fields(),
            headers: default_headers(),
            protocol_fields: false,
            timeout: default_forward_timeout(),
            retry_pause: default_retry_pause(),
            wait: default_wait(),
            early: None,
        }
    }
}

/// How the finished file reaches the upstream: one `POST path` with a multipart body.
#[derive(Debug, Clone)]
pub struct ForwardConfig {
    pub path: String,
    /// The multipart field name of the file part.
    pub field: String,
    pub fields: FieldPolicy,
    /// Request headers copied from the completing request (lower case).
    pub headers: Vec<http::HeaderName>,
    /// Also send the protocol's own parameters as text fields.
    pub protocol_fields: bool,
    /// How long the upstream may take to answer (per read, while it receives and processes).
    pub timeout: Duration,
    /// After a failed delivery, the next attempt for the same upload waits this long: Resumable.js
    /// retries at once, up to 100 times, and each attempt sends the whole file.
    pub retry_pause: Duration,
    /// tus: how long a request that completes an upload (or asks for its answer) waits for the
    /// delivery before it answers without the upstream's answer; the delivery goes on.
    pub wait: Duration,
    /// Start sending the file to the upstream while it is still arriving (`None`: only once
    /// it is complete).
    pub early: Option<Early>,
}

/// Early delivery (`forward.early`): while an upload of known length arrives, its stored parts
/// are already sent, in order, as the body of the upstream request; the request's last bytes go
/// out only once the upload is complete and its delivery is decided under the upload's lease,
/// so the upstream never holds a whole request that is not the delivery. The completing request
/// then waits only for what was not sent yet. A stream that waits longer than `stall` for the
/// next part (a client that paused or left) is cut off, and the upload is delivered whole once
/// complete: the application sees a request that broke off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Early {
    /// How long a stream waits for the next part (and, with every part sent, for the delivery).
    pub stall: Duration,
    /// At most this many early streams at once for the route in one process; uploads beyond
    /// them are delivered once complete.
    pub streams: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    path: String,
    #[serde(default, rename = "match")]
    match_kind: MatchKind,
    host: Option<String>,
    methods: Option<Vec<KnownMethod>>,
    protocol: ProtocolName,
    parameters: Option<RawParamNames>,
    tus: Option<RawTusOptions>,
    #[serde(default)]
    limits: Limits,
    scope: Option<Scope>,
    #[serde(default)]
    forward: RawForward,
    cors: Option<Cors>,
    authorize: Option<Authorize>,
}

/// The authorization hook (`authorize:`): before a new upload stores its first byte, Stitch
/// POSTs a JSON description of it to `path` on the upstream, with the client's credentials;
/// only a 2xx lets it start.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, try_from = "RawAuthorize")]
pub struct Authorize {
    pub path: String,
    /// How long the upstream has to answer.
    pub timeout: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuthorize {
    path: String,
    #[serde(default = "default_authorize_timeout", deserialize_with = "above_zero")]
    timeout: Span,
}

fn default_authorize_timeout() -> Span {
    Span(Duration::from_secs(10))
}

impl TryFrom<RawAuthorize> for Authorize {
    type Error = String;

    fn try_from(raw: RawAuthorize) -> Result<Authorize, String> {
        if !raw.path.starts_with('/') {
            return Err(format!("authorize.path {:?} must start with `/`", raw.path));
        }
        http::uri::PathAndQuery::try_from(raw.path.as_str())
            .map_err(|e| format!("authorize.path {:?}: {e}", raw.path))?;
        Ok(Authorize {
            path: raw.path,
            timeout: raw.timeout.0,
        })
    }
}

/// Cross-origin access to a route's uploads (`cors:`), for a page served from another origin.
/// Preflights are answered, and Stitch's own answers carry the CORS headers with the protocol's
/// headers exposed. Answers the application gives (pass-through) are the application's.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, try_from = "RawCors")]
pub struct Cors {
    /// Allowed origins (`https://app.example`, with a port if not the default), or `*`.
    pub origins: Vec<String>,
    /// Let browsers send cookies and authorization (`withCredentials`).
    pub credentials: bool,
    /// How long browsers may keep a preflight's answer.
    pub max_age: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCors {
    origins: Vec<String>,
    #[serde(default)]
    credentials: bool,
    #[serde(default = "default_cors_max_age")]
    max_age: Span,
}

fn default_cors_max_age() -> Span {
    Span(Duration::from_secs(86400))
}

impl TryFrom<RawCors> for Cors {
    type Error = String;

    fn try_from(raw: RawCors) -> Result<Cors, String> {
        if raw.origins.is_empty() {
            return Err("cors.origins: list the allowed origins, or `*`".into());
        }
        for origin in &raw.origins {
            let plain = origin == "*"
                || (origin.starts_with("http://") || origin.starts_with("https://"))
                    && !origin.ends_with('/')
                    && origin.split("://").nth(1).is_some_and(|rest| {
                        !rest.is_empty() && !rest.contains('/') && !rest.contains(' ')
                    });
            if !plain {
                return Err(format!(
                    "cors.origins: {origin:?} is not an origin (`https://host[:port]`, no path) or `*`"
                ));
            }
        }
        if raw.credentials && raw.origins.iter().any(|o| o == "*") {
            return Err(
                "cors: browsers refuse credentials from a server that allows every origin; list the origins"
                    .into(),
            );
        }
        Ok(Cors {
            origins: raw.origins,
            credentials: raw.credentials,
            max_age: raw.max_age.0,
        })
    }
}

/// A validated upload route.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawRoute")]
pub struct Route {
    /// Stable name of the route, part of every upload key: uploads stay found when routes are
    /// reordered in the file.
    pub id: String,
    /// The route as metrics name it: its host (if any) and path, as configured.
    pub label: String,
    pub path: PathMatch,
    /// Lower-case host name (without port) the route is limited to.
    pub host: Option<String>,
    pub methods: Vec<Method>,
    /// The protocol its clients speak, with that protocol's options.
    pub protocol: ProtocolConfig,
    pub limits: Limits,
    pub scope: Option<Scope>,
    pub forward: ForwardConfig,
    pub cors: Option<Cors>,
    pub authorize: Option<Authorize>,
}

impl TryFrom<RawRoute> for Route {
    type Error = String;

    fn try_from(raw: RawRoute) -> Result<Route, String> {
        if !raw.path.starts_with('/') && raw.match_kind != MatchKind::Regex {
            return Err(format!("route path {:?} must start with `/`", raw.path));
        }
        let path = match raw.match_kind {
            MatchKind::Prefix => PathMatch::Prefix(raw.path.clone()),
            MatchKind::Exact => PathMatch::Exact(raw.path.clone()),
            MatchKind::Regex => PathMatch::Regex(
                Regex::new(&raw.path).map_err(|e| format!("route path is not a regex: {e}"))?,
            ),
        };
        let protocol = ProtocolConfig::new(
            raw.protocol,
            RawProtocolOptions {
                parameters: raw.parameters,
                tus: raw.tus,
            },
        )?;
        let tus = matches!(protocol, ProtocolConfig::Tus(_));
        if !tus && matches!(raw.scope, Some(Scope::Metadata(_))) {
            return Err("scope: `metadata` is for tus routes (chunk uploads carry none)".into());
        }
        if tus && raw.match_kind != MatchKind::Prefix {
            return Err(
                "a tus route is a prefix route: uploads live below its path (`/files/<id>`)".into(),
            );
        }
        let methods = match raw.methods {
            // tus uses DELETE and OPTIONS too (and PUT for finalize).
            None if tus => KNOWN_METHODS.to_vec(),
            None => vec![
                Method::GET,
                Method::HEAD,
                Method::POST,
                Method::PUT,
                Method::PATCH,
            ],
            Some(list) => list.into_iter().map(|m| m.0).collect(),
        };
        let forward_path = match (raw.forward.path, raw.match_kind) {
            (Some(p), _) if p.starts_with('/') => p,
            (Some(p), _) => return Err(format!("forward.path {p:?} must start with `/`")),
            (None, MatchKind::Regex) => {
                return Err("a regex route needs forward.path: where should files go?".into())
            }
            (None, _) => raw.path.clone(),
        };
        http::uri::PathAndQuery::try_from(forward_path.as_str())
            .map_err(|e| format!("forward.path {forward_path:?}: {e}"))?;
        let headers = raw
            .forward
            .headers
            .iter()
            .map(|h| {
                http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
                    .map_err(|_| format!("forward.headers: {h:?} is not a header name"))
            })
            .collect::<Result<Vec<http::HeaderName>, _>>()?;
        if let Some(fixed) = headers.iter().find(|h| FIXED_HEADERS.contains(&h.as_str())) {
            return Err(format!(
                "forward.headers: {fixed} is set by Stitch itself (the client's Host, the \
                 length and type of the new body)"
            ));
        }
        if raw.forward.field.is_empty() || raw.forward.field.contains(['"', '\r', '\n']) {
            return Err("forward.field must be a plain, non-empty field name".into());
        }
        if raw
            .host
            .as_deref()
            .is_some_and(|h| h.is_empty() || h.contains(':'))
        {
            return Err("host: give the host name alone, without a port".into());
        }
        if methods.is_empty() {
            return Err("methods: list at least one method, or leave the key out".into());
        }
        let host = raw.host.map(|h| h.to_ascii_lowercase());
        Ok(Route {
            id: format!(
                "{:?}:{}@{}",
                raw.match_kind,
                raw.path,
                host.as_deref().unwrap_or("*")
            ),
            label: format!("{}{}", host.as_deref().unwrap_or(""), raw.path),
            path,
            host,
            methods,
            protocol,
            limits: raw.limits,
            scope: raw.scope,
            forward: ForwardConfig {
                path: forward_path,
                field: raw.forward.field,
                fields: raw.forward.fields,
                headers,
                protocol_fields: raw.forward.protocol_fields,
                timeout: raw.forward.timeout.0,
                retry_pause: raw.forward.retry_pause.0,
                wait: raw.forward.wait.0,
                early: match raw.forward.early {
                    None | Some(RawEarly::On(false)) => None,
                    Some(RawEarly::On(true)) => Some(Early {
                        stall: default_early_stall().0,
                        streams: default_early_streams(),
                    }),
                    Some(RawEarly::Settings(settings)) => {
                        if settings.streams == 0 {
                            return Err("forward.early.streams must be 1 or more (or leave \
                                        forward.early out)"
                                .to_string());
                        }
                        Some(Early {
                            stall: settings.stall.0,
                            streams: settings.streams,
                        })
                    }
                },
            },
            cors: raw.cors,
            authorize: raw.authorize,
        })
    }
}

impl Route {
    /// The methods of this route's requests that `earlier`, listed before it, takes instead
    /// (the first route that matches a request takes it, and passes through what is not its
    /// protocol's). Only what can be told for sure: a prefix that covers this route's plain
    /// path, the same exact path, or a regex that matches that path (every request of an
    /// exact route; a prefix route's requests to its path itself, such as a tus creation), on
    /// every host this route serves.
    pub fn shadowed_by(&self, earlier: &Route) -> Vec<Method> {
        let path = match &self.path {
            PathMatch::Prefix(p) | PathMatch::Exact(p) => p,
            PathMatch::Regex(_) => return Vec::new(),
        };
        let paths = match (&earlier.path, &self.path) {
            (PathMatch::Prefix(_) | PathMatch::Regex(_), _) => earlier.path.matches(path),
            (PathMatch::Exact(p), PathMatch::Exact(_)) => p == path,
            _ => false,
        };
        let covered = paths && (earlier.host.is_none() || earlier.host == self.host);
        if !covered {
            return Vec::new();
        }
        let takes = |method: &Method| {
            earlier.methods.contains(method)
                || (*method == Method::OPTIONS && earlier.cors.is_some())
        };
        let mut mine = self.methods.clone();
        if self.cors.is_some() && !mine.contains(&Method::OPTIONS) {
            mine.push(Method::OPTIONS);
        }
        mine.into_iter().filter(takes).collect()
    }

    /// Does this route intercept a request with this method, path and Host header?
    pub fn matches(&self, method: &Method, path: &str, host: Option<&str>) -> bool {
        // With CORS, a preflight (OPTIONS) for the route is the route's too.
        let preflight = self.cors.is_some() && method == Method::OPTIONS;
        if !(self.methods.contains(method) || preflight) || !self.path.matches(path) {
            return false;
        }
        match &self.host {
            None => true,
            Some(want) => host
                .map(|h| h.rsplit_once(':').map_or(h, |(name, _)| name))
                .is_some_and(|h| h.eq_ignore_ascii_case(want)),
        }
    }
}

/// A method a route may list, checked while the file is read (so the error has its line).
#[derive(Debug, Clone)]
struct KnownMethod(Method);

impl<'de> Deserialize<'de> for KnownMethod {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        let upper = name.to_ascii_uppercase();
        KNOWN_METHODS
            .iter()
            .find(|known| known.as_str() == upper)
            .map(|known| KnownMethod(known.clone()))
            .ok_or_else(|| {
                let known: Vec<&str> = KNOWN_METHODS.iter().map(Method::as_str).collect();
                serde::de::Error::custom(format!("{name:?} is not one of {}", known.join(", ")))
            })
    }
}

/// The methods a route may list.
const KNOWN_METHODS: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
];

/// Headers of the forwarded request that Stitch sets itself.
const FIXED_HEADERS: [&str; 4] = [
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
];

fn default_max_file_size() -> ByteSize {
    ByteSize(10 << 30)
}
fn default_max_chunk_size() -> ByteSize {
    ByteSize(128 << 20)
}
fn default_field() -> String {
    "file".into()
}
fn default_fields() -> FieldPolicy {
    FieldPolicy::Keyword(FieldKeyword::All)
}
fn default_headers() -> Vec<String> {
    vec!["cookie".into(), "authorization".into()]
}
fn default_forward_timeout() -> Span {
    Span(Duration::from_secs(300))
}
fn default_wait() -> Span {
    Span(Duration::from_secs(30))
}
fn default_early_stall() -> Span {
    Span(Duration::from_secs(10))
}
fn default_early_streams() -> usize {
    8
}
fn default_retry_pause() -> Span {
    Span(Duration::from_secs(2))
}

/// The routes, each checked as it is read: an error names the route by its index
/// (`routes[1]: ...`), whose line `plain_message` then finds (serde reports where the list
/// starts).
pub(super) fn routes_in_order<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<Route>, D::Error> {
    struct Routes;
    impl<'de> serde::de::Visitor<'de> for Routes {
        type Value = Vec<Route>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Vec<Route>, A::Error> {
            let mut routes = Vec::new();
            while let Some(raw) = seq.next_element::<RawRoute>()? {
                let index = routes.len();
                let route = Route::try_from(raw).map_err(|e| {
                    <A::Error as serde::de::Error>::custom(format!("routes[{index}]: {e}"))
                })?;
                routes.push(route);
            }
            Ok(routes)
        }
    }
    d.deserialize_seq(Routes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_matches_whole_segments_only() {
        let p = PathMatch::Prefix("/upload".into());
        assert!(p.matches("/upload"));
        assert!(p.matches("/upload/x"));
        assert!(!p.matches("/uploads"));
    }
}
