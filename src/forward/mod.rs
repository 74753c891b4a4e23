//! The forwarder: sends a finished upload to the upstream as ONE ordinary `multipart/form-data`
//! request, streamed part by part from the chunk store, and reads back the upstream's answer.
//!
//! The request has an exact `Content-Length` (application servers often handle chunked uploads
//! badly) and goes through Pingora's own connector, so it shares the pass-through path's address
//! and connection settings.

use crate::config::ForwardConfig;
use crate::store::{RecordedAnswer, StoreError, StoredPart, StoredReader, UploadKey, UploadMeta};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::future::OptionFuture;
use http::{HeaderName, HeaderValue};
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::{HttpPeer, Peer};
use pingora::ErrorType;
use std::net::SocketAddr;
use std::time::Duration;

mod early;

use early::Shape;
pub use early::{EarlyBegin, EarlyEnd, PartFeed};

/// The upstream's answer is kept whole (it is replayed later); larger bodies are cut here.
pub const MAX_ANSWER_BODY: usize = 16 << 20;

/// Headers that describe one hop, not the message: never copied between connections.
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
    "proxy-authenticate",
];

/// What the completing request contributes to the upstream request.
#[derive(Debug, Clone, Default)]
pub struct DeliveryRequest {
    /// Text fields, in order: the application's own fields (and protocol fields if asked).
    pub fields: Vec<(String, String)>,
    /// Headers copied from the client (Cookie, Authorization, configured extras).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The client's Host header, so the application sees the host it is used to.
    pub host: Option<HeaderValue>,
    /// The id of the route the upload came in on (the delivery queue finds its forward
    /// settings by it).
    pub route: String,
}

impl DeliveryRequest {
    /// Headers kept as plain names and bytes (in an upload's state), as headers again; any
    /// that no longer parse are left out.
    pub fn parse_headers(stored: &[(String, Vec<u8>)]) -> Vec<(HeaderName, HeaderValue)> {
        stored
            .iter()
            .filter_map(|(name, value)| {
                Some((
                    HeaderName::from_bytes(name.as_bytes()).ok()?,
                    HeaderValue::from_bytes(value).ok()?,
                ))
            })
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("the upstream did not answer in time: {message}")]
    Timeout { message: String, in_doubt: bool },
    #[error("the upstream could not be reached or broke off: {message}")]
    Upstream { message: String, in_doubt: bool },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ForwardError {
    /// True if the whole request reached the upstream and no answer came back: the upstream
    /// may have the file. Nothing can tell; a later delivery is logged as "in doubt".
    pub fn in_doubt(&self) -> bool {
        match self {
            ForwardError::Timeout { in_doubt, .. } | ForwardError::Upstream { in_doubt, .. } => {
                *in_doubt
            }
            ForwardError::Store(_) => false,
        }
    }

    fn upstream(message: impl Into<String>) -> ForwardError {
        ForwardError::Upstream {
            message: message.into(),
            in_doubt: false,
        }
    }
}

/// What an upstream status means for the upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The application decided (2xx, 3xx, a 4xx other than those below): the upload is done.
    Final,
    /// "Who are you" (401, 403, 407, and the 419 and 440 some frameworks send for an expired
    /// session or CSRF token): a retry with fresh credentials may succeed; the parts stay.
    WhoAreYou,
    /// A server error or "try again later" (408, 429): the parts stay for a retry.
    TryLater,
}

pub fn verdict(status: u16) -> Verdict {
    match status {
        401 | 403 | 407 | 419 | 440 => Verdict::WhoAreYou,
        408 | 429 | 500.. => Verdict::TryLater,
        _ => Verdict::Final,
    }
}

/// Where the forwarder reads an upload's parts from (the core gives it the upload's own).
#[async_trait]
pub trait PartReader: Send + Sync {
    async fn open(&self, part: &StoredPart) -> Result<StoredReader, StoreError>;
}

