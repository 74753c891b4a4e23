//! Local-disk engine for both stores (the default, single-instance setup).
//!
//! ```text
//! <dir>/lock                             held by the one Stitch process using this directory
//! <dir>/tmp/<random>                     bytes being staged; cleared at start-up
//! <dir>/blobs/<aa>/<sha256>              one file per distinct content (deduplication)
//! <dir>/uploads/<key>/meta.json          pinned metadata
//! <dir>/uploads/<key>/parts/<n>-<len>-<sha256>   a hard link to the blob: one published part
//! <dir>/uploads/<key>/answer             the upstream's recorded answer
//! <dir>/uploads/<key>/delivering         present while a delivery is being sent
//! ```
//!
//! Publishing is `rename` (blob) then `link` (part), each atomic, with the file and every
//! directory it is entered in fsynced first when `fsync` is on. A crash leaves either no part or
//! a whole one. A blob's link count says how many parts use it, so whoever lets go of it last
//! deletes it; a blob orphaned by a crash between `rename` and `link` is collected later.

use super::{
    BodySource, ChunkStore, PartIndex, RecordedAnswer, StageError, StagedPart, StateStore,
    StoreError, StoredPart, UploadKey, UploadMeta,
};
use crate::locks::KeyedLocks;
use async_trait::async_trait;
use dashmap::DashMap;
use sha2::{Digest, Sha256};
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;
use tokio::io::{AsyncRead, AsyncWriteExt};

/// Linux's "too many links" (a blob shared by ~65,000 parts on ext4).
const EMLINK: i32 = 31;

pub struct FsStore {
    root: PathBuf,
    fsync: bool,
    /// Held while a blob is created or linked, and while it is unlinked, so that a blob is never
    /// deleted between the check that it exists and the link that uses it.
    blob_locks: KeyedLocks<[u8; 32]>,
    /// Each upload's parts, read from disk once and then kept up to date (this process is the
    /// only one using the directory), so that no chunk request lists a directory.
    index: DashMap<UploadKey, Arc<PartIndex>>,
    /// Serializes loading an upload's index with changes to it.
    index_locks: KeyedLocks<UploadKey>,
    /// The directory lock: kept open for the life of the store.
    lock: Option<std::fs::File>,
    /// Set once the directory lock is released (see [`FsStore::released`]).
    released: Arc<AtomicBool>,
}

impl Drop for FsStore {
    fn drop(&mut self) {
        drop(self.lock.take());
        self.released.store(true, Ordering::SeqCst);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("another Stitch process uses this storage directory")]
    InUse,
}

