//! tus 1.0.0 on top of the upload core: creation (with upload, with the length deferred),
//! HEAD, PATCH with checksums, termination and expiration; the finished file is delivered to
//! the upstream like any other upload.
//!
//! The collection is the route's path (`POST /files`); each upload lives at
//! `<route path>/<id>`, where the id is 128 random bits. The id only ever enters a hash: the
//! upload's key is derived from the route, the client's scope and the id, so a URL is useless
//! in another scope. A `GET` on an upload's URL returns the upstream's answer once recorded.
//!
//! This protocol's own notions stay here: the raw `Upload-Metadata` (returned by HEAD), the
//! metadata pairs sent to the application as fields, and the creating request's credentials,
//! all pinned with the upload in the metadata's protocol-owned part.

mod checksum;
mod metadata;
mod options;
mod reply;

pub use options::{RawTusOptions, TusOptions};

use super::{authorization_question, delivery_request, origin, scope_value};
use crate::config::{PathMatch, Route, Scope};
use crate::forward::DeliveryRequest;
use crate::http::{
    accept_expect_continue, client_ip, content_length, header_str, public_origin, RequestBody,
};
use crate::proxy::trailers;
use crate::store::BodySource;
use crate::store::{BodyError, UploadKey, UploadMeta};
use crate::upload::{Authorization, CoreError, Outcome, UploadCore};
use checksum::{ChecksumError, Expected, TrailerSlot, Wanted};
use http::{HeaderName, HeaderValue, Method};
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use reply::{Answer, Delivered, Refusal};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::time::Instant;

/// The body type of a PATCH (and of a creation carrying bytes).
const OFFSET_OCTET_STREAM: &str = "application/offset+octet-stream";

/// A PATCH body of known length without a checksum to check first is kept in parts of this
/// size, each made durable while the next arrives: a crash loses at most the two pieces under
/// way, not the whole body (tus clients send a whole file in one PATCH by default). With early
/// delivery, each is sent on to the upstream while the next arrives.
const PIECE: u64 = 32 << 20;

/// What a tus upload keeps besides the core's metadata.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct TusState {
    /// `Upload-Metadata` as the client sent it (HEAD returns it).
    metadata: String,
    /// The metadata pairs the application gets as text fields.
    fields: Vec<(String, String)>,
    /// The creating request's headers that go to the upstream with the file.
    headers: Vec<(String, Vec<u8>)>,
    host: Option<Vec<u8>>,
    /// `Upload-Concat` as HEAD returns it: `partial`, or `final;<urls>`.
    #[serde(default)]
    concat: Option<String>,
}

impl TusState {
    fn is_partial(&self) -> bool {
        self.concat.as_deref() == Some("partial")
    }

    fn is_final(&self) -> bool {
        self.concat
            .as_deref()
            .is_some_and(|c| c.starts_with("final"))
    }
}

/// A creation's `Upload-Concat`.
enum Concat {
    Partial,
    /// The partial uploads' ids, in order.
    Final(Vec<String>),
}

impl Concat {
    fn of(header: &RequestHeader) -> Result<Option<Concat>, Refusal> {
        let Some(value) = header.headers.get("upload-concat") else {
            return Ok(None);
        };
        let bad = |why: &str| Refusal::BadRequest(format!("Upload-Concat: {why}"));
        let value = value.to_str().map_err(|_| bad("not ASCII"))?.trim();
        if value == "partial" {
            return Ok(Some(Concat::Partial));
        }
        let urls = value
            .strip_prefix("final;")
            .ok_or_else(|| bad("`partial`, or `final;` and the partial uploads' URLs"))?;
        let ids: Vec<String> = urls
            .split_whitespace()
            .map(|url| {
                // An absolute URL or a path; the id is its last segment.
                let path = url.split_once("://").map_or(url, |(_, rest)| {
                    rest.find('/').map_or("", |slash| &rest[slash..])
                });
                path.rsplit('/').next().unwrap_or_default().to_string()
            })
            .collect();
        if ids.is_empty() {
            return Err(bad("a final upload names at least one partial upload"));
        }
        Ok(Some(Concat::Final(ids)))
    }
}

/// Which URL of the route a request is for.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    /// The route's path itself: where uploads are created.
    Collection,
    /// `<route path>/<id>`.
    Upload(String),
    /// Anything deeper.
    Other,
}

