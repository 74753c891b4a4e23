//! Stitch: a reverse proxy that terminates resumable browser uploads (Resumable.js, Flow.js) and
//! hands the application ONE ordinary multipart upload per finished file.
//!
//! The data flow, one module per step:
//! `proxy` (Pingora glue) → `config::Route` (which requests are uploads) → `protocol` (what the
//! client said) → `upload` (the state machine: stored, complete, delivered) → `store` (chunk bytes
//! and upload state) → `forward` (one request to the upstream, answer recorded).

pub mod config;
pub mod demo;
pub mod drain;
pub mod forward;
mod locks;
pub mod protocol;
pub mod proxy;
pub mod server;
pub mod store;
pub mod upload;

pub use config::Config;
pub use server::{spawn, Running};