/// Sends a finished upload to the upstream. The upload core knows the forwarder only through
/// this trait, so that its races can be tested with a stand-in.
#[async_trait]
pub trait Forward: Send + Sync {
    /// Sends `file` (the upload's parts, in order, read through `parts`) as one file and
    /// returns the upstream's answer.
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        parts: &dyn PartReader,
        upload: &UploadKey,
        meta: &UploadMeta,
        file: &[StoredPart],
        forward: &ForwardConfig,
        request: &DeliveryRequest,
        idempotency_key: &str,
    ) -> Result<RecordedAnswer, ForwardError>;

    /// Begins the delivery of an upload that is still arriving (`forward.early`): sends the
    /// request's header and the parts `feed` gives, in order, as they are stored, but never the
    /// request's end. Returns when the stream ended: with every part sent and the request
    /// finished by [`Forward::send`] for the same file, or cut off. By default nothing is sent
    /// early.
    async fn send_early(&self, _begin: EarlyBegin<'_>, _feed: &dyn PartFeed) -> EarlyEnd {
        EarlyEnd::Unsupported
    }

    /// Asks the upstream a question about an upload (the authorization hook): one small POST of
    /// `body` (JSON) to `path`, with the client's headers, and its answer.
    async fn ask(
        &self,
        _upload: &UploadKey,
        _path: &str,
        _request: &DeliveryRequest,
        _body: Bytes,
        _timeout: Duration,
    ) -> Result<RecordedAnswer, ForwardError> {
        Err(ForwardError::upstream("this forwarder asks nothing"))
    }
}

/// The forwarder over HTTP, through Pingora's connector.
pub struct HttpForwarder {
    connector: Connector,
    upstream: SocketAddr,
    connect_timeout: Duration,
    /// Requests begun early, by upload (see `early`).
    early: dashmap::DashMap<UploadKey, std::sync::Arc<early::Slot>>,
}

impl HttpForwarder {
    pub fn new(upstream: SocketAddr, connect_timeout: Duration) -> HttpForwarder {
        HttpForwarder {
            connector: Connector::new(None),
            upstream,
            connect_timeout,
            early: dashmap::DashMap::new(),
        }
    }
}

#[async_trait]
impl Forward for HttpForwarder {
    /// A pooled connection that turns out to be dead is replaced once; an upstream that
    /// answers before taking the whole body (a 413, a 401) is heard, not reported as a failure.
    /// `forward.timeout` bounds every read and write, and the wait for the answer. A request
    /// begun early for this file (see [`Forward::send_early`]) is finished instead of sending
    /// the file again, if it is the same request.
    async fn send(
        &self,
        parts: &dyn PartReader,
        upload: &UploadKey,
        meta: &UploadMeta,
        file: &[StoredPart],
        forward: &ForwardConfig,
        request: &DeliveryRequest,
        idempotency_key: &str,
    ) -> Result<RecordedAnswer, ForwardError> {
        let file_len: u64 = file.iter().map(|p| p.len).sum();
        let shape = Shape::of(meta, forward, request, idempotency_key, file_len);
        let peer = self.peer();
        if let Some(begun) = self.take_early(upload, &shape, file).await {
            let rest = &file[begun.sent.len()..];
            tracing::debug!(
                "{upload:?}: finishing the request begun early ({} parts sent, {} to go)",
                begun.sent.len(),
                rest.len()
            );
            let attempt = self
                .attempt(
                    begun.session,
                    None,
                    &begun.body,
                    parts,
                    rest,
                    upload,
                    forward,
                    &peer,
                )
                .await;
            match attempt {
                Attempt::Done(result) => return *result,
                Attempt::Retry(e) => tracing::info!(
                    "{upload:?}: the request begun early broke off ({e}); sending the file \
                     on another connection"
                ),
            }
        }
        let body = MultipartBody::new(meta, forward, request);
        let header = self.request_header(&body, file_len, forward, request, idempotency_key)?;
        let mut retried = false;
        loop {
            let (session, reused) = self
                .connector
                .get_http_session(&peer)
                .await
                .map_err(|e| classify(e, false))?;
            let attempt = self
                .attempt(
                    session,
                    Some(header.clone()),
                    &body,
                    parts,
                    file,
                    upload,
                    forward,
                    &peer,
                )
                .await;
            match attempt {
                Attempt::Done(result) => return *result,
                // A pooled connection the upstream had closed fails on the first writes;
                // nothing was processed, so one more try on another connection is safe.
                Attempt::Retry(e) if reused && !retried => {
                    tracing::debug!(
                        "{upload:?}: pooled upstream connection failed ({e}); retrying"
                    );
                    retried = true;
                }
                Attempt::Retry(e) => return Err(classify(e, false)),
            }
        }
    }

