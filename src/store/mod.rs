//! Storage, behind three small interfaces, each engine in its own file:
//!
//! - [`BlobStore`]: content-addressed bytes. Bytes are staged (streamed in and hashed), then
//!   kept under their BLAKE3 hash, so identical bytes are stored once; read back streamed.
//! - [`StateStore`]: what is known about each upload: its pinned metadata, its part index
//!   (which blob is part N), the recorded answer, its last activity (with an index to find idle
//!   uploads without listing them all), and how many parts reference each blob.
//! - [`Locker`]: per-upload (and per-blob) mutual exclusion as leases with fencing tokens.
//!
//! [`open`] is the one place that picks the engines a config names: `fs` (local disk, the
//! default; `fs/`) or `memory` (tests; `memory.rs`). The upload core knows storage only through
//! the traits: it never assumes hard links, paths, fsync or a single process.
//!
//! Every path an engine uses is derived from an [`UploadKey`] or a content digest, never from a
//! client-supplied string.

pub mod fs;
mod index;
pub mod memory;

pub use index::PartIndex;

use crate::config::{EngineConfig, StorageConfig};
use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The BLAKE3 hash of some bytes: the name of a blob. (Stores written before BLAKE3 named
/// blobs by their SHA-256; a part records its blob's name, so those are still read. Bytes
/// stored under both names are kept twice until the uploads that hold them end.)
pub type Digest = [u8; 32];

/// The identity of one upload: a hash of the route, the user's scope and the client's identifier.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UploadKey([u8; 32]);

impl UploadKey {
    /// Each component is length-prefixed so that no two different tuples hash alike.
    pub fn derive(components: &[&[u8]]) -> UploadKey {
        let mut hasher = Sha256::new();
        for c in components {
            hasher.update((c.len() as u64).to_be_bytes());
            hasher.update(c);
        }
        UploadKey(hasher.finalize().into())
    }

    /// A key made of random bytes (uploads whose URL is their identity, such as tus).
    pub fn random() -> UploadKey {
        UploadKey(rand::random())
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Twelve hex digits: enough to tell uploads apart in logs, and nothing a client sent.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }

    pub fn from_hex(text: &str) -> Option<UploadKey> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(UploadKey(bytes))
    }
}

impl fmt::Debug for UploadKey {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "upload:{}", self.short())
    }
}

/// What an upload declared about its file, pinned when the upload starts; later requests must
/// agree. `protocol` belongs to the protocol that created the upload (chunk size and the like):
/// the core and the engines store it without reading it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadMeta {
    /// The file's size, if known yet (tus may declare it later).
    pub length: Option<u64>,
    pub name: String,
    /// The MIME type, if the client said one.
    pub media_type: Option<String>,
    #[serde(default)]
    pub protocol: serde_json::Value,
    /// Where the upload came from, for operators (the admin listing); never compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Box<Origin>>,
    /// The parts, in order, that this upload kept from the delivered file of its identifier
    /// when it began and that none of its requests has claimed since (see
    /// `UploadCore::drop_unclaimed`); never compared.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub carried: Vec<u64>,
}

/// Where an upload came from: its route, protocol, a short hash of its scope, when it started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The route's label (its configured host and path).
    pub route: String,
    pub protocol: String,
    /// Twelve hex digits of a hash of the route and the user's scope ("" when unscoped).
    pub scope: String,
    /// When the upload started, in milliseconds since the epoch.
    pub started_ms: u64,
}

impl UploadMeta {
    /// Does a request declaring `other` belong to the upload that pinned `self`? A type
    /// missing on either side does not disagree (Flow.js sends none with some requests).
    pub fn agrees_with(&self, other: &UploadMeta) -> bool {
        let types_agree = match (&self.media_type, &other.media_type) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        self.length == other.length
            && self.name == other.name
            && self.protocol == other.protocol
            && types_agree
    }
}

