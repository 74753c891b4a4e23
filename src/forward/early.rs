//! Early delivery (`forward.early`): the request to the upstream begins while the upload still
//! arrives. Its header (with the final Content-Length) and the text parts go out first, then
//! each stored part in order as soon as it is stored; the request's end (the closing boundary)
//! is written only by [`Forward::send`](super::Forward::send), which the core calls under the
//! upload's lease once the upload is complete and its delivery decided. So the upstream never
//! holds a whole request that is not the delivery: a stream cut off anywhere before (a client
//! that paused, a crash) is a request that broke off, which no application takes for an upload.

use super::{
    copy_part, send_start, DeliveryRequest, Failure, ForwardConfig, HttpForwarder, MultipartBody,
    StoredPart, StoredReader, UploadKey, UploadMeta,
};
use async_trait::async_trait;
use pingora::protocols::http::client::HttpSession;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// What an early delivery sends: the same as the delivery will.
pub struct EarlyBegin<'a> {
    pub upload: &'a UploadKey,
    pub meta: &'a UploadMeta,
    pub forward: &'a ForwardConfig,
    pub request: &'a DeliveryRequest,
    pub idempotency_key: &'a str,
    /// The whole file's length.
    pub length: u64,
    /// How long to wait for the next part, and with every part sent, for the delivery.
    pub stall: Duration,
}

/// How an early delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyEnd {
    /// Every part went out and the delivery finished the request.
    Used,
    /// Every part went out, and no delivery came to finish the request in time.
    Unused,
    /// Every part went out, and the delivery found it was not its request (the file's parts,
    /// the fields or the credentials changed since): cut off, and the file sent anew.
    Discarded,
    /// The next part did not come in time: the request was cut off.
    Stalled,
    /// The upstream or the store failed: the request was cut off.
    Failed,
    /// A request for this upload is begun already.
    Busy,
    /// This forwarder sends nothing early.
    Unsupported,
}

impl EarlyEnd {
    pub fn label(self) -> &'static str {
        match self {
            EarlyEnd::Used => "used",
            EarlyEnd::Unused => "unused",
            EarlyEnd::Discarded => "discarded",
            EarlyEnd::Stalled => "stalled",
            EarlyEnd::Failed => "failed",
            EarlyEnd::Busy => "busy",
            EarlyEnd::Unsupported => "unsupported",
        }
    }
}

/// An arriving upload's parts, in order, as they are stored.
#[async_trait]
pub trait PartFeed: Send + Sync {
    /// Part `number` and a reader of its bytes, once it is stored; `None` if it is not stored
    /// within the stall time, or cannot be read.
    async fn next(&self, number: u64) -> Option<(StoredPart, StoredReader)>;
}

/// Everything a delivery request is made of besides its boundary and the file's bytes: a
/// request begun early is finished only by a delivery of the same shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Shape {
    path: String,
    field: String,
    fields: Vec<(String, String)>,
    headers: Vec<(String, Vec<u8>)>,
    host: Option<Vec<u8>>,
    name: String,
    media_type: Option<String>,
    idempotency_key: String,
    length: u64,
}

impl Shape {
    pub(super) fn of(
        meta: &UploadMeta,
        forward: &ForwardConfig,
        request: &DeliveryRequest,
        idempotency_key: &str,
        length: u64,
    ) -> Shape {
        Shape {
            path: forward.path.clone(),
            field: forward.field.clone(),
            fields: request.fields.clone(),
            headers: request
                .headers
                .iter()
                .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
                .collect(),
            host: request.host.as_ref().map(|h| h.as_bytes().to_vec()),
            name: meta.name.clone(),
            media_type: meta.media_type.clone(),
            idempotency_key: idempotency_key.to_string(),
            length,
        }
    }
}

/// A request with every part written and its end not.
pub(super) struct Begun {
    pub session: HttpSession,
    pub body: MultipartBody,
    pub shape: Shape,
    pub sent: Vec<StoredPart>,
}

/// One upload's early request, as the delivery finds it.
pub(super) struct Slot {
    begun: Mutex<Option<Begun>>,
    /// True once the stream stopped writing (every part sent, or cut off).
    ended: watch::Sender<bool>,
    taken: Notify,
    /// The delivery that took the request found it was not its own.
    discarded: std::sync::atomic::AtomicBool,
}

impl HttpForwarder {
    /// The request begun early for `upload`, once every part is written, if there is one: it
    /// is the caller's now. Waits while the stream is still writing parts (each write is
    /// bounded by `forward.timeout`, each wait for a part by the stall time).
    ///
    /// One that is not this delivery's (`shape` differs, or the parts sent are not the start of
    /// `file`) is cut off here, and `None` returned: the file is sent anew.
    pub(super) async fn take_early(
        &self,
        upload: &UploadKey,
        shape: &Shape,
        file: &[StoredPart],
    ) -> Option<Begun> {
        let slot = self.early.get(upload).map(|slot| Arc::clone(&slot))?;
        let mut ended = slot.ended.subscribe();
        let _ = ended.wait_for(|ended| *ended).await;
        let begun = slot.begun.lock().expect("early lock").take();
        self.early.remove_if(upload, |_, s| Arc::ptr_eq(s, &slot));
        let mut begun = begun?;
        if begun.shape != *shape || !file.starts_with(&begun.sent) {
            tracing::info!(
                "{upload:?}: the request begun early is not this delivery's (its parts or \
                 fields changed); sending the file anew"
            );
            begun.session.shutdown().await;
            slot.discarded
                .store(true, std::sync::atomic::Ordering::SeqCst);
            slot.taken.notify_one();
            return None;
        }
        slot.taken.notify_one();
        Some(begun)
    }

