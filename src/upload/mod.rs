//! The upload core: protocol-neutral operations on uploads, and the state machine behind them.
//!
//! ```text
//! receiving ──(last missing part published)──► complete ──(one delivery at a time)──► delivered
//!     ▲                                            │                                  (answer recorded,
//!     └──────────── upstream failed (5xx, 408, 429, unreachable): parts kept ◄────────┘  parts removed)
//! ```
//!
//! Protocol adapters ask "is part P of upload U stored?", "store these bytes as part P of U" and
//! "deliver U"; they never see storage. Decisions that must not race (pinning metadata,
//! publishing, delivering) happen under the upload's lock. Deliveries are single-flight: requests
//! that complete the same upload at once share one forward and its answer.

use crate::config::ForwardConfig;
use crate::drain::InFlight;
use crate::forward::{DeliveryRequest, ForwardError, Forwarder};
use crate::locks::KeyedLocks;
use crate::store::{
    BodySource, ChunkStore, DeliveredFile, PartIndex, RecordedAnswer, StageError, StagedPart,
    StateStore, StoreError, StoredPart, UploadKey, UploadMeta,
};
use bytes::Bytes;
use dashmap::DashMap;
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{watch, Notify};

/// One chunk as a request declares it.
#[derive(Debug, Clone, Copy)]
pub struct PartRef {
    /// 1-based.
    pub number: u64,
    /// Bytes the chunk holds.
    pub len: u64,
}

/// What a request would send to the upstream besides the file (its application fields). A
/// recorded answer is replayed only to requests with the same fields: the same file sent again
/// with other fields (another folder, another record) is a new upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldsDigest(String);

impl FieldsDigest {
    pub fn of(fields: &[(String, String)]) -> FieldsDigest {
        let mut hasher = Sha256::new();
        for (name, value) in fields {
            for text in [name, value] {
                hasher.update((text.len() as u64).to_be_bytes());
                hasher.update(text.as_bytes());
            }
        }
        FieldsDigest(hex::encode(hasher.finalize()))
    }
}

/// Who the upstream is told the client is: a digest of the Cookie and Authorization headers
/// forwarded with the file. An answer that means "who are you" is replayed only to requests
/// with the same credentials; new credentials (a new login) deliver again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials(String);

impl Credentials {
    pub fn of(headers: &[(http::HeaderName, http::HeaderValue)]) -> Credentials {
        let mut hasher = Sha256::new();
        for (name, value) in headers {
            if name == http::header::COOKIE || name == http::header::AUTHORIZATION {
                for text in [name.as_str().as_bytes(), value.as_bytes()] {
                    hasher.update((text.len() as u64).to_be_bytes());
                    hasher.update(text);
                }
            }
        }
        Credentials(hex::encode(hasher.finalize()))
    }
}

/// Where an upload stands, as seen by one request.
#[derive(Debug)]
pub enum PartStatus {
    /// The part is not stored yet.
    Missing,
    /// The part is stored; `complete` says whether the upload now has every part.
    Stored { complete: bool },
    /// The upload was delivered and this chunk's bytes are the delivered ones: this is the
    /// upstream's answer, replayed.
    Delivered(RecordedAnswer),
}

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The request contradicts what this upload already pinned.
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The result of a delivery attempt, shared by every request that waited for it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub answer: RecordedAnswer,
    /// True if the attempt failed in a way a later attempt may mend (the upstream unreachable,
    /// a 5xx, 408, 429): the next attempt waits `retry_pause`.
    pub retryable: bool,
}

type Flight = watch::Receiver<Option<Arc<Delivery>>>;

/// Replies to an upload's requests that are decided but not yet sent (see [`ReplyHold`]).
#[derive(Default)]
struct PendingReplies {
    count: AtomicUsize,
    sent: Notify,
}

/// Held by a request that answers "chunk stored" until its answer is sent: the request that
/// completes the upload sends the upstream's answer only after such replies, so that the answer
/// is the last response the client gets (both clients report the last body they receive).
pub struct ReplyHold {
    core: Arc<UploadCore>,
    upload: UploadKey,
}

