//! Delivery: the one request to the upstream per finished file, single-flight within a process
//! and under the upload's lease across processes, its answer recorded and replayed.

use super::{Credentials, FieldsDigest, UploadCore};
use crate::config::ForwardConfig;
use crate::forward::{verdict, DeliveryRequest, ForwardError, PartReader, Verdict};
use crate::store::{
    DeliveredFile, Fence, RecordedAnswer, StoreError, StoredPart, StoredReader, UploadKey,
    UploadMeta,
};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

pub(super) type Flight = watch::Receiver<Option<Arc<Delivery>>>;

/// What a delivery attempt came to, shared by every request that waited for it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub outcome: Outcome,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    /// The upstream answered (or its recorded answer is replayed). `retryable`: it asked for
    /// a retry (5xx, 408, 429); the parts are kept.
    Answered {
        answer: Box<RecordedAnswer>,
        retryable: bool,
    },
    /// The upstream could not be reached or broke off before answering; the parts are kept.
    Unreachable,
    /// The upstream did not answer in time; the parts are kept.
    TimedOut,
    /// Storage failed; the parts are kept.
    StorageFailed,
    /// Nothing to deliver: the upload was removed (terminated, or expired) between its last
    /// byte and its delivery. Nothing was sent, and nothing is owed.
    Gone,
}

impl Delivery {
    /// Will a later attempt possibly do better (so that it should wait `retry_pause`)?
    fn retryable(&self) -> bool {
        match &self.outcome {
            Outcome::Answered { retryable, .. } => *retryable,
            Outcome::Gone => false,
            _ => true,
        }
    }

