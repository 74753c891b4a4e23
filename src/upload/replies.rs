//! Reply ordering: both clients report the body of the LAST response they receive for a file as
//! its success message, so the upstream's answer must be the last word. A request that answers
//! "chunk stored" holds a [`ReplyHold`] until its reply is sent; the request that completes the
//! upload sends the answer only after such replies, and a reply decided after the upload was
//! settled relays the answer itself.

use super::{FieldsDigest, UploadCore};
use crate::store::{RecordedAnswer, UploadKey};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// How long a completing request waits for earlier replies to go out.
const EARLIER_REPLIES_WAIT: Duration = Duration::from_secs(5);

/// The lead a reply that just went out gets over the answer.
pub(super) const LEAD: Duration = Duration::from_millis(100);

/// Replies to an upload's requests that are decided but not yet sent.
#[derive(Default)]
pub(super) struct PendingReplies {
    count: AtomicUsize,
    sent: Notify,
}

/// Held by a request that answers "chunk stored" until its answer is sent.
pub struct ReplyHold {
    core: Arc<UploadCore>,
    upload: UploadKey,
}

impl Drop for ReplyHold {
    fn drop(&mut self) {
        if let Some(pending) = self.core.replies.get(&self.upload) {
            if pending.count.fetch_sub(1, Ordering::SeqCst) == 1 {
                self.core
                    .recently_sent
                    .insert(self.upload, std::time::Instant::now());
                pending.sent.notify_waiters();
            }
        }
        self.core
            .replies
            .remove_if(&self.upload, |_, p| p.count.load(Ordering::SeqCst) == 0);
    }
}

impl UploadCore {
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

    /// Waits (briefly, at most) until no reply held for `upload` is still unsent. A reply
    /// that went out just now gets a moment's lead: replies on different connections that
    /// leave within the same instant may reach the client's event loop in either order.
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
        if let Some((_, at)) = self.recently_sent.remove(upload) {
            tokio::time::sleep(LEAD.saturating_sub(at.elapsed())).await;
        }
    }

    /// The upload's outcome if it has one by now: the answer of a delivery under way (waited
    /// for) or recorded. A chunk stored just before another request completed the upload must
    /// answer with it too.
    pub async fn settled(
        &self,
        upload: &UploadKey,
        fields: &FieldsDigest,
    ) -> Option<RecordedAnswer> {
        let flight = self.flights.get(upload).map(|f| f.clone());
        if let Some(mut flight) = flight {
            if let Ok(delivery) = flight.wait_for(|d| d.is_some()).await {
                return delivery.as_ref().and_then(|d| d.answer().cloned());
            }
        }
        self.fresh_answer(upload, fields).await.ok().flatten()
    }
}