impl Drop for ReplyHold {
    fn drop(&mut self) {
        if let Some(pending) = self.core.replies.get(&self.upload) {
            if pending.count.fetch_sub(1, Ordering::SeqCst) == 1 {
                pending.sent.notify_waiters();
            }
        }
        self.core
            .replies
            .remove_if(&self.upload, |_, p| p.count.load(Ordering::SeqCst) == 0);
    }
}

/// How long a completing request waits for earlier replies to go out.
const EARLIER_REPLIES_WAIT: Duration = Duration::from_secs(5);

pub struct UploadCore {
    chunks: Arc<dyn ChunkStore>,
    state: Arc<dyn StateStore>,
    forwarder: Forwarder,
    locks: KeyedLocks<UploadKey>,
    flights: DashMap<UploadKey, Flight>,
    replies: DashMap<UploadKey, Arc<PendingReplies>>,
    /// When each upload's last delivery attempt failed (for `retry_pause`).
    failures: DashMap<UploadKey, Instant>,
    /// Answers to delivered files that could not be written down yet (a full disk). They are replayed from here, and written again (then the parts removed) by
    /// the next request for the upload or the sweep, whichever comes first.
    unrecorded: DashMap<UploadKey, RecordedAnswer>,
    upload_ttl: Duration,
    result_ttl: Duration,
    /// Deliveries run in tasks of their own; a graceful shutdown waits for them.
    in_flight: InFlight,
}

impl UploadCore {
    pub fn new(
        chunks: Arc<dyn ChunkStore>,
        state: Arc<dyn StateStore>,
        forwarder: Forwarder,
        upload_ttl: Duration,
        result_ttl: Duration,
        in_flight: InFlight,
    ) -> UploadCore {
        UploadCore {
            chunks,
            state,
            forwarder,
            locks: KeyedLocks::default(),
            flights: DashMap::new(),
            replies: DashMap::new(),
            failures: DashMap::new(),
            unrecorded: DashMap::new(),
            upload_ttl,
            result_ttl,
            in_flight,
        }
    }

    /// Is this part stored? Read-only: a test request never changes anything.
    ///
    /// For a delivered file the answer is "not stored": a test cannot prove that the client
    /// has the same file (the default identifier is only its size and name), so the client
    /// sends the bytes, and a chunk whose bytes match the delivered ones gets the answer.
    pub async fn status(
        &self,
        upload: &UploadKey,
        declared: &UploadMeta,
        part: PartRef,
        fields: &FieldsDigest,
    ) -> Result<PartStatus, CoreError> {
        if let Some(pinned) = self.state.meta(upload).await? {
            check_pinned(&pinned, declared)?;
        }
        if self.fresh_answer(upload, fields).await?.is_some() {
            return Ok(PartStatus::Missing);
        }
        self.part_status(upload, declared, part).await
    }

    async fn part_status(
        &self,
        upload: &UploadKey,
        meta: &UploadMeta,
        part: PartRef,
    ) -> Result<PartStatus, CoreError> {
        let parts = self.chunks.parts(upload).await?;
        match parts.get(&part.number) {
            None => Ok(PartStatus::Missing),
            Some(stored) if stored.len != part.len => Err(CoreError::Conflict(format!(
                "chunk {} is stored with {} bytes, this request declares {}",
                part.number, stored.len, part.len
            ))),
            Some(_) => Ok(PartStatus::Stored {
                complete: complete_len(&parts, meta).is_some(),
            }),
        }
    }

    /// Streams a chunk's bytes into staging (not yet visible). `limit` is the declared size.
    pub async fn stage(
        &self,
        body: &mut dyn BodySource,
        limit: u64,
    ) -> Result<StagedPart, StageError> {
        self.chunks.stage(body, limit).await
    }

    pub async fn discard(&self, staged: StagedPart) {
        self.chunks.discard(staged).await
    }

