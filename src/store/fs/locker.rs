//! Locks on local disk: an in-process lock orders this process's tasks, then a `flock` on a
//! lock file keeps other processes out. Keys are hashed onto a fixed set of lock files
//! (stripes), so lock files are never created and deleted per key (which races with `flock`).
//!
//! Each upload stripe's file holds a counter: the fencing token, one more for every lease
//! taken by any process. A process that sees the counter jump by more than one since its own
//! last lease knows another process took the stripe in between, and stops trusting what it
//! cached about the uploads hashed onto it.

use super::{Fs, BLOB_STRIPES, UPLOAD_STRIPES};
use crate::locks::KeyGuard;
use crate::store::{Fence, Lease, LockKey, Locker, StoreError};
use async_trait::async_trait;
use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub(super) struct FsLocker(pub(super) Arc<Fs>);

/// A held lock: the lock file (its `flock` goes with it), then the in-process lock.
struct Held {
    _file: File,
    _local: KeyGuard<LockKey>,
}

#[async_trait]
impl Locker for FsLocker {
    /// Leases here last as long as their holder: the kernel releases a `flock` when its
    /// process dies, never before, so `lease` needs no renewal.
    async fn lock(&self, key: LockKey, _lease: Duration) -> Result<Lease, StoreError> {
        let local = self.0.local.lock(key).await;
        let (name, stripe) = match key {
            LockKey::Upload(upload) => {
                let stripe = Fs::upload_stripe(&upload);
                (format!("upload-{stripe}"), Some(stripe))
            }
            LockKey::Blob(digest) => {
                let stripe = u64::from(u16::from_be_bytes([digest[0], digest[1]])) % BLOB_STRIPES;
                (format!("blob-{stripe}"), None)
            }
        };
        let file = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(self.0.root.join("locks").join(name))?;
        let mut wait = Duration::from_millis(1);
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) => {
                    // Held by another process: wait without holding a thread.
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(50));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
            }
        }
        let fence = match stripe {
            Some(stripe) => Fence(self.next_token(&file, stripe)?),
            None => Fence(0),
        };
        Ok(Lease::new(
            fence,
            Held {
                _file: file,
                _local: local,
            },
        ))
    }
}

impl FsLocker {
    /// Takes the stripe's next token (holding its lock), and notes whether another process
    /// took the stripe since this one last did.
    fn next_token(&self, file: &File, stripe: usize) -> std::io::Result<u64> {
        let mut bytes = [0u8; 8];
        let last = match file.read_exact_at(&mut bytes, 0) {
            Ok(()) => u64::from_be_bytes(bytes),
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e),
        };
        let token = last + 1;
        file.write_all_at(&token.to_be_bytes(), 0)?;
        let state = &self.0.stripes[stripe];
        if state.last_token.swap(token, Ordering::SeqCst) != last {
            state.epoch.fetch_add(1, Ordering::SeqCst);
        }
        debug_assert!(UPLOAD_STRIPES as usize == self.0.stripes.len());
        Ok(token)
    }
}