/// The upstream's answer to an upload, recorded so that it can be replayed.
///
/// Two kinds: the answer to a delivered file (`file` says which file it was, so that a later
/// chunk can prove it carries the same one), and a refusal that means "who are you" (401, 403,
/// ...: `refused_for` is the digest of the credentials it was given; the parts are kept and a
/// request with other credentials delivers again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Digest of the application fields the upstream was sent (see `upload::FieldsDigest`).
    #[serde(default)]
    pub fields: String,
    /// The file the upstream received (a delivered file's answer only).
    #[serde(default)]
    pub file: Option<DeliveredFile>,
    /// Digest of the credentials of a "who are you" refusal (see `upload::Credentials`).
    #[serde(default)]
    pub refused_for: Option<String>,
    #[serde(skip)]
    pub body: Bytes,
}

impl RecordedAnswer {
    /// Is this the answer to a delivered file (not a refusal that keeps the parts)?
    pub fn is_delivery(&self) -> bool {
        self.refused_for.is_none()
    }
}

/// What the upstream received: the file's metadata and the digest of each part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveredFile {
    pub meta: UploadMeta,
    pub parts: Vec<StoredPart>,
}

impl DeliveredFile {
    /// Does a chunk with this metadata, number and content belong to this very file?
    pub fn contains(&self, meta: &UploadMeta, part: &StoredPart) -> bool {
        self.meta.agrees_with(meta)
            && part
                .number
                .checked_sub(1)
                .and_then(|i| self.parts.get(usize::try_from(i).ok()?))
                .is_some_and(|delivered| delivered == part)
    }
}

/// A stored part: its number, length and content digest (which names its blob).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPart {
    pub number: u64,
    pub len: u64,
    #[serde(with = "hex")]
    pub digest: Digest,
}

/// Bytes streamed into a blob store and hashed, not yet kept under their digest.
#[derive(Debug)]
pub struct Staged {
    pub len: u64,
    pub digest: Digest,
    /// Why staging stopped before the body's end, if it did: the bytes before that point are
    /// staged all the same (a protocol that keeps what arrived, such as tus, may keep them).
    pub cut: Option<Cut>,
    /// Engine-specific handle (for `fs`, the temporary file's name).
    pub(crate) token: String,
}

/// Why staging stopped early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cut {
    /// The request body broke off or stalled.
    Body(BodyError),
    /// The body carried more than the limit: the bytes up to the limit are staged.
    TooLong(u64),
}

/// A lease's fencing token: each lease on a key has a greater one than the last. A state
/// change made with a token older than the newest issued for that upload is refused
/// ([`StoreError::Fenced`]), so a holder that stalled past its lease cannot change anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fence(pub u64);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
    #[error("the lease on {0} expired and was taken by another holder")]
    Fenced(String),
}

/// A source of request-body bytes, read piece by piece (never held whole).
#[async_trait]
pub trait BodySource: Send {
    async fn next_piece(&mut self) -> Result<Option<Bytes>, BodyError>;
}

/// Stored bytes (a blob, or a part through its upload's reference), read piece by piece. Each
/// piece is handed on as it is, not copied: the forward writes it to the upstream's socket.
#[async_trait]
pub trait StoredBytes: Send {
    /// The next piece, never empty; `None` at the end. The pieces hold no more than the
    /// length the reader was opened for (fewer only if the stored file was cut meanwhile: the
    /// caller checks).
    async fn next_piece(&mut self) -> std::io::Result<Option<Bytes>>;
}

/// A reader of stored bytes, as the engines open them.
pub type StoredReader = Box<dyn StoredBytes>;

