//! The chunk protocol of Resumable.js and Flow.js, on top of the upload core.
//!
//! A request on a chunk route is a *test* (GET/HEAD, or any request whose body carries no chunk)
//! or an *upload* (POST/PUT/PATCH with the chunk as a multipart file part or as the raw body).
//! Each becomes core calls ([`UploadCore::status`], [`UploadCore::put_part`],
//! [`UploadCore::deliver`]); what they come to becomes a status in one place, `reply`.
//!
//! This protocol's own notions stay here: the parameters and their names (`params`,
//! `options`), and the chunk size, which is pinned with the upload in the metadata's
//! protocol-owned part.

mod options;
mod params;
mod reply;

pub use options::{ChunkOptions, Flavor, ParamNames, RawParamNames};

use super::{authorization_question, delivery_request, origin, scope_value};
use crate::config::Route;
use crate::forward::DeliveryRequest;
use crate::http::{
    accept_expect_continue, answer as answer_reply, body_stream, client_ip, content_length,
    header_str, Progress, RequestBody,
};
use crate::store::{BodyError, BodySource, UploadKey, UploadMeta};
use crate::upload::{Authorization, CoreError, FieldsDigest, PartStatus, ReplyHold, UploadCore};
use async_trait::async_trait;
use bytes::Bytes;
use http::Method;
use params::{ChunkParams, Fields, ParamError};
use pingora::proxy::Session;
use reply::{Answer, Refusal, MAX_TEXT_FIELD};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

/// Room for multipart framing and text fields on top of a route's largest chunk; also the most
/// text (names and values) a multipart request may carry.
const MULTIPART_SLACK: u64 = 1 << 20;
/// What each multipart field counts against the text budget besides its name and value, so that
/// a flood of empty fields is bounded too.
const FIELD_OVERHEAD: usize = 128;
/// How much of a multipart body may pass while no field or piece of one comes out of it (a
/// part's headers are a few hundred bytes).
const MULTIPART_HEADERS_BUDGET: u64 = 256 << 10;

/// Handles a request on a chunk route. `Ok(false)`: not chunk traffic, pass it through.
pub async fn handle(
    session: &mut Session,
    route: &Route,
    options: &ChunkOptions,
    core: &Arc<UploadCore>,
) -> pingora::Result<bool> {
    let header = session.req_header();
    let fields = Fields::from_query(header.uri.query());
    let content_type = header_str(header, http::header::CONTENT_TYPE);
    let boundary = content_type.and_then(|ct| multer::parse_boundary(ct).ok());
    // A multipart body Stitch cannot read (no boundary, or not form data) is refused, never
    // taken for the chunk's bytes nor passed through.
    let multipart = content_type.is_some_and(|ct| {
        ct.trim_start()
            .get(..10)
            .is_some_and(|t| t.eq_ignore_ascii_case("multipart/"))
    });
    let is_test_method = header.method == Method::GET || header.method == Method::HEAD;
    let in_query = fields.get(&options.names.chunk_number).is_some();
    // Resumable.js always puts its parameters in the URL; Flow.js puts them only in a multipart
    // body, so on a Flow route every multipart upload is chunk traffic.
    let flow_multipart = options.flavor == Flavor::Flow && multipart && !is_test_method;
    if !in_query && !flow_multipart {
        return Ok(false);
    }
    let exchange = Exchange {
        route,
        options,
        core,
        delivery: delivery_request(header, client_ip(session), route),
        scope: scope_value(header, route.scope.as_ref()),
        continued: AtomicBool::new(false),
        hold: Mutex::new(None),
        arrived: Instant::now(),
    };
    let too_large =
        content_length(header).is_some_and(|n| n > route.limits.max_chunk_size.0 + MULTIPART_SLACK);
    let answer = if is_test_method {
        exchange.test(&fields, None).await
    } else if too_large {
        Answer::Refused(Refusal::BodyTooLarge)
    } else if let Some(boundary) = boundary {
        // Resumable.js repeats its parameters in the URL: check them before asking for the body.
        match in_query.then(|| exchange.identify(&fields, None)) {
            Some(Err(e)) => Answer::Refused(Refusal::Params(e)),
            _ => {
                exchange.proceed(session).await?;
                exchange.multipart(session, fields, boundary).await
            }
        }
    } else if multipart {
        Answer::Refused(Refusal::Multipart(
            "Content-Type names no boundary, or is not multipart/form-data".into(),
        ))
    } else {
        exchange.octet(session, &fields).await
    };
    let reply = reply::reply(answer).with_header("cache-control", "no-store");
    let reply = super::cors::decorate(route, session.req_header(), reply);
    let continued = exchange.continued.load(Ordering::Relaxed);
    let sent = answer_reply(session, reply, continued).await;
    drop(exchange);
    sent.map(|_| true)
}

