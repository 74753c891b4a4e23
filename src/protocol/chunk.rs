//! The chunk protocol of Resumable.js and Flow.js, on top of the upload core.
//!
//! A request on an upload route is a *test* (GET/HEAD, or any request whose body carries no chunk)
//! or an *upload* (POST/PUT/PATCH with the chunk as a multipart file part or as the raw body).
//! Status codes are chosen so that Resumable.js and Flow.js read them the same way (README,
//! "Status codes"):
//!
//! | situation | status |
//! |---|---|
//! | test: chunk stored and verified / not stored | 200 / 204, `Cache-Control: no-store` |
//! | upload stored | 200 |
//! | upload completes the file | the upstream's answer, recorded and replayed later (see `relay`) |
//! | invalid parameters, limits, disagreement with the first chunk | 415 (final for both clients) |
//! | body ended early or malformed multipart | 400 |
//! | body sent nothing for `connections.body_timeout` | 408 |
//! | storage failure | 503 |
//! | upstream unreachable / too slow at completion | 502 / 504 (parts kept) |

use super::params::{ChunkParams, Fields, ParamError};
use crate::config::{Protocol, Route, Scope};
use crate::forward::DeliveryRequest;
use crate::proxy::io::{
    accept_expect_continue, body_stream, expects_continue, forwarded_for, Reply, RequestBody,
};
use crate::store::{BodyError, BodySource, StageError, UploadKey, UploadMeta};
use crate::upload::{CoreError, FieldsDigest, PartStatus, ReplyHold, UploadCore};
use async_trait::async_trait;
use bytes::Bytes;
use http::Method;
use pingora::proxy::Session;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Room for multipart framing and text fields on top of a route's largest chunk; also the most
/// text (names and values) a multipart request may carry.
const MULTIPART_SLACK: u64 = 1 << 20;
/// What each multipart field counts against the text budget besides its name and value, so that
/// a flood of empty fields is bounded too.
const FIELD_OVERHEAD: usize = 128;
/// Largest single multipart text field.
const MAX_TEXT_FIELD: usize = 64 << 10;

/// Handles a request on an upload route. `Ok(false)`: not chunk traffic, pass it through.
pub async fn handle(
    session: &mut Session,
    route: &Route,
    core: &Arc<UploadCore>,
) -> pingora::Result<bool> {
    let header = session.req_header();
    let fields = Fields::from_query(header.uri.query());
    let boundary = header
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| multer::parse_boundary(ct).ok());
    let is_test_method = header.method == Method::GET || header.method == Method::HEAD;
    let in_query = fields.get(&route.params.chunk_number).is_some();
    // Resumable.js always puts its parameters in the URL; Flow.js puts them only in a multipart
    // body, so on a Flow route every multipart upload is chunk traffic.
    let flow_multipart = route.protocol == Protocol::Flow && boundary.is_some() && !is_test_method;
    if !in_query && !flow_multipart {
        return Ok(false);
    }
    let exchange = Exchange {
        route,
        core,
        delivery: delivery_request(session, route),
        scope: scope_value(session, route.scope.as_ref()),
        continued: AtomicBool::new(false),
        hold: Mutex::new(None),
    };
    let declared_length = content_length(session);
    let reply = if is_test_method {
        exchange.test(&fields, None).await
    } else if declared_length.is_some_and(|n| n > route.limits.max_chunk_size.0 + MULTIPART_SLACK) {
        let reply = Reply::refuse(415, "the request body is larger than this route accepts");
        return reply.send(session).await.map(|_| true);
    } else if let Some(boundary) = boundary {
        // Resumable.js repeats its parameters in the URL: check them before asking for the body.
        match in_query.then(|| exchange.identify(&fields, None)) {
            Some(Err(e)) => Reply::refuse(415, e.0),
            _ => {
                exchange.proceed(session).await?;
                exchange.multipart(session, fields, boundary).await
            }
        }
    } else {
        exchange.octet(session, &fields).await
    };
    // Read what is left of the body so the connection stays usable, unless the client is
    // still waiting for a `100 Continue` it will now never get (it sends no body then).
    let body_coming = !expects_continue(session) || exchange.continued.load(Ordering::Relaxed);
    if body_coming && !session.is_body_done() {
        // Bounded by the body timeout, set on the session (`proxy::connections`).
        let _ = session.drain_request_body().await;
    }
    let sent = reply
        .with_header("cache-control", "no-store")
        .send(session)
        .await;
    drop(exchange);
    sent.map(|_| true)
}

