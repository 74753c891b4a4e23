//! One async lock per upload, created on demand and dropped when nobody holds or awaits it.

use crate::store::UploadKey;
use dashmap::DashMap;
use std::sync::Arc;
use tokio::sync::{Mutex, OwnedMutexGuard};

#[derive(Default)]
pub struct UploadLocks {
    map: DashMap<UploadKey, Arc<Mutex<()>>>,
}

pub struct UploadGuard<'a> {
    locks: &'a UploadLocks,
    key: UploadKey,
    guard: Option<OwnedMutexGuard<()>>,
}

impl UploadLocks {
    pub async fn lock(&self, key: UploadKey) -> UploadGuard<'_> {
        let mutex = self.map.entry(key).or_default().clone();
        UploadGuard {
            locks: self,
            key,
            guard: Some(mutex.lock_owned().await),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

impl Drop for UploadGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        // Only the map's own reference left: nobody holds or waits for this lock.
        self.locks
            .map
            .remove_if(&self.key, |_, mutex| Arc::strong_count(mutex) == 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_released_lock_leaves_no_entry_behind() {
        let locks = UploadLocks::default();
        let key = UploadKey::derive(&[b"a"]);
        drop(locks.lock(key).await);
        assert_eq!(locks.len(), 0);
    }

    #[tokio::test]
    async fn a_second_holder_waits_for_the_first() {
        let locks = Arc::new(UploadLocks::default());
        let key = UploadKey::derive(&[b"a"]);
        let first = locks.lock(key).await;
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _second = locks.lock(key).await;
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(first);
        waiter.await.unwrap();
        assert_eq!(locks.len(), 0);
    }
}
