//! The upload core: protocol-neutral operations on uploads, and the state machine behind them.
//!
//! ```text
//! receiving ──(last missing part stored)──► complete ──(one delivery at a time)──► delivered
//!     ▲                                         │                                (answer recorded,
//!     └──── upstream failed (5xx, 408, 429, unreachable, "who are you"): parts kept ◄┘ parts removed)
//! ```
//!
//! Protocol adapters call one operation per protocol verb: "is part P of upload U stored?"
//! ([`UploadCore::status`]), "store these bytes as part P of U" ([`UploadCore::put_part`]),
//! "create U" / "append at offset" / "where is U" / "terminate U" (tus), "deliver U", and
//! map the typed results ([`CoreError`], [`PartStatus`], [`Delivery`]) to their own statuses.
//! They never see storage: the core talks to the engines ([`crate::store`]) and the forwarder
//! ([`crate::forward::Forward`]) only through traits.
//!
//! # Exactly once
//!
//! Every change to an upload (its metadata, parts, answer, delivery) happens under the upload's
//! lease from the [`Locker`](crate::store::Locker), and carries the lease's fencing token, which
//! the state store checks: a holder whose lease ran out (a stalled process, on an engine whose
//! leases expire) is refused, so two processes never both change one upload.
//!
//! - A part is visible only once its bytes are kept and the part is added, both under the
//!   lease; a crash in between leaves an unreferenced blob, collected later.
//! - Delivery happens under the lease: it reads the parts, sends the file, records the answer
//!   and removes the parts before letting go. Whoever takes the lease next finds either the
//!   answer (and replays it) or the parts (the delivery did not finish: it is retried).
//!   Within a process, deliveries are also single-flight: requests completing an upload at once
//!   share one delivery and its answer.
//! - The one window no lock closes: from the last byte of a delivery written to the upstream
//!   until its answer is recorded. If the process dies there, the next delivery repeats the
//!   file (logged "in doubt"; the `Idempotency-Key` header lets an application drop it).

mod authorize;
mod delivery;
mod early;
mod error;
mod expiry;
mod listing;
mod parts;
mod queue;
mod replies;
mod takeover;

pub use authorize::Authorization;
pub use delivery::{Delivery, Outcome};
pub use error::CoreError;
pub use listing::{Inventory, Listed};
pub use parts::{Appended, Progress};
pub use replies::ReplyHold;

use crate::drain::InFlight;
use crate::forward::Forward;
use crate::store::{Engines, Lease, LockKey, RecordedAnswer, StoreError, UploadKey};
use dashmap::DashMap;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// How long a lease is taken for. Engines whose leases can expire renew them while they are
/// held; this bounds how long a dead holder keeps an upload locked.
const LEASE: Duration = Duration::from_secs(30);

/// One part as a request declares it.
#[derive(Debug, Clone, Copy)]
pub struct PartRef {
    /// 1-based.
    pub number: u64,
    /// Bytes the part holds.
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
    /// The upload was delivered and this part's bytes are the delivered ones: this is the
    /// upstream's answer, replayed.
    Delivered(Box<RecordedAnswer>),
}

/// Time, as the core sees it (tests move it by hand).
pub trait Clock: Send + Sync {
    fn now(&self) -> SystemTime;
}

/// The system's clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// How long things last.
#[derive(Debug, Clone, Copy)]
pub struct Ttls {
    /// Unfinished uploads idle this long are deleted.
    pub upload: Duration,
    /// A delivered file's answer is replayed this long.
    pub result: Duration,
}