/// Everything about one request that the protocol steps share.
struct Exchange<'a> {
    route: &'a Route,
    core: &'a Arc<UploadCore>,
    delivery: DeliveryRequest,
    scope: Vec<u8>,
    /// Whether a `100 Continue` was sent.
    continued: AtomicBool,
    /// Keeps the upload's completing answer behind this request's reply until it is sent.
    hold: Mutex<Option<ReplyHold>>,
}

impl Exchange<'_> {
    /// Lets a client that sent `Expect: 100-continue` send its body.
    async fn proceed(&self, session: &mut Session) -> pingora::Result<()> {
        accept_expect_continue(session).await?;
        self.continued.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Parses and checks the parameters, and derives the upload's key.
    fn identify(&self, fields: &Fields, body_type: Option<&str>) -> Result<Chunk, ParamError> {
        let params = ChunkParams::parse(fields, &self.route.params, &self.route.limits)?;
        let key = UploadKey::derive(&[
            b"stitch upload v1",
            self.route.id.as_bytes(),
            &self.scope,
            params.identifier.as_bytes(),
        ]);
        let meta = UploadMeta {
            chunk_size: params.chunk_size,
            total_size: params.total_size,
            file_name: params.file_name.clone(),
            file_type: params.file_type(self.route.protocol, body_type),
        };
        let app_fields = self.app_fields(fields);
        Ok(Chunk {
            key,
            meta,
            params,
            digest: FieldsDigest::of(&app_fields),
            app_fields,
        })
    }

    /// A test: is this chunk stored? If the upload is complete, this request delivers it.
    async fn test(&self, fields: &Fields, body_type: Option<&str>) -> Reply {
        let chunk = match self.identify(fields, body_type) {
            Ok(chunk) => chunk,
            Err(e) => return Reply::refuse(415, e.0),
        };
        let status = self
            .core
            .status(&chunk.key, &chunk.meta, chunk.params.part, &chunk.digest)
            .await;
        match status {
            Ok(PartStatus::Missing) => Reply::empty(204),
            Ok(status) => self.conclude(chunk, status).await,
            Err(e) => core_error(e),
        }
    }

    /// Turns the state after a stored (or already present) chunk into the reply.
    async fn conclude(&self, chunk: Chunk, status: PartStatus) -> Reply {
        match status {
            PartStatus::Missing => Reply::text(503, "the chunk was not stored; retry"),
            PartStatus::Stored { complete: false } => {
                // Held until this reply is sent; then look again: another request may have
                // completed the upload meanwhile, and its answer must be the last word.
                let hold = self.core.hold_reply(chunk.key);
                *self.hold.lock().expect("hold lock") = Some(hold);
                match self.core.settled(&chunk.key, &chunk.digest).await {
                    Some(answer) => relay(answer),
                    None => Reply::text(200, "chunk stored"),
                }
            }
            PartStatus::Delivered(answer) => relay(answer),
            PartStatus::Stored { complete: true } => {
                let mut request = self.delivery.clone();
                request.fields = chunk.app_fields;
                let forward = &self.route.forward;
                let delivery = self.core.deliver(chunk.key, forward, request).await;
                self.core.earlier_replies_sent(&chunk.key).await;
                relay(delivery.answer.clone())
            }
        }
    }

    /// A raw-body upload (`method: 'octet'`): parameters in the URL, the chunk is the body.
    async fn octet(&self, session: &mut Session, fields: &Fields) -> Reply {
        let body_type = header_str(session, http::header::CONTENT_TYPE).map(str::to_string);
        let chunk = match self.identify(fields, body_type.as_deref()) {
            Ok(chunk) => chunk,
            Err(e) => return Reply::refuse(415, e.0),
        };
        if chunk.params.part.len > 0 && session.is_body_empty() {
            return self.test(fields, body_type.as_deref()).await;
        }
        // Only now, with the parameters checked, ask a waiting client for the body.
        if let Err(e) = self.proceed(session).await {
            return Reply::refuse(400, format!("could not answer Expect: {e}"));
        }
        let declared = content_length(session);
        let mut body = RequestBody(session);
        match self.store(&chunk, &mut body, declared).await {
            Ok(status) => self.conclude(chunk, status).await,
            Err(reply) => reply,
        }
    }

    /// A multipart upload: text fields first, then the chunk as the file part.
    async fn multipart(
        &self,
        session: &mut Session,
        mut fields: Fields,
        boundary: String,
    ) -> Reply {
        let stream = body_stream(session.as_downstream_mut());
        let mut multipart = multer::Multipart::new(stream, boundary);
        let file_field = &self.route.params.file_field;
        let mut file = None;
        let mut text_bytes = 0usize;
        loop {
            match multipart.next_field().await {
                Ok(Some(field)) if field.name() == Some(file_field.as_str()) => {
                    file = Some(field);
                    break;
                }
                Ok(Some(field)) => match read_text(field).await {
                    Ok((name, value)) => {
                        text_bytes += name.len() + value.len() + FIELD_OVERHEAD;
                        if text_bytes as u64 > MULTIPART_SLACK {
                            return Reply::refuse(415, "too many or too long multipart fields");
                        }
                        fields.push_body(name, value)
                    }
                    Err(reply) => return reply,
                },
                Ok(None) => break,
                Err(e) => return Reply::refuse(400, format!("malformed multipart body: {e}")),
            }
        }
        let body_type = file
            .as_ref()
            .and_then(|f| f.content_type())
            .map(|m| m.essence_str().to_string());
        let Some(field) = file else {
            // Chunk parameters without a chunk: Flow's test when `testMethod` is not GET.
            return self.test(&fields, body_type.as_deref()).await;
        };
        let chunk = match self.identify(&fields, body_type.as_deref()) {
            Ok(chunk) => chunk,
            Err(e) => return Reply::refuse(415, e.0),
        };
        let mut body = FieldBody(field);
        let stored = self.store(&chunk, &mut body, None).await;
        drop(body);
        while let Ok(Some(mut rest)) = multipart.next_field().await {
            while let Ok(Some(_)) = rest.chunk().await {}
        }
        match stored {
            Ok(status) => self.conclude(chunk, status).await,
            Err(reply) => reply,
        }
    }

    /// Stores the chunk unless it is stored already; `Err` is the reply for a refused chunk.
    /// `framed_len` is the body length the request's framing announced, if any.
    async fn store(
        &self,
        chunk: &Chunk,
        body: &mut dyn BodySource,
        framed_len: Option<u64>,
    ) -> Result<PartStatus, Reply> {
        let Chunk {
            key, meta, params, ..
        } = chunk;
        match self
            .core
            .status(key, meta, params.part, &chunk.digest)
            .await
        {
            Ok(PartStatus::Missing) => {}
            Ok(known) => {
                while let Ok(Some(_)) = body.next_piece().await {}
                return Ok(known);
            }
            Err(e) => return Err(core_error(e)),
        }
        let staged = match self.core.stage(body, params.part.len).await {
            Ok(staged) => staged,
            Err(StageError::Body(BodyError::Stalled)) => {
                return Err(Reply::refuse(
                    408,
                    "the request body stalled; send the chunk again",
                ))
            }
            Err(StageError::Body(e)) => return Err(Reply::refuse(400, e.to_string())),
            Err(StageError::TooLong(n)) => {
                return Err(Reply::text(
                    415,
                    format!("the chunk carries more than the {n} bytes it declares"),
                ))
            }
            Err(StageError::Store(e)) => {
                log::error!("staging a chunk failed: {e}");
                return Err(Reply::text(503, "storage is unavailable; retry later"));
            }
        };
        if staged.len != params.part.len {
            let received = staged.len;
            let truncated = framed_len.is_some_and(|n| received < n);
            self.core.discard(staged).await;
            if truncated {
                return Err(Reply::refuse(400, "the request body ended early"));
            }
            let message = format!(
                "the chunk declares {} bytes but carries {}",
                params.part.len, received
            );
            return Err(Reply::refuse(415, message));
        }
        self.core
            .commit(key, meta, params.part, staged, &chunk.digest)
            .await
            .map_err(core_error)
    }

    /// The application's own fields: everything that is not a protocol parameter, filtered by
    /// the route's policy (protocol parameters too when the route asks for them).
    /// Resumable.js puts its `parameterNamespace` in front of them; the application gets them
    /// by the names it gave them.
    fn app_fields(&self, fields: &Fields) -> Vec<(String, String)> {
        let forward = &self.route.forward;
        let params = &self.route.params;
        fields
            .merged()
            .into_iter()
            .filter_map(|(name, value)| {
                if params.is_protocol_param(&name) {
                    return forward.protocol_fields.then_some((name, value));
                }
                let own = name
                    .strip_prefix(params.namespace.as_str())
                    .unwrap_or(&name)
                    .to_string();
                forward.fields.allows(&own).then_some((own, value))
            })
            .collect()
    }
}