    /// The upstream's answer, if there is one.
    pub fn answer(&self) -> Option<&RecordedAnswer> {
        match &self.outcome {
            Outcome::Answered { answer, .. } => Some(answer),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum DeliverError {
    #[error("the upload is not complete")]
    Incomplete,
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Core(#[from] super::CoreError),
}

/// Removes an upload's delivery from the in-flight table when the delivery ends, even by panic
/// or by the task never running.
struct Landing {
    core: Arc<UploadCore>,
    upload: UploadKey,
}

impl Drop for Landing {
    fn drop(&mut self) {
        self.core.flights.remove(&self.upload);
    }
}

impl UploadCore {
    /// Delivers a complete upload, or joins the delivery already under way for it.
    ///
    /// `asked` is when the asking request arrived. A request that was under way while an
    /// attempt failed (it waited for the upload's lease that the attempt held, say) shares that
    /// attempt's outcome, as if it had joined it: only a request that comes after a failure
    /// (a client's retry) sends the file again.
    pub async fn deliver(
        self: &Arc<Self>,
        upload: UploadKey,
        forward: &ForwardConfig,
        request: DeliveryRequest,
        asked: Instant,
    ) -> Arc<Delivery> {
        let mut flight = match self.flights.entry(upload) {
            dashmap::Entry::Occupied(entry) => entry.get().clone(),
            dashmap::Entry::Vacant(entry) => {
                if let Some(failure) = self.failures.get(&upload) {
                    let (ended, delivery) = &*failure;
                    if *ended > asked {
                        return Arc::clone(delivery);
                    }
                }
                let (done, flight) = watch::channel(None);
                entry.insert(flight.clone());
                let landing = Landing {
                    core: Arc::clone(self),
                    upload,
                };
                let forward = forward.clone();
                let working = self.in_flight.start();
                // A task of its own: a client that gives up must not cut a delivery in half.
                let delivering = async move {
                    let _working = working;
                    let delivery = landing
                        .core
                        .deliver_once(&upload, &forward, &request, &done)
                        .await;
                    drop(landing);
                    let _ = done.send(Some(delivery));
                };
                let span = tracing::info_span!("delivery", upload = %upload.short());
                tokio::spawn(delivering.instrument(span));
                flight
            }
        };
        let delivery = match flight.wait_for(|d| d.is_some()).await {
            Ok(delivery) => delivery.clone().expect("waited for a delivery"),
            Err(_) => Arc::new(Delivery {
                outcome: Outcome::StorageFailed,
            }),
        };
        delivery
    }

    /// `done` hears a recorded answer as soon as it is recorded, before the parts are removed.
    async fn deliver_once(
        &self,
        upload: &UploadKey,
        forward: &ForwardConfig,
        request: &DeliveryRequest,
        done: &watch::Sender<Option<Arc<Delivery>>>,
    ) -> Arc<Delivery> {
        // Back-pressure: a retry right after a failure waits, instead of sending the whole file
        // again at once (Resumable.js retries immediately, up to 100 times).
        let failed_at = self.failures.get(upload).map(|failure| failure.0);
        if let Some(pause) = failed_at.and_then(|at| forward.retry_pause.checked_sub(at.elapsed()))
        {
            tokio::time::sleep(pause).await;
        }
        let delivery = match self.try_deliver(upload, forward, request, done).await {
            Ok(delivery) => delivery,
            Err(e) => {
                // The details are for the log; the protocol gives clients a short message.
                tracing::error!("{upload:?}: delivery failed: {e}");
                let outcome = match e {
                    DeliverError::Forward(ForwardError::Timeout { .. }) => Outcome::TimedOut,
                    DeliverError::Forward(ForwardError::Upstream { .. }) => Outcome::Unreachable,
                    DeliverError::Incomplete => Outcome::Gone,
                    _ => Outcome::StorageFailed,
                };
                Delivery { outcome }
            }
        };
        let delivery = Arc::new(delivery);
        if done.borrow().is_none() {
            // An answer published early was counted then.
            self.count_attempt(&delivery);
        }
        if delivery.retryable() {
            self.failures
                .insert(*upload, (Instant::now(), Arc::clone(&delivery)));
        } else {
            self.failures.remove(upload);
        }
        delivery
    }

    fn count_attempt(&self, delivery: &Delivery) {
        let outcome = match &delivery.outcome {
            Outcome::Answered {
                retryable: true, ..
            } => "retry-later",
            Outcome::Answered { answer, .. } if (200..300).contains(&answer.status) => "delivered",
            Outcome::Answered { .. } => "refused",
            Outcome::Unreachable => "unreachable",
            Outcome::TimedOut => "timed-out",
            Outcome::StorageFailed => "storage-failed",
            // Nothing was sent.
            Outcome::Gone => return,
        };
        self.metrics.deliveries.with_label_values(&[outcome]).inc();
    }

    async fn try_deliver(
        &self,
        upload: &UploadKey,
        forward: &ForwardConfig,
        request: &DeliveryRequest,
        done: &watch::Sender<Option<Arc<Delivery>>>,
    ) -> Result<Delivery, DeliverError> {
        let lease = self.lock(upload).await?;
        let fence = lease.fence;
        let state = &self.engines.state;
        let fields = FieldsDigest::of(&request.fields);
        let credentials = Credentials::of(&request.headers);
        self.record_pending(upload, fence).await;
        let answered = |answer, retryable| Delivery {
            outcome: Outcome::Answered {
                answer: Box::new(answer),
                retryable,
            },
        };
        if let Some(answer) = self.fresh_answer(upload, &fields).await? {
            self.clean_leftovers(upload, &answer, fence).await?;
            self.unqueue(upload, fence).await;
            return Ok(answered(answer, false));
        }
        if let Some((refusal, at)) = state.answer(upload).await? {
            let same_client = refusal.refused_for.as_deref() == Some(credentials.0.as_str());
            if same_client && self.applies(&refusal, at, &fields) {
                // Asked again with the credentials it refused: the same answer, without
                // sending the file again. New credentials (a new login) deliver below.
                self.unqueue(upload, fence).await;
                return Ok(answered(refusal, false));
            }
        }
        let complete = match state.meta(upload).await? {
            Some(meta) => {
                let parts = state.parts(upload).await?;
                super::parts::complete_len(&parts, meta.length)
                    .map(|count| (meta, (1..=count).map(|n| parts[&n]).collect::<Vec<_>>()))
            }
            None => None,
        };
        let Some((meta, file)) = complete else {
            // Nothing to deliver (removed, or never complete): nothing is owed either.
            self.unqueue(upload, fence).await;
            return Err(DeliverError::Incomplete);
        };
        let file: Vec<StoredPart> = file;
        let key = idempotency_key(upload, &fields, &credentials, &meta, &file);
        let size: u64 = file.iter().map(|p| p.len).sum();
        let started = Instant::now();
        if state.was_delivering(upload).await? {
            tracing::warn!(
                "{upload:?}: delivering again, in doubt: an earlier attempt sent the file and \
                 its answer was never recorded (Idempotency-Key {key})"
            );
        }
        self.queue_attempt(upload, request, forward, fence).await;
        state.mark_delivering(upload, true, fence).await?;
        let sent = self
            .forwarder
            .send(
                &UploadParts {
                    engines: &self.engines,
                    upload: *upload,
                },
                upload,
                &meta,
                &file,
                forward,
                request,
                &key,
            )
            .await;
        self.metrics
            .delivery_seconds
            .observe(started.elapsed().as_secs_f64());
        let mut answer = match sent {
            Ok(answer) => {
                self.metrics
                    .upstream_responses
                    .with_label_values(&[crate::metrics::status_class(answer.status)])
                    .inc();
                answer
            }
            Err(e) => {
                // Unless the whole request went out, the upstream cannot have the file.
                if !e.in_doubt() {
                    state.mark_delivering(upload, false, fence).await?;
                }
                return Err(e.into());
            }
        };
        answer.fields = fields.0;
        tracing::info!(
            "{upload:?}: sent {size} bytes ({} parts) to the application in {:.2} s; it answered {}",
            file.len(),
            started.elapsed().as_secs_f64(),
            answer.status
        );
        match verdict(answer.status) {
            Verdict::WhoAreYou => {
                tracing::warn!(
                    "{upload:?}: the application answered {} (who are you?); parts kept for a \
                     request with other credentials",
                    answer.status
                );
                answer.refused_for = Some(credentials.0);
                self.metrics.upload_event("refused");
                state
                    .save_answer(upload, &answer, self.clock.now(), fence)
                    .await?;
                state.mark_delivering(upload, false, fence).await?;
                self.unqueue(upload, fence).await;
                return Ok(answered(answer, false));
            }
            Verdict::TryLater => {
                tracing::warn!("{upload:?}: parts kept for a retry");
                state.mark_delivering(upload, false, fence).await?;
                return Ok(answered(answer, true));
            }
            Verdict::Final => {}
        }
        self.metrics
            .upload_event(if (200..300).contains(&answer.status) {
                "delivered"
            } else {
                "refused"
            });
        answer.file = Some(DeliveredFile { meta, parts: file });
        // The upstream has the file, whatever happens here: never report a retryable failure
        // (a retry would send the file again).
        if self.record(upload, &answer, fence).await {
            // The answer stands (any request from now on finds it): the client need not wait
            // for the parts to be removed, which for a large file in small chunks takes a while.
            let _cleaning = self.cleanups.start();
            let delivery = answered(answer.clone(), false);
            // Counted before anyone hears the answer: a scrape after it sees the attempt.
            self.count_attempt(&delivery);
            done.send_replace(Some(Arc::new(delivery)));
            if let Err(e) = self.finish(upload, fence).await {
                tracing::error!("{upload:?}: delivered, but removing its parts failed: {e}");
            }
            if let Err(e) = state.mark_delivering(upload, false, fence).await {
                tracing::warn!("{upload:?}: clearing the delivery note failed: {e}");
            }
        }
        self.unqueue(upload, fence).await;
        Ok(answered(answer, false))
    }

    /// Writes down a delivered file's answer. When storage is too full for the whole answer,
    /// its status and headers without the body are written (other processes, and this one
    /// after a restart, replay that much until the whole answer is written); when not even
    /// that fits, the answer is kept in memory only, and the delivery note stays, so that a
    /// delivery from elsewhere meanwhile is logged as in doubt. True if something is written.
    async fn record(&self, upload: &UploadKey, answer: &RecordedAnswer, fence: Fence) -> bool {
        let state = &self.engines.state;
        let now = self.clock.now();
        let Err(e) = state.save_answer(upload, answer, now, fence).await else {
            return true;
        };
        let bodiless = RecordedAnswer {
            body: bytes::Bytes::new(),
            ..answer.clone()
        };
        if state
            .save_answer(upload, &bodiless, now, fence)
            .await
            .is_ok()
        {
            tracing::error!(
                "{upload:?}: delivered; recording the whole answer failed ({e}), so it is \
                 recorded without its body for now"
            );
            // Replayed whole from memory, and written whole when storage allows.
            self.unrecorded.insert(*upload, answer.clone());
            return true;
        }
        tracing::error!(
            "{upload:?}: delivered, but recording the answer failed ({e}); it is replayed \
             from memory and recorded when storage allows"
        );
        self.unrecorded.insert(*upload, answer.clone());
        false
    }

    /// Finishes a delivered upload whose parts are still there (a crash or a failure between
    /// recording its answer and removing its parts): they would otherwise be taken for a new
    /// upload of the same file.
    pub(super) async fn clean_leftovers(
        &self,
        upload: &UploadKey,
        answer: &RecordedAnswer,
        fence: Fence,
    ) -> Result<(), super::CoreError> {
        let Some(file) = &answer.file else {
            return Ok(());
        };
        let parts = self.engines.state.parts(upload).await?;
        let leftovers = !parts.is_empty()
            && parts.len() == file.parts.len()
            && file.parts.iter().all(|p| parts.get(&p.number) == Some(p));
        if leftovers {
            self.finish(upload, fence).await?;
        }
        Ok(())
    }

    /// The answer to the delivered file, if there is one for these fields and it has not
    /// expired. Otherwise the upload starts over (a new upload of the same file).
    pub(super) async fn fresh_answer(
        &self,
        upload: &UploadKey,
        fields: &FieldsDigest,
    ) -> Result<Option<RecordedAnswer>, StoreError> {
        let delivered = self.delivery_answer(upload).await?;
        Ok(delivered
            .filter(|delivered| self.is_fresh(delivered, fields))
            .map(|(answer, _)| answer))
    }

    /// The answer of the upload's last delivery while it is kept, whatever fields it was for,
    /// with when it was recorded (`None`: not written down yet, see `unrecorded`).
    pub(super) async fn delivery_answer(
        &self,
        upload: &UploadKey,
    ) -> Result<Option<(RecordedAnswer, Option<SystemTime>)>, StoreError> {
        if let Some(entry) = self.unrecorded.get(upload) {
            return Ok(Some((entry.clone(), None)));
        }
        Ok(self
            .engines
            .state
            .answer(upload)
            .await?
            .filter(|(answer, _)| answer.is_delivery())
            .map(|(answer, at)| (answer, Some(at))))
    }

    /// Is a delivery's answer (see [`delivery_answer`](Self::delivery_answer)) the answer for
    /// a request with these fields? One not written down yet is, whatever the fields.
    pub(super) fn is_fresh(
        &self,
        (answer, at): &(RecordedAnswer, Option<SystemTime>),
        fields: &FieldsDigest,
    ) -> bool {
        at.is_none_or(|at| self.applies(answer, at, fields))
    }

    /// The upstream's answer to the upload, whatever request it came from, while it is kept
    /// (a delivered file's answer, or a "who are you" refusal). Read-only.
    pub async fn recorded_answer(
        &self,
        upload: &UploadKey,
    ) -> Result<Option<RecordedAnswer>, super::CoreError> {
        if let Some(entry) = self.unrecorded.get(upload) {
            return Ok(Some(entry.clone()));
        }
        Ok(match self.engines.state.answer(upload).await? {
            Some((answer, at)) if !self.expired(at, self.ttls.result) => Some(answer),
            _ => None,
        })
    }

    /// Is a recorded answer still the answer for a request with these fields?
    pub(super) fn applies(
        &self,
        answer: &RecordedAnswer,
        at: SystemTime,
        fields: &FieldsDigest,
    ) -> bool {
        !self.expired(at, self.ttls.result) && answer.fields == fields.0
    }

    /// Writes down an answer kept in memory because storage failed, then ends the upload.
    /// Call under the upload's lease.
    pub(super) async fn record_pending(&self, upload: &UploadKey, fence: Fence) {
        let Some(answer) = self.unrecorded.get(upload).map(|e| e.clone()) else {
            return;
        };
        let recorded = async {
            self.engines
                .state
                .save_answer(upload, &answer, self.clock.now(), fence)
                .await?;
            self.unrecorded.remove(upload);
            self.finish(upload, fence).await
        };
        match recorded.await {
            Ok(()) => tracing::info!("{upload:?}: the delivered file's answer is recorded now"),
            Err(e) => {
                tracing::warn!(
                    "{upload:?}: recording the delivered file's answer failed again: {e}"
                )
            }
        }
    }
}

/// An upload's parts, read through its own references where the engine keeps them.
pub(super) struct UploadParts<'a> {
    pub(super) engines: &'a crate::store::Engines,
    pub(super) upload: UploadKey,
}

#[async_trait::async_trait]
impl PartReader for UploadParts<'_> {
    async fn open(&self, part: &StoredPart) -> Result<StoredReader, StoreError> {
        match self.engines.state.open_part(&self.upload, part).await? {
            Some(reader) => Ok(reader),
            None => self.engines.blobs.open(&part.digest, part.len).await,
        }
    }
}

/// A stable `Idempotency-Key` for one delivery of one file: the same upload, fields,
/// credentials and bytes always give the same key, so an application that honours the header
/// can drop a delivery repeated after a crash. An upload that records when it started is keyed
/// by that instead of its parts' digests, so that a delivery begun before the last part is
/// stored (`forward.early`) carries the key the finished delivery computes: within one upload
/// the bytes cannot change, and a new upload of the same file starts at another time.
pub(super) fn idempotency_key(
    upload: &UploadKey,
    fields: &FieldsDigest,
    credentials: &Credentials,
    meta: &UploadMeta,
    file: &[StoredPart],
) -> String {
    let mut hasher = Sha256::new();
    match &meta.origin {
        Some(origin) => {
            hasher.update(b"stitch delivery v2");
            hasher.update(upload.hex());
            hasher.update(&fields.0);
            hasher.update(&credentials.0);
            hasher.update(meta.length.unwrap_or_default().to_be_bytes());
            hasher.update(origin.started_ms.to_be_bytes());
        }
        None => {
            hasher.update(b"stitch delivery v1");
            hasher.update(upload.hex());
            hasher.update(&fields.0);
            hasher.update(&credentials.0);
            for part in file {
                hasher.update(part.len.to_be_bytes());
                hasher.update(part.digest);
            }
        }
    }
    hex::encode(&hasher.finalize()[..16])
}