/// Why a request body could not be read to its end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// The client sent nothing for longer than the body timeout.
    #[error("the request body stalled")]
    Stalled,
    #[error("the request body broke off: {0}")]
    Broken(String),
    /// A newer request for the same upload took over: this one stopped reading.
    #[error("a newer request for this upload took over")]
    Interrupted,
    /// The process is shutting down: the append stopped reading so that its client resumes
    /// (elsewhere, or after the restart) from the bytes that arrived, instead of losing them
    /// when the process exits.
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// Content-addressed bytes.
#[async_trait]
pub trait BlobStore: Send + Sync {
    /// Streams `body` into staging, hashing it; at most `limit` bytes are staged (more is
    /// [`Cut::TooLong`]). Durable (fsynced) when the engine is configured so.
    async fn stage(&self, body: &mut dyn BodySource, limit: u64) -> Result<Staged, StoreError>;
    /// Like [`stage`](Self::stage), but the bytes are made durable only by a later
    /// [`sync_staged`](Self::sync_staged), which must come before [`keep`](Self::keep): a
    /// caller can receive the next bytes while the disk syncs these.
    async fn stage_unsynced(
        &self,
        body: &mut dyn BodySource,
        limit: u64,
    ) -> Result<Staged, StoreError> {
        self.stage(body, limit).await
    }
    /// Makes bytes staged by [`stage_unsynced`](Self::stage_unsynced) durable, when the engine
    /// is configured so.
    async fn sync_staged(&self, _staged: &Staged) -> Result<(), StoreError> {
        Ok(())
    }
    /// Keeps staged bytes under their digest; a no-op if that content is stored already.
    /// Call under the blob's lock (see [`LockKey::Blob`]). True if it was stored already (the
    /// bytes are deduplicated).
    async fn keep(&self, staged: Staged) -> Result<bool, StoreError>;
    /// Drops staged bytes.
    async fn discard(&self, staged: Staged);
    /// Reads a blob of `len` bytes.
    async fn open(&self, digest: &Digest, len: u64) -> Result<StoredReader, StoreError>;
    /// Deletes a blob. Call under the blob's lock, once no part references it.
    async fn delete(&self, digest: &Digest) -> Result<(), StoreError>;
    /// The bytes every stored blob takes (each distinct content once).
    async fn stored_bytes(&self) -> Result<u64, StoreError>;
    /// Every stored blob, to collect those no part references (left by a crash between keeping
    /// bytes and adding the part).
    async fn digests(&self) -> Result<Vec<Digest>, StoreError>;
}

/// Upload state. Every change takes the fencing token of the upload's lease.
#[async_trait]
pub trait StateStore: Send + Sync {
    async fn meta(&self, upload: &UploadKey) -> Result<Option<UploadMeta>, StoreError>;
    async fn save_meta(
        &self,
        upload: &UploadKey,
        meta: &UploadMeta,
        fence: Fence,
    ) -> Result<(), StoreError>;
    async fn remove_meta(&self, upload: &UploadKey, fence: Fence) -> Result<(), StoreError>;

    /// The upload's parts, by number.
    async fn parts(&self, upload: &UploadKey) -> Result<Arc<PartIndex>, StoreError>;
    /// Adds a part, referencing its blob (which must be kept already). Returns false, and
    /// changes nothing, if the upload has a part with that number.
    async fn add_part(
        &self,
        upload: &UploadKey,
        part: StoredPart,
        fence: Fence,
    ) -> Result<bool, StoreError>;
    /// Adds a part as [`add_part`](Self::add_part) does, but the engine may leave the change
    /// not yet durable: the caller lets the upload's lease go, then calls
    /// [`sync_parts`](Self::sync_parts) before it says the part is stored. The durable step is
    /// then out of the lease, where the parts that parallel requests added meanwhile share it.
    async fn add_part_unsynced(
        &self,
        upload: &UploadKey,
        part: StoredPart,
        fence: Fence,
    ) -> Result<bool, StoreError> {
        self.add_part(upload, part, fence).await
    }
    /// Makes durable every part this process added to the upload with
    /// [`add_part_unsynced`](Self::add_part_unsynced) before the call.
    async fn sync_parts(&self, _upload: &UploadKey) -> Result<(), StoreError> {
        Ok(())
    }
    /// Forgets one part (to put other bytes in its place); returns its digest if it was there.
    async fn remove_part(
        &self,
        upload: &UploadKey,
        number: u64,
        fence: Fence,
    ) -> Result<Option<Digest>, StoreError>;
    /// Forgets every part of the upload; returns the digests of the parts it had (some may be
    /// referenced by other uploads still: see `is_referenced`).
    async fn remove_parts(
        &self,
        upload: &UploadKey,
        fence: Fence,
    ) -> Result<Vec<Digest>, StoreError>;
    /// Reads a part through the upload's own reference to its bytes, where the engine has one
    /// (the `fs` engine's hard link survives what may befall the blob's own name); `None`:
    /// read the blob.
    async fn open_part(
        &self,
        _upload: &UploadKey,
        _part: &StoredPart,
    ) -> Result<Option<StoredReader>, StoreError> {
        Ok(None)
    }
    /// Does any part of any upload reference this blob?
    async fn is_referenced(&self, digest: &Digest) -> Result<bool, StoreError>;
    /// The blobs of `digests` that no part of any upload references (as
    /// [`is_referenced`](Self::is_referenced) tells, for many at once).
    async fn unreferenced(&self, digests: Vec<Digest>) -> Result<Vec<Digest>, StoreError> {
        let mut unreferenced = Vec::new();
        for digest in digests {
            if !self.is_referenced(&digest).await? {
                unreferenced.push(digest);
            }
        }
        Ok(unreferenced)
    }

