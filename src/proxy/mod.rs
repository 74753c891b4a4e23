//! The Pingora glue: upload routes are answered in `request_filter`; everything else is proxied
//! to the upstream untouched (streaming both ways, keep-alive kept).

pub mod io;

use crate::config::{Config, Route};
use crate::protocol;
use crate::upload::UploadCore;
use async_trait::async_trait;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub struct StitchProxy {
    routes: Vec<Route>,
    core: Arc<UploadCore>,
    upstream: SocketAddr,
    connect_timeout: Duration,
}

impl StitchProxy {
    pub fn new(config: &Config, core: Arc<UploadCore>) -> StitchProxy {
        StitchProxy {
            routes: config.routes.clone(),
            core,
            upstream: config.upstream,
            connect_timeout: config.connect_timeout.0,
        }
    }

    fn route_for(&self, session: &Session) -> Option<&Route> {
        let header = session.req_header();
        let host = header
            .headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| header.uri.authority().map(|a| a.as_str()));
        self.routes
            .iter()
            .find(|route| route.matches(&header.method, header.uri.path(), host))
    }
}

#[async_trait]
impl ProxyHttp for StitchProxy {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
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
        _ctx: &mut (),
    ) -> pingora::Result<()> {
        if let Some(value) = io::forwarded_for(session) {
            upstream_request.insert_header("x-forwarded-for", value)?;
        }
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> pingora::Result<bool> {
        match self.route_for(session) {
            Some(route) => protocol::handle(session, route, &self.core).await,
            None => Ok(false),
        }
    }
}