    async fn send_early(&self, begin: EarlyBegin<'_>, feed: &dyn PartFeed) -> EarlyEnd {
        self.stream_early(begin, feed).await
    }

    async fn ask(
        &self,
        upload: &UploadKey,
        path: &str,
        request: &DeliveryRequest,
        body: Bytes,
        timeout: Duration,
    ) -> Result<RecordedAnswer, ForwardError> {
        self.ask_upstream(upload, path, request, body, timeout)
            .await
    }
}

#[async_trait]
trait Ask {
    async fn ask_once(
        &self,
        upload: &UploadKey,
        header: RequestHeader,
        body: Bytes,
        timeout: Duration,
    ) -> Result<RecordedAnswer, (pingora::BError, bool)>;
}

#[async_trait]
impl Ask for HttpForwarder {
    /// One try; the error says whether the connection was a pooled one.
    async fn ask_once(
        &self,
        upload: &UploadKey,
        header: RequestHeader,
        body: Bytes,
        timeout: Duration,
    ) -> Result<RecordedAnswer, (pingora::BError, bool)> {
        let peer = self.peer();
        let (mut session, reused) = self
            .connector
            .get_http_session(&peer)
            .await
            .map_err(|e| (e, false))?;
        session.set_read_timeout(Some(timeout));
        session.set_write_timeout(Some(timeout));
        let sent = async {
            session.write_request_header(Box::new(header)).await?;
            session.write_request_body(body, true).await?;
            session.finish_request_body().await?;
            read_answer(&mut session, upload, timeout).await
        };
        match sent.await {
            Ok((answer, whole)) => {
                if whole {
                    self.connector
                        .release_http_session(session, &peer, peer.idle_timeout())
                        .await;
                } else {
                    session.shutdown().await;
                }
                Ok(answer)
            }
            Err(e) => {
                session.shutdown().await;
                Err((e, reused))
            }
        }
    }
}

/// How one try at sending the request ended.
enum Attempt {
    /// With an answer or a failure to report.
    Done(Box<Result<RecordedAnswer, ForwardError>>),
    /// The connection failed before the upstream had the whole request, and it said nothing:
    /// another connection may do better.
    Retry(Box<pingora::Error>),
}

impl HttpForwarder {
    fn peer(&self) -> HttpPeer {
        let mut peer = HttpPeer::new(self.upstream, false, String::new());
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer
    }