/// Handles a request on a tus route. `Ok(false)`: not tus traffic, pass it through.
pub async fn handle(
    session: &mut Session,
    route: &Route,
    options: &TusOptions,
    core: &Arc<UploadCore>,
) -> pingora::Result<bool> {
    let header = session.req_header();
    let target = target(&route.path, header.uri.path());
    let method = effective_method(header);
    // Every tus method on the route is tus (a request without `Tus-Resumable` gets 412). GET
    // and PUT are the application's, except a GET on an upload's URL, which asks for the
    // upstream's answer.
    // A PUT on `<route path>/<token>` is a finalize request if an upload carries that token.
    let ours = match method {
        Method::GET => matches!(target, Target::Upload(_)),
        Method::PUT => options.finalize.is_some() && matches!(target, Target::Upload(_)),
        _ => true,
    };
    if !ours {
        return Ok(false);
    }
    let mut exchange = Exchange {
        route,
        options,
        core,
        scope: scope_value(header, route.scope.as_ref()),
        continued: false,
        arrived: Instant::now(),
    };
    let answer = if method == Method::PUT {
        let Target::Upload(token) = &target else {
            unreachable!("checked above");
        };
        match exchange.finalize(session, token).await {
            Some(answer) => answer,
            None => return Ok(false),
        }
    } else if method == Method::OPTIONS {
        Answer::Capabilities {
            max_size: route.limits.max_file_size.0,
        }
    } else if method != Method::GET && !speaks_our_version(session.req_header()) {
        Answer::Refused(Refusal::Version)
    } else if let Some(name) = repeated_tus_header(session.req_header()) {
        Answer::Refused(Refusal::BadRequest(format!(
            "{name} is sent more than once"
        )))
    } else {
        match (method, target) {
            (Method::POST, Target::Collection) => exchange.create(session).await,
            (Method::GET, Target::Upload(id)) => exchange.answer(&id).await,
            (Method::HEAD, Target::Upload(id)) => exchange.head(session, &id).await,
            (Method::PATCH, Target::Upload(id)) => exchange.patch(session, &id).await,
            (Method::DELETE, Target::Upload(id)) => exchange.terminate(&id).await,
            (_, Target::Other) => Answer::Refused(Refusal::NotFound),
            // (GET on the route's path is the application's: passed through, not listed.)
            (_, Target::Collection) => Answer::Refused(Refusal::Method("OPTIONS, POST")),
            (_, Target::Upload(_)) => {
                Answer::Refused(Refusal::Method("OPTIONS, HEAD, PATCH, DELETE, GET"))
            }
        }
    };
    let reply = reply::reply(answer);
    let reply = super::cors::decorate(route, session.req_header(), reply);
    crate::http::answer(session, reply, exchange.continued)
        .await
        .map(|_| true)
}

/// The request's method, or the one `X-HTTP-Method-Override` names (for clients behind
/// something that only lets GET and POST through).
fn effective_method(header: &RequestHeader) -> Method {
    header
        .headers
        .get("x-http-method-override")
        .and_then(|v| Method::from_bytes(v.as_bytes()).ok())
        .unwrap_or_else(|| header.method.clone())
}

/// The request's `Upload-Checksum`, if any: in its header, or announced as a trailer
/// (`Trailer: Upload-Checksum`, on a chunked body).
fn expected_checksum(header: &RequestHeader) -> Result<Option<Wanted>, Refusal> {
    let in_header = header_str(header, HeaderName::from_static("upload-checksum"));
    if trailers::announced(header, "upload-checksum") {
        if in_header.is_some() {
            return Err(Refusal::BadRequest(
                "Upload-Checksum comes as a header or as a trailer, not both".into(),
            ));
        }
        let chunked = header
            .headers
            .get_all(http::header::TRANSFER_ENCODING)
            .iter()
            .any(|v| {
                v.to_str()
                    .is_ok_and(|v| v.to_ascii_lowercase().contains("chunked"))
            });
        if !chunked {
            return Err(Refusal::BadRequest(
                "an Upload-Checksum trailer needs a body sent with Transfer-Encoding: chunked"
                    .into(),
            ));
        }
        return Ok(Some(Wanted::Trailer(Default::default())));
    }
    let Some(value) = in_header else {
        return Ok(None);
    };
    match Expected::parse(value) {
        Ok(expected) => Ok(Some(Wanted::Header(expected))),
        Err(ChecksumError::Unsupported(algorithm)) => Err(Refusal::UnknownAlgorithm(algorithm)),
        Err(ChecksumError::Malformed) => Err(Refusal::BadRequest(
            "Upload-Checksum is `<algorithm> <base64 digest>`".into(),
        )),
    }
}

/// A body without a `Content-Length` (chunked): its length is known once it has ended.
fn chunked(header: &RequestHeader) -> bool {
    content_length(header).is_none() && header.headers.contains_key(http::header::TRANSFER_ENCODING)
}

/// Reads `body` to its end, refused at its first byte (the upload has room for none).
async fn nothing_more(body: &mut dyn BodySource) -> Result<(), Refusal> {
    loop {
        match body.next_piece().await {
            Ok(None) => return Ok(()),
            Ok(Some(piece)) if piece.is_empty() => {}
            Ok(Some(_)) => return Err(Refusal::Core(CoreError::TooLong { limit: 0 })),
            Err(_) => return Err(Refusal::BadRequest("the body ended before its end".into())),
        }
    }
}

/// A request body whose trailers are read into `slot` when it ends.
struct Trailed<'s> {
    session: &'s mut Session,
    slot: TrailerSlot,
}

#[async_trait::async_trait]
impl crate::store::BodySource for Trailed<'_> {
    async fn next_piece(&mut self) -> Result<Option<bytes::Bytes>, BodyError> {
        let piece = RequestBody(self.session).next_piece().await?;
        if piece.is_none() {
            let fields = trailers::trailers(self.session.as_downstream());
            *self.slot.lock().expect("trailers") = Some(fields);
        }
        Ok(piece)
    }
}

/// A tus header sent twice with different values, which one reader could take for its first
/// value and another for its last (a declared length, an offset): refused rather than
/// guessed. (The same value twice is one value; `Upload-Metadata`, a list, may come in several
/// lines, which are joined.)
fn repeated_tus_header(header: &RequestHeader) -> Option<&'static str> {
    [
        "upload-length",
        "upload-defer-length",
        "upload-offset",
        "upload-checksum",
        "upload-concat",
        "tus-resumable",
    ]
    .into_iter()
    .find(|name| {
        let mut values = header.headers.get_all(*name).iter();
        let first = values.next();
        values.any(|other| Some(other) != first)
    })
}

fn speaks_our_version(header: &RequestHeader) -> bool {
    header
        .headers
        .get("tus-resumable")
        .is_some_and(|v| v.as_bytes() == reply::VERSION.as_bytes())
}