    pub(super) async fn stream_early(
        &self,
        begin: EarlyBegin<'_>,
        feed: &dyn PartFeed,
    ) -> EarlyEnd {
        let slot = Arc::new(Slot {
            begun: Mutex::new(None),
            ended: watch::Sender::new(false),
            taken: Notify::new(),
            discarded: std::sync::atomic::AtomicBool::new(false),
        });
        match self.early.entry(*begin.upload) {
            dashmap::Entry::Occupied(_) => return EarlyEnd::Busy,
            dashmap::Entry::Vacant(entry) => {
                entry.insert(Arc::clone(&slot));
            }
        }
        let end = match self.stream(&begin, feed).await {
            Ok(begun) => {
                let sent = begun.sent.len();
                *slot.begun.lock().expect("early lock") = Some(begun);
                slot.ended.send_replace(true);
                tracing::debug!(
                    "{:?}: every part ({sent}) went out early; waiting for the delivery",
                    begin.upload
                );
                let _ = tokio::time::timeout(begin.stall, slot.taken.notified()).await;
                let unused = slot.begun.lock().expect("early lock").take();
                match unused {
                    Some(mut unused) => {
                        tracing::info!(
                            "{:?}: no delivery came for the request begun early within {:?}; \
                             it is cut off",
                            begin.upload,
                            begin.stall
                        );
                        unused.session.shutdown().await;
                        EarlyEnd::Unused
                    }
                    None if slot.discarded.load(std::sync::atomic::Ordering::SeqCst) => {
                        EarlyEnd::Discarded
                    }
                    None => EarlyEnd::Used,
                }
            }
            Err(end) => end,
        };
        slot.ended.send_replace(true);
        self.early
            .remove_if(begin.upload, |_, s| Arc::ptr_eq(s, &slot));
        end
    }

    /// Writes the request's start and every part as it comes. A dead pooled connection is
    /// replaced once.
    async fn stream(&self, begin: &EarlyBegin<'_>, feed: &dyn PartFeed) -> Result<Begun, EarlyEnd> {
        let upload = begin.upload;
        let body = MultipartBody::new(begin.meta, begin.forward, begin.request);
        let header = self
            .request_header(
                &body,
                begin.length,
                begin.forward,
                begin.request,
                begin.idempotency_key,
            )
            .map_err(|e| {
                tracing::warn!("{upload:?}: no early delivery: {e}");
                EarlyEnd::Failed
            })?;
        let shape = Shape::of(
            begin.meta,
            begin.forward,
            begin.request,
            begin.idempotency_key,
            begin.length,
        );
        let peer = self.peer();
        let mut retried = false;
        let mut session = loop {
            let (mut session, reused) =
                self.connector.get_http_session(&peer).await.map_err(|e| {
                    tracing::info!("{upload:?}: no early delivery, the upstream: {e}");
                    EarlyEnd::Failed
                })?;
            session.set_read_timeout(Some(begin.forward.timeout));
            session.set_write_timeout(Some(begin.forward.timeout));
            match send_start(&mut session, header.clone(), &body).await {
                Ok(()) => break session,
                Err(_) if reused && !retried => {
                    session.shutdown().await;
                    retried = true;
                }
                Err(e) => {
                    session.shutdown().await;
                    tracing::info!("{upload:?}: no early delivery, the upstream: {}", e);
                    return Err(EarlyEnd::Failed);
                }
            }
        };
        let mut sent: Vec<StoredPart> = Vec::new();
        let mut len = 0u64;
        while len < begin.length {
            let number = sent.len() as u64 + 1;
            let Some((part, mut reader)) = feed.next(number).await else {
                tracing::info!(
                    "{upload:?}: part {number} did not come within {:?}; the request begun \
                     early is cut off after {len} bytes of the file",
                    begin.stall
                );
                session.shutdown().await;
                return Err(EarlyEnd::Stalled);
            };
            if part.number != number || len + part.len > begin.length {
                tracing::warn!("{upload:?}: part {number} does not fit the file; cut off");
                session.shutdown().await;
                return Err(EarlyEnd::Failed);
            }
            if let Err(e) = copy_part(&mut session, &mut reader, &part).await {
                tracing::info!("{upload:?}: the request begun early is cut off: {e}");
                session.shutdown().await;
                return Err(EarlyEnd::Failed);
            }
            len += part.len;
            sent.push(part);
        }
        Ok(Begun {
            session,
            body,
            shape,
            sent,
        })
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Upstream(e) => write!(f, "{e}"),
            Failure::Store(e) => write!(f, "{e}"),
        }
    }
}
