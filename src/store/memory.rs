//! The in-memory engine: blobs, state and leases in this process's memory. It keeps nothing
//! across restarts and holds whole files in memory: it is for tests, where it lets the upload
//! core's races run without disks, sockets or sleeps.
//!
//! Unlike the `fs` engine, its leases do expire: a holder that stops renewing loses its lease to
//! the next taker, and any change it then attempts is refused by its stale fencing token. That
//! is the behaviour a shared engine (Redis) has, so the core's exactly-once argument can be
//! tested here.

use super::{
    BlobStore, BodySource, Cut, Digest, Engines, Fence, Lease, LockKey, Locker, PartIndex,
    QueuedDelivery, RecordedAnswer, Staged, StateStore, StoreError, StoredBytes, StoredPart,
    StoredReader, UploadKey, UploadMeta,
};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Notify;

/// Opens an empty in-memory engine.
pub fn open() -> Engines {
    open_with_handle().0
}

/// Opens an empty in-memory engine, and a handle on it for tests (see [`Memory::expire_leases`]).
pub fn open_with_handle() -> (Engines, Arc<Memory>) {
    let closed = Arc::new(AtomicBool::new(false));
    let memory = Arc::new(Memory {
        data: Mutex::default(),
        leases: Mutex::default(),
        released: Notify::new(),
        closed: closed.clone(),
    });
    let engines = Engines::new(
        memory.clone(),
        memory.clone(),
        Arc::new(memory.clone()),
        closed,
    );
    (engines, memory)
}

pub struct Memory {
    data: Mutex<Data>,
    leases: Mutex<Leases>,
    /// Woken whenever a lease is released.
    released: Notify,
    closed: Arc<AtomicBool>,
}

impl Drop for Memory {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct Data {
    staged: HashMap<String, Bytes>,
    blobs: HashMap<Digest, Bytes>,
    uploads: HashMap<UploadKey, Upload>,
    /// How many parts reference each blob.
    references: HashMap<Digest, usize>,
    /// (time, upload) index entries, for `idle_since`.
    index: BTreeSet<(SystemTime, UploadKey)>,
}

#[derive(Default, Clone)]
struct Upload {
    meta: Option<UploadMeta>,
    parts: Arc<PartIndex>,
    answer: Option<(RecordedAnswer, SystemTime)>,
    delivering: bool,
    activity: Option<SystemTime>,
    queued: Option<QueuedDelivery>,
}

#[derive(Default)]
struct Leases {
    /// The newest token issued per key, and until when its lease runs.
    held: HashMap<LockKey, (u64, Option<Instant>)>,
    newest: HashMap<LockKey, u64>,
}

/// A held lease: renewed in the background until dropped, then released.
struct Held {
    memory: Arc<Memory>,
    key: LockKey,
    token: u64,
    renewer: tokio::task::JoinHandle<()>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.renewer.abort();
        let mut leases = self.memory.leases.lock().expect("leases");
        if leases
            .held
            .get(&self.key)
            .is_some_and(|(t, _)| *t == self.token)
        {
            leases.held.remove(&self.key);
        }
        drop(leases);
        self.memory.released.notify_waiters();
    }
}

impl Memory {
    /// Refuses a change made under a lease older than the newest issued for the upload. The
    /// guard it returns keeps new leases from being issued until the change is made.
    fn fenced(
        &self,
        upload: &UploadKey,
        fence: Fence,
    ) -> Result<std::sync::MutexGuard<'_, Leases>, StoreError> {
        let leases = self.leases.lock().expect("leases");
        match leases.newest.get(&LockKey::Upload(*upload)) {
            Some(newest) if *newest > fence.0 => Err(StoreError::Fenced(format!("{upload:?}"))),
            _ => Ok(leases),
        }
    }

    fn with_upload<T>(&self, upload: &UploadKey, f: impl FnOnce(&mut Upload) -> T) -> T {
        let mut data = self.data.lock().expect("data");
        f(data.uploads.entry(*upload).or_default())
    }

    fn read_upload<T>(&self, upload: &UploadKey, f: impl FnOnce(Option<&Upload>) -> T) -> T {
        let data = self.data.lock().expect("data");
        f(data.uploads.get(upload))
    }
}

