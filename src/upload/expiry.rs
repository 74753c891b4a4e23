//! Expiry: clients never say they gave up, so uploads idle for `upload_ttl` are deleted, and
//! answers older than `result_ttl` are forgotten. The sweep asks the state store for uploads
//! idle past a time (an index by last activity), never for a list of every upload.
//!
//! An upload whose lease is held is in use, not idle: a tus client sends a whole file in one
//! PATCH by default, which on a slow line runs for hours, and its upload is touched only when
//! the body ends. The sweep passes such an upload by (looking at it again an idle time later)
//! rather than wait for its lease, which would hold up the expiry of every other upload.

use super::{CoreError, UploadCore};
use crate::store::{Lease, UploadKey};
use std::time::Duration;

/// How long the sweep waits for an upload's lease held elsewhere (one of this process's
/// appends is passed by at once) before it takes the upload for busy: leases for a chunk or a
/// short request last milliseconds; one held longer is a body or a delivery under way. (The
/// sweep waits for each such upload in turn, and a graceful stop waits for the sweep.)
const BUSY_WAIT: Duration = Duration::from_millis(250);

/// How long a request to stop an append of another process is kept (see
/// `StateStore::forget_stop_requests`).
const STOP_REQUESTS_KEPT: Duration = Duration::from_secs(60);