/// Everything about one request that the protocol steps share.
struct Exchange<'a> {
    route: &'a Route,
    options: &'a ChunkOptions,
    core: &'a Arc<UploadCore>,
    delivery: DeliveryRequest,
    scope: Vec<u8>,
    /// Whether a `100 Continue` was sent.
    continued: AtomicBool,
    /// Keeps the upload's completing answer behind this request's reply until it is sent.
    hold: Mutex<Option<ReplyHold>>,
    /// When the request arrived (a delivery that failed meanwhile is this request's answer).
    arrived: Instant,
}

/// One chunk request, understood: which upload, what it declares, what the upstream would get.
struct Chunk {
    key: UploadKey,
    meta: UploadMeta,
    params: ChunkParams,
    app_fields: Vec<(String, String)>,
    digest: FieldsDigest,
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
        let params = ChunkParams::parse(fields, &self.options.names, &self.route.limits)?;
        let key = UploadKey::derive(&[
            b"stitch upload v1",
            self.route.id.as_bytes(),
            &self.scope,
            params.identifier.as_bytes(),
        ]);
        let meta = UploadMeta {
            length: Some(params.total_size),
            name: params.file_name.clone(),
            media_type: params.file_type(self.options.flavor, body_type),
            protocol: serde_json::json!({ "chunk_size": params.chunk_size }),
            origin: Some(Box::new(origin(self.route, &self.scope))),
            carried: Vec::new(),
        };
        tracing::Span::current()
            .record("upload", tracing::field::display(key.short()))
            .record("part", params.part.number);
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
    async fn test(&self, fields: &Fields, body_type: Option<&str>) -> Answer {
        let chunk = match self.identify(fields, body_type) {
            Ok(chunk) => chunk,
            Err(e) => return Answer::Refused(Refusal::Params(e)),
        };
        let status = self
            .core
            .status(&chunk.key, &chunk.meta, chunk.params.part, &chunk.digest)
            .await;
        match status {
            Ok(PartStatus::Missing) => Answer::NotStored,
            Ok(status) => self.conclude(chunk, status).await,
            Err(e) => Answer::Refused(Refusal::Core(e, Box::new(chunk.meta))),
        }
    }

    /// Turns the state after a stored (or already present) chunk into the answer.
    async fn conclude(&self, chunk: Chunk, status: PartStatus) -> Answer {
        match status {
            PartStatus::Missing => Answer::NotStored,
            PartStatus::Stored { complete: false } => {
                // Held until this reply is sent; then look again: another request may have
                // completed the upload meanwhile, and its answer must be the last word.
                let hold = self.core.hold_reply(chunk.key);
                *self.hold.lock().expect("hold lock") = Some(hold);
                match self.core.settled(&chunk.key, &chunk.digest).await {
                    Some(answer) => Answer::Upstream(Box::new(answer)),
                    None => Answer::Stored,
                }
            }
            PartStatus::Delivered(answer) => Answer::Upstream(answer),
            PartStatus::Stored { complete: true } => {
                let mut request = self.delivery.clone();
                request.fields = chunk.app_fields;
                let forward = &self.route.forward;
                let delivery = self
                    .core
                    .deliver(chunk.key, forward, request, self.arrived)
                    .await;
                self.core.earlier_replies_sent(&chunk.key).await;
                Answer::Undelivered(delivery.outcome.clone())
            }
        }
    }