#[async_trait]
impl BlobStore for Memory {
    async fn stage(&self, body: &mut dyn BodySource, limit: u64) -> Result<Staged, StoreError> {
        let mut bytes = BytesMut::new();
        let mut cut = None;
        loop {
            match body.next_piece().await {
                Ok(Some(piece)) => {
                    let room = (limit - bytes.len() as u64).min(piece.len() as u64) as usize;
                    bytes.extend_from_slice(&piece[..room]);
                    if room < piece.len() {
                        cut = Some(Cut::TooLong(limit));
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    cut = Some(Cut::Body(e));
                    break;
                }
            }
        }
        let token = hex::encode(rand::random::<[u8; 16]>());
        let staged = Staged {
            len: bytes.len() as u64,
            digest: blake3::hash(&bytes).into(),
            cut,
            token: token.clone(),
        };
        self.data
            .lock()
            .expect("data")
            .staged
            .insert(token, bytes.freeze());
        Ok(staged)
    }

    async fn keep(&self, staged: Staged) -> Result<bool, StoreError> {
        let mut data = self.data.lock().expect("data");
        let bytes = data.staged.remove(&staged.token).unwrap_or_default();
        let known = data.blobs.contains_key(&staged.digest);
        data.blobs.entry(staged.digest).or_insert(bytes);
        Ok(known)
    }

    async fn discard(&self, staged: Staged) {
        self.data.lock().expect("data").staged.remove(&staged.token);
    }

    async fn open(&self, digest: &Digest, len: u64) -> Result<StoredReader, StoreError> {
        let bytes = self.data.lock().expect("data").blobs.get(digest).cloned();
        match bytes {
            Some(bytes) if bytes.len() as u64 == len => {
                Ok(Box::new(Whole(Some(bytes).filter(|b| !b.is_empty()))))
            }
            Some(bytes) => Err(StoreError::Corrupt(format!(
                "blob has {} bytes, expected {len}",
                bytes.len()
            ))),
            None => Err(StoreError::Corrupt("blob missing".into())),
        }
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StoreError> {
        self.data.lock().expect("data").blobs.remove(digest);
        Ok(())
    }

    async fn stored_bytes(&self) -> Result<u64, StoreError> {
        let data = self.data.lock().expect("data");
        Ok(data.blobs.values().map(|b| b.len() as u64).sum())
    }

    async fn digests(&self) -> Result<Vec<Digest>, StoreError> {
        Ok(self
            .data
            .lock()
            .expect("data")
            .blobs
            .keys()
            .copied()
            .collect())
    }
}

#[async_trait]
impl StateStore for Memory {
    async fn meta(&self, upload: &UploadKey) -> Result<Option<UploadMeta>, StoreError> {
        Ok(self.read_upload(upload, |u| u.and_then(|u| u.meta.clone())))
    }

    async fn save_meta(
        &self,
        upload: &UploadKey,
        meta: &UploadMeta,
        fence: Fence,
    ) -> Result<(), StoreError> {
        let _fenced = self.fenced(upload, fence)?;
        self.with_upload(upload, |u| u.meta = Some(meta.clone()));
        Ok(())
    }

    async fn remove_meta(&self, upload: &UploadKey, fence: Fence) -> Result<(), StoreError> {
        let _fenced = self.fenced(upload, fence)?;
        self.with_upload(upload, |u| u.meta = None);
        Ok(())
    }

    async fn parts(&self, upload: &UploadKey) -> Result<Arc<PartIndex>, StoreError> {
        Ok(self.read_upload(upload, |u| u.map(|u| u.parts.clone()).unwrap_or_default()))
    }

    async fn add_part(
        &self,
        upload: &UploadKey,
        part: StoredPart,
        fence: Fence,
    ) -> Result<bool, StoreError> {
        let _fenced = self.fenced(upload, fence)?;
        let mut data = self.data.lock().expect("data");
        let entry = data.uploads.entry(*upload).or_default();
        if entry.parts.contains_key(&part.number) {
            return Ok(false);
        }
        // Changed in place unless a reader holds the index (a copy per part grew with the
        // upload).
        Arc::make_mut(&mut entry.parts).insert(part.number, part);
        *data.references.entry(part.digest).or_default() += 1;
        Ok(true)
    }

    async fn remove_part(
        &self,
        upload: &UploadKey,
        number: u64,
        fence: Fence,
    ) -> Result<Option<Digest>, StoreError> {
        let _fenced = self.fenced(upload, fence)?;
        let mut data = self.data.lock().expect("data");
        let Some(entry) = data.uploads.get_mut(upload) else {
            return Ok(None);
        };
        if !entry.parts.contains_key(&number) {
            return Ok(None);
        }
        let Some(part) = Arc::make_mut(&mut entry.parts).remove(&number) else {
            return Ok(None);
        };
        if let Some(count) = data.references.get_mut(&part.digest) {
            *count -= 1;
            if *count == 0 {
                data.references.remove(&part.digest);
            }
        }
        Ok(Some(part.digest))
    }

    async fn remove_parts(
        &self,
        upload: &UploadKey,
        fence: Fence,
    ) -> Result<Vec<Digest>, StoreError> {
        let _fenced = self.fenced(upload, fence)?;
        let mut data = self.data.lock().expect("data");
        let parts = match data.uploads.get_mut(upload) {
            Some(entry) => std::mem::take(&mut entry.parts),
            None => return Ok(Vec::new()),
        };
        let mut released = Vec::new();
        for part in parts.values() {
            if let Some(count) = data.references.get_mut(&part.digest) {
                *count -= 1;
                if *count == 0 {
                    data.references.remove(&part.digest);
                }
            }
            if !released.contains(&part.digest) {
                released.push(part.digest);
            }
        }
        Ok(released)
    }

    async fn is_referenced(&self, digest: &Digest) -> Result<bool, StoreError> {
        Ok(self
            .data
            .lock()
            .expect("data")
            .references
            .contains_key(digest))
    }

    async fn answer(
        &self,
        upload: &UploadKey,
    ) -> Result<Option<(RecordedAnswer, SystemTime)>, StoreError> {
        Ok(self.read_upload(upload, |u| u.and_then(|u| u.answer.clone())))
    }

    async fn save_answer(
        &self,
        upload: &UploadKey,
        answer: &RecordedAnswer,
        at: SystemTime,
        fence: Fence,
    ) -> Result<(), StoreError> {
        let _fenced = self.fenced(upload, fence)?;
        self.with_upload(upload, |u| u.answer = Some((answer.clone(), at)));
        Ok(())
    }

    async fn remove_answer(&self, upload: &UploadKey, fence: Fence) -> Result<(), StoreError> {
        let _fenced = self.fenced(upload, fence)?;
        self.with_upload(upload, |u| u.answer = None);
        Ok(())
    }

    async fn mark_delivering(
        &self,
        upload: &UploadKey,
        delivering: bool,
        fence: Fence,
    ) -> Result<(), StoreError> {
        let _fenced = self.fenced(upload, fence)?;
        self.with_upload(upload, |u| u.delivering = delivering);
        Ok(())
    }

    async fn was_delivering(&self, upload: &UploadKey) -> Result<bool, StoreError> {
        Ok(self.read_upload(upload, |u| u.is_some_and(|u| u.delivering)))
    }

    async fn touch(&self, upload: &UploadKey, at: SystemTime) -> Result<(), StoreError> {
        let mut data = self.data.lock().expect("data");
        data.uploads.entry(*upload).or_default().activity = Some(at);
        data.index.insert((at, *upload));
        Ok(())
    }

    async fn reindex(&self, upload: &UploadKey, at: SystemTime) -> Result<(), StoreError> {
        self.data.lock().expect("data").index.insert((at, *upload));
        Ok(())
    }

    async fn last_activity(&self, upload: &UploadKey) -> Result<Option<SystemTime>, StoreError> {
        Ok(self.read_upload(upload, |u| u.and_then(|u| u.activity)))
    }

    async fn idle_since(&self, before: SystemTime) -> Result<Vec<UploadKey>, StoreError> {
        let data = self.data.lock().expect("data");
        let mut found: Vec<UploadKey> = data
            .index
            .iter()
            .take_while(|(at, _)| *at < before)
            .map(|(_, upload)| *upload)
            .collect();
        found.sort();
        found.dedup();
        Ok(found)
    }

    async fn prune_activity(&self, before: SystemTime) -> Result<(), StoreError> {
        let mut data = self.data.lock().expect("data");
        data.index.retain(|(at, _)| *at >= before);
        Ok(())
    }

    async fn remove(&self, upload: &UploadKey, fence: Fence) -> Result<(), StoreError> {
        let _fenced = self.fenced(upload, fence)?;
        self.data.lock().expect("data").uploads.remove(upload);
        Ok(())
    }

    async fn queue(
        &self,
        upload: &UploadKey,
        entry: &QueuedDelivery,
        fence: Fence,
    ) -> Result<(), StoreError> {
        let _fenced = self.fenced(upload, fence)?;
        self.with_upload(upload, |u| u.queued = Some(entry.clone()));
        Ok(())
    }

    async fn queued(&self, upload: &UploadKey) -> Result<Option<QueuedDelivery>, StoreError> {
        Ok(self.read_upload(upload, |u| u.and_then(|u| u.queued.clone())))
    }

    async fn unqueue(&self, upload: &UploadKey, fence: Fence) -> Result<(), StoreError> {
        let _fenced = self.fenced(upload, fence)?;
        let mut data = self.data.lock().expect("data");
        if let Some(u) = data.uploads.get_mut(upload) {
            u.queued = None;
        }
        Ok(())
    }

    async fn all_queued(&self) -> Result<Vec<(UploadKey, QueuedDelivery)>, StoreError> {
        let data = self.data.lock().expect("data");
        Ok(data
            .uploads
            .iter()
            .filter_map(|(key, u)| Some((*key, u.queued.clone()?)))
            .collect())
    }

    async fn uploads(&self) -> Result<Vec<UploadKey>, StoreError> {
        let data = self.data.lock().expect("data");
        Ok(data
            .uploads
            .iter()
            .filter(|(_, u)| u.meta.is_some() || u.answer.is_some())
            .map(|(key, _)| *key)
            .collect())
    }
}

impl Memory {
    /// Ends every lease now, as if their holders had stalled past them (a paused process): the
    /// next taker gets a lease with a newer token, and the old holders can no longer change
    /// anything.
    pub fn expire_leases(&self) {
        let mut leases = self.leases.lock().expect("leases");
        let now = Instant::now();
        for (_, until) in leases.held.values_mut() {
            *until = Some(now);
        }
        drop(leases);
        self.released.notify_waiters();
    }

    /// Takes the lease if it is free or expired; the new token if so.
    fn try_take(&self, key: LockKey, lease: Duration) -> Option<u64> {
        let mut leases = self.leases.lock().expect("leases");
        let now = Instant::now();
        if let Some((_, until)) = leases.held.get(&key) {
            if until.is_none_or(|until| until > now) {
                return None;
            }
        }
        let token = leases.newest.get(&key).copied().unwrap_or(0) + 1;
        leases.newest.insert(key, token);
        leases.held.insert(key, (token, Some(now + lease)));
        Some(token)
    }

    /// Extends a lease still held with `token`; false if it was lost.
    fn renew(&self, key: LockKey, token: u64, lease: Duration) -> bool {
        let mut leases = self.leases.lock().expect("leases");
        match leases.held.get_mut(&key) {
            Some((held, Some(until))) if *held == token && *until > Instant::now() => {
                *until = Instant::now() + lease;
                true
            }
            _ => false,
        }
    }
}

#[async_trait]
impl Locker for Arc<Memory> {
    async fn lock(&self, key: LockKey, lease: Duration) -> Result<Lease, StoreError> {
        loop {
            let released = self.released.notified();
            if let Some(token) = self.try_take(key, lease) {
                let memory = Arc::clone(self);
                let renewer = tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(lease / 3).await;
                        if !memory.renew(key, token, lease) {
                            return;
                        }
                    }
                });
                let held = Held {
                    memory: Arc::clone(self),
                    key,
                    token,
                    renewer,
                };
                return Ok(Lease::new(Fence(token), held));
            }
            // Woken by a release, or in time to take an expired lease.
            let _ = tokio::time::timeout(lease, released).await;
        }
    }
}

/// A blob's bytes, handed out as one piece (shared, not copied).
struct Whole(Option<Bytes>);

#[async_trait]
impl StoredBytes for Whole {
    async fn next_piece(&mut self) -> std::io::Result<Option<Bytes>> {
        Ok(self.0.take())
    }
}
