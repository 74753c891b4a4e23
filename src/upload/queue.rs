//! The delivery queue: every complete file owes the upstream one delivery, and the queue keeps
//! that debt durably until an answer stands (2xx, or a refusal a retry would not change).
//!
//! An entry is written (under the upload's lease) before the file is sent and removed when the
//! answer is final; a failure leaves it with a later due time. The background worker
//! ([`UploadCore::deliver_due`]) retries what is due with backoff, so a file is delivered even
//! when its client left, when the upstream was down at completion, or when the process was
//! killed mid-delivery (after a restart the entry is still there). Retries go through
//! [`UploadCore::deliver`]: single-flight, under the lease, recorded answers replayed, so the
//! queue never sends a file twice that the other paths would not.

use super::UploadCore;
use crate::config::ForwardConfig;
use crate::forward::DeliveryRequest;
use crate::store::{Fence, QueuedDelivery, UploadKey};
use http::HeaderValue;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// The longest pause between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);

/// How many queued deliveries one process runs at once.
pub(super) const QUEUE_SLOTS: usize = 4;

/// The pause before attempt `attempts + 1`: `retry_pause`, doubled per attempt, at most
/// [`MAX_BACKOFF`].
fn backoff(retry_pause: Duration, attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(20);
    retry_pause
        .saturating_mul(1 << doublings)
        .min(MAX_BACKOFF)
        .max(retry_pause.min(MAX_BACKOFF))
}

fn millis(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl QueuedDelivery {
    fn of(request: &DeliveryRequest) -> QueuedDelivery {
        QueuedDelivery {
            route: request.route.clone(),
            fields: request.fields.clone(),
            headers: request
                .headers
                .iter()
                .map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec()))
                .collect(),
            host: request.host.as_ref().map(|h| h.as_bytes().to_vec()),
            attempts: 0,
            due_ms: 0,
        }
    }

    fn request(&self) -> DeliveryRequest {
        DeliveryRequest {
            fields: self.fields.clone(),
            headers: DeliveryRequest::parse_headers(&self.headers),
            host: self
                .host
                .as_ref()
                .and_then(|h| HeaderValue::from_bytes(h).ok()),
            route: self.route.clone(),
        }
    }
}

impl UploadCore {
    /// Writes the upload's queue entry before an attempt: one more attempt, the next due after
    /// the backoff. Under the upload's lease. A failure to write it (a full disk) does not stop
    /// the attempt: the client's own retries still deliver.
    pub(super) async fn queue_attempt(
        &self,
        upload: &UploadKey,
        request: &DeliveryRequest,
        forward: &ForwardConfig,
        fence: Fence,
    ) {
        let state = &self.engines.state;
        let attempts = match state.queued(upload).await {
            Ok(entry) => entry.map_or(0, |e| e.attempts),
            Err(_) => 0,
        } + 1;
        let entry = QueuedDelivery {
            attempts,
            due_ms: millis(self.clock.now() + backoff(forward.retry_pause, attempts)),
            ..QueuedDelivery::of(request)
        };
        if attempts == 1 {
            // Every byte is there, and the first attempt to deliver it starts.
            self.metrics.upload_event("completed");
        }
        if let Err(e) = state.queue(upload, &entry, fence).await {
            tracing::warn!("{upload:?}: the delivery could not be queued ({e}); sending it anyway");
        }
    }

    /// Removes the upload's queue entry: its answer stands. Under the upload's lease.
    pub(super) async fn unqueue(&self, upload: &UploadKey, fence: Fence) {
        if let Err(e) = self.engines.state.unqueue(upload, fence).await {
            // The worker tries again, finds the answer recorded and removes it then.
            tracing::warn!("{upload:?}: removing the delivered file from the queue failed: {e}");
        }
    }

    /// Starts the queued deliveries that are due, each with the forward settings its route has
    /// now (`forward_for` maps a route id to them), at most a few at once in this process.
    /// Returns how many it started; they go on in tasks of their own.
    pub async fn deliver_due(
        self: &Arc<Self>,
        forward_for: &(dyn Fn(&str) -> Option<ForwardConfig> + Sync),
    ) -> Result<usize, super::CoreError> {
        let now = millis(self.clock.now());
        let mut started = 0;
        let queued = self.engines.state.all_queued().await?;
        self.metrics.queue_length.set(queued.len() as i64);
        for (upload, entry) in queued {
            if entry.due_ms > now || self.flights.contains_key(&upload) {
                continue;
            }
            let Some(forward) = forward_for(&entry.route) else {
                if self.unroutable.insert(upload, ()).is_none() {
                    tracing::warn!(
                        "{upload:?}: a queued delivery names route `{}`, which the config no \
                         longer has; it stays queued until the upload expires",
                        entry.route
                    );
                }
                continue;
            };
            let Ok(slot) = Arc::clone(&self.queue_slots).try_acquire_owned() else {
                break;
            };
            tracing::info!(
                "{upload:?}: delivering from the queue (attempt {})",
                entry.attempts + 1
            );
            let core = Arc::clone(self);
            tokio::spawn(async move {
                let _slot = slot;
                core.deliver(upload, &forward, entry.request(), Instant::now())
                    .await;
            });
            started += 1;
        }
        Ok(started)
    }

    /// Queues a complete upload's delivery to be made at once, unless it is queued already,
    /// under way or delivered (for a protocol that learns of a complete, undelivered upload
    /// without a request that would deliver it, such as a tus HEAD after a crash). Never waits
    /// for a delivery under way: it holds the upload's lease while the application takes the
    /// file (minutes, for a slow one), and records or queues its own outcome.
    pub async fn ensure_queued(
        &self,
        upload: &UploadKey,
        request: &DeliveryRequest,
    ) -> Result<(), super::CoreError> {
        if self.flights.contains_key(upload) || self.queued_or_answered(upload).await? {
            return Ok(());
        }
        // Held for long: a delivery under way in another process.
        let Some(lease) = self.lease_unless_busy(upload).await? else {
            return Ok(());
        };
        if self.queued_or_answered(upload).await? {
            return Ok(());
        }
        let entry = QueuedDelivery {
            due_ms: millis(self.clock.now()),
            ..QueuedDelivery::of(request)
        };
        self.engines
            .state
            .queue(upload, &entry, lease.fence)
            .await?;
        Ok(())
    }

    async fn queued_or_answered(&self, upload: &UploadKey) -> Result<bool, super::CoreError> {
        Ok(self.engines.state.queued(upload).await?.is_some()
            || self.recorded_answer(upload).await?.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_retry_pause_up_to_the_cap() {
        let pause = Duration::from_secs(2);
        assert_eq!(backoff(pause, 1), pause);
        assert_eq!(backoff(pause, 2), Duration::from_secs(4));
        assert_eq!(backoff(pause, 4), Duration::from_secs(16));
        assert_eq!(backoff(pause, 30), MAX_BACKOFF);
        assert_eq!(backoff(Duration::from_secs(900), 1), MAX_BACKOFF);
    }
}