impl FsStore {
    /// Opens (creating if needed) a storage directory, takes its lock, and clears half-written
    /// leftovers.
    pub fn open(root: &Path, fsync: bool) -> Result<FsStore, OpenError> {
        for sub in ["tmp", "blobs", "uploads"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        let lock = std::fs::File::create(root.join("lock"))?;
        lock.try_lock().map_err(|e| match e {
            std::fs::TryLockError::WouldBlock => OpenError::InUse,
            std::fs::TryLockError::Error(e) => OpenError::Io(e),
        })?;
        for entry in std::fs::read_dir(root.join("tmp"))? {
            let _ = std::fs::remove_file(entry?.path());
        }
        Ok(FsStore {
            root: root.to_path_buf(),
            fsync,
            blob_locks: KeyedLocks::default(),
            index: DashMap::new(),
            index_locks: KeyedLocks::default(),
            lock: Some(lock),
            released: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Becomes true once the store is dropped and its directory lock released, so that another
    /// store can open the directory (an `Arc`'s count reaches zero before its value is dropped,
    /// so the count alone cannot tell).
    pub fn released(&self) -> Arc<AtomicBool> {
        self.released.clone()
    }

    fn upload_dir(&self, upload: &UploadKey) -> PathBuf {
        self.root.join("uploads").join(upload.hex())
    }

    fn blob_path(&self, digest: &[u8; 32]) -> PathBuf {
        let hex = hex::encode(digest);
        self.root.join("blobs").join(&hex[..2]).join(hex)
    }

    fn tmp_path(&self) -> (String, PathBuf) {
        let name = hex::encode(rand::random::<[u8; 16]>());
        let path = self.root.join("tmp").join(&name);
        (name, path)
    }

    async fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        if !self.fsync {
            return Ok(());
        }
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || std::fs::File::open(dir)?.sync_all())
            .await
            .map_err(std::io::Error::other)?
    }

    /// Creates `dir` and any missing parents, making each new entry durable in its parent.
    async fn create_dir_durable(&self, dir: &Path) -> std::io::Result<()> {
        let mut missing = Vec::new();
        let mut cursor = dir;
        while !tokio::fs::try_exists(cursor).await? {
            missing.push(cursor.to_path_buf());
            cursor = match cursor.parent() {
                Some(parent) => parent,
                None => break,
            };
        }
        for created in missing.iter().rev() {
            match tokio::fs::create_dir(created).await {
                Err(e) if e.kind() != ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
            if let Some(parent) = created.parent() {
                self.sync_dir(parent).await?;
            }
        }
        Ok(())
    }

    /// Writes a small file atomically: temporary name, fsync, rename, fsync the directory. Every
    /// step's error is reported (a full disk must never leave a short file in place), and the
    /// temporary file is removed when a step fails.
    async fn write_atomic(&self, path: &Path, bytes: Vec<u8>) -> std::io::Result<()> {
        let dir = path.parent().expect("store paths have a parent");
        self.create_dir_durable(dir).await?;
        let (_, tmp) = self.tmp_path();
        let (path, fsync) = (path.to_path_buf(), self.fsync);
        tokio::task::spawn_blocking(move || {
            let written = write_then_rename(&tmp, &path, &bytes, fsync);
            if written.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            written
        })
        .await
        .map_err(std::io::Error::other)??;
        self.sync_dir(dir).await
    }

    fn part_path(&self, upload: &UploadKey, part: &StoredPart) -> PathBuf {
        let name = format!("{}-{}-{}", part.number, part.len, hex::encode(part.digest));
        self.upload_dir(upload).join("parts").join(name)
    }

    /// The upload's parts, from the index (loaded from disk on first use).
    async fn indexed(&self, upload: &UploadKey) -> std::io::Result<Arc<PartIndex>> {
        if let Some(parts) = self.index.get(upload) {
            return Ok(Arc::clone(&parts));
        }
        let _guard = self.index_locks.lock(*upload).await;
        self.load_index(upload).await
    }

    /// Like `indexed`, for callers that hold the upload's index lock.
    async fn load_index(&self, upload: &UploadKey) -> std::io::Result<Arc<PartIndex>> {
        if let Some(parts) = self.index.get(upload) {
            return Ok(Arc::clone(&parts));
        }
        let parts = Arc::new(self.list_parts(upload).await?);
        if !parts.is_empty() {
            self.index.insert(*upload, Arc::clone(&parts));
        }
        Ok(parts)
    }

    /// Reads the parts directory: each entry is `<number>-<len>-<sha256>`.
    async fn list_parts(&self, upload: &UploadKey) -> std::io::Result<PartIndex> {
        let dir = self.upload_dir(upload).join("parts");
        let mut entries = match tokio::fs::read_dir(&dir).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(PartIndex::new()),
            Err(e) => return Err(e),
        };
        let mut parts = PartIndex::new();
        while let Some(entry) = entries.next_entry().await? {
            if let Some(part) = entry.file_name().to_str().and_then(parse_part_name) {
                parts.insert(part.number, part);
            }
        }
        Ok(parts)
    }

    /// [`ChunkStore::publish`], under the upload's index lock.
    async fn publish_locked(
        &self,
        upload: &UploadKey,
        part: &StoredPart,
        tmp: &Path,
        part_path: &Path,
    ) -> Result<bool, StoreError> {
        let parts = self.load_index(upload).await?;
        if parts.contains_key(&part.number) {
            let _ = tokio::fs::remove_file(tmp).await;
            return Ok(false);
        }
        let blob = self.blob_path(&part.digest);
        let _blob_guard = self.blob_locks.lock(part.digest).await;
        if tokio::fs::try_exists(&blob).await? {
            let _ = tokio::fs::remove_file(tmp).await;
        } else {
            // The blob's own directory entry needs no fsync: the part's link below is what
            // makes the bytes reachable, and it is fsynced.
            tokio::fs::create_dir_all(blob.parent().expect("blob paths have a parent")).await?;
            tokio::fs::rename(tmp, &blob).await?;
        }
        let parts_dir = part_path.parent().expect("part paths have a parent");
        self.create_dir_durable(parts_dir).await?;
        self.link_part(&blob, part_path).await?;
        self.sync_dir(parts_dir).await?;
        let mut updated = PartIndex::clone(&parts);
        updated.insert(part.number, *part);
        self.index.insert(*upload, Arc::new(updated));
        Ok(true)
    }

    /// Links part `name` to its blob; past the file system's link limit, copies the blob.
    async fn link_part(&self, blob: &Path, part: &Path) -> std::io::Result<()> {
        match tokio::fs::hard_link(blob, part).await {
            Err(e) if e.raw_os_error() == Some(EMLINK) => {
                let (_, tmp) = self.tmp_path();
                let copied = async {
                    tokio::fs::copy(blob, &tmp).await?;
                    if self.fsync {
                        tokio::fs::File::open(&tmp).await?.sync_all().await?;
                    }
                    tokio::fs::rename(&tmp, part).await
                }
                .await;
                if copied.is_err() {
                    let _ = tokio::fs::remove_file(&tmp).await;
                }
                copied
            }
            other => other,
        }
    }
}

async fn remove_if_present(path: &Path) -> Result<(), StoreError> {
    match tokio::fs::remove_file(path).await {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

/// A state file that cannot be read back (written short by an older version on a full disk) is
/// treated as absent, so that it is written anew instead of failing every request for good.
fn parse_or_absent<T>(
    upload: &UploadKey,
    what: &str,
    parse: impl FnOnce() -> Result<T, String>,
) -> Option<T> {
    match parse() {
        Ok(value) => Some(value),
        Err(e) => {
            log::warn!("{upload:?}: ignoring a damaged {what} ({e})");
            None
        }
    }
}

/// The blocking steps of [`FsStore::write_atomic`].
fn write_then_rename(tmp: &Path, path: &Path, bytes: &[u8], fsync: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(tmp)?;
    file.write_all(bytes)?;
    if fsync {
        file.sync_all()?;
    }
    drop(file);
    std::fs::rename(tmp, path)
}

fn parse_part_name(name: &str) -> Option<StoredPart> {
    let mut fields = name.splitn(3, '-');
    let number = fields.next()?.parse().ok()?;
    let len = fields.next()?.parse().ok()?;
    let mut digest = [0u8; 32];
    hex::decode_to_slice(fields.next()?, &mut digest).ok()?;
    Some(StoredPart {
        number,
        len,
        digest,
    })
}

#[async_trait]
impl ChunkStore for FsStore {
    async fn stage(&self, body: &mut dyn BodySource, limit: u64) -> Result<StagedPart, StageError> {
        let (token, path) = self.tmp_path();
        let mut file = tokio::fs::File::create(&path)
            .await
            .map_err(StoreError::Io)?;
        let written = async {
            let mut hasher = Sha256::new();
            let mut len = 0u64;
            while let Some(piece) = body.next_piece().await? {
                len += piece.len() as u64;
                if len > limit {
                    return Err(StageError::TooLong(limit));
                }
                hasher.update(&piece);
                file.write_all(&piece).await.map_err(StoreError::Io)?;
            }
            file.flush().await.map_err(StoreError::Io)?;
            if self.fsync {
                file.sync_all().await.map_err(StoreError::Io)?;
            }
            Ok((len, hasher.finalize().into()))
        }
        .await;
        drop(file);
        match written {
            Ok((len, digest)) => Ok(StagedPart { len, digest, token }),
            Err(e) => {
                let _ = tokio::fs::remove_file(&path).await;
                Err(e)
            }
        }
    }

    async fn discard(&self, staged: StagedPart) {
        let _ = tokio::fs::remove_file(self.root.join("tmp").join(staged.token)).await;
    }

    async fn publish(
        &self,
        upload: &UploadKey,
        number: u64,
        staged: StagedPart,
    ) -> Result<bool, StoreError> {
        let tmp = self.root.join("tmp").join(&staged.token);
        let part = StoredPart {
            number,
            len: staged.len,
            digest: staged.digest,
        };
        let part_path = self.part_path(upload, &part);
        let _index_guard = self.index_locks.lock(*upload).await;
        let published = self.publish_locked(upload, &part, &tmp, &part_path).await;
        if published.is_err() {
            // Give the space back at once, and leave no link the index does not know about (a
            // retry would trip over it). A blob this left behind is collected by the sweep.
            let _ = tokio::fs::remove_file(&tmp).await;
            let _ = tokio::fs::remove_file(&part_path).await;
        }
        published
    }

    async fn parts(&self, upload: &UploadKey) -> Result<Arc<PartIndex>, StoreError> {
        Ok(self.indexed(upload).await?)
    }

    async fn open(
        &self,
        upload: &UploadKey,
        part: &StoredPart,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, StoreError> {
        let file = tokio::fs::File::open(self.part_path(upload, part)).await?;
        let actual = file.metadata().await?.len();
        if actual != part.len {
            return Err(StoreError::Corrupt(format!(
                "{upload:?} part {} has {actual} bytes, expected {}",
                part.number, part.len
            )));
        }
        Ok(Box::new(file))
    }

    async fn remove_parts(&self, upload: &UploadKey) -> Result<(), StoreError> {
        let _index_guard = self.index_locks.lock(*upload).await;
        let parts = self.load_index(upload).await?;
        self.index.remove(upload);
        for part in parts.values() {
            let _blob_guard = self.blob_locks.lock(part.digest).await;
            match tokio::fs::remove_file(self.part_path(upload, part)).await {
                Err(e) if e.kind() != ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
            let blob = self.blob_path(&part.digest);
            match tokio::fs::metadata(&blob).await {
                Ok(meta) if meta.nlink() <= 1 => tokio::fs::remove_file(&blob).await?,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        match tokio::fs::remove_dir(self.upload_dir(upload).join("parts")).await {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    async fn collect_garbage(&self) -> Result<usize, StoreError> {
        let mut removed = 0;
        let mut shards = tokio::fs::read_dir(self.root.join("blobs")).await?;
        while let Some(shard) = shards.next_entry().await? {
            let mut blobs = tokio::fs::read_dir(shard.path()).await?;
            while let Some(blob) = blobs.next_entry().await? {
                let mut digest = [0u8; 32];
                let name = blob.file_name();
                let Some(hex) = name.to_str() else { continue };
                if hex::decode_to_slice(hex, &mut digest).is_err() {
                    continue;
                }
                // Under the blob's lock, one link means no part uses it and no publish is
                // between creating and linking it.
                let _guard = self.blob_locks.lock(digest).await;
                match tokio::fs::metadata(blob.path()).await {
                    Ok(meta) if meta.nlink() <= 1 => {
                        tokio::fs::remove_file(blob.path()).await?;
                        removed += 1;
                    }
                    Ok(_) => {}
                    // Deleted by its last upload since the directory was listed.
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(removed)
    }
}

#[async_trait]
impl StateStore for FsStore {
    async fn meta(&self, upload: &UploadKey) -> Result<Option<UploadMeta>, StoreError> {
        match tokio::fs::read(self.upload_dir(upload).join("meta.json")).await {
            Ok(bytes) => Ok(parse_or_absent(upload, "meta.json", || {
                serde_json::from_slice(&bytes).map_err(|e| e.to_string())
            })),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn save_meta(&self, upload: &UploadKey, meta: &UploadMeta) -> Result<(), StoreError> {
        let json = serde_json::to_vec(meta).expect("metadata serializes");
        let path = self.upload_dir(upload).join("meta.json");
        Ok(self.write_atomic(&path, json).await?)
    }

    async fn answer(
        &self,
        upload: &UploadKey,
    ) -> Result<Option<(RecordedAnswer, SystemTime)>, StoreError> {
        let path = self.upload_dir(upload).join("answer");
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let recorded_at = tokio::fs::metadata(&path).await?.modified()?;
        let answer = parse_or_absent(upload, "answer", || {
            let newline = bytes
                .iter()
                .position(|b| *b == b'\n')
                .ok_or("no header line")?;
            let mut answer: RecordedAnswer =
                serde_json::from_slice(&bytes[..newline]).map_err(|e| e.to_string())?;
            answer.body = bytes::Bytes::copy_from_slice(&bytes[newline + 1..]);
            Ok(answer)
        });
        Ok(answer.map(|answer| (answer, recorded_at)))
    }

    async fn save_answer(
        &self,
        upload: &UploadKey,
        answer: &RecordedAnswer,
    ) -> Result<(), StoreError> {
        let mut bytes = serde_json::to_vec(answer).expect("answers serialize");
        bytes.push(b'\n');
        bytes.extend_from_slice(&answer.body);
        let path = self.upload_dir(upload).join("answer");
        Ok(self.write_atomic(&path, bytes).await?)
    }

    async fn remove_answer(&self, upload: &UploadKey) -> Result<(), StoreError> {
        remove_if_present(&self.upload_dir(upload).join("answer")).await
    }

    async fn remove_meta(&self, upload: &UploadKey) -> Result<(), StoreError> {
        remove_if_present(&self.upload_dir(upload).join("meta.json")).await
    }

    async fn mark_delivering(
        &self,
        upload: &UploadKey,
        delivering: bool,
    ) -> Result<(), StoreError> {
        let path = self.upload_dir(upload).join("delivering");
        if delivering {
            Ok(self.write_atomic(&path, Vec::new()).await?)
        } else {
            remove_if_present(&path).await
        }
    }

    async fn was_delivering(&self, upload: &UploadKey) -> Result<bool, StoreError> {
        Ok(tokio::fs::try_exists(self.upload_dir(upload).join("delivering")).await?)
    }

    async fn uploads(&self) -> Result<Vec<UploadKey>, StoreError> {
        let mut found = Vec::new();
        let mut entries = tokio::fs::read_dir(self.root.join("uploads")).await?;
        while let Some(entry) = entries.next_entry().await? {
            if let Some(key) = entry.file_name().to_str().and_then(UploadKey::from_hex) {
                found.push(key);
            }
        }
        Ok(found)
    }

    async fn last_activity(&self, upload: &UploadKey) -> Result<Option<SystemTime>, StoreError> {
        let dir = self.upload_dir(upload);
        let mut latest = match tokio::fs::metadata(&dir).await {
            Ok(meta) => meta.modified()?,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        for name in ["meta.json", "parts", "answer"] {
            if let Ok(meta) = tokio::fs::metadata(dir.join(name)).await {
                latest = latest.max(meta.modified()?);
            }
        }
        Ok(Some(latest))
    }

    async fn remove(&self, upload: &UploadKey) -> Result<(), StoreError> {
        match tokio::fs::remove_dir_all(self.upload_dir(upload)).await {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}
