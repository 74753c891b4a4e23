//! Local-disk engine for both stores (the default, single-instance setup).
//!
//! ```text
//! <dir>/tmp/<random>                     bytes being staged; cleared at start-up
//! <dir>/blobs/<aa>/<sha256>              one file per distinct content (deduplication)
//! <dir>/uploads/<key>/meta.json          pinned metadata
//! <dir>/uploads/<key>/parts/<n>-<len>-<sha256>   a hard link to the blob: one published part
//! <dir>/uploads/<key>/answer             the upstream's recorded answer
//! ```
//!
//! Publishing is `rename` (blob) then `link` (part), each atomic, with the file and its directory
//! fsynced first when `fsync` is on. A crash leaves either no part or a whole one. A blob's link
//! count says how many parts use it, so the last upload to let go of it deletes it.

use super::{
    BodySource, ChunkStore, RecordedAnswer, StageError, StagedPart, StateStore, StoreError,
    UploadKey, UploadMeta,
};
use async_trait::async_trait;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::sync::Mutex;

pub struct FsStore {
    root: PathBuf,
    fsync: bool,
    /// Serializes link/unlink of blobs so that a blob is never deleted while a part is linked to
    /// it. Held only for renames and links, never while bytes are written.
    blob_lock: Mutex<()>,
}

