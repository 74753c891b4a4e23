//! Blobs on local disk: staged in `tmp/`, kept as `blobs/<aa>/<sha256>`.

use super::{remove_if_present, Fs};
use crate::store::{BlobStore, BodySource, Cut, Digest, Staged, StoreError};
use async_trait::async_trait;
use sha2::{Digest as _, Sha256};
use std::io::ErrorKind;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWriteExt};

pub(super) struct FsBlobs(pub(super) Arc<Fs>);

#[async_trait]
impl BlobStore for FsBlobs {
    async fn stage(&self, body: &mut dyn BodySource, limit: u64) -> Result<Staged, StoreError> {
        let (token, path) = self.0.tmp_path();
        let mut file = tokio::fs::File::create(&path).await?;
        let mut hasher = Sha256::new();
        let mut len = 0u64;
        let mut cut = None;
        let written = async {
            loop {
                let piece = match body.next_piece().await {
                    Ok(Some(piece)) => piece,
                    Ok(None) => break,
                    Err(e) => {
                        cut = Some(Cut::Body(e));
                        break;
                    }
                };
                let room = (limit - len).min(piece.len() as u64) as usize;
                hasher.update(&piece[..room]);
                file.write_all(&piece[..room]).await?;
                len += room as u64;
                if room < piece.len() {
                    cut = Some(Cut::TooLong(limit));
                    break;
                }
            }
            file.flush().await?;
            if self.0.fsync {
                file.sync_all().await?;
            }
            Ok::<_, std::io::Error>(())
        }
        .await;
        drop(file);
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(e.into());
        }
        Ok(Staged {
            len,
            digest: hasher.finalize().into(),
            cut,
            token,
        })
    }

    async fn keep(&self, staged: Staged) -> Result<(), StoreError> {
        let tmp = self.0.staging.join(&staged.token);
        let blob = self.0.blob_path(&staged.digest);
        let kept = async {
            if tokio::fs::try_exists(&blob).await? {
                return remove_if_present(&tmp).await;
            }
            // The blob's own directory entry needs no fsync: the part's link that references
            // it is what makes the bytes reachable, and that is fsynced.
            tokio::fs::create_dir_all(blob.parent().expect("blob paths have a parent")).await?;
            tokio::fs::rename(&tmp, &blob).await
        }
        .await;
        if kept.is_err() {
            // Give the space back at once.
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        Ok(kept?)
    }

    async fn discard(&self, staged: Staged) {
        let _ = tokio::fs::remove_file(self.0.staging.join(staged.token)).await;
    }

    async fn open(
        &self,
        digest: &Digest,
        len: u64,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, StoreError> {
        let file = tokio::fs::File::open(self.0.blob_path(digest)).await?;
        let actual = file.metadata().await?.len();
        if actual != len {
            return Err(StoreError::Corrupt(format!(
                "blob {} has {actual} bytes, expected {len}",
                hex::encode(&digest[..6])
            )));
        }
        Ok(Box::new(file))
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StoreError> {
        Ok(remove_if_present(&self.0.blob_path(digest)).await?)
    }

    async fn digests(&self) -> Result<Vec<Digest>, StoreError> {
        super::remove_dead_staging(&self.0.root.join("tmp"));
        let mut found = Vec::new();
        let mut shards = tokio::fs::read_dir(self.0.root.join("blobs")).await?;
        while let Some(shard) = shards.next_entry().await? {
            let mut blobs = match tokio::fs::read_dir(shard.path()).await {
                Ok(blobs) => blobs,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            while let Some(blob) = blobs.next_entry().await? {
                let mut digest = [0u8; 32];
                let name = blob.file_name();
                if let Some(hex) = name.to_str() {
                    if hex::decode_to_slice(hex, &mut digest).is_ok() {
                        found.push(digest);
                    }
                }
            }
        }
        Ok(found)
    }
}
