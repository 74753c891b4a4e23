//! Appends under way in this process, so that a newer request for an upload can take over
//! from an older one. A tus client whose connection went quiet (a phone that changed
//! networks) retries on a new connection while its old request is still open here, reading
//! a body that will never come and holding the upload's lease until the body timeout. The
//! newer request asks that append to stop reading: it keeps the bytes that arrived, as a body
//! that broke off does, and lets the lease go. The newest request for an upload wins: a PATCH,
//! a HEAD (a client resumes by asking for the offset first) or a termination. Only appends
//! of this process are seen: one running in another process on the same storage still holds
//! the lease until its body ends or times out.

use crate::store::{BodyError, BodySource, UploadKey};
use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;

#[derive(Default)]
pub(super) struct Appends(DashMap<UploadKey, Arc<Stop>>);

/// The request to stop, for one append.
#[derive(Default)]
struct Stop {
    asked: AtomicBool,
    notify: Notify,
}

impl Stop {
    fn ask(&self) {
        self.asked.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }
}

/// An append's place in [`Appends`], given up when dropped (unless a newer one took it).
pub(super) struct Running<'a> {
    appends: &'a Appends,
    upload: UploadKey,
    stop: Arc<Stop>,
}

impl Running<'_> {
    /// The append's body, ending once a newer request asks it to stop.
    pub(super) fn wrap<'b>(&self, body: &'b mut dyn BodySource) -> Interruptible<'b> {
        Interruptible {
            body,
            stop: Arc::clone(&self.stop),
        }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.appends
            .0
            .remove_if(&self.upload, |_, stop| Arc::ptr_eq(stop, &self.stop));
    }
}

impl Appends {
    /// Asks the append under way for `upload`, if any, to stop reading. True if there was one.
    pub(super) fn interrupt(&self, upload: &UploadKey) -> bool {
        match self.0.get(upload) {
            Some(stop) => {
                stop.ask();
                true
            }
            None => false,
        }
    }

    /// Whether an append for `upload` is under way (or waiting for the lease).
    pub(super) fn running(&self, upload: &UploadKey) -> bool {
        self.0.contains_key(upload)
    }

    /// Stops the append under way for `upload`, if any, and enters a new one (which a later
    /// request may stop in turn, even while it still waits for the lease).
    pub(super) fn take_over(&self, upload: &UploadKey) -> Running<'_> {
        let stop = Arc::new(Stop::default());
        if let Some(older) = self.0.insert(*upload, stop.clone()) {
            older.ask();
        }
        Running {
            appends: self,
            upload: *upload,
            stop,
        }
    }
}

/// A body that ends with [`BodyError::Interrupted`] once its append is asked to stop.
pub(super) struct Interruptible<'b> {
    body: &'b mut dyn BodySource,
    stop: Arc<Stop>,
}

#[async_trait]
impl BodySource for Interruptible<'_> {
    async fn next_piece(&mut self) -> Result<Option<Bytes>, BodyError> {
        if self.stop.asked.load(Ordering::SeqCst) {
            return Err(BodyError::Interrupted);
        }
        tokio::select! {
            biased;
            () = self.stop.notify.notified() => Err(BodyError::Interrupted),
            piece = self.body.next_piece() => piece,
        }
    }
}