impl FsStore {
    /// Opens (creating if needed) a storage directory and clears half-written leftovers.
    pub fn open(root: &Path, fsync: bool) -> std::io::Result<FsStore> {
        for sub in ["tmp", "blobs", "uploads"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        for entry in std::fs::read_dir(root.join("tmp"))? {
            let _ = std::fs::remove_file(entry?.path());
        }
        Ok(FsStore {
            root: root.to_path_buf(),
            fsync,
            blob_lock: Mutex::new(()),
        })
    }

    fn upload_dir(&self, upload: &UploadKey) -> PathBuf {
        self.root.join("uploads").join(upload.hex())
    }

    fn blob_path(&self, digest: &[u8; 32]) -> PathBuf {
        let hex = hex::encode(digest);
        self.root.join("blobs").join(&hex[..2]).join(hex)
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

    /// Writes a small file atomically: temporary name, fsync, rename, fsync the directory.
    async fn write_atomic(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let dir = path.parent().expect("store paths have a parent");
        tokio::fs::create_dir_all(dir).await?;
        let tmp = self.root.join("tmp").join(random_name());
        let mut file = tokio::fs::File::create(&tmp).await?;
        file.write_all(bytes).await?;
        if self.fsync {
            file.sync_all().await?;
        }
        drop(file);
        tokio::fs::rename(&tmp, path).await?;
        self.sync_dir(dir).await
    }

    /// Finds the directory entry of part `number`, if stored.
    async fn part_entry(&self, upload: &UploadKey, number: u64) -> std::io::Result<Option<Part>> {
        Ok(self
            .list_parts(upload)
            .await?
            .into_iter()
            .find(|p| p.number == number))
    }

    async fn list_parts(&self, upload: &UploadKey) -> std::io::Result<Vec<Part>> {
        let dir = self.upload_dir(upload).join("parts");
        let mut entries = match tokio::fs::read_dir(&dir).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut parts = Vec::new();
        while let Some(entry) = entries.next_entry().await? {
            if let Some(part) = entry.file_name().to_str().and_then(Part::parse) {
                parts.push(Part {
                    path: entry.path(),
                    ..part
                });
            }
        }
        Ok(parts)
    }
}

/// A published part, as its link's name records it: `<number>-<len>-<sha256>`.
struct Part {
    number: u64,
    len: u64,
    digest: [u8; 32],
    path: PathBuf,
}

impl Part {
    fn parse(name: &str) -> Option<Part> {
        let mut fields = name.splitn(3, '-');
        let number = fields.next()?.parse().ok()?;
        let len = fields.next()?.parse().ok()?;
        let mut digest = [0u8; 32];
        hex::decode_to_slice(fields.next()?, &mut digest).ok()?;
        Some(Part {
            number,
            len,
            digest,
            path: PathBuf::new(),
        })
    }
}

fn random_name() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

#[async_trait]
impl ChunkStore for FsStore {
    async fn stage(&self, body: &mut dyn BodySource, limit: u64) -> Result<StagedPart, StageError> {
        let token = random_name();
        let path = self.root.join("tmp").join(&token);
        let mut file = tokio::fs::File::create(&path)
            .await
            .map_err(StoreError::Io)?;
        let written = async {
            let mut hasher = Sha256::new();
            let mut len = 0u64;
            while let Some(piece) = body.next_piece().await.map_err(StageError::Body)? {
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
        let blob = self.blob_path(&staged.digest);
        let parts_dir = self.upload_dir(upload).join("parts");
        let _guard = self.blob_lock.lock().await;
        if self.part_entry(upload, number).await?.is_some() {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Ok(false);
        }
        if tokio::fs::try_exists(&blob).await? {
            let _ = tokio::fs::remove_file(&tmp).await;
        } else {
            let blob_dir = blob.parent().expect("blob paths have a parent");
            tokio::fs::create_dir_all(blob_dir).await?;
            tokio::fs::rename(&tmp, &blob).await?;
            self.sync_dir(blob_dir).await?;
        }
        tokio::fs::create_dir_all(&parts_dir).await?;
        let name = format!("{number}-{}-{}", staged.len, hex::encode(staged.digest));
        tokio::fs::hard_link(&blob, parts_dir.join(name)).await?;
        self.sync_dir(&parts_dir).await?;
        Ok(true)
    }

    async fn parts(&self, upload: &UploadKey) -> Result<BTreeMap<u64, u64>, StoreError> {
        Ok(self
            .list_parts(upload)
            .await?
            .into_iter()
            .map(|p| (p.number, p.len))
            .collect())
    }

    async fn open(
        &self,
        upload: &UploadKey,
        number: u64,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, StoreError> {
        let part = self
            .part_entry(upload, number)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("{upload:?} has no part {number}")))?;
        let file = tokio::fs::File::open(&part.path).await?;
        let actual = file.metadata().await?.len();
        if actual != part.len {
            return Err(StoreError::Corrupt(format!(
                "{upload:?} part {number} has {actual} bytes, expected {}",
                part.len
            )));
        }
        Ok(Box::new(file))
    }

    async fn remove_parts(&self, upload: &UploadKey) -> Result<(), StoreError> {
        let _guard = self.blob_lock.lock().await;
        for part in self.list_parts(upload).await? {
            tokio::fs::remove_file(&part.path).await?;
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
}

#[async_trait]
impl StateStore for FsStore {
    async fn meta(&self, upload: &UploadKey) -> Result<Option<UploadMeta>, StoreError> {
        match tokio::fs::read(self.upload_dir(upload).join("meta.json")).await {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("{upload:?} meta.json: {e}"))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn save_meta(&self, upload: &UploadKey, meta: &UploadMeta) -> Result<(), StoreError> {
        let json = serde_json::to_vec(meta).expect("metadata serializes");
        let path = self.upload_dir(upload).join("meta.json");
        Ok(self.write_atomic(&path, &json).await?)
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
        let newline = bytes
            .iter()
            .position(|b| *b == b'\n')
            .ok_or_else(|| StoreError::Corrupt(format!("{upload:?} answer has no header")))?;
        let mut answer: RecordedAnswer = serde_json::from_slice(&bytes[..newline])
            .map_err(|e| StoreError::Corrupt(format!("{upload:?} answer: {e}")))?;
        answer.body = bytes::Bytes::copy_from_slice(&bytes[newline + 1..]);
        Ok(Some((answer, recorded_at)))
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
        Ok(self.write_atomic(&path, &bytes).await?)
    }

    async fn uploads(&self) -> Result<Vec<(UploadKey, SystemTime)>, StoreError> {
        let mut found = Vec::new();
        let mut entries = tokio::fs::read_dir(self.root.join("uploads")).await?;
        while let Some(entry) = entries.next_entry().await? {
            let Some(key) = entry.file_name().to_str().and_then(UploadKey::from_hex) else {
                continue;
            };
            let mut latest = entry.metadata().await?.modified()?;
            for name in ["meta.json", "parts", "answer"] {
                if let Ok(meta) = tokio::fs::metadata(entry.path().join(name)).await {
                    latest = latest.max(meta.modified()?);
                }
            }
            found.push((key, latest));
        }
        Ok(found)
    }

    async fn remove(&self, upload: &UploadKey) -> Result<(), StoreError> {
        match tokio::fs::remove_dir_all(self.upload_dir(upload)).await {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}
