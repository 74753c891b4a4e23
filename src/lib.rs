//! Stitch: a reverse proxy that terminates resumable browser uploads (Resumable.js, Flow.js) and
//! hands the application ONE ordinary multipart upload per finished file.
//!
//! The data flow, one module per step, each using only those after it:
//! `proxy` (Pingora glue: route matching, connection limits) → `protocol` (what the client
//! said, in its protocol; `http` holds the helpers they share) → `upload` (the core: stored,
//! complete, delivered) → `store` (blobs, upload state, locks) and `forward` (the one request
//! to the upstream). `config` turns the YAML into one validated `Config`; `server` wires it up.

pub mod config;
pub mod demo;
pub mod drain;
pub mod forward;
pub mod http;
mod locks;
pub mod logging;
pub mod metrics;
pub mod protocol;
pub mod proxy;
pub mod server;
pub mod store;
pub mod upload;

pub use config::Config;
pub use server::{spawn, Running};
