//! Reading request bodies and writing whole responses on a Pingora session.

use crate::store::{BodyError, BodySource};
use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::proxy::Session;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A complete response Stitch answers itself.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Reply {
    pub fn text(status: u16, message: impl Into<String>) -> Reply {
        let mut body = message.into();
        body.push('\n');
        Reply {
            status,
            headers: vec![("content-type".into(), "text/plain; charset=utf-8".into())],
            body: Bytes::from(body),
        }
    }

    /// A request Stitch refuses (bad parameters, a broken body): logged with its reason, since
    /// the client often shows nothing of it.
    pub fn refuse(status: u16, reason: impl Into<String>) -> Reply {
        let reason = reason.into();
        log::info!("refused a chunk request with {status}: {reason}");
        Reply::text(status, reason)
    }

    pub fn empty(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    /// Sets a header, replacing any value it had.
    pub fn with_header(mut self, name: &str, value: &str) -> Reply {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Writes the reply with an exact Content-Length (keep-alive needs framing).
    pub async fn send(self, session: &mut Session) -> pingora::Result<()> {
        let mut header = ResponseHeader::build(self.status, Some(self.headers.len() + 1))?;
        for (name, value) in &self.headers {
            header.append_header(name.clone(), value.as_str())?;
        }
        let head_only = session.req_header().method == http::Method::HEAD;
        let no_body = self.body.is_empty() || head_only;
        if self.status != 204 && self.status != 304 {
            header.insert_header(http::header::CONTENT_LENGTH, self.body.len())?;
        }
        session
            .write_response_header(Box::new(header), no_body)
            .await?;
        if !no_body {
            session.write_response_body(Some(self.body), true).await?;
        }
        Ok(())
    }
}

/// The raw request body, piece by piece (at most 64 KiB each on HTTP/1).
pub struct RequestBody<'s>(pub &'s mut Session);

#[async_trait]
impl BodySource for RequestBody<'_> {
    async fn next_piece(&mut self) -> Result<Option<Bytes>, BodyError> {
        self.0
            .read_request_body()
            .await
            .map_err(|e| BodyError::from_pingora(&e))
    }
}

/// The request body as a stream, for a streaming parser such as multer.
///
/// multer pulls from its stream until the stream is not ready; over a fast connection that
/// would buffer a whole chunk in memory. This stream hands out one piece (at most 64 KiB on
/// HTTP/1) per pull, so the parser holds no more than that.
pub fn body_stream(
    session: &mut ServerSession,
) -> impl Stream<Item = pingora::Result<Bytes>> + Send + '_ {
    let pieces = futures::stream::unfold(session, |session| async move {
        match session.read_request_body().await {
            Ok(Some(piece)) => Some((Ok(piece), session)),
            Ok(None) => None,
            Err(e) => Some((Err(e), session)),
        }
    });
    OnePieceAtATime {
        inner: Box::pin(pieces),
        just_yielded: false,
    }
}

struct OnePieceAtATime<S> {
    inner: Pin<Box<S>>,
    just_yielded: bool,
}

impl<S: Stream> Stream for OnePieceAtATime<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        if self.just_yielded {
            // Not ready "yet": the consumer gets to use the last piece first. Wake at once.
            self.just_yielded = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let next = self.inner.as_mut().poll_next(cx);
        self.just_yielded = matches!(next, Poll::Ready(Some(_)));
        next
    }
}

/// Answers `Expect: 100-continue` (Pingora leaves it to us on this path) without losing
/// keep-alive.
pub async fn accept_expect_continue(session: &mut Session) -> pingora::Result<()> {
    if expects_continue(session) {
        session.set_close_on_response_before_downstream_finish(false);
        session.write_continue_response().await?;
        session.set_close_on_response_before_downstream_finish(true);
    }
    Ok(())
}

/// Does the client wait for `100 Continue` before it sends the body?
pub fn expects_continue(session: &Session) -> bool {
    session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// `X-Forwarded-For` for a request to the upstream: the client's value, if any, with the
/// client's own address appended.
pub fn forwarded_for(session: &Session) -> Option<http::HeaderValue> {
    let client = session.client_addr()?.as_inet()?.ip();
    let earlier = session
        .req_header()
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok());
    let value = match earlier {
        Some(earlier) => format!("{earlier}, {client}"),
        None => client.to_string(),
    };
    http::HeaderValue::from_str(&value).ok()
}