    /// Publishes staged bytes as a part, pinning the upload's metadata if this is its first part.
    ///
    /// After a delivery, a chunk whose bytes are the delivered file's part gets the recorded
    /// answer; it is stored all the same, because the client's file may still turn out to
    /// differ in a later chunk (same name and size, other content), and then the chunks that
    /// matched belong to the new upload. A chunk that differs starts that new upload.
    pub async fn commit(
        &self,
        upload: &UploadKey,
        declared: &UploadMeta,
        part: PartRef,
        staged: StagedPart,
        fields: &FieldsDigest,
    ) -> Result<PartStatus, CoreError> {
        let _guard = self.locks.lock(*upload).await;
        let chunk = StoredPart {
            number: part.number,
            len: staged.len,
            digest: staged.digest,
        };
        let delivered = match self.pinned_or_delivered(upload, declared, fields).await {
            Ok(delivered) => delivered,
            Err(e) => {
                self.chunks.discard(staged).await;
                return Err(e);
            }
        };
        if let Some((answer, false)) = &delivered {
            // The answer is not written down yet (a full disk): it stays the word for the
            // delivered file, and nothing new can be stored meanwhile.
            self.chunks.discard(staged).await;
            return match answer
                .file
                .as_ref()
                .is_some_and(|f| f.contains(declared, &chunk))
            {
                true => Ok(PartStatus::Delivered(answer.clone())),
                false => Err(CoreError::Store(StoreError::Io(std::io::Error::other(
                    "the last delivery's answer is not recorded yet",
                )))),
            };
        }
        self.chunks.publish(upload, part.number, staged).await?;
        if let Some((answer, _)) = delivered {
            let same = answer
                .file
                .as_ref()
                .is_some_and(|f| f.contains(declared, &chunk));
            if same {
                let parts = self.chunks.parts(upload).await?;
                if complete_len(&parts, declared).is_some() {
                    // The delivered file, sent again whole: nothing new to deliver.
                    self.finish(upload).await?;
                }
                return Ok(PartStatus::Delivered(answer));
            }
            self.state.remove_answer(upload).await?;
        }
        self.part_status(upload, declared, part).await
    }

    /// Checks the declared metadata against the pinned one (pinning it if there is none) and
    /// returns the delivered file's answer that applies to these fields, if any, with whether
    /// it is recorded. An answer that does not apply (expired, other fields) is forgotten:
    /// this is a new upload of the file.
    async fn pinned_or_delivered(
        &self,
        upload: &UploadKey,
        declared: &UploadMeta,
        fields: &FieldsDigest,
    ) -> Result<Option<(RecordedAnswer, bool)>, CoreError> {
        self.record_pending(upload).await;
        if let Some(entry) = self.unrecorded.get(upload) {
            return Ok(Some((entry.clone(), false)));
        }
        let delivered = match self.state.answer(upload).await? {
            Some((answer, at)) if answer.is_delivery() => {
                if self.applies(&answer, at, fields) {
                    Some((answer, true))
                } else {
                    self.state.remove_answer(upload).await?;
                    None
                }
            }
            _ => None,
        };
        match self.state.meta(upload).await? {
            Some(pinned) => check_pinned(&pinned, declared)?,
            None => self.state.save_meta(upload, declared).await?,
        }
        Ok(delivered)
    }

    /// Ends a delivered upload: its parts and pinned metadata go, its answer stays.
    async fn finish(&self, upload: &UploadKey) -> Result<(), StoreError> {
        self.chunks.remove_parts(upload).await?;
        self.state.remove_meta(upload).await
    }

    /// Writes down an answer kept in memory because storage failed, then ends the upload.
    /// Call under the upload's lock.
    async fn record_pending(&self, upload: &UploadKey) {
        let Some(answer) = self.unrecorded.get(upload).map(|e| e.clone()) else {
            return;
        };
        let recorded = async {
            self.state.save_answer(upload, &answer).await?;
            self.unrecorded.remove(upload);
            self.finish(upload).await
        };
        match recorded.await {
            Ok(()) => log::info!("{upload:?}: the delivered file's answer is recorded now"),
            Err(e) => {
                log::warn!("{upload:?}: recording the delivered file's answer failed again: {e}")
            }
        }
    }

