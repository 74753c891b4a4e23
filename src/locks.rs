//! One async lock per key (an upload, a blob) within this process, created on demand and
//! dropped when nobody holds or awaits it. The engines' lockers build on it: it orders the
//! tasks of one process, and an engine adds what keeps other processes out.

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

/// A held lock; released when dropped.
pub struct KeyGuard<K: Eq + Hash + Clone> {
    locks: Arc<KeyedLocks<K>>,
    key: K,
    guard: Option<OwnedMutexGuard<()>>,
}

impl<K: Eq + Hash + Clone> KeyedLocks<K> {
    pub async fn lock(self: &Arc<Self>, key: K) -> KeyGuard<K> {
        // The guard exists before the wait, so that a wait given up (its future dropped) still
        // cleans up the entry.
        let mut guard = KeyGuard {
            locks: Arc::clone(self),
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

impl<K: Eq + Hash + Clone> Drop for KeyGuard<K> {
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
        let locks = Arc::new(KeyedLocks::default());
        drop(locks.lock("a").await);
        assert_eq!(locks.len(), 0);
    }

    #[tokio::test]
    async fn a_wait_given_up_leaves_no_entry_behind() {
        let locks = Arc::new(KeyedLocks::default());
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
        let first = locks.lock("a").await;
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _second = locks.lock("a").await;
            })
        };
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(first);
        waiter.await.unwrap();
        assert_eq!(locks.len(), 0);
    }
}
