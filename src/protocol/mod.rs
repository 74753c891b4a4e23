//! Protocol adapters: they turn a client's requests into operations on the upload core and the
//! core's results into the statuses that client understands, each in one mapping function
//! (clients read status codes differently). They never touch storage.
//!
//! One folder per protocol family: `chunk/` for Resumable.js and Flow.js, which speak one chunk
//! protocol with different parameter names; `tus/` for tus 1.0. A route names its protocol and
//! carries that protocol's own options ([`ProtocolConfig`]); [`handle`] dispatches.

pub mod chunk;
pub mod cors;
pub mod tus;

use crate::config::{Route, Scope};
use crate::forward::DeliveryRequest;
use crate::http::{cookie, forwarded_for, host};
use crate::store::{Origin, UploadKey};
use crate::upload::UploadCore;
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use serde::Deserialize;
use std::sync::Arc;

/// A route's protocol, with that protocol's own options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolConfig {
    Chunk(Box<chunk::ChunkOptions>),
    Tus(tus::TusOptions),
}

/// `routes[].protocol` as written in the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProtocolName {
    Resumable,
    Flow,
    Tus,
}

/// The protocol options a route may carry, as written (each protocol reads its own).
#[derive(Debug, Clone, Default)]
pub struct RawProtocolOptions {
    /// `parameters:` (Resumable.js and Flow.js).
    pub parameters: Option<chunk::RawParamNames>,
    /// `tus:`.
    pub tus: Option<tus::RawTusOptions>,
}

impl ProtocolConfig {
    /// The protocol a route names, with its options; options of another protocol are refused.
    pub fn new(name: ProtocolName, raw: RawProtocolOptions) -> Result<ProtocolConfig, String> {
        let flavor = match name {
            ProtocolName::Resumable => chunk::Flavor::Resumable,
            ProtocolName::Flow => chunk::Flavor::Flow,
            ProtocolName::Tus => {
                if raw.parameters.is_some() {
                    return Err(
                        "`parameters:` is for resumable and flow routes; a tus route \
                                takes `tus:`"
                            .into(),
                    );
                }
                let options = tus::TusOptions::new(raw.tus.unwrap_or_default())?;
                return Ok(ProtocolConfig::Tus(options));
            }
        };
        if raw.tus.is_some() {
            return Err("`tus:` is for tus routes".into());
        }
        let options = chunk::ChunkOptions::new(flavor, raw.parameters.unwrap_or_default())?;
        Ok(ProtocolConfig::Chunk(Box::new(options)))
    }

    pub fn name(&self) -> &'static str {
        match self {
            ProtocolConfig::Chunk(options) => options.name(),
            ProtocolConfig::Tus(_) => "tus",
        }
    }
}

/// Handles a request on an upload route. `Ok(false)`: not upload traffic, pass it through.
pub async fn handle(
    session: &mut Session,
    route: &Route,
    core: &Arc<UploadCore>,
) -> pingora::Result<bool> {
    if let Some(cors) = &route.cors {
        if cors::is_preflight(session.req_header()) {
            let reply = cors::preflight(cors, route, session.req_header());
            return crate::http::answer(session, reply, false)
                .await
                .map(|_| true);
        }
        let chunk_route = matches!(route.protocol, ProtocolConfig::Chunk(_));
        if chunk_route && session.req_header().method == http::Method::OPTIONS {
            // Not a preflight: the application's.
            return Ok(false);
        }
    }
    match &route.protocol {
        ProtocolConfig::Chunk(options) => chunk::handle(session, route, options, core).await,
        ProtocolConfig::Tus(options) => tus::handle(session, route, options, core).await,
    }
}

/// What kind of request this is on an upload route, for metrics: `test` or `chunk` (Resumable,
/// Flow), the tus verb (`create`, `head`, `patch`, `terminate`, `options`, `answer`,
/// `finalize`), or `preflight` (CORS).
pub fn kind(route: &Route, header: &RequestHeader) -> &'static str {
    if route.cors.is_some() && cors::is_preflight(header) {
        return "preflight";
    }
    match &route.protocol {
        ProtocolConfig::Chunk(_) => match header.method {
            http::Method::GET | http::Method::HEAD => "test",
            _ => "chunk",
        },
        ProtocolConfig::Tus(_) => {
            let method = header
                .headers
                .get("x-http-method-override")
                .and_then(|v| http::Method::from_bytes(v.as_bytes()).ok())
                .unwrap_or_else(|| header.method.clone());
            match method {
                http::Method::POST => "create",
                http::Method::HEAD => "head",
                http::Method::PATCH => "patch",
                http::Method::DELETE => "terminate",
                http::Method::OPTIONS => "options",
                http::Method::GET => "answer",
                http::Method::PUT => "finalize",
                _ => "other",
            }
        }
    }
}

/// What the authorization hook is told about a new upload (see `upload::authorize`).
pub(crate) fn authorization_question(
    route: &Route,
    meta: &crate::store::UploadMeta,
    fields: &[(String, String)],
) -> serde_json::Value {
    serde_json::json!({
        "route": route.id,
        "protocol": route.protocol.name().to_string(),
        "name": meta.name,
        "size": meta.length,
        "type": meta.media_type,
        "metadata": fields
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
            .collect::<serde_json::Map<_, _>>(),
    })
}

/// The headers of the completing request that go to the upstream with the file.
pub(crate) fn delivery_request(
    header: &RequestHeader,
    client: Option<std::net::IpAddr>,
    route: &Route,
) -> DeliveryRequest {
    let mut headers = Vec::new();
    for name in route
        .forward
        .headers
        .iter()
        .filter(|n| *n != "x-forwarded-for")
    {
        for value in header.headers.get_all(name) {
            headers.push((name.clone(), value.clone()));
        }
    }
    if let Some(value) = forwarded_for(header, client) {
        headers.push((http::HeaderName::from_static("x-forwarded-for"), value));
    }
    DeliveryRequest {
        fields: Vec::new(),
        headers,
        host: host(header),
        route: route.id.clone(),
    }
}

/// Where a new upload on `route` comes from, for the operators' listing: the scope only as a
/// short hash, which tells one user's uploads from another's without saying who.
pub(crate) fn origin(route: &Route, scope: &[u8]) -> Origin {
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Origin {
        route: route.label.clone(),
        protocol: route.protocol.name().to_string(),
        scope: if scope.is_empty() {
            String::new()
        } else {
            UploadKey::derive(&[b"stitch scope", route.id.as_bytes(), scope]).short()
        },
        started_ms,
    }
}

/// The value that keeps one user's uploads apart from another's (empty: anonymous).
pub(crate) fn scope_value(header: &RequestHeader, scope: Option<&Scope>) -> Vec<u8> {
    match scope {
        None => Vec::new(),
        Some(Scope::Header(name)) => header
            .headers
            .get(name.as_str())
            .map(|v| v.as_bytes().to_vec())
            .unwrap_or_default(),
        Some(Scope::Cookie(name)) => cookie(header, name)
            .map(|v| v.as_bytes().to_vec())
            .unwrap_or_default(),
        // The token's value is checked at creation and names the finalize request; requests
        // on an upload's URL need nothing else.
        Some(Scope::Metadata(_)) => Vec::new(),
    }
}