    /// Sends the request on `session` (its header first, if given: else the header, the text
    /// parts and the parts before `file` went out already), then reads the answer.
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        mut session: HttpSession,
        header: Option<RequestHeader>,
        body: &MultipartBody,
        parts: &dyn PartReader,
        file: &[StoredPart],
        upload: &UploadKey,
        forward: &ForwardConfig,
        peer: &HttpPeer,
    ) -> Attempt {
        // The connector does not apply a peer's read and write timeouts: set them here, or an
        // upstream that stops reading holds the delivery forever.
        session.set_read_timeout(Some(forward.timeout));
        session.set_write_timeout(Some(forward.timeout));
        let sent = async {
            if let Some(header) = header {
                send_start(&mut session, header, body).await?;
            }
            send_parts(&mut session, parts, file).await?;
            send_end(&mut session, body).await
        };
        let write_error = match sent.await {
            Ok(()) => {
                // The whole request went out: whatever happens now, never send it again.
                let answered = match read_answer(&mut session, upload, forward.timeout).await {
                    Ok((answer, whole)) => {
                        if whole {
                            self.connector
                                .release_http_session(session, peer, peer.idle_timeout())
                                .await;
                        } else {
                            session.shutdown().await;
                        }
                        Ok(answer)
                    }
                    Err(e) => {
                        session.shutdown().await;
                        tracing::warn!(
                            "{upload:?}: the upstream got the whole file and gave no answer \
                             ({e}); whether it kept the file is in doubt"
                        );
                        Err(classify(e, true))
                    }
                };
                return Attempt::Done(Box::new(answered));
            }
            Err(Failure::Store(e)) => {
                session.shutdown().await;
                return Attempt::Done(Box::new(Err(ForwardError::Store(e))));
            }
            Err(Failure::Upstream(e)) => e,
        };
        // The upstream stopped taking the request (it stopped reading, or closed). It may have
        // refused it early and said why (a 413, a 401), whether it then keeps the connection
        // open or not: that answer counts, unless it claims success for a file it never fully
        // received.
        let early = tokio::time::timeout(
            EARLY_ANSWER_WAIT,
            read_answer(&mut session, upload, EARLY_ANSWER_WAIT),
        )
        .await;
        session.shutdown().await;
        if let Ok(Ok((answer, _))) = early {
            if (200..300).contains(&answer.status) {
                return Attempt::Done(Box::new(Err(ForwardError::upstream(format!(
                    "the upstream answered {} before it had the whole file",
                    answer.status
                )))));
            }
            return Attempt::Done(Box::new(Ok(answer)));
        }
        if is_timeout(&write_error) {
            // It stopped reading and said nothing: a new connection would fare no better.
            return Attempt::Done(Box::new(Err(classify(write_error, false))));
        }
        Attempt::Retry(write_error)
    }

    /// The authorization hook's request (see [`Forward::ask`]); a dead pooled connection is
    /// replaced once (the question changes nothing, so asking again is safe).
    pub async fn ask_upstream(
        &self,
        upload: &UploadKey,
        path: &str,
        request: &DeliveryRequest,
        body: Bytes,
        timeout: Duration,
    ) -> Result<RecordedAnswer, ForwardError> {
        let mut header = RequestHeader::build("POST", path.as_bytes(), None)
            .map_err(|e| ForwardError::upstream(e.to_string()))?;
        let host = request
            .host
            .clone()
            .unwrap_or_else(|| HeaderValue::from_str(&self.upstream.to_string()).expect("ascii"));
        let fixed = [
            (http::header::HOST, host),
            (
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (
                http::header::CONTENT_LENGTH,
                HeaderValue::from(body.len() as u64),
            ),
        ];
        for (name, value) in request.headers.iter().cloned().chain(fixed) {
            header
                .append_header(name, value)
                .map_err(|e| ForwardError::upstream(e.to_string()))?;
        }
        let mut retried = false;
        loop {
            match self
                .ask_once(upload, header.clone(), body.clone(), timeout)
                .await
            {
                Ok(answer) => return Ok(answer),
                Err((e, true)) if !retried && !is_timeout(&e) => retried = true,
                Err((e, _)) => return Err(classify(e, false)),
            }
        }
    }

    fn request_header(
        &self,
        body: &MultipartBody,
        file_len: u64,
        forward: &ForwardConfig,
        request: &DeliveryRequest,
        idempotency_key: &str,
    ) -> Result<RequestHeader, ForwardError> {
        let mut header = RequestHeader::build("POST", forward.path.as_bytes(), None)
            .map_err(|e| ForwardError::upstream(e.to_string()))?;
        let host = request
            .host
            .clone()
            .unwrap_or_else(|| HeaderValue::from_str(&self.upstream.to_string()).expect("ascii"));
        let content_length = body.head.len() as u64 + file_len + body.tail.len() as u64;
        let content_type = format!("multipart/form-data; boundary={}", body.boundary);
        let fixed = [
            (http::header::HOST, host),
            (
                http::header::CONTENT_TYPE,
                HeaderValue::from_str(&content_type).expect("ascii"),
            ),
            (
                http::header::CONTENT_LENGTH,
                HeaderValue::from(content_length),
            ),
            // A structured-field string, as the IETF httpapi draft has it.
            (
                HeaderName::from_static("idempotency-key"),
                HeaderValue::from_str(&format!("\"{idempotency_key}\"")).expect("hex is ascii"),
            ),
        ];
        for (name, value) in request.headers.iter().cloned().chain(fixed) {
            header
                .append_header(name, value)
                .map_err(|e| ForwardError::upstream(e.to_string()))?;
        }
        Ok(header)
    }
}