    /// The upload's outcome if it has one by now: the answer of a delivery under way (waited
    /// for) or recorded. A chunk stored just before another request completed the upload must
    /// answer with it too: the clients report the body of whichever response they get last.
    pub async fn settled(
        &self,
        upload: &UploadKey,
        fields: &FieldsDigest,
    ) -> Option<RecordedAnswer> {
        let flight = self.flights.get(upload).map(|f| f.clone());
        if let Some(mut flight) = flight {
            if let Ok(delivery) = flight.wait_for(|d| d.is_some()).await {
                return delivery.as_ref().map(|d| d.answer.clone());
            }
        }
        self.fresh_answer(upload, fields).await.ok().flatten()
    }

    /// Registers a reply about to be sent for `upload`; see [`ReplyHold`].
    pub fn hold_reply(self: &Arc<Self>, upload: UploadKey) -> ReplyHold {
        // Counted inside the map's entry guard, so a concurrent last drop cannot remove it.
        self.replies
            .entry(upload)
            .or_default()
            .count
            .fetch_add(1, Ordering::SeqCst);
        ReplyHold {
            core: Arc::clone(self),
            upload,
        }
    }

    /// Waits (briefly, at most) until no reply held for `upload` is still unsent.
    pub async fn earlier_replies_sent(&self, upload: &UploadKey) {
        let wait = async {
            loop {
                let Some(pending) = self.replies.get(upload).map(|p| Arc::clone(&p)) else {
                    return;
                };
                let sent = pending.sent.notified();
                if pending.count.load(Ordering::SeqCst) == 0 {
                    return;
                }
                sent.await;
            }
        };
        let _ = tokio::time::timeout(EARLIER_REPLIES_WAIT, wait).await;
    }

    /// Delivers a complete upload, or joins the delivery already under way for it.
    pub async fn deliver(
        self: &Arc<Self>,
        upload: UploadKey,
        forward: &ForwardConfig,
        request: DeliveryRequest,
    ) -> Arc<Delivery> {
        let mut flight = match self.flights.entry(upload) {
            dashmap::Entry::Occupied(entry) => entry.get().clone(),
            dashmap::Entry::Vacant(entry) => {
                let (done, flight) = watch::channel(None);
                entry.insert(flight.clone());
                let landing = Landing {
                    core: Arc::clone(self),
                    upload,
                };
                let forward = forward.clone();
                let working = self.in_flight.start();
                // A task of its own: a client that gives up must not cut a delivery in half.
                tokio::spawn(async move {
                    let _working = working;
                    let delivery = landing.core.deliver_once(&upload, &forward, &request).await;
                    drop(landing);
                    let _ = done.send(Some(Arc::new(delivery)));
                });
                flight
            }
        };
        let delivery = match flight.wait_for(|d| d.is_some()).await {
            Ok(delivery) => delivery.clone().expect("waited for a delivery"),
            Err(_) => Arc::new(failure(503, "the delivery failed; retry")),
        };
        delivery
    }

    async fn deliver_once(
        &self,
        upload: &UploadKey,
        forward: &ForwardConfig,
        request: &DeliveryRequest,
    ) -> Delivery {
        // Back-pressure: a retry right after a failure waits, instead of sending the whole file
        // again at once (Resumable.js retries immediately, up to 100 times).
        let failed_at = self.failures.get(upload).map(|at| *at);
        if let Some(pause) = failed_at.and_then(|at| forward.retry_pause.checked_sub(at.elapsed()))
        {
            tokio::time::sleep(pause).await;
        }
        let _guard = self.locks.lock(*upload).await;
        let delivery = self.attempt(upload, forward, request).await;
        if delivery.retryable {
            self.failures.insert(*upload, Instant::now());
        } else {
            self.failures.remove(upload);
        }
        delivery
    }