impl UploadCore {
    /// Deletes uploads nobody touched within `upload_ttl`, answers older than `result_ttl`,
    /// and bytes no part uses. Returns how many uploads were removed.
    pub async fn sweep(&self) -> Result<usize, CoreError> {
        self.recently_sent
            .retain(|_, at| at.elapsed() < super::replies::LEAD);
        self.authorizations.forget_old();
        let pending: Vec<UploadKey> = self.unrecorded.iter().map(|e| *e.key()).collect();
        for upload in pending {
            // A busy one is recorded by the next sweep, or by whoever holds it.
            if let Some(lease) = self.lease_unless_busy(&upload).await? {
                self.record_pending(&upload, lease.fence).await;
            }
        }
        let now = self.clock.now();
        let before = now - self.ttls.upload.min(self.ttls.result);
        let mut removed = 0;
        for upload in self.engines.state.idle_since(before).await? {
            match self.expire(&upload).await {
                Ok(true) => removed += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::error!("{upload:?}: expiry failed: {e}");
                    // Looked at again by the next sweep.
                    self.engines.state.reindex(&upload, now).await?;
                }
            }
        }
        self.engines.state.prune_activity(before).await?;
        self.engines
            .state
            .forget_stop_requests(now - STOP_REQUESTS_KEPT)
            .await?;
        self.collect_garbage_now_and_then().await?;
        Ok(removed)
    }

    /// Expires one upload, under its lease (it may have moved on since the index said it was
    /// idle). Returns whether it was removed; one that stays is indexed again at its last
    /// activity.
    async fn expire(&self, upload: &UploadKey) -> Result<bool, CoreError> {
        self.expire_marked(upload, false).await
    }

    /// `expire`, with the upload's tombstone (if it has one) written already or not. The
    /// tombstone is written before the upload goes, so that a request finds one or the
    /// other (410), never neither (404); and without the upload's lease (a second lease held
    /// with it could deadlock two processes sweeping at once), so the upload is looked at
    /// again after it. One left beside an upload that moved on meanwhile is never looked at.
    async fn expire_marked(&self, upload: &UploadKey, marked: bool) -> Result<bool, CoreError> {
        let state = &self.engines.state;
        let Some(lease) = self.lease_unless_busy(upload).await? else {
            state.reindex(upload, self.clock.now()).await?;
            return Ok(false);
        };
        self.record_pending(upload, lease.fence).await;
        if self.unrecorded.contains_key(upload) {
            state.reindex(upload, self.clock.now()).await?;
            return Ok(false);
        }
        let Some(last) = state.last_activity(upload).await? else {
            // Removed already (by another process, or terminated).
            return Ok(false);
        };
        // A refusal keeps the upload going: it expires like an unfinished upload.
        let answered_at = match state.answer(upload).await? {
            Some((answer, at)) if answer.is_delivery() => Some(at),
            _ => None,
        };
        // When this upload is due, if it stays.
        let due = match answered_at {
            Some(at) if !self.expired(at, self.ttls.result) => Some(at + self.ttls.result),
            Some(_) if !state.parts(upload).await?.is_empty() => {
                // The file is being uploaded again: only the old answer goes. The parts kept
                // since its delivery are the new upload's only once it claims them.
                self.supersede(upload, None, lease.fence).await?;
                Some(last + self.ttls.upload)
            }
            Some(_) => None,
            None if self.expired(last, self.ttls.upload) => None,
            None => Some(last + self.ttls.upload),
        };
        if let Some(due) = due {
            // Found again by the first sweep after it is due (sweeps look `min_ttl` back).
            let min_ttl = self.ttls.upload.min(self.ttls.result);
            state.reindex(upload, due - min_ttl).await?;
            return Ok(false);
        }
        if !marked {
            if let Some(tombstone) = self.tombstone_of(upload).await? {
                drop(lease);
                self.save_alias(&tombstone, "expired").await?;
                return Box::pin(self.expire_marked(upload, true)).await;
            }
        }
        let released = state.remove_parts(upload, lease.fence).await?;
        self.release(released).await?;
        state.remove(upload, lease.fence).await?;
        self.failures.remove(upload);
        drop(lease);
        self.metrics.upload_event("expired");
        Ok(true)
    }

    /// The upload's lease, or `None` if it is in use: an append of this process is under way
    /// (the lease would be held until its body ends), or the lease stays held elsewhere.
    pub(super) async fn lease_unless_busy(
        &self,
        upload: &UploadKey,
    ) -> Result<Option<Lease>, CoreError> {
        if self.appends.running(upload) {
            return Ok(None);
        }
        match tokio::time::timeout(BUSY_WAIT, self.lock(upload)).await {
            Ok(lease) => Ok(Some(lease?)),
            Err(_) => Ok(None),
        }
    }

    /// [`collect_garbage`](Self::collect_garbage), unless the last collection ended less than
    /// `COLLECTION_PAUSE` times its own duration ago. The collection looks at every stored
    /// blob, which grows with the store, while the sweep's other work grows with what expires:
    /// 200,000 blobs took 5 to 12 s of CPU here, every sweep (a tenth of the shortest TTL),
    /// so a large store spent most of a core on it with short TTLs. Orphans are rare (a crash
    /// between keeping bytes and publishing the part, or a delete that failed), so they wait
    /// a little longer in a large store instead; a small store is still collected every sweep.
    async fn collect_garbage_now_and_then(&self) -> Result<(), CoreError> {
        /// At most about 1/`COLLECTION_PAUSE` of the time goes to collections.
        const COLLECTION_PAUSE: u32 = 100;
        let due = |next: &Option<std::time::Instant>| {
            next.is_none_or(|next| std::time::Instant::now() >= next)
        };
        if !due(&self.next_collection.lock().expect("collection")) {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let collected = self.collect_garbage().await;
        *self.next_collection.lock().expect("collection") =
            Some(std::time::Instant::now() + started.elapsed() * COLLECTION_PAUSE);
        collected
    }

    /// Deletes blobs no part references (left by a crash between keeping bytes and adding the
    /// part that uses them).
    async fn collect_garbage(&self) -> Result<(), CoreError> {
        let digests = self.engines.blobs.digests().await?;
        let orphans = self.engines.state.unreferenced(digests).await?;
        let count = orphans.len();
        self.release(orphans).await?;
        if count > 0 {
            tracing::info!("deleted {count} stored chunks that no upload used");
        }
        Ok(())
    }
}
