//! HTTP helpers the protocol adapters share, below them and above nothing but storage types:
//! whole replies with exact framing, request bodies read piece by piece, `Expect: 100-continue`,
//! and reading request headers (over `&RequestHeader`, so they are testable without a session).

use crate::store::{BodyError, BodySource};
use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;
use http::{HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::ServerSession;
use pingora::proxy::Session;
use std::net::IpAddr;
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
        tracing::info!("refused a request with {status}: {reason}");
        Reply::text(status, reason)
    }

    /// A new upload that waits because the authorization hook could not be asked (a 503 that
    /// every client retries); `why` is for the log.
    pub fn hook_unavailable(why: &str) -> Reply {
        tracing::warn!("a new upload waits for the authorization hook: {why}");
        Reply::text(
            503,
            "the application could not be asked whether this upload may start; retry",
        )
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
        if !matches!(self.status, 204 | 304) {
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

/// How long an unread body is read (and thrown away) after the answer, before the connection
/// closes.
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// Sends an upload route's reply. A body left unread (a refused request) is not waited for:
/// the client gets its answer at once and the connection closes, after a moment of reading so
/// that the client sees the answer rather than a reset. A client still waiting for a
/// `100 Continue` (`continued` false) sends no body.
pub async fn answer(session: &mut Session, reply: Reply, continued: bool) -> pingora::Result<()> {
    let body_coming = !expects_continue(session.req_header()) || continued;
    let unread = body_coming && !session.is_body_done();
    if unread {
        session.set_keepalive(None);
    }
    let sent = reply.send(session).await;
    if unread {
        let _ = tokio::time::timeout(LINGER, session.drain_request_body()).await;
    }
    sent
}

impl BodyError {
    /// Classifies an error of Pingora's body reader.
    pub fn from_pingora(e: &pingora::Error) -> BodyError {
        match e.etype() {
            pingora::ErrorType::ReadTimedout => BodyError::Stalled,
            _ => BodyError::Broken(e.to_string()),
        }
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
/// HTTP/1) per pull, so the parser holds no more than that. And since multer keeps what it
/// reads until a part's headers end, a part whose headers never end could hold the whole
/// body: the stream fails once `budget` is spent with no [`Progress::made`] in between.
pub fn body_stream(
    session: &mut ServerSession,
    progress: Progress,
    budget: u64,
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
        progress,
        budget,
    }
}

/// Bytes a parser has pulled since it last produced something (a field, a piece of one).
#[derive(Clone, Default)]
pub struct Progress(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl Progress {
    /// The parser produced something: its budget starts again.
    pub fn made(&self) {
        self.0.store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

struct OnePieceAtATime<S> {
    inner: Pin<Box<S>>,
    just_yielded: bool,
    progress: Progress,
    budget: u64,
}

impl<S: Stream<Item = pingora::Result<Bytes>>> Stream for OnePieceAtATime<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        if self.just_yielded {
            // Not ready "yet": the consumer gets to use the last piece first. Wake at once.
            self.just_yielded = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let next = self.inner.as_mut().poll_next(cx);
        if let Poll::Ready(Some(Ok(piece))) = &next {
            let pulled = self
                .progress
                .0
                .fetch_add(piece.len() as u64, std::sync::atomic::Ordering::Relaxed);
            if pulled + piece.len() as u64 > self.budget {
                return Poll::Ready(Some(pingora::Error::e_explain(
                    pingora::ErrorType::InvalidHTTPHeader,
                    "a multipart part's headers never end",
                )));
            }
        }
        self.just_yielded = matches!(next, Poll::Ready(Some(_)));
        next
    }
}

/// Answers `Expect: 100-continue` (Pingora leaves it to us on this path) without losing
/// keep-alive.
pub async fn accept_expect_continue(session: &mut Session) -> pingora::Result<()> {
    if expects_continue(session.req_header()) {
        session.set_close_on_response_before_downstream_finish(false);
        session.write_continue_response().await?;
        session.set_close_on_response_before_downstream_finish(true);
    }
    Ok(())
}

/// Does the client wait for `100 Continue` before it sends the body?
pub fn expects_continue(header: &RequestHeader) -> bool {
    header
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// A header's value as text, if present and visible ASCII.
pub fn header_str(header: &RequestHeader, name: HeaderName) -> Option<&str> {
    header.headers.get(name)?.to_str().ok()
}

/// The body length the request's framing announces.
pub fn content_length(header: &RequestHeader) -> Option<u64> {
    header_str(header, http::header::CONTENT_LENGTH)?
        .trim()
        .parse()
        .ok()
}

/// The value of cookie `name`, from any `Cookie` header.
pub fn cookie<'h>(header: &'h RequestHeader, name: &str) -> Option<&'h str> {
    header
        .headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
}

/// The request's Host, from the header or an absolute URL.
pub fn host(header: &RequestHeader) -> Option<HeaderValue> {
    header.headers.get(http::header::HOST).cloned().or_else(|| {
        let authority = header.uri.authority()?;
        HeaderValue::from_str(authority.as_str()).ok()
    })
}

/// The scheme and authority a client used to reach this server (`http://host:port`), for
/// absolute URLs in answers. From the `Host` header; when `behind_proxy`, from the first hop of
/// `Forwarded` (`proto=`, `host=`) or else `X-Forwarded-Proto` / `X-Forwarded-Host`. A host
/// that is not a plain host name or address (with an optional port) is not used.
pub fn public_origin(header: &RequestHeader, behind_proxy: bool) -> Option<String> {
    let mut proto = None;
    let mut forwarded_host = None;
    if behind_proxy {
        if let Some(first) =
            header_str(header, http::header::FORWARDED).and_then(|v| v.split(',').next())
        {
            for pair in first.split(';') {
                let Some((name, value)) = pair.trim().split_once('=') else {
                    continue;
                };
                let value = value.trim_matches('"');
                match name.trim().to_ascii_lowercase().as_str() {
                    "proto" => proto = Some(value.to_ascii_lowercase()),
                    "host" => forwarded_host = Some(value.to_string()),
                    _ => {}
                }
            }
        }
        let first_of = |name: &'static str| {
            header_str(header, http::HeaderName::from_static(name))
                .and_then(|v| v.split(',').next())
                .map(|v| v.trim().to_string())
        };
        proto = proto.or_else(|| first_of("x-forwarded-proto").map(|p| p.to_ascii_lowercase()));
        forwarded_host = forwarded_host.or_else(|| first_of("x-forwarded-host"));
    }
    let host = match forwarded_host {
        Some(host) => host,
        None => host(header)?.to_str().ok()?.to_string(),
    };
    let plain = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    let scheme = match proto.as_deref() {
        Some("https") => "https",
        _ => "http",
    };
    // The scheme's own port is left out, as browsers write the URL.
    let default_port = if scheme == "https" { ":443" } else { ":80" };
    let host = host.strip_suffix(default_port).unwrap_or(&host);
    plain.then(|| format!("{scheme}://{host}"))
}

/// `X-Forwarded-For` for a request to the upstream: the client's value, if any, with the
/// client's own address appended.
pub fn forwarded_for(header: &RequestHeader, client: Option<IpAddr>) -> Option<HeaderValue> {
    let client = client?;
    let earlier = header
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok());
    let value = match earlier {
        Some(earlier) => format!("{earlier}, {client}"),
        None => client.to_string(),
    };
    HeaderValue::from_str(&value).ok()
}

/// The client's IP address, if the session has one.
pub fn client_ip(session: &Session) -> Option<IpAddr> {
    Some(session.client_addr()?.as_inet()?.ip())
}

/// A whole response for a small `ServeHttp` app (the demo application, the operators'
/// listener): the body with its type and length, never cached.
pub fn app_response(
    status: http::StatusCode,
    content_type: &str,
    body: Vec<u8>,
) -> http::Response<Vec<u8>> {
    http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(body)
        .expect("a valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_public_origin_comes_from_host_or_trusted_forwarding_headers() {
        let request = |headers: &[(&str, &str)]| {
            let mut r = RequestHeader::build("POST", b"/files", None).unwrap();
            for (n, v) in headers {
                r.insert_header(n.to_string(), *v).unwrap();
            }
            r
        };
        let plain = request(&[("host", "stitch.test:8080"), ("x-forwarded-host", "evil")]);
        assert_eq!(
            public_origin(&plain, false).as_deref(),
            Some("http://stitch.test:8080")
        );
        let proxied = request(&[
            ("host", "10.0.0.5:8080"),
            ("x-forwarded-host", "uploads.example.com"),
            ("x-forwarded-proto", "https"),
        ]);
        assert_eq!(
            public_origin(&proxied, true).as_deref(),
            Some("https://uploads.example.com")
        );
        let forwarded = request(&[
            ("host", "10.0.0.5"),
            (
                "forwarded",
                r#"for=1.2.3.4;proto=https;host="a.example:8443", for=5.6.7.8"#,
            ),
            ("x-forwarded-host", "ignored.example"),
        ]);
        assert_eq!(
            public_origin(&forwarded, true).as_deref(),
            Some("https://a.example:8443")
        );
        let garbage = request(&[("host", "x"), ("x-forwarded-host", "a b/c")]);
        assert_eq!(public_origin(&garbage, true), None);
    }

    fn request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut header = RequestHeader::build("POST", b"/upload?a=1", None).unwrap();
        for (name, value) in headers {
            header.append_header(name.to_string(), *value).unwrap();
        }
        header
    }

    #[test]
    fn expect_continue_is_recognised_in_any_case() {
        assert!(expects_continue(&request(&[("expect", "100-Continue")])));
        assert!(!expects_continue(&request(&[("expect", "something-else")])));
        assert!(!expects_continue(&request(&[])));
    }

    #[test]
    fn content_length_is_read_when_it_is_a_number() {
        assert_eq!(
            content_length(&request(&[("content-length", " 42 ")])),
            Some(42)
        );
        assert_eq!(
            content_length(&request(&[("content-length", "lots")])),
            None
        );
        assert_eq!(content_length(&request(&[])), None);
    }

    #[test]
    fn a_cookie_is_found_among_several_headers_and_pairs() {
        let header = request(&[("cookie", "a=1; session=abc"), ("cookie", "b=2")]);
        assert_eq!(cookie(&header, "session"), Some("abc"));
        assert_eq!(cookie(&header, "b"), Some("2"));
        assert_eq!(cookie(&header, "sess"), None);
    }

    #[test]
    fn the_client_address_is_appended_to_an_earlier_forwarded_for() {
        let ip = Some("10.0.0.7".parse().unwrap());
        let header = request(&[("x-forwarded-for", "203.0.113.1")]);
        let value = forwarded_for(&header, ip).unwrap();
        assert_eq!(value, "203.0.113.1, 10.0.0.7");
        assert_eq!(forwarded_for(&request(&[]), ip).unwrap(), "10.0.0.7");
        assert_eq!(forwarded_for(&header, None), None);
    }

    #[test]
    fn the_host_comes_from_the_header() {
        assert_eq!(
            host(&request(&[("host", "files.example.com")])).unwrap(),
            "files.example.com"
        );
        assert_eq!(host(&request(&[])), None);
    }
}