pub struct UploadCore {
    engines: Engines,
    forwarder: Arc<dyn Forward>,
    clock: Arc<dyn Clock>,
    ttls: Ttls,
    /// Deliveries under way in this process, by upload (see `delivery`).
    flights: DashMap<UploadKey, delivery::Flight>,
    /// Replies decided but not sent yet, by upload (see `replies`).
    replies: DashMap<UploadKey, Arc<replies::PendingReplies>>,
    /// When an upload's held replies were last all sent (the answer gives them a lead).
    recently_sent: DashMap<UploadKey, std::time::Instant>,
    /// Each upload's last failed delivery attempt and when it ended (for `retry_pause`, and
    /// for requests that arrived while it was under way).
    failures: DashMap<UploadKey, (Instant, Arc<delivery::Delivery>)>,
    /// Answers to delivered files that could not be written down yet (a full disk). They are
    /// replayed from here, and written again (then the parts removed) by the next request for
    /// the upload or the sweep, whichever comes first.
    unrecorded: DashMap<UploadKey, RecordedAnswer>,
    /// Deliveries run in tasks of their own; a graceful shutdown waits for them.
    in_flight: InFlight,
    /// Delivered uploads whose answer was given while their parts are being removed.
    cleanups: InFlight,
    /// Queued deliveries this process may run at once (see `queue`).
    queue_slots: Arc<tokio::sync::Semaphore>,
    /// Queued uploads whose route the config no longer has (warned about once).
    unroutable: DashMap<UploadKey, ()>,
    /// The authorization hook's final answers, by upload, and when they came.
    authorizations: authorize::Kept,
    /// Uploads whose early delivery began in this process, and when (see `early`).
    early_begun: DashMap<UploadKey, Instant>,
    /// Early deliveries under way, woken when a part of their upload is stored.
    early_watch: DashMap<UploadKey, tokio::sync::watch::Sender<u64>>,
    /// Early deliveries each route may run at once, by route id.
    early_slots: DashMap<String, Arc<tokio::sync::Semaphore>>,
    /// Appends under way in this process (a newer request for the upload stops them).
    appends: takeover::Appends,
    /// When the sweep may next look for blobs no part uses (see `expiry`).
    next_collection: std::sync::Mutex<Option<std::time::Instant>>,
    /// What happens to uploads, counted (the server exposes them).
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl UploadCore {
    pub fn new(
        engines: Engines,
        forwarder: Arc<dyn Forward>,
        clock: Arc<dyn Clock>,
        ttls: Ttls,
        in_flight: InFlight,
    ) -> UploadCore {
        UploadCore {
            engines,
            forwarder,
            clock,
            ttls,
            flights: DashMap::new(),
            replies: DashMap::new(),
            recently_sent: DashMap::new(),
            next_collection: std::sync::Mutex::default(),
            failures: DashMap::new(),
            unrecorded: DashMap::new(),
            in_flight,
            cleanups: InFlight::default(),
            queue_slots: Arc::new(tokio::sync::Semaphore::new(queue::QUEUE_SLOTS)),
            unroutable: DashMap::new(),
            authorizations: authorize::Kept::default(),
            early_begun: DashMap::new(),
            early_watch: DashMap::new(),
            early_slots: DashMap::new(),
            appends: takeover::Appends::default(),
            metrics: Arc::new(crate::metrics::Metrics::new()),
        }
    }

    /// Delivered uploads whose parts are being removed after their answer was given (tests
    /// wait for none before they look at storage).
    pub fn cleanups(&self) -> InFlight {
        self.cleanups.clone()
    }

    /// Stops every append under way, and any that starts from now on (a graceful shutdown):
    /// each keeps the bytes that arrived and ends with [`BodyError::ShuttingDown`](crate::store::BodyError::ShuttingDown).
    pub fn stop_appends(&self) {
        self.appends.stop_all();
    }

    /// Takes the upload's lease for a request that arrived at `arrived`, asking an append of
    /// another process that holds it to stop if it is not free within a moment (see
    /// `takeover`). The wait keeps its place meanwhile.
    async fn lock_asking(
        &self,
        upload: &UploadKey,
        arrived: SystemTime,
    ) -> Result<Lease, StoreError> {
        const ASK_AFTER: Duration = Duration::from_millis(200);
        let lock = self.lock(upload);
        tokio::pin!(lock);
        if let Ok(lease) = tokio::time::timeout(ASK_AFTER, &mut lock).await {
            return lease;
        }
        let (state, key) = (self.engines.state.clone(), *upload);
        tokio::spawn(async move {
            if let Err(e) = state.ask_to_stop(&key, arrived).await {
                tracing::warn!("{key:?}: could not ask the lease's holder to stop: {e}");
            }
        });
        lock.await
    }

    /// Takes the upload's lease.
    async fn lock(&self, upload: &UploadKey) -> Result<Lease, StoreError> {
        self.engines
            .locker
            .lock(LockKey::Upload(*upload), LEASE)
            .await
    }

    /// Whether storage takes a write now (readiness): stages one byte and lets it go (an empty
    /// file would still be created on a full disk).
    pub async fn check_store(&self) -> Result<(), StoreError> {
        struct OneByte(bool);
        #[async_trait::async_trait]
        impl crate::store::BodySource for OneByte {
            async fn next_piece(
                &mut self,
            ) -> Result<Option<bytes::Bytes>, crate::store::BodyError> {
                Ok(
                    (!std::mem::replace(&mut self.0, true))
                        .then(|| bytes::Bytes::from_static(b"?")),
                )
            }
        }
        let staged = self.engines.blobs.stage(&mut OneByte(false), 1).await?;
        let cut = staged.cut.clone();
        self.engines.blobs.discard(staged).await;
        match cut {
            None => Ok(()),
            Some(cut) => Err(StoreError::Io(std::io::Error::other(format!(
                "a one-byte write was cut: {cut:?}"
            )))),
        }
    }

    /// When an upload touched now expires if nothing touches it again.
    pub fn expires_if_idle(&self) -> SystemTime {
        self.clock.now() + self.ttls.upload
    }

    fn expired(&self, at: SystemTime, ttl: Duration) -> bool {
        self.clock
            .now()
            .duration_since(at)
            .is_ok_and(|age| age > ttl)
    }
}