/// Which URL of the route `path` is.
fn target(route_path: &PathMatch, path: &str) -> Target {
    let PathMatch::Prefix(prefix) = route_path else {
        return Target::Other;
    };
    let Some(rest) = path.strip_prefix(prefix.trim_end_matches('/')) else {
        return Target::Other;
    };
    match rest.trim_start_matches('/') {
        "" => Target::Collection,
        id if !id.contains('/') => Target::Upload(id.to_string()),
        _ => Target::Other,
    }
}

/// Everything about one request that the steps share.
struct Exchange<'a> {
    route: &'a Route,
    options: &'a TusOptions,
    core: &'a Arc<UploadCore>,
    scope: Vec<u8>,
    /// Whether a `100 Continue` was sent.
    continued: bool,
    /// When the request arrived (a delivery that failed meanwhile is this request's answer).
    arrived: Instant,
}

impl Exchange<'_> {
    /// The upload an id names in this route and scope. Ids Stitch never hands out (anything
    /// but 32 lower-case hex digits) name nothing.
    fn key(&self, id: &str) -> Option<UploadKey> {
        let ours = id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let key = ours.then(|| {
            UploadKey::derive(&[
                b"stitch tus v1",
                self.route.id.as_bytes(),
                &self.scope,
                id.as_bytes(),
            ])
        })?;
        tracing::Span::current().record("upload", tracing::field::display(key.short()));
        Some(key)
    }

    /// The alias a metadata token gives an upload, in this route and scope.
    fn token_key(&self, token: &str) -> UploadKey {
        UploadKey::derive(&[
            b"stitch tus token v1",
            self.route.id.as_bytes(),
            &self.scope,
            token.as_bytes(),
        ])
    }

    /// The upload's URL: absolute when the request says how it reached us (`Host`, or the
    /// forwarding headers of a trusted proxy), else the path alone.
    fn location(&self, header: &RequestHeader, id: &str) -> String {
        let PathMatch::Prefix(prefix) = &self.route.path else {
            unreachable!("tus routes are prefix routes");
        };
        let origin = public_origin(header, self.options.behind_proxy).unwrap_or_default();
        format!("{origin}{}/{id}", prefix.trim_end_matches('/'))
    }

    /// Where a removed upload's tombstone is kept (so that its URL answers 410, not 404).
    fn gone_key(&self, id: &str) -> UploadKey {
        UploadKey::derive(&[
            b"stitch tus gone v1",
            self.route.id.as_bytes(),
            &self.scope,
            id.as_bytes(),
        ])
    }

    /// The answer for an upload that is not there: gone (terminated or expired), or unknown.
    async fn missing(&self, id: &str) -> Answer {
        match self.core.alias(&self.gone_key(id)).await {
            Ok(Some(how)) => Answer::Refused(Refusal::Gone(how)),
            Ok(None) => Answer::Refused(Refusal::NotFound),
            Err(e) => Answer::Refused(Refusal::Core(e)),
        }
    }

    fn expires(&self) -> String {
        httpdate::fmt_http_date(self.core.expires_if_idle())
    }

    /// Lets a client that sent `Expect: 100-continue` send its body.
    async fn proceed(&mut self, session: &mut Session) -> Result<(), Answer> {
        accept_expect_continue(session).await.map_err(|e| {
            Answer::Refused(Refusal::BadRequest(format!(
                "the body could not start: {e}"
            )))
        })?;
        self.continued = true;
        Ok(())
    }

    /// POST on the collection: a new upload, perhaps with its first bytes.
    async fn create(&mut self, session: &mut Session) -> Answer {
        let header = session.req_header();
        let concat = match Concat::of(header) {
            Ok(concat) => concat,
            Err(refusal) => return Answer::Refused(refusal),
        };
        if let Some(Concat::Final(ids)) = &concat {
            // Its bytes are its partial uploads': a body for it is refused as a PATCH would be.
            if content_length(header) != Some(0) && !session.is_body_empty() {
                return Answer::Refused(Refusal::Final);
            }
            return self.create_final(session, ids).await;
        }
        let max = self.route.limits.max_file_size.0;
        let length = match declared_length(header) {
            Ok(length) => length,
            Err(refusal) => return Answer::Refused(refusal),
        };
        if length.is_some_and(|n| n > max) {
            return Answer::Refused(Refusal::TooLarge(max));
        }
        let (raw_metadata, pairs) = match self.metadata(header) {
            Ok(metadata) => metadata,
            Err(refusal) => return Answer::Refused(refusal),
        };
        let declared_body = content_length(header);
        let too_long = declared_body.is_some_and(|n| n > length.unwrap_or(max));
        let offset_stream = is_offset_stream(header);
        let expected = match expected_checksum(header) {
            Ok(expected) => expected,
            Err(refusal) => return Answer::Refused(refusal),
        };
        let carries_bytes = declared_body != Some(0) && !session.is_body_empty();
        if carries_bytes && !offset_stream {
            return Answer::Refused(Refusal::ContentType);
        }
        if carries_bytes && too_long {
            return Answer::Refused(Refusal::TooLarge(length.unwrap_or(max)));
        }
        let id = hex::encode(rand::random::<[u8; 16]>());
        let Some(key) = self.key(&id) else {
            unreachable!("a fresh id is well-formed");
        };
        let request = delivery_request(session.req_header(), client_ip(session), self.route);
        let mut meta = self.meta(length, &pairs, raw_metadata, &request, &id);
        if concat.is_some() {
            meta.protocol["tus"]["concat"] = "partial".into();
        }
        if let Some(hook) = &self.route.authorize {
            let question = authorization_question(self.route, &meta, &pairs);
            match self.core.authorize(&key, hook, &request, &question).await {
                Authorization::Allowed => {}
                Authorization::Refused(answer) => return Answer::Upstream((*answer).clone()),
                Authorization::Unavailable(why) => return Answer::Refused(Refusal::Unasked(why)),
            }
        }
        if let Err(e) = self.core.create(&key, &meta).await {
            return Answer::Refused(Refusal::Core(e));
        }
        // A partial upload is delivered only as part of a final one: a finalize request
        // means that one.
        if concat.is_none() {
            if let Err(e) = self.save_token(&pairs, &id).await {
                return Answer::Refused(Refusal::Core(e));
            }
        }
        tracing::info!("created upload {id} ({} bytes)", display_length(length));
        let location = self.location(session.req_header(), &id);
        let mut offset = None;
        let mut delivered = Delivered::NotYet;
        if carries_bytes {
            match self.append(session, &key, 0, length, expected).await {
                Ok(Answer::Patched {
                    offset: at,
                    delivered: how,
                    ..
                }) => {
                    offset = Some(at);
                    delivered = how;
                }
                Err(Answer::Refused(refusal)) if refusal.discards_the_bytes() => {
                    // The checksum did not match (or could not be checked): the bytes are
                    // discarded, and so is the upload they would have started (the client
                    // creates it again).
                    if let Err(e) = self.core.discard(&key).await {
                        tracing::warn!("removing the refused upload failed: {e}");
                    }
                    return Answer::Refused(refusal);
                }
                // The upload exists; its bytes did not make it. The client learns the offset
                // by HEAD and goes on from there.
                Ok(_) | Err(_) => offset = Some(0),
            }
            if let Ok(Some(progress)) = self.core.progress(&key).await {
                offset = Some(progress.offset);
            }
        } else if length == Some(0) && concat.is_none() {
            // An empty file is complete as soon as it exists.
            if let Ok(Some(progress)) = self.core.progress(&key).await {
                delivered = self.deliver(session, &key, &progress.meta).await;
            }
        }
        Answer::Created {
            location,
            offset,
            expires: Some(self.expires()),
            delivered,
            concat: concat.map(|_| "partial".to_string()),
        }
    }

    /// A creation's `Upload-Metadata`, as sent and as pairs; with a metadata scope, its key
    /// must be there.
    fn metadata(&self, header: &RequestHeader) -> Result<(String, Vec<(String, String)>), Refusal> {
        // A list: lines of it sent separately are one list (RFC 9110, 5.3); an empty line, or
        // one sent again as it was, adds nothing.
        let mut lines: Vec<&str> = Vec::new();
        for value in header.headers.get_all("upload-metadata") {
            let line = value.to_str().map_err(|_| {
                Refusal::BadRequest(
                    "Upload-Metadata must be ASCII: keys, then values in base64".into(),
                )
            })?;
            if !line.trim().is_empty() && !lines.contains(&line) {
                lines.push(line);
            }
        }
        let raw = lines.join(",");
        let pairs =
            metadata::parse(&raw, self.options.max_metadata).map_err(Refusal::BadRequest)?;
        if let Some(Scope::Metadata(key)) = &self.route.scope {
            if !pairs.iter().any(|(k, v)| k == key && !v.is_empty()) {
                return Err(Refusal::BadRequest(format!(
                    "uploads on this route carry `{key}` in Upload-Metadata"
                )));
            }
        }
        Ok((raw, pairs))
    }

    /// POST with `Upload-Concat: final;<urls>`: an upload made of partial uploads of this
    /// route and scope, from their stored parts. It is complete at once, and delivered.
    async fn create_final(&mut self, session: &mut Session, ids: &[String]) -> Answer {
        let header = session.req_header();
        if header.headers.contains_key("upload-length")
            || header.headers.contains_key("upload-defer-length")
        {
            return Answer::Refused(Refusal::BadRequest(
                "a final upload takes its length from its partial uploads: no Upload-Length".into(),
            ));
        }
        let (raw_metadata, pairs) = match self.metadata(header) {
            Ok(metadata) => metadata,
            Err(refusal) => return Answer::Refused(refusal),
        };
        let mut sources = Vec::new();
        let mut total = 0u64;
        for id in ids {
            let Some(key) = self.key(id) else {
                return Answer::Refused(Refusal::NotFound);
            };
            let progress = match self.core.progress(&key).await {
                Ok(Some(progress)) => progress,
                Ok(None) => return Answer::Refused(Refusal::NotFound),
                Err(e) => return Answer::Refused(Refusal::Core(e)),
            };
            if tus_state(&progress.meta).concat.as_deref() != Some("partial") {
                return Answer::Refused(Refusal::BadRequest(format!(
                    "upload {id} is not a partial upload"
                )));
            }
            if progress.meta.length != Some(progress.offset) {
                return Answer::Refused(Refusal::BadRequest(format!(
                    "partial upload {id} is not complete"
                )));
            }
            total += progress.offset;
            sources.push(key);
        }
        let max = self.route.limits.max_file_size.0;
        if total > max {
            return Answer::Refused(Refusal::TooLarge(max));
        }
        let id = hex::encode(rand::random::<[u8; 16]>());
        let Some(key) = self.key(&id) else {
            unreachable!("a fresh id is well-formed");
        };
        let request = delivery_request(session.req_header(), client_ip(session), self.route);
        let mut meta = self.meta(None, &pairs, raw_metadata, &request, &id);
        if let Some(hook) = &self.route.authorize {
            let described = UploadMeta {
                length: Some(total),
                ..meta.clone()
            };
            let question = authorization_question(self.route, &described, &pairs);
            match self.core.authorize(&key, hook, &request, &question).await {
                Authorization::Allowed => {}
                Authorization::Refused(answer) => return Answer::Upstream((*answer).clone()),
                Authorization::Unavailable(why) => return Answer::Refused(Refusal::Unasked(why)),
            }
        }
        // HEAD returns it "as received in the upload creation request" (the specification's
        // words): relative URLs stay relative.
        let received = header_str(header, HeaderName::from_static("upload-concat"))
            .unwrap_or_default()
            .trim();
        meta.protocol["tus"]["concat"] = received.into();
        let meta = match self.core.concatenate(&key, &meta, &sources).await {
            Ok(length) => UploadMeta {
                length: Some(length),
                ..meta
            },
            Err(e) => return Answer::Refused(Refusal::Core(e)),
        };
        // (tus-js-client's `parallelUploads` sends the metadata, the token with it, only with
        // the final upload.) A final upload the client is not told of must not stay: it would
        // never be delivered.
        if let Err(e) = self.save_token(&pairs, &id).await {
            if let Err(cleanup) = self.core.discard(&key).await {
                tracing::warn!("removing final upload {id}, whose token was not saved: {cleanup}");
            }
            return Answer::Refused(Refusal::Core(e));
        }
        tracing::info!("created upload {id} from {} partial uploads", ids.len());
        let location = self.location(session.req_header(), &id);
        let delivered = self.deliver(session, &key, &meta).await;
        Answer::Created {
            location,
            offset: None,
            expires: None,
            delivered,
            concat: tus_state(&meta).concat,
        }
    }

    /// Makes the metadata's finalize token (if the route has finalize requests and the upload
    /// carries one) name the upload `id`: the newest upload with a token is the one a finalize
    /// request means.
    async fn save_token(&self, pairs: &[(String, String)], id: &str) -> Result<(), CoreError> {
        let token = self.options.finalize.as_ref().and_then(|name| {
            pairs
                .iter()
                .find(|(k, v)| k == name && !v.is_empty())
                .map(|(_, v)| v)
        });
        match token {
            Some(token) => self.core.save_alias(&self.token_key(token), id).await,
            None => Ok(()),
        }
    }

    /// The core's metadata for a new upload: the file's name and type from the tus metadata
    /// (`filename`, else `name`; `filetype`, else `contentType`, else `type`), every other pair
    /// a field for the application.
    fn meta(
        &self,
        length: Option<u64>,
        pairs: &[(String, String)],
        raw_metadata: String,
        request: &DeliveryRequest,
        id: &str,
    ) -> UploadMeta {
        let first_of = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| pairs.iter().find(|(name, v)| name == k && !v.is_empty()))
                .map(|(k, v)| (k.clone(), v.clone()))
        };
        let name = first_of(&["filename", "name"]);
        let media_type = first_of(&["filetype", "contentType", "type"]);
        // The pairs that named the file or its type are not fields, nor are their repeats
        // under the other keys (Uppy sends `name` and `filename` alike).
        let describes_the_file = |(k, v): &(String, String)| {
            let same = |chosen: &Option<(String, String)>, keys: &[&str]| {
                chosen
                    .as_ref()
                    .is_some_and(|(ck, cv)| ck == k || (keys.contains(&k.as_str()) && cv == v))
            };
            same(&name, &["filename", "name"])
                || same(&media_type, &["filetype", "contentType", "type"])
        };
        // A metadata scope is the token's value; the others come from the request's headers.
        let scope = match &self.route.scope {
            Some(Scope::Metadata(key)) => pairs
                .iter()
                .find(|(k, _)| k == key)
                .map_or_else(Vec::new, |(_, v)| v.as_bytes().to_vec()),
            _ => self.scope.clone(),
        };
        let forward = &self.route.forward;
        let fields = pairs
            .iter()
            .filter(|pair| !describes_the_file(pair) && forward.fields.allows(&pair.0))
            .cloned()
            .collect();
        let state = TusState {
            metadata: raw_metadata,
            fields,
            headers: request
                .headers
                .iter()
                .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
                .collect(),
            host: request.host.as_ref().map(|h| h.as_bytes().to_vec()),
            concat: None,
        };
        UploadMeta {
            length,
            name: name.map_or_else(|| id.to_string(), |(_, v)| v),
            media_type: media_type.map(|(_, v)| v),
            protocol: serde_json::json!({ "tus": state, "gone": self.gone_key(id).hex() }),
            origin: Some(Box::new(origin(self.route, &scope))),
            carried: Vec::new(),
        }
    }

    /// HEAD: where the upload stands. A complete upload not delivered yet (its delivery
    /// failed) is delivered now: tus-js-client resumes by HEAD and, finding every byte there,
    /// sends nothing more.
    async fn head(&self, session: &Session, id: &str) -> Answer {
        let Some(key) = self.key(id) else {
            return Answer::Refused(Refusal::NotFound);
        };
        // A client resumes with HEAD: a PATCH of its still open here (its connection went
        // quiet) stops, and its bytes count in the offset given.
        if let Err(e) = self.core.settle(&key).await {
            return Answer::Refused(Refusal::Core(e));
        }
        let progress = match self.core.progress(&key).await {
            Ok(Some(progress)) => progress,
            Ok(None) => return self.missing(id).await,
            Err(e) => return Answer::Refused(Refusal::Core(e)),
        };
        let state = tus_state(&progress.meta);
        let complete = progress.meta.length == Some(progress.offset);
        if complete && !progress.delivered && !state.is_partial() {
            // Normally queued already; not if the process died between the last byte and
            // the delivery. The queue delivers it in the background.
            let request = self.request(session, &progress.meta);
            if let Err(e) = self.core.ensure_queued(&key, &request).await {
                return Answer::Refused(Refusal::Core(e));
            }
        }
        Answer::Progress {
            offset: progress.offset,
            length: progress.meta.length,
            metadata: Some(state.metadata),
            expires: progress.expires.map(httpdate::fmt_http_date),
            concat: state.concat,
        }
    }

    /// PATCH: bytes at an offset.
    async fn patch(&mut self, session: &mut Session, id: &str) -> Answer {
        let Some(key) = self.key(id) else {
            return Answer::Refused(Refusal::NotFound);
        };
        let header = session.req_header();
        if !is_offset_stream(header) {
            return Answer::Refused(Refusal::ContentType);
        }
        let Some(at) = header_number(header, "upload-offset") else {
            return Answer::Refused(Refusal::BadRequest(
                "a PATCH needs Upload-Offset, a number of bytes".into(),
            ));
        };
        let expected = match expected_checksum(header) {
            Ok(expected) => expected,
            Err(refusal) => return Answer::Refused(refusal),
        };
        let new_length = match header.headers.get("upload-length") {
            None => None,
            Some(_) => match header_number(header, "upload-length") {
                Some(length) => Some(length),
                None => {
                    return Answer::Refused(Refusal::BadRequest(
                        "Upload-Length is a number of bytes".into(),
                    ))
                }
            },
        };
        let progress = match self.core.progress(&key).await {
            Ok(Some(progress)) => progress,
            Ok(None) => return self.missing(id).await,
            Err(e) => return Answer::Refused(Refusal::Core(e)),
        };
        if tus_state(&progress.meta).is_final() {
            return Answer::Refused(Refusal::Final);
        }
        if progress.offset != at {
            return Answer::Refused(Refusal::Core(CoreError::OffsetMismatch {
                current: progress.offset,
            }));
        }
        let complete = progress.meta.length == Some(at);
        if complete || progress.delivered {
            // Nothing more can be stored: a body is past the length, and so is another one.
            if content_length(header).is_some_and(|n| n > 0) {
                return Answer::Refused(Refusal::Core(CoreError::TooLong { limit: 0 }));
            }
            if let Some(new_length) = new_length.filter(|&n| Some(n) != progress.meta.length) {
                return Answer::Refused(Refusal::BadRequest(format!(
                    "Upload-Length {new_length} is not the upload's length, {at}"
                )));
            }
        }
        if progress.delivered && chunked(session.req_header()) {
            // A body without a length tells whether it has bytes only when read: any is past
            // the length, as with a `Content-Length`.
            if let Err(answer) = self.proceed(session).await {
                return answer;
            }
            if let Err(refusal) = nothing_more(&mut RequestBody(session)).await {
                return Answer::Refused(refusal);
            }
        }
        let header = session.req_header();
        if progress.delivered {
            // Every byte is there and the file went to the application: say so again.
            return match self.core.recorded_answer(&key).await {
                Ok(answer) => Answer::Patched {
                    offset: progress.offset,
                    expires: None,
                    delivered: answer
                        .map_or(Delivered::Pending, |a| Delivered::Answer(Box::new(a))),
                },
                Err(e) => Answer::Refused(Refusal::Core(e)),
            };
        }
        let max = self.route.limits.max_file_size.0;
        let mut length = progress.meta.length;
        if let Some(new_length) = new_length {
            if new_length > max {
                return Answer::Refused(Refusal::TooLarge(max));
            }
            if new_length < at {
                return Answer::Refused(Refusal::BadRequest(format!(
                    "Upload-Length {new_length} is below the {at} bytes stored"
                )));
            }
            if let Err(e) = self.core.declare_length(&key, new_length).await {
                return Answer::Refused(Refusal::Core(e));
            }
            length = Some(new_length);
        }
        let no_body = match content_length(header) {
            Some(n) => n == 0,
            None => !chunked(header),
        };
        if complete && no_body && !tus_state(&progress.meta).is_partial() {
            // Every byte is there, the delivery not made yet (under way, or failed and
            // queued): no lease to wait for (a delivery under way holds it while the
            // application takes the file); the answer is awaited as by the completing PATCH.
            let delivered = self.deliver(session, &key, &progress.meta).await;
            if let Delivered::Failed(Outcome::Gone) = delivered {
                return self.missing(id).await;
            }
            return Answer::Patched {
                offset: at,
                expires: None,
                delivered,
            };
        }
        match self.append(session, &key, at, length, expected).await {
            Ok(answer) | Err(answer) => answer,
        }
    }

    /// Appends the request's body at `at`, checked as `wanted` says; delivers the upload if
    /// that completes it.
    async fn append(
        &mut self,
        session: &mut Session,
        key: &UploadKey,
        at: u64,
        length: Option<u64>,
        wanted: Option<Wanted>,
    ) -> Result<Answer, Answer> {
        let room = length
            .unwrap_or(self.route.limits.max_file_size.0)
            .saturating_sub(at);
        if content_length(session.req_header()).is_some_and(|n| n > room) {
            return Err(Answer::Refused(Refusal::Core(CoreError::TooLong {
                limit: room,
            })));
        }
        let trailer = match &wanted {
            Some(Wanted::Trailer(slot)) => Some(slot.clone()),
            _ => None,
        };
        if trailer.is_some() && !trailers::keep_tail(session.as_downstream()) {
            return Err(Answer::Refused(Refusal::BadRequest(
                "trailers cannot be read on this connection".into(),
            )));
        }
        self.proceed(session).await?;
        // Early delivery: the stored parts go to the upstream while the rest arrives.
        if self.route.forward.early.is_some() {
            self.begin_early(session, key).await;
        }
        // (A body whose checksum is checked once it has ended is kept whole or not at all; one
        // without a length could pass the room left after pieces were kept.)
        let pieces = wanted.is_none() && content_length(session.req_header()).is_some();
        let mut plain;
        let mut trailed;
        let body: &mut dyn BodySource = match trailer {
            Some(slot) => {
                trailed = Trailed { session, slot };
                &mut trailed
            }
            None => {
                plain = RequestBody(session);
                &mut plain
            }
        };
        let appended = if pieces {
            self.core
                .append_in_pieces(key, at, body, room, PIECE)
                .await
                .map_err(|e| Answer::Refused(Refusal::Core(e)))?
        } else {
            let (mut checked, verdict) = checksum::check(body, wanted);
            let judge = verdict.clone();
            let accept = move |_: &crate::store::Staged| judge.matches();
            match self.core.append(key, at, &mut checked, room, &accept).await {
                Ok(appended) => appended,
                Err(CoreError::Refused) => {
                    return Err(Answer::Refused(match verdict.outcome() {
                        Err(problem) => Refusal::Trailer(problem.explain()),
                        Ok(_) => Refusal::Core(CoreError::Refused),
                    }))
                }
                Err(e) => return Err(Answer::Refused(Refusal::Core(e))),
            }
        };
        if let Some(e) = appended.broke_off {
            // What arrived is kept; the client asks with HEAD where to go on.
            tracing::info!(
                "a PATCH body ended early ({e}); {} bytes are stored",
                appended.offset
            );
            return Err(Answer::Refused(match e {
                BodyError::Stalled => Refusal::Stalled,
                // (The reason, Pingora's, is for the log.)
                BodyError::Broken(_) => Refusal::BadRequest(format!(
                    "the body ended before its end; the upload is at offset {}",
                    appended.offset
                )),
                BodyError::Interrupted => Refusal::TakenOver,
                BodyError::ShuttingDown => Refusal::ShuttingDown {
                    offset: appended.offset,
                },
            }));
        }
        let mut delivered = Delivered::NotYet;
        if appended.complete {
            let meta = match self.core.progress(key).await {
                Ok(Some(progress)) => progress.meta,
                Ok(None) => return Err(Answer::Refused(Refusal::NotFound)),
                Err(e) => return Err(Answer::Refused(Refusal::Core(e))),
            };
            if tus_state(&meta).is_partial() {
                // A part of a final upload to come: delivered as part of it.
                return Ok(Answer::Patched {
                    offset: appended.offset,
                    expires: None,
                    delivered,
                });
            }
            // A delivery that failed goes on from the queue: the bytes are all here, so the
            // PATCH succeeded; its headers say how the delivery stands.
            delivered = self.deliver(session, key, &meta).await;
            if let Delivered::Failed(Outcome::Gone) = delivered {
                // Terminated (a DELETE that raced this PATCH) before its delivery began:
                // nothing was sent, nor will be.
                return Err(Answer::Refused(Refusal::Gone("terminated".into())));
            }
        }
        Ok(Answer::Patched {
            offset: appended.offset,
            expires: (!appended.complete).then(|| self.expires()),
            delivered,
        })
    }

    /// Begins the upload's early delivery (`forward.early`) unless it is a partial upload
    /// (delivered as part of a final one).
    async fn begin_early(&self, session: &Session, key: &UploadKey) {
        if self.core.early_begun(key) {
            return;
        }
        let meta = match self.core.progress(key).await {
            Ok(Some(progress)) if !progress.delivered => progress.meta,
            _ => return,
        };
        if tus_state(&meta).is_partial() {
            return;
        }
        let request = self.request(session, &meta);
        self.core
            .begin_early(*key, &self.route.forward, request)
            .await;
    }

    /// DELETE: the upload and its bytes go.
    async fn terminate(&self, id: &str) -> Answer {
        let Some(key) = self.key(id) else {
            return Answer::Refused(Refusal::NotFound);
        };
        match self.core.progress(&key).await {
            Ok(Some(_)) => {}
            Ok(None) => return self.missing(id).await,
            Err(e) => return Answer::Refused(Refusal::Core(e)),
        }
        match self.core.terminate(&key).await {
            Ok(()) => Answer::Terminated,
            Err(e) => Answer::Refused(Refusal::Core(e)),
        }
    }

    /// GET on an upload: the upstream's answer, once there is one.
    async fn answer(&self, id: &str) -> Answer {
        let Some(key) = self.key(id) else {
            return Answer::Refused(Refusal::NotFound);
        };
        match self.core.recorded_answer(&key).await {
            Ok(Some(answer)) => return Answer::Upstream(answer),
            Ok(None) => {}
            Err(e) => return Answer::Refused(Refusal::Core(e)),
        }
        match self.core.progress(&key).await {
            Ok(Some(progress)) if tus_state(&progress.meta).is_partial() => {
                Answer::Refused(Refusal::Partial)
            }
            Ok(Some(_)) => Answer::Pending,
            Ok(None) => self.missing(id).await,
            Err(e) => Answer::Refused(Refusal::Core(e)),
        }
    }

    /// A finalize request (`PUT <route path>/<token>`): waits for the delivery of the upload
    /// that carries the token, then answers with the upstream's answer. `None`: no upload
    /// carries it (the request is the application's).
    async fn finalize(&self, session: &Session, token: &str) -> Option<Answer> {
        let token = percent_encoding::percent_decode_str(token)
            .decode_utf8()
            .ok()?;
        let id = match self.core.alias(&self.token_key(&token)).await {
            Ok(Some(id)) => id,
            Ok(None) => return None,
            Err(e) => return Some(Answer::Refused(Refusal::Core(e))),
        };
        tracing::info!("finalize request for upload {id}");
        let key = self.key(&id)?;
        if let Ok(Some(answer)) = self.core.recorded_answer(&key).await {
            return Some(Answer::Upstream(answer));
        }
        let progress = match self.core.progress(&key).await {
            Ok(Some(progress)) => progress,
            Ok(None) => return Some(Answer::Refused(Refusal::NotFound)),
            Err(e) => return Some(Answer::Refused(Refusal::Core(e))),
        };
        if progress.meta.length != Some(progress.offset) {
            return Some(Answer::Refused(Refusal::Incomplete {
                offset: progress.offset,
                length: progress.meta.length,
            }));
        }
        Some(match self.deliver(session, &key, &progress.meta).await {
            Delivered::Answer(answer) => Answer::Upstream(*answer),
            Delivered::Failed(outcome) => Answer::Undelivered(outcome),
            Delivered::Pending | Delivered::NotYet => Answer::Pending,
        })
    }

    /// Delivers the complete upload (see `request`), waiting for it up to `forward.wait`.
    async fn deliver(&self, session: &Session, key: &UploadKey, meta: &UploadMeta) -> Delivered {
        let request = self.request(session, meta);
        let forward = &self.route.forward;
        // The delivery runs in a task of its own: it goes on after the wait.
        let delivery = self.core.deliver(*key, forward, request, self.arrived);
        match tokio::time::timeout(forward.wait, delivery).await {
            Err(_) => Delivered::Pending,
            Ok(delivery) => match &delivery.outcome {
                Outcome::Answered {
                    answer,
                    retryable: false,
                } => Delivered::Answer(answer.clone()),
                outcome => Delivered::Failed(outcome.clone()),
            },
        }
    }

    /// What the upstream gets with the file: the fields and credentials the upload was created
    /// with (the credentials of this request instead, if it carries any: a new login after a
    /// refusal).
    fn request(&self, session: &Session, meta: &UploadMeta) -> DeliveryRequest {
        let state = tus_state(meta);
        let current = delivery_request(session.req_header(), client_ip(session), self.route);
        let has_credentials = |request: &DeliveryRequest| {
            request.headers.iter().any(|(name, _)| {
                name == http::header::COOKIE || name == http::header::AUTHORIZATION
            })
        };
        if has_credentials(&current) {
            DeliveryRequest {
                fields: state.fields,
                ..current
            }
        } else {
            DeliveryRequest {
                fields: state.fields,
                headers: DeliveryRequest::parse_headers(&state.headers),
                host: state
                    .host
                    .and_then(|h| HeaderValue::from_bytes(&h).ok())
                    .or(current.host),
                route: current.route,
            }
        }
    }
}

