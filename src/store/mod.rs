//! Storage, behind two small interfaces: [`ChunkStore`] keeps the bytes of each part (deduplicated
//! by content), [`StateStore`] keeps what is known about each upload (its pinned metadata and the
//! upstream's recorded answer). The upload core knows storage only through these traits; the
//! engines live in their own files (`fs.rs`: local disk, the default).
//!
//! Every path an engine uses is derived from a [`UploadKey`] or a content digest, never from a
//! client-supplied string.

pub mod fs;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::io::AsyncRead;

/// The identity of one upload: a hash of the route, the user's scope and the client's identifier.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
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

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(text: &str) -> Option<UploadKey> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(UploadKey(bytes))
    }
}

impl fmt::Debug for UploadKey {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "upload:{}", &self.hex()[..12])
    }
}

/// What the first stored chunk declared about the file; later chunks must agree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadMeta {
    pub chunk_size: u64,
    pub total_size: u64,
    pub file_name: String,
    /// The MIME type, if the client said one.
    pub file_type: Option<String>,
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
        self.meta == *meta
            && part
                .number
                .checked_sub(1)
                .and_then(|i| self.parts.get(usize::try_from(i).ok()?))
                .is_some_and(|delivered| delivered == part)
    }
}

/// A published part: its number, length and content digest (which names its bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPart {
    pub number: u64,
    pub len: u64,
    #[serde(with = "hex")]
    pub digest: [u8; 32],
}

/// An upload's stored parts, by number.
pub type PartIndex = BTreeMap<u64, StoredPart>;

/// Bytes of one part, written and flushed but not yet visible as a part of any upload.
#[derive(Debug)]
pub struct StagedPart {
    pub len: u64,
    pub digest: [u8; 32],
    /// Engine-specific handle (for `fs`, the temporary file's name).
    token: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
}

/// Why staging a part's bytes stopped.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Body(#[from] BodyError),
    #[error("the chunk has more than the {0} bytes it declared")]
    TooLong(u64),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A source of request-body bytes, read piece by piece (never held whole).
#[async_trait]
pub trait BodySource: Send {
    async fn next_piece(&mut self) -> Result<Option<Bytes>, BodyError>;
}

/// Why a request body could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The client sent nothing for longer than the body timeout.
    #[error("the request body stalled")]
    Stalled,
    #[error("the request body broke off: {0}")]
    Broken(String),
}

impl BodyError {
    /// Classifies an error of Pingora's body reader.
    pub fn from_pingora(e: &pingora::Error) -> BodyError {
        match e.etype() {
            pingora::ErrorType::ReadTimedout => BodyError::Stalled,
            _ => BodyError::Broken(e.to_string()),
        }
    }
}

#[async_trait]
pub trait ChunkStore: Send + Sync {
    /// Streams `body` into durable staging, hashing it on the way; fails past `limit` bytes.
    async fn stage(&self, body: &mut dyn BodySource, limit: u64) -> Result<StagedPart, StageError>;
    /// Drops staged bytes that will not be published.
    async fn discard(&self, staged: StagedPart);
    /// Makes staged bytes visible as part `number` of `upload`, atomically. Returns false (and
    /// drops the bytes) if that part was stored already.
    async fn publish(
        &self,
        upload: &UploadKey,
        number: u64,
        staged: StagedPart,
    ) -> Result<bool, StoreError>;
    /// Stored parts of an upload, by part number.
    async fn parts(&self, upload: &UploadKey) -> Result<Arc<PartIndex>, StoreError>;
    /// Reads one stored part.
    async fn open(
        &self,
        upload: &UploadKey,
        part: &StoredPart,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, StoreError>;
    /// Forgets every part of an upload; bytes no other upload shares are deleted.
    async fn remove_parts(&self, upload: &UploadKey) -> Result<(), StoreError>;
    /// Deletes bytes that no part uses (left by a crash between storing and publishing).
    /// Returns how many blobs were deleted.
    async fn collect_garbage(&self) -> Result<usize, StoreError>;
}

#[async_trait]
pub trait StateStore: Send + Sync {
    async fn meta(&self, upload: &UploadKey) -> Result<Option<UploadMeta>, StoreError>;
    async fn save_meta(&self, upload: &UploadKey, meta: &UploadMeta) -> Result<(), StoreError>;
    /// The recorded answer and when it was recorded.
    async fn answer(
        &self,
        upload: &UploadKey,
    ) -> Result<Option<(RecordedAnswer, SystemTime)>, StoreError>;
    async fn save_answer(
        &self,
        upload: &UploadKey,
        answer: &RecordedAnswer,
    ) -> Result<(), StoreError>;
    /// Forgets the recorded answer (the upload starts over).
    async fn remove_answer(&self, upload: &UploadKey) -> Result<(), StoreError>;
    /// Forgets the pinned metadata (the file was delivered; the next upload pins its own).
    async fn remove_meta(&self, upload: &UploadKey) -> Result<(), StoreError>;
    /// Notes, durably, that a delivery is being sent (`true`) or has ended (`false`). A note
    /// still there when the next delivery starts means an earlier one may have reached the
    /// upstream without its answer being recorded (a crash, a timeout after the whole request).
    async fn mark_delivering(&self, upload: &UploadKey, delivering: bool)
        -> Result<(), StoreError>;
    async fn was_delivering(&self, upload: &UploadKey) -> Result<bool, StoreError>;
    /// Every upload that has state.
    async fn uploads(&self) -> Result<Vec<UploadKey>, StoreError>;
    /// When the upload last changed (a part published, metadata or answer saved).
    async fn last_activity(&self, upload: &UploadKey) -> Result<Option<SystemTime>, StoreError>;
    /// Forgets an upload's state (call `ChunkStore::remove_parts` first).
    async fn remove(&self, upload: &UploadKey) -> Result<(), StoreError>;
}