    /// A raw-body upload (`method: 'octet'`): parameters in the URL, the chunk is the body.
    async fn octet(&self, session: &mut Session, fields: &Fields) -> Answer {
        let body_type =
            header_str(session.req_header(), http::header::CONTENT_TYPE).map(str::to_string);
        let chunk = match self.identify(fields, body_type.as_deref()) {
            Ok(chunk) => chunk,
            Err(e) => return Answer::Refused(Refusal::Params(e)),
        };
        if chunk.params.part.len > 0 && session.is_body_empty() {
            return self.test(fields, body_type.as_deref()).await;
        }
        // Only now, with the parameters checked, ask a waiting client for the body.
        if let Err(e) = self.proceed(session).await {
            return Answer::Refused(Refusal::Expect(e.to_string()));
        }
        let mut body = RequestBody(session);
        self.store(chunk, &mut body).await
    }

    /// A multipart upload: text fields first, then the chunk as the file part.
    async fn multipart(
        &self,
        session: &mut Session,
        mut fields: Fields,
        boundary: String,
    ) -> Answer {
        let progress = Progress::default();
        let stream = body_stream(
            session.as_downstream_mut(),
            progress.clone(),
            MULTIPART_HEADERS_BUDGET,
        );
        let mut multipart = multer::Multipart::new(stream, boundary);
        let file_field = &self.options.names.file_field;
        let mut file = None;
        let mut text_bytes = 0usize;
        loop {
            let next = multipart.next_field().await;
            progress.made();
            match next {
                Ok(Some(field)) if field.name() == Some(file_field.as_str()) => {
                    file = Some(field);
                    break;
                }
                Ok(Some(field)) => match read_text(field, &progress).await {
                    Ok((name, value)) => {
                        text_bytes += name.len() + value.len() + FIELD_OVERHEAD;
                        if text_bytes as u64 > MULTIPART_SLACK {
                            return Answer::Refused(Refusal::TooManyFields);
                        }
                        fields.push_body(name, value)
                    }
                    Err(refusal) => return Answer::Refused(refusal),
                },
                Ok(None) => break,
                Err(e) => return Answer::Refused(multipart_refusal(&e)),
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
            Err(e) => return Answer::Refused(Refusal::Params(e)),
        };
        let mut body = FieldBody(field, progress);
        let answer = self.store(chunk, &mut body).await;
        drop(body);
        // The rest of the body (the file part's unread bytes, the fields after it) is read and
        // dropped, so that the client sees the answer and the connection serves the next
        // request; not once the body itself failed (one that stalled would be waited for
        // again).
        let body_failed = matches!(
            answer,
            Answer::Refused(
                Refusal::Stalled
                    | Refusal::Multipart(_)
                    | Refusal::Core(
                        CoreError::Short {
                            broke_off: Some(_),
                            ..
                        },
                        _
                    )
            )
        );
        if !body_failed {
            while let Ok(Some(mut rest)) = multipart.next_field().await {
                while let Ok(Some(_)) = rest.chunk().await {}
            }
        }
        answer
    }

    /// Stores the chunk (unless it is stored already) and concludes.
    async fn store(&self, chunk: Chunk, body: &mut dyn BodySource) -> Answer {
        if let Some(hook) = &self.route.authorize {
            let question = authorization_question(self.route, &chunk.meta, &chunk.app_fields);
            match self
                .core
                .authorize(&chunk.key, hook, &self.delivery, &question)
                .await
            {
                Authorization::Allowed => {}
                Authorization::Refused(answer) => {
                    return Answer::Refused(Refusal::Unauthorized(answer))
                }
                Authorization::Unavailable(why) => return Answer::Refused(Refusal::Unasked(why)),
            }
        }
        let stored = self
            .core
            .put_part(
                &chunk.key,
                &chunk.meta,
                chunk.params.part,
                body,
                &chunk.digest,
            )
            .await;
        let forward = &self.route.forward;
        // Early delivery, from the first part stored on. With protocol fields (which differ
        // from chunk to chunk) the completing request's delivery would not be the same request.
        if matches!(stored, Ok(PartStatus::Stored { complete: false }))
            && forward.early.is_some()
            && !forward.protocol_fields
        {
            let mut request = self.delivery.clone();
            request.fields = chunk.app_fields.clone();
            self.core.begin_early(chunk.key, forward, request).await;
        }
        match stored {
            Ok(status) => self.conclude(chunk, status).await,
            Err(e) => Answer::Refused(Refusal::Core(e, Box::new(chunk.meta))),
        }
    }

    /// The application's own fields: everything that is not a protocol parameter, filtered by
    /// the route's policy (protocol parameters too when the route asks for them).
    /// Resumable.js puts its `parameterNamespace` in front of them; the application gets them
    /// by the names it gave them.
    fn app_fields(&self, fields: &Fields) -> Vec<(String, String)> {
        let forward = &self.route.forward;
        let names = &self.options.names;
        fields
            .merged()
            .into_iter()
            .filter_map(|(name, value)| {
                if names.is_protocol_param(&name) {
                    return forward.protocol_fields.then_some((name, value));
                }
                let own = name
                    .strip_prefix(names.namespace.as_str())
                    .unwrap_or(&name)
                    .to_string();
                forward.fields.allows(&own).then_some((own, value))
            })
            .collect()
    }
}

/// The file part as a body source.
struct FieldBody<'r>(multer::Field<'r>, Progress);