    /// The recorded answer and when it was recorded.
    async fn answer(
        &self,
        upload: &UploadKey,
    ) -> Result<Option<(RecordedAnswer, SystemTime)>, StoreError>;
    async fn save_answer(
        &self,
        upload: &UploadKey,
        answer: &RecordedAnswer,
        at: SystemTime,
        fence: Fence,
    ) -> Result<(), StoreError>;
    async fn remove_answer(&self, upload: &UploadKey, fence: Fence) -> Result<(), StoreError>;

    /// Notes, durably, that a delivery is being sent (`true`) or has ended (`false`). A note
    /// still there when the next delivery starts means an earlier one may have reached the
    /// upstream without its answer being recorded (a crash, a timeout after the whole request).
    async fn mark_delivering(
        &self,
        upload: &UploadKey,
        delivering: bool,
        fence: Fence,
    ) -> Result<(), StoreError>;
    async fn was_delivering(&self, upload: &UploadKey) -> Result<bool, StoreError>;

    /// Records activity on the upload at `at` (for expiry), and enters it in the index at `at`.
    async fn touch(&self, upload: &UploadKey, at: SystemTime) -> Result<(), StoreError>;
    /// Enters the upload in the index at `at` (when expiry should look at it again), without
    /// recording activity.
    async fn reindex(&self, upload: &UploadKey, at: SystemTime) -> Result<(), StoreError>;
    async fn last_activity(&self, upload: &UploadKey) -> Result<Option<SystemTime>, StoreError>;

    /// Asks whoever holds the upload's lease in another process to stop reading the body it is
    /// appending, for a request that arrived at `arrived` and waits for the lease: the newest
    /// asker's arrival is kept. Engines shared by one process only need nothing: its appends
    /// are stopped in memory.
    async fn ask_to_stop(
        &self,
        _upload: &UploadKey,
        _arrived: SystemTime,
    ) -> Result<(), StoreError> {
        Ok(())
    }
    /// The arrival of the newest request that asked for the upload's append to stop, if any
    /// (an append that arrived later than that goes on).
    async fn stop_asked(&self, _upload: &UploadKey) -> Result<Option<SystemTime>, StoreError> {
        Ok(None)
    }
    /// Forgets requests to stop made before `before`: long seen, or left for an upload that
    /// is gone.
    async fn forget_stop_requests(&self, _before: SystemTime) -> Result<(), StoreError> {
        Ok(())
    }
    /// Uploads with an index entry before `before` (no listing of every upload). The caller
    /// checks each one under its lock: removes it, or indexes it again.
    async fn idle_since(&self, before: SystemTime) -> Result<Vec<UploadKey>, StoreError>;
    /// Forgets index entries older than `before`, once every upload `idle_since` returned for
    /// it has been removed or touched again.
    async fn prune_activity(&self, before: SystemTime) -> Result<(), StoreError>;
    /// Forgets everything about the upload (its parts first: see `remove_parts`), its queued
    /// delivery included.
    async fn remove(&self, upload: &UploadKey, fence: Fence) -> Result<(), StoreError>;

