//! Work in flight (requests being answered, deliveries, expiry sweeps), counted so that a
//! graceful shutdown (SIGTERM) ends as soon as there is none, instead of always waiting out
//! `shutdown_grace`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Default)]
pub struct InFlight(Arc<AtomicUsize>);

/// One piece of work; counted until dropped.
pub struct Working(Arc<AtomicUsize>);

impl InFlight {
    pub fn start(&self) -> Working {
        self.0.fetch_add(1, Ordering::SeqCst);
        Working(self.0.clone())
    }

    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// Blocks until nothing is in flight, or `within` has passed; true if nothing is.
    pub fn wait_idle(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while self.count() > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Waits (asynchronously) until nothing is in flight, or `within` has passed; true if
    /// nothing is.
    pub async fn idle(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while self.count() > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}

impl Drop for Working {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