/// One chunk request, understood: which upload, what it declares, what the upstream would get.
struct Chunk {
    key: UploadKey,
    meta: UploadMeta,
    params: ChunkParams,
    app_fields: Vec<(String, String)>,
    digest: FieldsDigest,
}

/// The file part as a body source.
struct FieldBody<'r>(multer::Field<'r>);

#[async_trait]
impl BodySource for FieldBody<'_> {
    async fn next_piece(&mut self) -> Result<Option<Bytes>, BodyError> {
        self.0.chunk().await.map_err(|e| multipart_body_error(&e))
    }
}

/// multer wraps the body reader's errors: a stalled body is still a stalled body.
fn multipart_body_error(e: &multer::Error) -> BodyError {
    let source = match e {
        multer::Error::StreamReadFailed(source) => source.downcast_ref::<pingora::Error>(),
        _ => None,
    };
    match source {
        Some(e) => BodyError::from_pingora(e),
        None => BodyError::Broken(e.to_string()),
    }
}

async fn read_text(mut field: multer::Field<'_>) -> Result<(String, String), Reply> {
    let name = field.name().unwrap_or_default().to_string();
    let mut value = Vec::new();
    loop {
        match field.chunk().await {
            Ok(Some(piece)) if value.len() + piece.len() <= MAX_TEXT_FIELD => {
                value.extend_from_slice(&piece)
            }
            Ok(Some(_)) => {
                return Err(Reply::text(
                    415,
                    format!("field {name:?} is longer than {MAX_TEXT_FIELD} bytes"),
                ))
            }
            Ok(None) => break,
            Err(e) => return Err(Reply::refuse(400, format!("malformed multipart body: {e}"))),
        }
    }
    let value = String::from_utf8(value)
        .map_err(|_| Reply::refuse(415, format!("field {name:?} is not UTF-8 text")))?;
    Ok((name, value))
}

