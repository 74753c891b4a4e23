//! Protocol adapters: they turn a client's requests into operations on the upload core and the
//! core's answers into the status codes that client understands. They never touch storage.
//!
//! Resumable.js and Flow.js speak one chunk protocol with different parameter names, so they
//! share one adapter (`chunk`), configured per route by `config::ParamNames`.

pub mod chunk;
pub mod params;

pub use chunk::handle;
