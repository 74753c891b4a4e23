//! What operators see of the uploads in store: the admin listing, and the gauges derived from it
//! (uploads in progress, bytes stored). Read without leases: a listing is a snapshot, and an
//! upload changing meanwhile shows either its state before or after.

use super::parts::complete_len;
use super::UploadCore;
use crate::store::StoreError;
use serde::Serialize;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One upload, as the listing shows it. Nothing a client sent but, when the operator asks for
/// them, file names.
#[derive(Debug, Serialize)]
pub struct Listed {
    /// Twelve hex digits of the upload's key, as the access log shows it.
    pub upload: String,
    pub route: Option<String>,
    pub protocol: Option<String>,
    /// A short hash of the user's scope ("" when the route has none).
    pub scope: Option<String>,
    /// The file's declared size (tus may not have declared it yet).
    pub declared_bytes: Option<u64>,
    pub stored_bytes: u64,
    pub parts: usize,
    pub age_seconds: Option<u64>,
    pub idle_seconds: Option<u64>,
    /// `receiving`, `complete`, `delivering`, `queued` (a retry is due), `refused` (the
    /// application asked who the user is: kept for other credentials) or `delivered`.
    pub delivery: &'static str,
    /// Delivery attempts started from the durable queue.
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_name: Option<String>,
}

impl Listed {
    /// Not delivered yet (what the "uploads in progress" gauge counts).
    pub fn in_progress(&self) -> bool {
        self.delivery != "delivered"
    }
}

/// Every upload in store, and the bytes the store holds.
pub struct Inventory {
    pub uploads: Vec<Listed>,
    pub stored_bytes: u64,
    /// Deliveries owed (entries in the durable queue).
    pub queued: usize,
}

impl UploadCore {
    /// Lists the uploads in store (oldest first), with file names only if `file_names`.
    pub async fn inventory(&self, file_names: bool) -> Result<Inventory, StoreError> {
        let state = &self.engines.state;
        let now = self.clock.now();
        let seconds_since = |at: SystemTime| now.duration_since(at).ok().map(|d| d.as_secs());
        let mut uploads = Vec::new();
        let mut owed = 0;
        for key in state.uploads().await? {
            let answer = state.answer(&key).await?.map(|(answer, _)| answer);
            // A delivered upload's metadata goes with its parts; its answer keeps a copy.
            let meta = match state.meta(&key).await? {
                Some(meta) => meta,
                None => match answer.as_ref().and_then(|a| a.file.as_ref()) {
                    Some(file) => file.meta.clone(),
                    None => continue,
                },
            };
            if !meta.protocol["alias"].is_null() {
                continue; // a name for another upload, or a tombstone: not an upload
            }
            let parts = state.parts(&key).await?;
            let queued = state.queued(&key).await?;
            owed += usize::from(queued.is_some());
            let delivery = match (&answer, &queued) {
                // Its answer stands from when it is recorded, while the parts are removed.
                (Some(answer), _) if answer.is_delivery() => "delivered",
                _ if self.flights.contains_key(&key) => "delivering",
                (Some(_), None) => "refused",
                (_, Some(_)) => "queued",
                (None, None) if complete_len(&parts, meta.length).is_some() => "complete",
                (None, None) => "receiving",
            };
            let origin = meta.origin.as_ref();
            let started = origin.map(|o| UNIX_EPOCH + Duration::from_millis(o.started_ms));
            uploads.push(Listed {
                upload: key.short(),
                route: origin.map(|o| o.route.clone()),
                protocol: origin.map(|o| o.protocol.clone()),
                scope: origin.map(|o| o.scope.clone()),
                declared_bytes: meta.length,
                stored_bytes: parts.values().map(|p| p.len).sum(),
                parts: parts.len(),
                age_seconds: started.and_then(seconds_since),
                idle_seconds: state.last_activity(&key).await?.and_then(seconds_since),
                delivery,
                attempts: queued.map_or(0, |q| q.attempts),
                file_name: file_names.then(|| meta.name.clone()),
            });
        }
        uploads.sort_by_key(|u| std::cmp::Reverse(u.age_seconds));
        Ok(Inventory {
            uploads,
            stored_bytes: self.engines.blobs.stored_bytes().await?,
            queued: owed,
        })
    }
}