/// The upstream's answer as the client should see it: its headers and body, with a status the
/// clients read as intended. Resumable.js retries a 202 or 204 as if it failed and Flow.js fails
/// a 204, so a success is 200 (or 201); both give up for good on 500 and 501, so an upstream
/// failure that a retry can mend is 502.
fn relay(answer: crate::store::RecordedAnswer) -> Reply {
    let status = match answer.status {
        200 | 201 => answer.status,
        202..=299 => 200,
        500 | 501 => 502,
        other => other,
    };
    Reply {
        status,
        headers: answer.headers,
        body: answer.body,
    }
}

fn core_error(e: CoreError) -> Reply {
    match e {
        CoreError::Conflict(message) => Reply::refuse(415, message),
        CoreError::Store(e) => {
            log::error!("storage failed: {e}");
            Reply::text(503, "storage is unavailable; retry later")
        }
    }
}

fn header_str(session: &Session, name: http::HeaderName) -> Option<&str> {
    session.req_header().headers.get(name)?.to_str().ok()
}

fn content_length(session: &Session) -> Option<u64> {
    header_str(session, http::header::CONTENT_LENGTH)?
        .trim()
        .parse()
        .ok()
}

/// The headers of the completing request that go to the upstream with the file.
fn delivery_request(session: &Session, route: &Route) -> DeliveryRequest {
    let header = session.req_header();
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
    if let Some(value) = forwarded_for(session) {
        headers.push((http::HeaderName::from_static("x-forwarded-for"), value));
    }
    let host = header.headers.get(http::header::HOST).cloned().or_else(|| {
        let authority = header.uri.authority()?;
        http::HeaderValue::from_str(authority.as_str()).ok()
    });
    DeliveryRequest {
        fields: Vec::new(),
        headers,
        host,
    }
}

/// The value that keeps one user's uploads apart from another's (empty: anonymous).
fn scope_value(session: &Session, scope: Option<&Scope>) -> Vec<u8> {
    let headers = &session.req_header().headers;
    match scope {
        None => Vec::new(),
        Some(Scope::Header(name)) => headers
            .get(name.as_str())
            .map(|v| v.as_bytes().to_vec())
            .unwrap_or_default(),
        Some(Scope::Cookie(name)) => headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_bytes().to_vec())
            .unwrap_or_default(),
    }
}
