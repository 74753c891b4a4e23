//! Appends under way in this process, so that a newer request for an upload can take over
//! from an older one. A tus client whose connection went quiet (a phone that changed
//! networks) retries on a new connection while its old request is still open here, reading
//! a body that will never come and holding the upload's lease until the body timeout. The
//! newer request asks that append to stop reading: it keeps the bytes that arrived, as a body
//! that broke off does, and lets the lease go. The newest request for an upload wins: a PATCH,
//! a HEAD (a client resumes by asking for the offset first) or a termination. An append in
//! another process sharing the storage is asked through the state store: a PATCH or a
//! termination that finds the lease held for a moment asks (`ask_to_stop`), and a running
//! append looks for such a request twice a second. (A HEAD there reports what is stored; the
//! PATCH that follows asks, and is told the offset moved.)
//!
//! A graceful shutdown (or upgrade) stops every append the same way: a tus client sending a
//! whole file in one PATCH keeps what arrived and resumes (on the new process, or once this
//! one is back) instead of losing the whole body when the process exits.

use crate::store::{BodyError, BodySource, StateStore, UploadKey};
use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;

#[derive(Default)]
pub(super) struct Appends {
    running: DashMap<UploadKey, Arc<Stop>>,
    /// The process is shutting down: every append stops, and a new one stops at once.
    stopping: AtomicBool,
}

/// The request to stop, for one append: why, once asked.
#[derive(Default)]
struct Stop {
    asked: AtomicU8,
    notify: Notify,
}

const RUNNING: u8 = 0;
const TAKEN_OVER: u8 = 1;
const SHUTTING_DOWN: u8 = 2;

impl Stop {
    fn ask(&self, why: u8) {
        // The first reason stands.
        let _ = self
            .asked
            .compare_exchange(RUNNING, why, Ordering::SeqCst, Ordering::SeqCst);
        self.notify.notify_one();
    }

    /// Why the append was asked to stop, if it was.
    fn asked(&self) -> Option<BodyError> {
        match self.asked.load(Ordering::SeqCst) {
            RUNNING => None,
            TAKEN_OVER => Some(BodyError::Interrupted),
            _ => Some(BodyError::ShuttingDown),
        }
    }
}

/// An append's place in [`Appends`], given up when dropped (unless a newer one took it).
pub(super) struct Running<'a> {
    appends: &'a Appends,
    upload: UploadKey,
    stop: Arc<Stop>,
    /// When the request arrived: a request to stop from another process counts only if it
    /// came from a request that arrived later.
    pub(super) arrived: std::time::SystemTime,
}

impl Running<'_> {
    /// The append's body, ending once a newer request asks it to stop.
    pub(super) fn wrap<'b>(&self, body: &'b mut dyn BodySource) -> Interruptible<'b> {
        Interruptible {
            body,
            stop: Arc::clone(&self.stop),
        }
    }

    /// Watches for a newer request of another process sharing the storage, which asks through
    /// the state store ([`StateStore::ask_to_stop`], stamped with the asker's arrival): looked
    /// at every half second while the append runs, and stopped when dropped. Only a request
    /// that arrived after this one counts (not its own, nor an older one's); a stamp in the
    /// future (the clock was set back) is not believed.
    pub(super) fn watch_other_processes(&self, state: Arc<dyn StateStore>) -> Watching {
        let (stop, upload, arrived) = (Arc::clone(&self.stop), self.upload, self.arrived);
        let watching = tokio::spawn(async move {
            loop {
                tokio::time::sleep(WATCH_EVERY).await;
                if let Ok(Some(asked)) = state.stop_asked(&upload).await {
                    if asked > arrived && asked <= std::time::SystemTime::now() {
                        stop.ask(TAKEN_OVER);
                        return;
                    }
                }
            }
        })
        .abort_handle();
        Watching(watching)
    }
}

/// The watch of [`Running::watch_other_processes`], ended when dropped.
pub(super) struct Watching(tokio::task::AbortHandle);

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How often a running append looks for a request to stop from another process.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.appends
            .running
            .remove_if(&self.upload, |_, stop| Arc::ptr_eq(stop, &self.stop));
    }
}

impl Appends {
    /// Asks the append under way for `upload`, if any, to stop reading. True if there was one.
    pub(super) fn interrupt(&self, upload: &UploadKey) -> bool {
        match self.running.get(upload) {
            Some(stop) => {
                stop.ask(TAKEN_OVER);
                true
            }
            None => false,
        }
    }

    /// Whether an append for `upload` is under way (or waiting for the lease).
    pub(super) fn running(&self, upload: &UploadKey) -> bool {
        self.running.contains_key(upload)
    }

    /// Stops every append, now and from now on (the process is shutting down).
    pub(super) fn stop_all(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for entry in self.running.iter() {
            entry.value().ask(SHUTTING_DOWN);
        }
    }

    /// Stops the append under way for `upload`, if any, and enters a new one (which a later
    /// request may stop in turn, even while it still waits for the lease).
    pub(super) fn take_over(&self, upload: &UploadKey) -> Running<'_> {
        let stop = Arc::new(Stop::default());
        if let Some(older) = self.running.insert(*upload, stop.clone()) {
            older.ask(TAKEN_OVER);
        }
        // (Checked after the entry is in: `stop_all` sees it, or this sees the flag.)
        if self.stopping.load(Ordering::SeqCst) {
            stop.ask(SHUTTING_DOWN);
        }
        Running {
            appends: self,
            upload: *upload,
            stop,
            arrived: std::time::SystemTime::now(),
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
        if let Some(why) = self.stop.asked() {
            return Err(why);
        }
        tokio::select! {
            biased;
            () = self.stop.notify.notified() => {
                Err(self.stop.asked().unwrap_or(BodyError::Interrupted))
            }
            piece = self.body.next_piece() => piece,
        }
    }
}