fn tus_state(meta: &UploadMeta) -> TusState {
    serde_json::from_value(meta.protocol["tus"].clone()).unwrap_or_default()
}

fn is_offset_stream(header: &RequestHeader) -> bool {
    header_str(header, http::header::CONTENT_TYPE).is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case(OFFSET_OCTET_STREAM))
    })
}

/// A header holding a number of bytes: digits only.
fn header_number(header: &RequestHeader, name: &'static str) -> Option<u64> {
    let value = header_str(header, HeaderName::from_static(name))?;
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// A creation's length: `Upload-Length`, or none with `Upload-Defer-Length: 1`.
fn declared_length(header: &RequestHeader) -> Result<Option<u64>, Refusal> {
    let has_length = header.headers.contains_key("upload-length");
    let defer = header.headers.get("upload-defer-length");
    match (has_length, defer) {
        (true, None) => header_number(header, "upload-length")
            .map(Some)
            .ok_or_else(|| Refusal::BadRequest("Upload-Length is a number of bytes".into())),
        (false, Some(value)) if value.as_bytes() == b"1" => Ok(None),
        (false, Some(_)) => Err(Refusal::BadRequest(
            "Upload-Defer-Length takes the value 1".into(),
        )),
        (true, Some(_)) => Err(Refusal::BadRequest(
            "send Upload-Length or Upload-Defer-Length, not both".into(),
        )),
        (false, None) => Err(Refusal::BadRequest(
            "a creation needs Upload-Length (or Upload-Defer-Length: 1)".into(),
        )),
    }
}

fn display_length(length: Option<u64>) -> String {
    length.map_or_else(|| "length deferred".into(), |n| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_below_the_route_are_uploads() {
        let route = PathMatch::Prefix("/files".into());
        assert_eq!(target(&route, "/files"), Target::Collection);
        assert_eq!(target(&route, "/files/"), Target::Collection);
        assert_eq!(target(&route, "/files/abc"), Target::Upload("abc".into()));
        assert_eq!(target(&route, "/files/abc/def"), Target::Other);
        let slash = PathMatch::Prefix("/files/".into());
        assert_eq!(target(&slash, "/files/abc"), Target::Upload("abc".into()));
    }
}