    async fn attempt(
        &self,
        upload: &UploadKey,
        forward: &ForwardConfig,
        request: &DeliveryRequest,
    ) -> Delivery {
        match self.try_deliver(upload, forward, request).await {
            Ok(delivery) => delivery,
            Err(e) => {
                // The details are for the log; clients get a short message they can show.
                log::error!("{upload:?}: delivery failed: {e}");
                match e {
                    DeliverError::Forward(ForwardError::Timeout { .. }) => failure(
                        504,
                        "the application did not answer in time; the file is kept, retry",
                    ),
                    DeliverError::Forward(ForwardError::Upstream { .. }) => failure(
                        502,
                        "the application could not be reached; the file is kept, retry",
                    ),
                    _ => failure(503, "storage is unavailable; the file is kept, retry"),
                }
            }
        }
    }

    async fn try_deliver(
        &self,
        upload: &UploadKey,
        forward: &ForwardConfig,
        request: &DeliveryRequest,
    ) -> Result<Delivery, DeliverError> {
        let fields = FieldsDigest::of(&request.fields);
        let credentials = Credentials::of(&request.headers);
        self.record_pending(upload).await;
        if let Some(answer) = self.fresh_answer(upload, &fields).await? {
            return Ok(Delivery {
                answer,
                retryable: false,
            });
        }
        if let Some((refusal, at)) = self.state.answer(upload).await? {
            let same_client = refusal.refused_for.as_deref() == Some(credentials.0.as_str());
            if same_client && self.applies(&refusal, at, &fields) {
                // Asked again with the credentials it refused: the same answer, without
                // sending the file again. New credentials (a new login) deliver below.
                return Ok(Delivery {
                    answer: refusal,
                    retryable: false,
                });
            }
        }
        let meta = self
            .state
            .meta(upload)
            .await?
            .ok_or(DeliverError::Incomplete)?;
        let parts = self.chunks.parts(upload).await?;
        let count = complete_len(&parts, &meta).ok_or(DeliverError::Incomplete)?;
        let file: Vec<StoredPart> = (1..=count).map(|n| parts[&n]).collect();
        let key = idempotency_key(upload, &fields, &credentials, &file);
        let size: u64 = file.iter().map(|p| p.len).sum();
        let started = Instant::now();
        if self.state.was_delivering(upload).await? {
            log::warn!(
                "{upload:?}: delivering again, in doubt: an earlier attempt sent the file and                  its answer was never recorded (Idempotency-Key {key})"
            );
        }
        self.state.mark_delivering(upload, true).await?;
        let sent = self
            .forwarder
            .send(
                self.chunks.as_ref(),
                upload,
                &meta,
                &file,
                forward,
                request,
                &key,
            )
            .await;
        let mut answer = match sent {
            Ok(answer) => answer,
            Err(e) => {
                // Unless the whole request went out, the upstream cannot have the file.
                if !e.in_doubt() {
                    self.state.mark_delivering(upload, false).await?;
                }
                return Err(e.into());
            }
        };
        answer.fields = fields.0;
        log::info!(
            "{upload:?}: sent {size} bytes ({} parts) to the application in {:.2} s; it answered {}",
            file.len(),
            started.elapsed().as_secs_f64(),
            answer.status
        );
        if who_are_you(answer.status) {
            log::warn!(
                "{upload:?}: upstream answered {} (who are you?); parts kept for a request                  with other credentials",
                answer.status
            );
            answer.refused_for = Some(credentials.0);
            self.state.save_answer(upload, &answer).await?;
            self.state.mark_delivering(upload, false).await?;
            return Ok(Delivery {
                answer,
                retryable: false,
            });
        }
        if !is_final(answer.status) {
            log::warn!(
                "{upload:?}: upstream answered {}; parts kept for a retry",
                answer.status
            );
            self.state.mark_delivering(upload, false).await?;
            return Ok(Delivery {
                answer,
                retryable: true,
            });
        }
        answer.file = Some(DeliveredFile { meta, parts: file });
        // The upstream has the file, whatever happens here: never report a retryable failure
        // (a retry would send the file again).
        let recorded = self.state.save_answer(upload, &answer).await;
        match recorded {
            Ok(()) => {
                if let Err(e) = self.finish(upload).await {
                    log::error!("{upload:?}: delivered, but removing its parts failed: {e}");
                }
            }
            Err(e) => {
                log::error!(
                    "{upload:?}: delivered, but recording the answer failed ({e}); it is \
                     replayed from memory and recorded when storage allows"
                );
                self.unrecorded.insert(*upload, answer.clone());
            }
        }
        if let Err(e) = self.state.mark_delivering(upload, false).await {
            log::warn!("{upload:?}: clearing the delivery note failed: {e}");
        }
        Ok(Delivery {
            answer,
            retryable: false,
        })
    }