    /// The delivery queue (see [`QueuedDelivery`]): one entry per upload at most.
    async fn queue(
        &self,
        upload: &UploadKey,
        entry: &QueuedDelivery,
        fence: Fence,
    ) -> Result<(), StoreError>;
    async fn queued(&self, upload: &UploadKey) -> Result<Option<QueuedDelivery>, StoreError>;
    async fn unqueue(&self, upload: &UploadKey, fence: Fence) -> Result<(), StoreError>;
    /// Every queued delivery (the queue holds only uploads that are complete and undelivered).
    async fn all_queued(&self) -> Result<Vec<(UploadKey, QueuedDelivery)>, StoreError>;
    /// Every upload with metadata or a recorded answer (for the operators' listing: the upload
    /// path never lists).
    async fn uploads(&self) -> Result<Vec<UploadKey>, StoreError>;
}

/// A delivery still owed to the upstream: written before a file is sent, removed once the
/// upstream gave an answer that stands (2xx, or a refusal a retry would not change), so that the
/// background queue retries the rest, also after a restart. It carries what the completing
/// request contributed (fields, credentials, host): the browser may be gone by the retry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedDelivery {
    /// The route's id; its forward settings are read from the config at each attempt.
    pub route: String,
    pub fields: Vec<(String, String)>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub host: Option<Vec<u8>>,
    /// Attempts started so far.
    pub attempts: u32,
    /// When the next attempt is due, in milliseconds since the epoch.
    pub due_ms: u64,
}

/// What a lock is taken on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LockKey {
    /// Everything that changes one upload: its metadata, parts, answer, delivery.
    Upload(UploadKey),
    /// A blob between the check that it exists and the part that references it, and between
    /// the check that nothing references it and its deletion.
    Blob(Digest),
}

/// A held lock: exclusive until dropped, or until its lease runs out without renewal (engines
/// whose leases can expire renew them in the background while the holder lives).
pub struct Lease {
    pub fence: Fence,
    /// Released when dropped.
    _held: Box<dyn Send + Sync>,
}

impl Lease {
    pub fn new(fence: Fence, held: impl Send + Sync + 'static) -> Lease {
        Lease {
            fence,
            _held: Box::new(held),
        }
    }
}

/// Mutual exclusion between everyone who uses a store: tasks of this process, and other
/// processes on the same storage.
#[async_trait]
pub trait Locker: Send + Sync {
    /// Waits for the lock on `key` and takes it for `lease` (renewed while held).
    async fn lock(&self, key: LockKey, lease: Duration) -> Result<Lease, StoreError>;
}

/// The engines a config names, opened together.
#[derive(Clone)]
pub struct Engines {
    pub blobs: Arc<dyn BlobStore>,
    pub state: Arc<dyn StateStore>,
    pub locker: Arc<dyn Locker>,
    /// Becomes true once every engine is closed (see [`Engines::closed`]).
    closed: Arc<std::sync::atomic::AtomicBool>,
}

impl Engines {
    pub fn new(
        blobs: Arc<dyn BlobStore>,
        state: Arc<dyn StateStore>,
        locker: Arc<dyn Locker>,
        closed: Arc<std::sync::atomic::AtomicBool>,
    ) -> Engines {
        Engines {
            blobs,
            state,
            locker,
            closed,
        }
    }

    /// True once the engines have been dropped and have released what they hold (files,
    /// locks), so that a new server can open the same storage.
    pub fn closed(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.closed.clone()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot open storage {what}: {source}")]
pub struct OpenError {
    what: String,
    source: std::io::Error,
}

/// Opens the engines the config names.
pub fn open(config: &StorageConfig) -> Result<Engines, OpenError> {
    match &config.engine {
        EngineConfig::Fs { dir, fsync } => {
            // Expiry finds an upload at most a quarter of the shortest TTL late.
            let span = (config.upload_ttl.min(config.result_ttl) / 4)
                .clamp(Duration::from_secs(1), Duration::from_secs(3600));
            fs::open(dir, *fsync, span).map_err(|source| OpenError {
                what: format!("directory {}", dir.display()),
                source,
            })
        }
        EngineConfig::Memory => Ok(memory::open()),
    }
}
