//! Early delivery (`forward.early`): the core's side. While an upload of known length arrives,
//! a task hands its stored parts, in order, to the forwarder, which sends them as the start of
//! the delivery request (see `crate::forward::early`). Nothing of the exactly-once argument
//! changes: the request's end is written only by the delivery, under the upload's lease, after
//! the same checks as any delivery; a stream that is not finished that way is cut off, and the
//! upload is delivered whole once complete.

use super::delivery::{idempotency_key, UploadParts};
use super::{Credentials, FieldsDigest, UploadCore};
use crate::config::ForwardConfig;
use crate::forward::{DeliveryRequest, EarlyBegin, EarlyEnd, PartFeed, PartReader};
use crate::store::{StoredPart, StoredReader, UploadKey};
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How often a waiting stream looks for a part stored by another process (parts stored by
/// this one wake it at once).
const POLL: Duration = Duration::from_millis(250);

/// Uploads remembered as streamed before this many are forgotten (the oldest first).
const REMEMBERED: usize = 4096;

impl UploadCore {
    /// Begins delivering `upload` while it arrives, if `forward.early` asks for it, its length
    /// is known, and no stream for it began in this process before (a stream cut off because
    /// its client paused is not begun again: the upload is delivered once complete). At most
    /// `forward.early.streams` streams per route at once; uploads beyond them are delivered
    /// once complete. Returns at once; the stream runs in a task of its own.
    pub async fn begin_early(
        self: &Arc<Self>,
        upload: UploadKey,
        forward: &ForwardConfig,
        request: DeliveryRequest,
    ) {
        let Some(early) = forward.early else {
            return;
        };
        if self.early_begun(&upload) {
            return;
        }
        let slots = self
            .early_slots
            .entry(request.route.clone())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(early.streams)))
            .clone();
        let Ok(permit) = slots.try_acquire_owned() else {
            return;
        };
        let meta = match self.engines.state.meta(&upload).await {
            Ok(Some(meta)) => meta,
            _ => return,
        };
        if !meta.carried.is_empty() {
            // Kept parts of a delivered file may still give way to the client's own bytes
            // (see `drop_unclaimed`): this upload is delivered once complete.
            return;
        }
        let (Some(length), Some(_)) = (meta.length, meta.origin.as_ref()) else {
            // The length is not known yet, or the upload predates the keys early delivery
            // needs (see `idempotency_key`).
            return;
        };
        if length == 0 {
            return;
        }
        match self.early_begun.entry(upload) {
            dashmap::Entry::Occupied(_) => return,
            dashmap::Entry::Vacant(entry) => {
                entry.insert(Instant::now());
            }
        }
        if self.early_begun.len() > REMEMBERED {
            let horizon = Instant::now() - self.ttls.upload.min(Duration::from_secs(3600));
            self.early_begun.retain(|_, at| *at > horizon);
        }
        let (stored, changes) = watch::channel(0u64);
        self.early_watch.insert(upload, stored);
        let core = Arc::clone(self);
        let forward = forward.clone();
        let streaming = async move {
            let _permit = permit;
            let fields = FieldsDigest::of(&request.fields);
            let credentials = Credentials::of(&request.headers);
            let key = idempotency_key(&upload, &fields, &credentials, &meta, &[]);
            let feed = Feed {
                core: &core,
                upload,
                stall: early.stall,
                changes: tokio::sync::Mutex::new(changes),
            };
            let begin = EarlyBegin {
                upload: &upload,
                meta: &meta,
                forward: &forward,
                request: &request,
                idempotency_key: &key,
                length,
                stall: early.stall,
            };
            let end = core.forwarder.send_early(begin, &feed).await;
            core.early_watch.remove(&upload);
            if !matches!(end, EarlyEnd::Busy | EarlyEnd::Unsupported) {
                core.metrics.early.with_label_values(&[end.label()]).inc();
            }
            tracing::debug!("{upload:?}: early delivery ended: {}", end.label());
        };
        let span = tracing::info_span!("early delivery", upload = %upload.short());
        tokio::spawn(tracing::Instrument::instrument(streaming, span));
    }

    /// Did an early delivery of `upload` begin in this process (whatever became of it)?
    pub fn early_begun(&self, upload: &UploadKey) -> bool {
        self.early_begun.contains_key(upload)
    }

    /// Wakes the early delivery waiting for `upload`'s next part, if there is one.
    pub(super) fn part_stored(&self, upload: &UploadKey) {
        if let Some(stored) = self.early_watch.get(upload) {
            stored.send_modify(|count| *count += 1);
        }
    }
}

/// One upload's parts as they are stored.
struct Feed<'a> {
    core: &'a UploadCore,
    upload: UploadKey,
    stall: Duration,
    changes: tokio::sync::Mutex<watch::Receiver<u64>>,
}

#[async_trait]
impl PartFeed for Feed<'_> {
    async fn next(&self, number: u64) -> Option<(StoredPart, StoredReader)> {
        let deadline = Instant::now() + self.stall;
        let mut changes = self.changes.lock().await;
        loop {
            changes.borrow_and_update();
            let parts = self.core.engines.state.parts(&self.upload).await.ok()?;
            if let Some(part) = parts.get(&number) {
                let reader = UploadParts {
                    engines: &self.core.engines,
                    upload: self.upload,
                };
                return match reader.open(part).await {
                    Ok(read) => Some((*part, read)),
                    Err(e) => {
                        tracing::info!("{:?}: part {number} cannot be read: {e}", self.upload);
                        None
                    }
                };
            }
            // Terminated (or expired) meanwhile: the stream is cut now, not after `stall`.
            if matches!(self.core.engines.state.meta(&self.upload).await, Ok(None)) {
                return None;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            let wait = (deadline - now).min(POLL);
            let _ = tokio::time::timeout(wait, changes.changed()).await;
        }
    }
}