#[async_trait]
impl BodySource for FieldBody<'_> {
    async fn next_piece(&mut self) -> Result<Option<Bytes>, BodyError> {
        let piece = self.0.chunk().await.map_err(|e| multipart_body_error(&e));
        self.1.made();
        piece
    }
}

/// multer wraps the body reader's errors: a stalled body is still a stalled body.
fn multipart_body_error(e: &multer::Error) -> BodyError {
    let source = match e {
        multer::Error::StreamReadFailed(source) => source
            .downcast_ref::<Box<pingora::Error>>()
            .map(|e| &**e)
            .or_else(|| source.downcast_ref::<pingora::Error>()),
        _ => None,
    };
    match source {
        Some(e) => BodyError::from_pingora(e),
        None => BodyError::Broken(e.to_string()),
    }
}

/// A multipart body that could not be parsed: stalled, or malformed (or broken off).
fn multipart_refusal(e: &multer::Error) -> Refusal {
    match multipart_body_error(e) {
        BodyError::Stalled => Refusal::Stalled,
        // (Chunks are never interrupted: they are stored before the upload's lease is taken.)
        BodyError::Broken(_) | BodyError::Interrupted | BodyError::ShuttingDown => {
            Refusal::Multipart(e.to_string())
        }
    }
}

async fn read_text(
    mut field: multer::Field<'_>,
    progress: &Progress,
) -> Result<(String, String), Refusal> {
    let name = field.name().unwrap_or_default().to_string();
    let mut value = Vec::new();
    loop {
        let piece = field.chunk().await;
        progress.made();
        match piece {
            Ok(Some(piece)) if value.len() + piece.len() <= MAX_TEXT_FIELD => {
                value.extend_from_slice(&piece)
            }
            Ok(Some(_)) => return Err(Refusal::FieldTooLong(name)),
            Ok(None) => break,
            Err(e) => return Err(multipart_refusal(&e)),
        }
    }
    let value = String::from_utf8(value).map_err(|_| Refusal::FieldNotText(name.clone()))?;
    Ok((name, value))
}
