//! One async lock per key (an upload, a blob), created on demand and dropped when nobody holds
//! or awaits it.

use dashmap::DashMap;
use std::hash::Hash;
use std::sync::Arc;
use tokio::sync::{Mutex, OwnedMutexGuard};

pub struct KeyedLocks<K: Eq + Hash + Clone> {
    map: DashMap<K, Arc<Mutex<()>>>,
}

impl<K: Eq + Hash + Clone> Default for KeyedLocks<K> {
    fn default() -> Self {
        KeyedLocks {
            map: DashMap::new(),
        }
    }
}

pub struct KeyGuard<'a, K: Eq + Hash + Clone> {
    locks: &'a KeyedLocks<K>,
    key: K,
    guard: Option<OwnedMutexGuard<()>>,
}

impl<K: Eq + Hash + Clone> KeyedLocks<K> {
    pub async fn lock(&self, key: K) -> KeyGuard<'_, K> {
        // The guard exists before the wait, so that a wait given up (its future dropped) still
        // cleans up the entry.
        let mut guard = KeyGuard {
            locks: self,
            key: key.clone(),
            guard: None,
        };
        let mutex = self.map.entry(key).or_default().clone();
        guard.guard = Some(mutex.lock_owned().await);
        guard
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

impl<K: Eq + Hash + Clone> Drop for KeyGuard<'_, K> {
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
        let locks = KeyedLocks::default();
        let key = "a";
        drop(locks.lock(key).await);
        assert_eq!(locks.len(), 0);
    }

    #[tokio::test]
    async fn a_wait_given_up_leaves_no_entry_behind() {
        let locks = KeyedLocks::default();
        let first = locks.lock("a").await;
        let mut waiter = Box::pin(locks.lock("a"));
        assert!(futures::poll!(&mut waiter).is_pending());
        drop(first);
        drop(waiter); // given up after the lock was handed to it, before it saw so
        assert_eq!(locks.len(), 0);
    }

    #[tokio::test]
    async fn a_second_holder_waits_for_the_first() {
        let locks = Arc::new(KeyedLocks::default());
        let key = "a";
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