/// How long to listen for an early answer after the upstream stopped taking the body.
const EARLY_ANSWER_WAIT: Duration = Duration::from_secs(5);

enum Failure {
    Upstream(Box<pingora::Error>),
    Store(StoreError),
}

/// Writes the request's header and the text parts before the file.
async fn send_start(
    session: &mut HttpSession,
    header: RequestHeader,
    body: &MultipartBody,
) -> Result<(), Failure> {
    session
        .write_request_header(Box::new(header))
        .await
        .map_err(Failure::Upstream)?;
    session
        .write_request_body(body.head.clone(), false)
        .await
        .map_err(Failure::Upstream)
}

/// Writes the file's parts, read from the store. Each part is opened, and its first piece
/// read, while the one before it is written (and each piece of a part while the one before is:
/// see the store's readers), so that parts the page cache no longer holds are read from the
/// disk while the upstream takes the bytes before them. (The store bounds what its readers
/// hold at once over the process: see the fs engine's `open_stored`.)
async fn send_parts(
    session: &mut HttpSession,
    parts: &dyn PartReader,
    file: &[StoredPart],
) -> Result<(), Failure> {
    let Some(first) = file.first() else {
        return Ok(());
    };
    let mut reader = parts.open(first).await.map_err(Failure::Store)?;
    for (at, part) in file.iter().enumerate() {
        let next = OptionFuture::from(file.get(at + 1).map(|next| parts.open(next)));
        let (copied, next) = tokio::join!(copy_part(session, &mut reader, part), next);
        copied?;
        if let Some(next) = next {
            reader = next.map_err(Failure::Store)?;
        }
    }
    Ok(())
}

/// Copies a part's bytes from `reader` to the request, piece by piece as the store hands them
/// over (not copied). A part that holds more or fewer bytes than recorded fails the request
/// before its end is written: the declared Content-Length would be wrong, and such a request
/// must never complete (a piece that would go past the part is not written at all).
async fn copy_part(
    session: &mut HttpSession,
    reader: &mut StoredReader,
    part: &StoredPart,
) -> Result<(), Failure> {
    let wrong = |held: String| {
        Failure::Store(StoreError::Io(std::io::Error::other(format!(
            "stored part {} held {held} bytes where {} were recorded",
            part.number, part.len
        ))))
    };
    let mut copied = 0u64;
    while let Some(piece) = reader
        .next_piece()
        .await
        .map_err(|e| Failure::Store(StoreError::Io(e)))?
    {
        copied += piece.len() as u64;
        if copied > part.len {
            return Err(wrong(format!("more than {}", part.len)));
        }
        if piece.is_empty() {
            break;
        }
        session
            .write_request_body(piece, false)
            .await
            .map_err(Failure::Upstream)?;
    }
    if copied != part.len {
        return Err(wrong(copied.to_string()));
    }
    Ok(())
}

/// Writes the closing boundary and ends the request.
async fn send_end(session: &mut HttpSession, body: &MultipartBody) -> Result<(), Failure> {
    session
        .write_request_body(body.tail.clone(), true)
        .await
        .map_err(Failure::Upstream)?;
    session
        .finish_request_body()
        .await
        .map_err(Failure::Upstream)
}