    /// The answer to the delivered file, if there is one for these fields and it has not
    /// expired. Otherwise the upload starts over (a new upload of the same file).
    async fn fresh_answer(
        &self,
        upload: &UploadKey,
        fields: &FieldsDigest,
    ) -> Result<Option<RecordedAnswer>, StoreError> {
        if let Some(entry) = self.unrecorded.get(upload) {
            return Ok(Some(entry.clone()));
        }
        match self.state.answer(upload).await? {
            Some((answer, at)) if answer.is_delivery() && self.applies(&answer, at, fields) => {
                Ok(Some(answer))
            }
            _ => Ok(None),
        }
    }

    /// Is a recorded answer still the answer for a request with these fields?
    fn applies(&self, answer: &RecordedAnswer, at: SystemTime, fields: &FieldsDigest) -> bool {
        !expired(at, self.result_ttl) && answer.fields == fields.0
    }

    /// Deletes uploads nobody touched within `upload_ttl`, answers older than `result_ttl`,
    /// and bytes no part uses. Returns how many uploads were removed.
    pub async fn sweep(&self) -> Result<usize, StoreError> {
        let mut removed = 0;
        let pending: Vec<UploadKey> = self.unrecorded.iter().map(|e| *e.key()).collect();
        for upload in pending {
            let _guard = self.locks.lock(upload).await;
            self.record_pending(&upload).await;
        }
        for upload in self.state.uploads().await? {
            match self.expire(&upload).await {
                Ok(true) => removed += 1,
                Ok(false) => {}
                Err(e) => log::error!("{upload:?}: expiry failed: {e}"),
            }
        }
        let orphans = self.chunks.collect_garbage().await?;
        if orphans > 0 {
            log::info!("deleted {orphans} stored chunks that no upload used");
        }
        Ok(removed)
    }
}

impl UploadCore {
    /// Expires one upload, under its lock (it may have moved on while the sweep waited).
    /// Returns whether the upload was removed.
    async fn expire(&self, upload: &UploadKey) -> Result<bool, StoreError> {
        let _guard = self.locks.lock(*upload).await;
        self.record_pending(upload).await;
        if self.unrecorded.contains_key(upload) {
            return Ok(false);
        }
        // A refusal keeps the upload going: it expires like an unfinished upload.
        let answered_at = match self.state.answer(upload).await? {
            Some((answer, at)) if answer.is_delivery() => Some(at),
            _ => None,
        };
        if let Some(at) = answered_at {
            if !expired(at, self.result_ttl) {
                return Ok(false);
            }
            if !self.chunks.parts(upload).await?.is_empty() {
                // The file is being uploaded again: only the old answer goes.
                self.state.remove_answer(upload).await?;
                return Ok(false);
            }
        } else {
            match self.state.last_activity(upload).await? {
                Some(at) if expired(at, self.upload_ttl) => {}
                _ => return Ok(false),
            }
        }
        self.chunks.remove_parts(upload).await?;
        self.state.remove(upload).await?;
        self.failures.remove(upload);
        Ok(true)
    }
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

#[derive(Debug, thiserror::Error)]
enum DeliverError {
    #[error("the upload is not complete")]
    Incomplete,
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn failure(status: u16, message: &str) -> Delivery {
    Delivery {
        answer: RecordedAnswer {
            status,
            headers: vec![("content-type".into(), "text/plain; charset=utf-8".into())],
            fields: String::new(),
            file: None,
            refused_for: None,
            body: Bytes::from(format!("{message}\n")),
        },
        retryable: true,
    }
}

/// Whether an upstream status ends the upload for good. Server errors, "try again later"
/// (408, 429) and "who are you" keep the parts so that a retry can deliver again.
pub fn is_final(status: u16) -> bool {
    !(status >= 500 || status == 408 || status == 429 || who_are_you(status))
}

/// Statuses that mean "who are you": an expired session or missing login, which a retry with
/// fresh credentials mends (401, 403, 407, and the 419 and 440 some frameworks send for an
/// expired session or CSRF token).
pub fn who_are_you(status: u16) -> bool {
    matches!(status, 401 | 403 | 407 | 419 | 440)
}

/// A stable `Idempotency-Key` for one delivery of one file: the same upload, fields,
/// credentials and bytes always give the same key, so an application that honours the header
/// can drop a delivery repeated after a crash.
fn idempotency_key(
    upload: &UploadKey,
    fields: &FieldsDigest,
    credentials: &Credentials,
    file: &[StoredPart],
) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"stitch delivery v1");
    hasher.update(upload.hex());
    hasher.update(&fields.0);
    hasher.update(&credentials.0);
    for part in file {
        hasher.update(part.len.to_be_bytes());
        hasher.update(part.digest);
    }
    hex::encode(&hasher.finalize()[..16])
}

