//! The Pingora glue: upload routes are answered in `request_filter`; everything else is proxied
//! to the upstream untouched (streaming both ways, keep-alive kept).

pub mod connections;
pub mod trailers;

use crate::config::{Config, ConnectionLimits, Route};
use crate::protocol;
use crate::upload::UploadCore;
use async_trait::async_trait;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// One line per request Stitch answered itself, in the request's span (route, protocol, kind,
/// upload hash, part or offset): status, bytes received, duration.
fn access_log(session: &Session, kind: &str, started: std::time::Instant) {
    let status = session.response_written().map_or(0, |r| r.status.as_u16());
    tracing::info!(
        target: "stitch::access",
        status,
        received = session.body_bytes_read(),
        ms = started.elapsed().as_millis() as u64,
        "{} {} {status}",
        session.req_header().method,
        kind
    );
}

/// One line per request passed through to the application.
fn pass_through_log(session: &Session, started: std::time::Instant) {
    let status = session.response_written().map_or(0, |r| r.status.as_u16());
    tracing::info!(
        target: "stitch::access",
        kind = "pass-through",
        status,
        received = session.body_bytes_read(),
        ms = started.elapsed().as_millis() as u64,
        "{} {} {status}",
        session.req_header().method,
        session.req_header().uri.path()
    );
}

/// What the proxy knows about a request while it is answered (for metrics).
pub struct Ctx {
    started: std::time::Instant,
    /// The upload route it is on, by index.
    route: Option<usize>,
    /// What kind of request it is (see `protocol::kind`).
    kind: &'static str,
}

pub struct StitchProxy {
    routes: Vec<Route>,
    core: Arc<UploadCore>,
    upstream: SocketAddr,
    connect_timeout: Duration,
    limits: ConnectionLimits,
    /// Whether requests are counted (only with a `metrics` listener to expose them).
    counted: bool,
}

impl StitchProxy {
    pub fn new(config: &Config, core: Arc<UploadCore>) -> StitchProxy {
        StitchProxy {
            routes: config.routes.clone(),
            core,
            upstream: config.upstream,
            connect_timeout: config.connect_timeout.0,
            limits: config.connections.clone(),
            counted: config.metrics.is_some(),
        }
    }

    fn route_for(&self, session: &Session) -> Option<(usize, &Route)> {
        let header = session.req_header();
        let host = header
            .headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| header.uri.authority().map(|a| a.as_str()));
        self.routes
            .iter()
            .enumerate()
            .find(|(_, route)| route.matches(&header.method, header.uri.path(), host))
    }
}

#[async_trait]
impl ProxyHttp for StitchProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            started: std::time::Instant::now(),
            route: None,
            kind: "pass-through",
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Ctx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let mut peer = HttpPeer::new(self.upstream, false, String::new());
        peer.options.connection_timeout = Some(self.connect_timeout);
        Ok(Box::new(peer))
    }

    /// The application now sits behind a proxy: tell it who the client is.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut pingora::http::RequestHeader,
        _ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        let value =
            crate::http::forwarded_for(session.req_header(), crate::http::client_ip(session));
        if let Some(value) = value {
            upstream_request.insert_header("x-forwarded-for", value)?;
        }
        Ok(())
    }

    /// The header is in: the connection limits that apply from here on (see `connections`).
    async fn early_request_filter(
        &self,
        session: &mut Session,
        _ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        connections::header_arrived();
        let header_size = session
            .as_downstream()
            .as_http1()
            .map_or(0, |h1| h1.get_headers_raw_bytes().len());
        if header_size > self.limits.max_header_size {
            return Error::e_explain(
                ErrorType::HTTPStatus(431),
                format!(
                    "request header of {header_size} bytes, over {}",
                    self.limits.max_header_size
                ),
            );
        }
        // Pingora keeps HTTP/1.1 connections alive forever unless told otherwise.
        if session.get_keepalive().is_some() {
            session.set_keepalive(Some(self.limits.idle_timeout.as_secs().max(1)));
        }
        session.set_read_timeout(Some(self.limits.body_timeout));
        session.set_total_drain_timeout(Some(self.limits.body_timeout));
        Ok(())
    }

    /// Pingora's own choice of status, except that a client whose body stalled gets 408.
    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, _ctx: &mut Ctx) -> FailToProxy {
        let code = match (e.etype(), e.esource()) {
            (ErrorType::HTTPStatus(code), _) => *code,
            (_, ErrorSource::Upstream) => 502,
            (ErrorType::ReadTimedout, ErrorSource::Downstream) => 408,
            (
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed,
                ErrorSource::Downstream,
            ) => 0, // the client is gone
            (_, ErrorSource::Downstream) => 400,
            _ => 500,
        };
        if code > 0 {
            if let Err(e) = session.respond_error(code).await {
                tracing::debug!("could not send a {code} to the client: {e}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> pingora::Result<bool> {
        match self.route_for(session) {
            Some((index, route)) => {
                ctx.route = Some(index);
                ctx.kind = protocol::kind(route, session.req_header());
                let span = tracing::info_span!(
                    "request",
                    route = %route.label,
                    protocol = %route.protocol.name(),
                    kind = ctx.kind,
                    upload = tracing::field::Empty,
                    part = tracing::field::Empty,
                );
                let kind = ctx.kind;
                let started = ctx.started;
                let answered = async {
                    let handled = protocol::handle(session, route, &self.core).await;
                    if matches!(handled, Ok(true)) {
                        access_log(session, kind, started);
                    }
                    handled
                };
                let handled = answered.instrument(span).await;
                if matches!(handled, Ok(false)) {
                    ctx.kind = "pass-through";
                }
                handled
            }
            None => Ok(false),
        }
    }

    /// Logs a request passed through, and counts every request once it is answered.
    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        if ctx.kind == "pass-through" {
            pass_through_log(session, ctx.started);
        }
        if !self.counted {
            return;
        }
        let metrics = &self.core.metrics;
        let (route, protocol) = match ctx.route.map(|i| &self.routes[i]) {
            Some(route) => (route.label.as_str(), route.protocol.name().to_string()),
            None => ("", String::new()),
        };
        let status = session
            .response_written()
            .map_or("none", |r| crate::metrics::status_class(r.status.as_u16()));
        metrics
            .requests
            .with_label_values(&[route, &protocol, ctx.kind, status])
            .inc();
        metrics
            .request_seconds
            .with_label_values(&[route, &protocol, ctx.kind])
            .observe(ctx.started.elapsed().as_secs_f64());
        if ctx.kind != "pass-through" && ctx.route.is_some() {
            metrics
                .received_bytes
                .with_label_values(&[route, &protocol])
                .inc_by(session.body_bytes_read() as u64);
        }
    }
}
