//! Protocol adapters: they turn a client's requests into operations on the upload core and the
//! core's results into the statuses that client understands, each in one mapping function
//! (clients read status codes differently). They never touch storage.
//!
//! One folder per protocol family: `chunk/` for Resumable.js and Flow.js, which speak one chunk
//! protocol with different parameter names. A route names its protocol and carries that
//! protocol's own options ([`ProtocolConfig`]); [`handle`] dispatches.

pub mod chunk;

use crate::config::Route;
use crate::upload::UploadCore;
use pingora::proxy::Session;
use serde::Deserialize;
use std::sync::Arc;

/// A route's protocol, with that protocol's own options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolConfig {
    Chunk(chunk::ChunkOptions),
}

/// `routes[].protocol` as written in the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProtocolName {
    Resumable,
    Flow,
}

impl ProtocolConfig {
    /// The protocol a route names, with its options (`parameters:` for the chunk protocols).
    pub fn new(
        name: ProtocolName,
        parameters: chunk::RawParamNames,
    ) -> Result<ProtocolConfig, String> {
        let flavor = match name {
            ProtocolName::Resumable => chunk::Flavor::Resumable,
            ProtocolName::Flow => chunk::Flavor::Flow,
        };
        Ok(ProtocolConfig::Chunk(chunk::ChunkOptions::new(
            flavor, parameters,
        )?))
    }

    pub fn name(&self) -> &'static str {
        match self {
            ProtocolConfig::Chunk(options) => options.name(),
        }
    }
}

/// Handles a request on an upload route. `Ok(false)`: not upload traffic, pass it through.
pub async fn handle(
    session: &mut Session,
    route: &Route,
    core: &Arc<UploadCore>,
) -> pingora::Result<bool> {
    match &route.protocol {
        ProtocolConfig::Chunk(options) => chunk::handle(session, route, options, core).await,
    }
}