fn expired(at: SystemTime, ttl: Duration) -> bool {
    at.elapsed().is_ok_and(|age| age > ttl)
}

fn check_pinned(pinned: &UploadMeta, declared: &UploadMeta) -> Result<(), CoreError> {
    let mismatch = |what: &str, was: &dyn std::fmt::Debug, now: &dyn std::fmt::Debug| {
        Err(CoreError::Conflict(format!(
            "{what} {now:?} disagrees with {was:?} declared by the upload's first chunk"
        )))
    };
    if pinned.chunk_size != declared.chunk_size {
        return mismatch("chunk size", &pinned.chunk_size, &declared.chunk_size);
    }
    if pinned.total_size != declared.total_size {
        return mismatch("total size", &pinned.total_size, &declared.total_size);
    }
    if pinned.file_name != declared.file_name {
        return mismatch("file name", &pinned.file_name, &declared.file_name);
    }
    if let (Some(was), Some(now)) = (&pinned.file_type, &declared.file_type) {
        if was != now {
            return mismatch("file type", was, now);
        }
    }
    Ok(())
}

/// If parts 1..=K are stored and part K ends exactly at the file's end, returns K.
fn complete_len(parts: &PartIndex, meta: &UploadMeta) -> Option<u64> {
    count_to_end(
        |n| parts.get(&n).map(|p| p.len),
        parts.len(),
        meta.total_size,
    )
}

/// Given part lengths (`None`: not stored) and how many parts there are, how many consecutive
/// parts from 1 end exactly at `total`?
fn count_to_end(len_of: impl Fn(u64) -> Option<u64>, parts: usize, total: u64) -> Option<u64> {
    let mut offset = 0u64;
    for number in 1..=parts as u64 {
        offset = offset.checked_add(len_of(number)?)?;
        if offset == total {
            return Some(number);
        }
        if offset > total {
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn an_upload_is_complete_when_consecutive_parts_reach_the_end() {
        let lens = |map: BTreeMap<u64, u64>| move |n| map.get(&n).copied();
        let both = BTreeMap::from([(1, 1000), (2, 1500)]);
        assert_eq!(count_to_end(lens(both), 2, 2500), Some(2));
        let gap = BTreeMap::from([(1, 1000), (3, 500)]);
        assert_eq!(count_to_end(lens(gap), 2, 2500), None);
    }

    #[test]
    fn an_empty_file_is_complete_with_its_one_empty_part() {
        assert_eq!(count_to_end(|n| (n == 1).then_some(0), 1, 0), Some(1));
        assert_eq!(count_to_end(|_| None, 0, 0), None);
    }

    #[test]
    fn server_errors_and_try_later_statuses_are_not_final() {
        assert!(is_final(200) && is_final(303) && is_final(422));
        assert!(!is_final(500) && !is_final(503) && !is_final(429) && !is_final(408));
    }
}