/// Reads the upstream's response (skipping 1xx) into a record that can be replayed, within
/// `deadline` overall. Once a final status has arrived the upstream has decided: if the body
/// then breaks off or runs late, the status counts with the part of the body that arrived
/// (`false`: the answer is not whole, the connection cannot be reused).
async fn read_answer(
    session: &mut HttpSession,
    upload: &UploadKey,
    deadline: Duration,
) -> pingora::Result<(RecordedAnswer, bool)> {
    let started = tokio::time::Instant::now();
    let Ok(header) = tokio::time::timeout(deadline, read_final_header(session)).await else {
        return pingora::Error::e_explain(
            ErrorType::ReadTimedout,
            "the upstream's answer took too long",
        );
    };
    let header = header?;
    let mut body = BytesMut::new();
    let rest = deadline.saturating_sub(started.elapsed());
    let read = tokio::time::timeout(rest, read_body(session, upload, &mut body)).await;
    let whole = match read {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(
                "{upload:?}: the upstream's {} answer broke off after {} body bytes ({e}); \
                 its status stands",
                header.status,
                body.len()
            );
            false
        }
        Err(_) => {
            tracing::warn!(
                "{upload:?}: the upstream's {} answer body took too long; its status stands",
                header.status
            );
            false
        }
    };
    let answer = RecordedAnswer {
        status: header.status.as_u16(),
        fields: String::new(),
        file: None,
        refused_for: None,
        headers: header
            .headers
            .iter()
            .filter(|(name, _)| !HOP_BY_HOP.contains(&name.as_str()))
            .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_string())))
            .collect(),
        body: body.freeze(),
    };
    Ok((answer, whole))
}

async fn read_final_header(session: &mut HttpSession) -> pingora::Result<ResponseHeader> {
    loop {
        session.read_response_header().await?;
        let header = session
            .response_header()
            .expect("a response header was read");
        if !header.status.is_informational() {
            return Ok(header.clone());
        }
    }
}

/// Appends the response body to `body`, up to [`MAX_ANSWER_BODY`]; what arrived stays in
/// `body` if this fails or is cancelled.
async fn read_body(
    session: &mut HttpSession,
    upload: &UploadKey,
    body: &mut BytesMut,
) -> pingora::Result<()> {
    while let Some(piece) = session.read_response_body().await? {
        let room = MAX_ANSWER_BODY - body.len();
        if piece.len() > room {
            body.extend_from_slice(&piece[..room]);
            tracing::warn!(
                "{upload:?}: the upstream's answer exceeds {MAX_ANSWER_BODY} bytes; the rest is cut"
            );
            return Ok(());
        }
        body.extend_from_slice(&piece);
    }
    Ok(())
}

fn is_timeout(e: &pingora::Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
    )
}

fn classify(e: Box<pingora::Error>, in_doubt: bool) -> ForwardError {
    let message = e.to_string();
    if is_timeout(&e) {
        ForwardError::Timeout { message, in_doubt }
    } else {
        ForwardError::Upstream { message, in_doubt }
    }
}

/// The bytes around the file: text parts and the file part's header, then the closing boundary.
#[derive(Debug)]
struct MultipartBody {
    boundary: String,
    head: Bytes,
    tail: Bytes,
}

impl MultipartBody {
    fn new(meta: &UploadMeta, forward: &ForwardConfig, request: &DeliveryRequest) -> MultipartBody {
        let boundary = format!(
            "----StitchBoundary{}",
            hex::encode(rand::random::<[u8; 16]>())
        );
        let mut head = String::new();
        for (name, value) in &request.fields {
            head.push_str(&format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{}\"\r\n\r\n{value}\r\n",
                escape_quoted(name)
            ));
        }
        let file_type = meta
            .media_type
            .as_deref()
            .filter(|t| !t.is_empty())
            .unwrap_or("application/octet-stream");
        head.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{}\"; filename=\"{}\"\r\n\
             Content-Type: {}\r\n\r\n",
            escape_quoted(&forward.field),
            escape_quoted(&meta.name),
            file_type.replace(['\r', '\n'], "")
        ));
        let tail = format!("\r\n--{boundary}--\r\n");
        MultipartBody {
            boundary,
            head: Bytes::from(head),
            tail: Bytes::from(tail),
        }
    }
}

/// Escapes a name for a quoted multipart parameter the way browsers do (HTML's
/// multipart/form-data encoding): `"` CR LF become `%22` `%0D` `%0A`.
fn escape_quoted(text: &str) -> String {
    text.replace('"', "%22")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

#[cfg(test)]
mod tests {
    use super::escape_quoted;

    #[test]
    fn quotes_and_line_breaks_are_percent_encoded_like_browsers_do() {
        assert_eq!(escape_quoted("a\"b\r\nc.txt"), "a%22b%0D%0Ac.txt");
    }
}
