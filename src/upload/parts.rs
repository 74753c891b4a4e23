//! Storing parts: by number (Resumable.js and Flow.js chunks, any order) or by offset (tus
//! appends, in order), and the questions protocols ask about them.

use super::{CoreError, FieldsDigest, PartRef, PartStatus, UploadCore};
use crate::store::{
    BodyError, BodySource, Cut, Digest, Fence, LockKey, PartIndex, RecordedAnswer, Staged,
    StoredPart, UploadKey, UploadMeta,
};

/// Where an upload stands, for a protocol that uploads by offset.
#[derive(Debug, Clone)]
pub struct Progress {
    pub meta: UploadMeta,
    /// Bytes stored contiguously from the start.
    pub offset: u64,
    /// The file was delivered (its answer is recorded).
    pub delivered: bool,
    /// When the upload expires if nothing touches it (not for a delivered file).
    pub expires: Option<std::time::SystemTime>,
}

/// The result of an append.
#[derive(Debug)]
pub struct Appended {
    /// The upload's offset now.
    pub offset: u64,
    /// The upload has all its bytes.
    pub complete: bool,
    /// The body ended early; the bytes that arrived before are stored (unless a checksum of
    /// the whole body was to be checked: then none are, and `offset` did not move).
    pub broke_off: Option<BodyError>,
}

impl UploadCore {
    /// Is this part stored? Asked by a test request (see [`put_part`](Self::put_part) for a
    /// chunk's). A test changes nothing, but for one thing: parts the client may never have
    /// sent are forgotten first (see [`drop_unclaimed`](Self::drop_unclaimed)).
    ///
    /// For a delivered file the answer is "not stored": a test cannot prove that the client
    /// has the same file (the default identifier is only its size and name), so the client
    /// sends the bytes, and a chunk whose bytes match the delivered ones gets the answer.
    pub async fn status(
        &self,
        upload: &UploadKey,
        declared: &UploadMeta,
        part: PartRef,
        fields: &FieldsDigest,
    ) -> Result<PartStatus, CoreError> {
        self.status_for(upload, declared, part, fields, true).await
    }

    /// [`status`](Self::status), for a test (`test`) or for a chunk before its bytes are read.
    async fn status_for(
        &self,
        upload: &UploadKey,
        declared: &UploadMeta,
        part: PartRef,
        fields: &FieldsDigest,
        test: bool,
    ) -> Result<PartStatus, CoreError> {
        let pinned = self.engines.state.meta(upload).await?;
        if let Some(pinned) = &pinned {
            check_pinned(pinned, declared)?;
        }
        let carried = pinned.map(|meta| meta.carried).unwrap_or_default();
        let delivered = self.delivery_answer(upload).await?;
        if delivered.is_some() || !carried.is_empty() {
            // Both clients go through a file in order and test each chunk before they send
            // it: a test of the first chunk begins a client's pass through the file.
            let whole = test && part.number == 1;
            if whole || carried.contains(&part.number) || delivered.is_some() {
                self.drop_unclaimed(upload, (!whole).then_some(part.number))
                    .await?;
            }
        }
        if delivered.is_some_and(|delivered| self.is_fresh(&delivered, fields)) {
            return Ok(PartStatus::Missing);
        }
        let status = self.part_status(upload, declared, part).await?;
        if matches!(status, PartStatus::Stored { .. }) {
            // The part may be another request's, linked but not yet durable (see `commit`):
            // it is not said to be stored before it is.
            self.engines.state.sync_parts(upload).await?;
        }
        Ok(status)
    }

    async fn is_carried(&self, upload: &UploadKey, number: u64) -> Result<bool, CoreError> {
        let meta = self.engines.state.meta(upload).await?;
        Ok(meta.is_some_and(|meta| meta.carried.contains(&number)))
    }

    /// Part `number` is claimed: no longer carried (see `carry`). Call under the lease.
    async fn uncarry(
        &self,
        upload: &UploadKey,
        number: u64,
        fence: Fence,
    ) -> Result<(), CoreError> {
        let state = &self.engines.state;
        if let Some(mut meta) = state.meta(upload).await? {
            if let Ok(at) = meta.carried.binary_search(&number) {
                meta.carried.remove(at);
                state.save_meta(upload, &meta, fence).await?;
            }
        }
        Ok(())
    }

    /// Notes, as a new upload of a delivered file's identifier begins, the parts it starts with
    /// (all but `except`, the part that began it): they were stored after the delivery because
    /// they matched the delivered file (see `commit`), and their metadata was pinned then.
    /// Noted in the metadata, so that every process, and this one after a restart, knows.
    async fn carry(
        &self,
        upload: &UploadKey,
        except: Option<u64>,
        fence: Fence,
    ) -> Result<(), CoreError> {
        let state = &self.engines.state;
        let Some(mut meta) = state.meta(upload).await? else {
            return Ok(());
        };
        let parts = state.parts(upload).await?;
        let carried: Vec<u64> = parts
            .keys()
            .copied()
            .filter(|number| Some(*number) != except)
            .collect();
        if carried != meta.carried {
            meta.carried = carried;
            state.save_meta(upload, &meta, fence).await?;
        }
        Ok(())
    }

    /// Lets a delivered file's answer go as a new upload of its identifier begins, with the
    /// parts kept since noted as carried first (all but `except`, see [`carry`](Self::carry)).
    /// Call under the lease.
    pub(super) async fn supersede(
        &self,
        upload: &UploadKey,
        except: Option<u64>,
        fence: Fence,
    ) -> Result<(), CoreError> {
        self.carry(upload, except, fence).await?;
        Ok(self.engines.state.remove_answer(upload, fence).await?)
    }

    /// Forgets part `only` of `upload` (`None`: every part) if it is there and the client
    /// asking about it may never have sent it: a part stored after the upload's delivery
    /// because its bytes matched the delivered file, or such a part kept when a new upload of
    /// the identifier began (see [`carry`](Self::carry)) that no chunk of the new upload has
    /// claimed since.
    ///
    /// Such a part is most often a delivered file's chunk retried after its answer was lost
    /// (a crash, a cut connection): its client got the answer and is done. A client that asks
    /// about that number later is another one, most likely with a new file of the same name
    /// and size, and taking the old bytes for its own would splice two files. The client
    /// sends what it is told is missing, so forgetting costs a chunk sent again; the chunks
    /// that a new file sent itself before it turned out to differ from the delivered one are
    /// asked about only before they are sent, so they are kept.
    async fn drop_unclaimed(&self, upload: &UploadKey, only: Option<u64>) -> Result<(), CoreError> {
        let parts = self.engines.state.parts(upload).await?;
        if parts.is_empty() || only.is_some_and(|number| !parts.contains_key(&number)) {
            return Ok(());
        }
        let lease = self.lock(upload).await?;
        let state = &self.engines.state;
        // Again under the lease: the upload may have been finished or claimed meanwhile.
        let delivered = self.delivery_answer(upload).await?;
        if let Some((answer, _)) = &delivered {
            // The delivered file's own parts, left by a crash: they all go, not one of them.
            self.clean_leftovers(upload, answer, lease.fence).await?;
        }
        let carried = state
            .meta(upload)
            .await?
            .map(|meta| meta.carried)
            .unwrap_or_default();
        let unclaimed: Vec<u64> = state
            .parts(upload)
            .await?
            .keys()
            .copied()
            .filter(|number| only.is_none_or(|only| only == *number))
            .filter(|number| delivered.is_some() || carried.contains(number))
            .collect();
        for number in unclaimed {
            let old = state.remove_part(upload, number, lease.fence).await?;
            self.release(old.into_iter().collect()).await?;
            tracing::info!(
                "{upload:?}: part {number} forgotten, to be sent again: it was kept from the \
                 delivered file, and the client asking may not be the one that sent it"
            );
        }
        drop(lease);
        Ok(())
    }

    pub(super) async fn part_status(
        &self,
        upload: &UploadKey,
        meta: &UploadMeta,
        part: PartRef,
    ) -> Result<PartStatus, CoreError> {
        let parts = self.engines.state.parts(upload).await?;
        match parts.get(&part.number) {
            None => Ok(PartStatus::Missing),
            Some(stored) if stored.len != part.len => Err(CoreError::PartLength {
                number: part.number,
                stored: stored.len,
                declared: part.len,
            }),
            Some(_) => Ok(PartStatus::Stored {
                complete: complete_len(&parts, meta.length).is_some(),
            }),
        }
    }

    /// Stores `body` as part `part` of `upload` (unless it is stored already): streams it in,
    /// checks its length, checks the declared metadata against the pinned one (pinning it for
    /// a new upload), and publishes it or lets it go.
    pub async fn put_part(
        &self,
        upload: &UploadKey,
        declared: &UploadMeta,
        part: PartRef,
        body: &mut dyn BodySource,
        fields: &FieldsDigest,
    ) -> Result<PartStatus, CoreError> {
        match self
            .status_for(upload, declared, part, fields, false)
            .await?
        {
            PartStatus::Missing => {}
            known => {
                while let Ok(Some(_)) = body.next_piece().await {}
                return Ok(known);
            }
        }
        let staged = self.engines.blobs.stage(body, part.len).await?;
        let refusal = match &staged.cut {
            Some(Cut::TooLong(limit)) => Some(CoreError::TooLong { limit: *limit }),
            Some(Cut::Body(e)) => Some(CoreError::Short {
                declared: part.len,
                received: staged.len,
                broke_off: Some(e.clone()),
            }),
            None if staged.len != part.len => Some(CoreError::Short {
                declared: part.len,
                received: staged.len,
                broke_off: None,
            }),
            None => None,
        };
        if let Some(refusal) = refusal {
            self.engines.blobs.discard(staged).await;
            return Err(refusal);
        }
        self.commit(upload, declared, part, staged, fields).await
    }

    /// Publishes staged bytes as a part, pinning the upload's metadata if this is its first part.
    ///
    /// After a delivery, a chunk whose bytes are the delivered file's part gets the recorded
    /// answer; it is stored all the same, because the client's file may still turn out to
    /// differ in a later chunk (same name and size, other content), and then the chunks that
    /// matched belong to the new upload. A chunk that differs starts that new upload.
    async fn commit(
        &self,
        upload: &UploadKey,
        declared: &UploadMeta,
        part: PartRef,
        staged: Staged,
        fields: &FieldsDigest,
    ) -> Result<PartStatus, CoreError> {
        let chunk = StoredPart {
            number: part.number,
            len: staged.len,
            digest: staged.digest,
        };
        let checked = async {
            let lease = self.lock(upload).await?;
            let delivered = self
                .pinned_or_delivered(upload, declared, fields, lease.fence)
                .await?;
            Ok::<_, CoreError>((lease, delivered))
        }
        .await;
        let (lease, delivered) = match checked {
            Ok(checked) => checked,
            Err(e) => {
                self.engines.blobs.discard(staged).await;
                return Err(e);
            }
        };
        if let Some((answer, false)) = &delivered {
            // The answer is not written down yet (a full disk): it stays the word for the
            // delivered file, and nothing new can be stored meanwhile.
            self.engines.blobs.discard(staged).await;
            return match answer
                .file
                .as_ref()
                .is_some_and(|f| f.contains(declared, &chunk))
            {
                true => Ok(PartStatus::Delivered(Box::new(answer.clone()))),
                false => Err(CoreError::Store(crate::store::StoreError::Io(
                    std::io::Error::other("the last delivery's answer is not recorded yet"),
                ))),
            };
        }
        let carried = self.is_carried(upload, part.number).await?;
        if delivered.is_some() || carried {
            // The parts stored since the delivery all match it; other bytes for one of their
            // numbers belong to the file now being uploaded.
            let stored = self.engines.state.parts(upload).await?;
            if stored.get(&part.number).is_some_and(|p| *p != chunk) {
                let old = self
                    .engines
                    .state
                    .remove_part(upload, part.number, lease.fence)
                    .await?;
                self.release(old.into_iter().collect()).await?;
            }
        }
        // A new part's link is made durable after the lease is let go (below), where the
        // chunks sent in parallel share one fsync of the parts directory instead of taking
        // turns for one each; the rare re-sent part of a delivered file is durable at once.
        let later = delivered.is_none();
        self.publish_with(upload, part.number, staged, lease.fence, later)
            .await?;
        if carried {
            // The part is this request's now, whoever stored its number before.
            self.uncarry(upload, part.number, lease.fence).await?;
        }
        if let Some((answer, _)) = delivered {
            let same = answer
                .file
                .as_ref()
                .is_some_and(|f| f.contains(declared, &chunk));
            if same {
                let parts = self.engines.state.parts(upload).await?;
                if complete_len(&parts, declared.length).is_some() {
                    // The delivered file, sent again whole: nothing new to deliver.
                    self.finish(upload, lease.fence).await?;
                }
                return Ok(PartStatus::Delivered(Box::new(answer)));
            }
            // A new upload of the identifier begins with the parts that matched.
            self.supersede(upload, Some(part.number), lease.fence)
                .await?;
        }
        drop(lease);
        if later {
            // Also when the part was there already (another request's, perhaps not durable
            // yet): one fsync covers every link made before it. If it fails, the chunk is
            // refused and the part stays linked: no answer says it is stored until a later
            // fsync succeeds (`status` makes one before it says so).
            self.engines.state.sync_parts(upload).await?;
        }
        self.part_status(upload, declared, part).await
    }

    /// Checks the declared metadata against the pinned one (pinning it if there is none) and
    /// returns the delivered file's answer that applies to these fields, if any, with whether
    /// it is recorded. An answer that does not apply (expired, other fields) is forgotten:
    /// this is a new upload of the file.
    async fn pinned_or_delivered(
        &self,
        upload: &UploadKey,
        declared: &UploadMeta,
        fields: &FieldsDigest,
        fence: Fence,
    ) -> Result<Option<(RecordedAnswer, bool)>, CoreError> {
        self.record_pending(upload, fence).await;
        if let Some(entry) = self.unrecorded.get(upload) {
            return Ok(Some((entry.clone(), false)));
        }
        let state = &self.engines.state;
        let delivered = match state.answer(upload).await? {
            Some((answer, at)) if answer.is_delivery() => {
                self.clean_leftovers(upload, &answer, fence).await?;
                if self.applies(&answer, at, fields) {
                    Some((answer, true))
                } else {
                    self.supersede(upload, None, fence).await?;
                    None
                }
            }
            _ => None,
        };
        let pinned = state.meta(upload).await?;
        if let Some(pinned) = &pinned {
            check_pinned(pinned, declared)?;
        }
        // Activity first: an upload is in the expiry index before anything of it is stored.
        state.touch(upload, self.clock.now()).await?;
        if pinned.is_none() {
            state.save_meta(upload, declared, fence).await?;
            self.metrics.upload_event("started");
        }
        Ok(delivered)
    }

    /// Keeps staged bytes and adds them as part `number`, under the blob's lock (so that the
    /// blob cannot be deleted between being found and being referenced). Returns false if the
    /// upload had that part already.
    pub(super) async fn publish(
        &self,
        upload: &UploadKey,
        number: u64,
        staged: Staged,
        fence: Fence,
    ) -> Result<bool, CoreError> {
        self.publish_with(upload, number, staged, fence, false)
            .await
    }

    /// [`publish`](Self::publish), leaving the part's link to be made durable by
    /// `StateStore::sync_parts` if `later`.
    async fn publish_with(
        &self,
        upload: &UploadKey,
        number: u64,
        staged: Staged,
        fence: Fence,
        later: bool,
    ) -> Result<bool, CoreError> {
        let part = StoredPart {
            number,
            len: staged.len,
            digest: staged.digest,
        };
        let blob_lock = self
            .engines
            .locker
            .lock(LockKey::Blob(part.digest), super::LEASE)
            .await;
        let blob_lock = match blob_lock {
            Ok(lock) => lock,
            Err(e) => {
                self.engines.blobs.discard(staged).await;
                return Err(e.into());
            }
        };
        let known = self.engines.blobs.keep(staged).await?;
        let added = match later {
            true => {
                self.engines
                    .state
                    .add_part_unsynced(upload, part, fence)
                    .await
            }
            false => self.engines.state.add_part(upload, part, fence).await,
        };
        if matches!(added, Ok(true)) {
            self.part_stored(upload);
            self.metrics.parts_stored.inc();
            if known {
                self.metrics.parts_deduplicated.inc();
                self.metrics.deduplicated_bytes.inc_by(part.len);
            }
        }
        if !matches!(added, Ok(true)) {
            // Kept for nothing (the part was there, or adding it failed): let it go if
            // nothing else uses it.
            if !self.engines.state.is_referenced(&part.digest).await? {
                self.engines.blobs.delete(&part.digest).await?;
            }
        }
        drop(blob_lock);
        Ok(added?)
    }

    /// Deletes the blobs among `digests` that no part references any more, several at a time
    /// (each under its own blob lock, one at a time per task): one after the other, the blobs
    /// of a 1 GiB file in 1 MiB chunks took 0.8 s here, while the upload's lease is held.
    /// Every one is tried, and the first error reported: a failure does not cut short another
    /// task's delete, which would let its blob lock go while the unlink may still land.
    pub(super) async fn release(&self, digests: Vec<Digest>) -> Result<(), CoreError> {
        use futures::StreamExt;
        const AT_ONCE: usize = 8;
        let results: Vec<Result<(), CoreError>> = futures::stream::iter(digests)
            .map(|digest| async move {
                let _blob_lock = self
                    .engines
                    .locker
                    .lock(LockKey::Blob(digest), super::LEASE)
                    .await?;
                if !self.engines.state.is_referenced(&digest).await? {
                    self.engines.blobs.delete(&digest).await?;
                }
                Ok(())
            })
            .buffer_unordered(AT_ONCE)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// Ends a delivered upload: its parts and pinned metadata go, its answer stays.
    pub(super) async fn finish(&self, upload: &UploadKey, fence: Fence) -> Result<(), CoreError> {
        let released = self.engines.state.remove_parts(upload, fence).await?;
        self.release(released).await?;
        Ok(self.engines.state.remove_meta(upload, fence).await?)
    }

    /// Starts an upload whose identity is its key (tus): pins its metadata, which may lack the
    /// length (declared later with [`declare_length`](Self::declare_length)).
    pub async fn create(&self, upload: &UploadKey, meta: &UploadMeta) -> Result<(), CoreError> {
        if let Err(e) = self.record_meta(upload, meta).await {
            // Its activity may be written already (a full disk took the metadata only): nothing
            // is left of an upload the client is not told of.
            if let Err(cleanup) = self.discard(upload).await {
                tracing::warn!("{upload:?}: removing a failed creation failed: {cleanup}");
            }
            return Err(e);
        }
        self.metrics.upload_event("started");
        Ok(())
    }

    async fn record_meta(&self, upload: &UploadKey, meta: &UploadMeta) -> Result<(), CoreError> {
        let lease = self.lock(upload).await?;
        self.engines.state.touch(upload, self.clock.now()).await?;
        self.engines
            .state
            .save_meta(upload, meta, lease.fence)
            .await?;
        Ok(())
    }

    /// Declares the length of an upload created without one.
    pub async fn declare_length(&self, upload: &UploadKey, length: u64) -> Result<(), CoreError> {
        let lease = self.lock(upload).await?;
        let state = &self.engines.state;
        let mut meta = state.meta(upload).await?.ok_or(CoreError::NotFound)?;
        let stored = state.parts(upload).await?.contiguous_len();
        if length < stored {
            return Err(CoreError::TooLong { limit: length });
        }
        match meta.length {
            Some(declared) if declared != length => Err(CoreError::LengthDeclared { declared }),
            Some(_) => Ok(()),
            None => {
                meta.length = Some(length);
                Ok(state.save_meta(upload, &meta, lease.fence).await?)
            }
        }
    }

    /// Stops an append under way for `upload` in this process, if any, and waits until the
    /// bytes it received are kept (see `takeover`), for at most `SETTLE_WAIT` (a stalled disk
    /// may hold them longer: the look then goes on without them).
    pub async fn settle(&self, upload: &UploadKey) -> Result<(), CoreError> {
        const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
        if self.appends.interrupt(upload) {
            if let Ok(lease) = tokio::time::timeout(SETTLE_WAIT, self.lock(upload)).await {
                drop(lease?);
            }
        }
        Ok(())
    }

    /// Where an upload stands (`None`: no such upload). Read-only.
    pub async fn progress(&self, upload: &UploadKey) -> Result<Option<Progress>, CoreError> {
        let state = &self.engines.state;
        // The answer first: a delivered upload's parts are removed after its answer is
        // recorded, and a look meanwhile must not take the half-removed parts for its offset.
        let delivered = match self.unrecorded.get(upload) {
            Some(answer) => answer.file.clone(),
            None => state.answer(upload).await?.and_then(|(a, _)| a.file),
        };
        if let Some(file) = delivered {
            return Ok(Some(Progress {
                offset: file.parts.iter().map(|p| p.len).sum(),
                meta: file.meta,
                delivered: true,
                expires: None,
            }));
        }
        let Some(meta) = state.meta(upload).await? else {
            return Ok(None);
        };
        let parts = state.parts(upload).await?;
        let expires = state
            .last_activity(upload)
            .await?
            .map(|at| at + self.ttls.upload);
        Ok(Some(Progress {
            meta,
            offset: parts.contiguous_len(),
            delivered: false,
            expires,
        }))
    }

    /// Appends `body` at offset `at` (which must be the upload's offset), at most `limit`
    /// bytes and never past the declared length. A body that breaks off keeps the bytes that
    /// arrived. `accept` sees the staged bytes before they are kept (a checksum check): if it
    /// says no, nothing is kept (and a body that broke off is reported so, not refused: a
    /// checksum of the whole body cannot match what arrived of it).
    pub async fn append(
        &self,
        upload: &UploadKey,
        at: u64,
        body: &mut dyn BodySource,
        limit: u64,
        accept: &(dyn Fn(&Staged) -> bool + Send + Sync),
    ) -> Result<Appended, CoreError> {
        let running = self.appends.take_over(upload);
        let mut body = running.wrap(body);
        let body: &mut dyn BodySource = &mut body;
        let Appending {
            lease,
            meta,
            current,
            room,
            next,
        } = self
            .start_append(upload, at, limit, running.arrived)
            .await?;
        // Another process's newer request may ask it to stop while the body is read.
        let _watching = running.watch_other_processes(self.engines.state.clone());
        let state = &self.engines.state;
        let staged = self.engines.blobs.stage(body, room).await?;
        let broke_off = match &staged.cut {
            Some(Cut::TooLong(limit)) => {
                let limit = *limit;
                self.engines.blobs.discard(staged).await;
                return Err(CoreError::TooLong { limit });
            }
            Some(Cut::Body(e)) => Some(e.clone()),
            None => None,
        };
        if !accept(&staged) {
            self.engines.blobs.discard(staged).await;
            if broke_off.is_some() {
                state.touch(upload, self.clock.now()).await?;
                return Ok(Appended {
                    offset: current,
                    complete: false,
                    broke_off,
                });
            }
            return Err(CoreError::Refused);
        }
        let offset = current + staged.len;
        if staged.len == 0 {
            self.engines.blobs.discard(staged).await;
        } else {
            self.publish(upload, next, staged, lease.fence).await?;
        }
        state.touch(upload, self.clock.now()).await?;
        Ok(Appended {
            offset,
            complete: meta.length == Some(offset),
            broke_off,
        })
    }

    /// Takes the lease for an append at `at` and says where the upload stands: its offset
    /// (which must be `at`), the room left (at most `limit`), the next part's number.
    async fn start_append(
        &self,
        upload: &UploadKey,
        at: u64,
        limit: u64,
        arrived: std::time::SystemTime,
    ) -> Result<Appending, CoreError> {
        let lease = self.lock_asking(upload, arrived).await?;
        let state = &self.engines.state;
        let meta = state.meta(upload).await?.ok_or(CoreError::NotFound)?;
        let parts = state.parts(upload).await?;
        let current = parts.contiguous_len();
        if current != at {
            return Err(CoreError::OffsetMismatch { current });
        }
        let room = meta
            .length
            .map_or(limit, |length| length.saturating_sub(current))
            .min(limit);
        Ok(Appending {
            lease,
            meta,
            current,
            room,
            next: parts.keys().next_back().map_or(1, |n| n + 1),
        })
    }

    /// Appends `body` at offset `at` like [`UploadCore::append`], without a check of the whole
    /// body, storing it as parts of at most `piece` bytes, each made durable and kept while the
    /// next one arrives: an early delivery sends each while the rest arrives. `body` must not carry more than the
    /// room left (the caller checked its Content-Length): what passes it is refused, and the
    /// pieces kept before stay.
    pub async fn append_in_pieces(
        &self,
        upload: &UploadKey,
        at: u64,
        body: &mut dyn BodySource,
        limit: u64,
        piece: u64,
    ) -> Result<Appended, CoreError> {
        let running = self.appends.take_over(upload);
        let mut body = running.wrap(body);
        let body: &mut dyn BodySource = &mut body;
        let Appending {
            lease,
            meta,
            current,
            room,
            mut next,
        } = self
            .start_append(upload, at, limit, running.arrived)
            .await?;
        // Another process's newer request may ask it to stop while the body is read.
        let _watching = running.watch_other_processes(self.engines.state.clone());
        // Each piece is made durable and kept while the next one is received (the client is
        // not held up by the fsync), one piece ahead at most; should keeping it fail, the
        // next one stops reading at once.
        let (failed, stop) = tokio::sync::watch::channel(false);
        let mut body = Stoppable { body, stop };
        let mut offset = current;
        let mut carry = None;
        let mut keeping: Option<Keeping<'_>> = None;
        let outcome = loop {
            let budget = room - (offset - current);
            let receive = async {
                // Only a body with more to come starts a piece (no empty part at the end).
                while carry.is_none() {
                    match body.next_piece().await {
                        Ok(Some(bytes)) if bytes.is_empty() => {}
                        Ok(Some(bytes)) => carry = Some(bytes),
                        Ok(None) => return Ok(Piece::End(None)),
                        Err(e) => return Ok(Piece::End(Some(e))),
                    }
                }
                if budget == 0 {
                    // Bytes beyond the room.
                    return Err(CoreError::TooLong { limit: room });
                }
                let size = piece.min(budget);
                let mut window = Window {
                    body: &mut body,
                    carry: &mut carry,
                    left: size,
                };
                let staged = self
                    .engines
                    .blobs
                    .stage_unsynced(&mut window, budget)
                    .await?;
                Ok(Piece::Staged(staged, size))
            };
            let before = async {
                let kept = match keeping.take() {
                    Some(keeping) => keeping.await,
                    None => Ok(()),
                };
                if kept.is_err() {
                    let _ = failed.send(true);
                }
                kept
            };
            let (received, kept) = tokio::join!(receive, before);
            if let Err(e) = kept {
                if let Ok(Piece::Staged(staged, _)) = received {
                    self.engines.blobs.discard(staged).await;
                }
                break Err(e);
            }
            let (staged, size) = match received {
                Ok(Piece::Staged(staged, size)) => (staged, size),
                Ok(Piece::End(broke_off)) => break Ok(broke_off),
                Err(e) => break Err(e),
            };
            let broke_off = match &staged.cut {
                Some(Cut::TooLong(limit)) => {
                    let limit = *limit;
                    self.engines.blobs.discard(staged).await;
                    break Err(CoreError::TooLong { limit });
                }
                Some(Cut::Body(e)) => Some(e.clone()),
                None => None,
            };
            let staged_len = staged.len;
            if staged_len == 0 {
                self.engines.blobs.discard(staged).await;
            } else {
                offset += staged_len;
                keeping = Some(Box::pin(self.keep_piece(upload, next, staged, lease.fence)));
                next += 1;
            }
            if broke_off.is_some() || (staged_len < size && carry.is_none()) {
                // Broke off, or ended within the window.
                break Ok(broke_off);
            }
        };
        // The last piece (or the one received when the body ended) is kept before the answer.
        if let Some(keeping) = keeping {
            keeping.await?;
        }
        let broke_off = outcome?;
        self.engines.state.touch(upload, self.clock.now()).await?;
        Ok(Appended {
            offset,
            complete: meta.length == Some(offset),
            broke_off,
        })
    }

    /// Makes a staged piece durable and keeps it as part `number` (see `append_in_pieces`).
    async fn keep_piece(
        &self,
        upload: &UploadKey,
        number: u64,
        staged: Staged,
        fence: Fence,
    ) -> Result<(), CoreError> {
        if let Err(e) = self.engines.blobs.sync_staged(&staged).await {
            self.engines.blobs.discard(staged).await;
            return Err(e.into());
        }
        self.publish(upload, number, staged, fence).await?;
        // Active, for expiry, should this body end in a crash or a failed write.
        self.engines.state.touch(upload, self.clock.now()).await?;
        Ok(())
    }

    /// Creates `upload` whole, as the concatenation of `sources` (complete uploads) in order,
    /// from their stored parts: no byte is copied, each part references the same blob. `meta`'s
    /// length is set to the sum. Returns it. Nothing is created if a source is missing or not
    /// complete.
    pub async fn concatenate(
        &self,
        upload: &UploadKey,
        meta: &UploadMeta,
        sources: &[UploadKey],
    ) -> Result<u64, CoreError> {
        let state = &self.engines.state;
        // Each source is read under its own lease (never two leases at once).
        let mut file = Vec::new();
        for source in sources {
            let _lease = self.lock(source).await?;
            let source_meta = state.meta(source).await?.ok_or(CoreError::NotFound)?;
            let parts = state.parts(source).await?;
            let count = complete_len(&parts, source_meta.length).ok_or(CoreError::Incomplete)?;
            file.extend((1..=count).map(|n| parts[&n]));
        }
        let total: u64 = file.iter().map(|p| p.len).sum();
        let lease = self.lock(upload).await?;
        let linked = async {
            state.touch(upload, self.clock.now()).await?;
            let meta = UploadMeta {
                length: Some(total),
                ..meta.clone()
            };
            state.save_meta(upload, &meta, lease.fence).await?;
            self.metrics.upload_event("started");
            for (number, part) in (1..).zip(&file) {
                // Under the blob's lock: a source removed meanwhile cannot delete it while
                // this reference is being added (a blob gone already fails the link).
                let _blob = self
                    .engines
                    .locker
                    .lock(LockKey::Blob(part.digest), super::LEASE)
                    .await?;
                let part = StoredPart { number, ..*part };
                if let Err(e) = state.add_part(upload, part, lease.fence).await {
                    return Err(match e {
                        // Its blob is gone: the source was removed since it was read.
                        crate::store::StoreError::Io(io)
                            if io.kind() == std::io::ErrorKind::NotFound =>
                        {
                            CoreError::NotFound
                        }
                        e => e.into(),
                    });
                }
            }
            Ok::<_, CoreError>(())
        };
        // Whatever was written of it goes if any step fails (a full disk): nothing is left of
        // an upload the client is not told of.
        if let Err(e) = linked.await {
            drop(lease);
            if let Err(cleanup) = self.discard(upload).await {
                tracing::warn!("{upload:?}: removing a failed concatenation failed: {cleanup}");
            }
            return Err(e);
        }
        Ok(total)
    }

    /// Makes `alias` name the upload `target` (a protocol's own identifier; tus: a metadata
    /// token that a finalize request names). An alias is kept as an upload of its own without
    /// bytes: scoped like its key, shared by every process, and expiring like an upload.
    pub async fn save_alias(&self, alias: &UploadKey, target: &str) -> Result<(), CoreError> {
        let meta = UploadMeta {
            length: None,
            name: String::new(),
            media_type: None,
            protocol: serde_json::json!({ "alias": target }),
            origin: None,
            carried: Vec::new(),
        };
        self.record_meta(alias, &meta).await
    }

    /// What `alias` names, if it is an alias.
    pub async fn alias(&self, alias: &UploadKey) -> Result<Option<String>, CoreError> {
        let meta = self.engines.state.meta(alias).await?;
        Ok(meta.and_then(|m| m.protocol["alias"].as_str().map(str::to_string)))
    }

    /// Removes an upload and its bytes (tus termination), leaving its tombstone.
    pub async fn terminate(&self, upload: &UploadKey) -> Result<(), CoreError> {
        self.remove_upload(upload, true).await?;
        self.metrics.upload_event("terminated");
        Ok(())
    }

    /// Removes an upload nobody was told of (its creation was refused), without a trace.
    pub async fn discard(&self, upload: &UploadKey) -> Result<(), CoreError> {
        self.remove_upload(upload, false).await
    }

    async fn remove_upload(&self, upload: &UploadKey, remember: bool) -> Result<(), CoreError> {
        // An append under way would hold the lease until its body ends.
        let _ = self.appends.interrupt(upload);
        let arrived = std::time::SystemTime::now();
        // The tombstone first: a request that finds the upload removed finds it (410), never
        // neither (404). One left beside an upload whose removal failed is never looked at.
        if remember {
            if let Some(tombstone) = self.tombstone_of(upload).await? {
                self.save_alias(&tombstone, "terminated").await?;
            }
        }
        let lease = self.lock_asking(upload, arrived).await?;
        let released = self.engines.state.remove_parts(upload, lease.fence).await?;
        self.release(released).await?;
        self.engines.state.remove(upload, lease.fence).await?;
        self.failures.remove(upload);
        self.unrecorded.remove(upload);
        // An early delivery waiting for the next part sees the upload gone and ends.
        self.part_stored(upload);
        Ok(())
    }

    /// Where an upload asked to be remembered when it is removed: the key its metadata names
    /// under `"gone"` (a protocol that answers "gone" rather than "unknown", as tus does with
    /// 410). The tombstone is an alias saying how it went; it expires like an idle upload.
    pub(super) async fn tombstone_of(
        &self,
        upload: &UploadKey,
    ) -> Result<Option<UploadKey>, CoreError> {
        let state = &self.engines.state;
        let meta = match state.meta(upload).await? {
            Some(meta) => Some(meta),
            None => state
                .answer(upload)
                .await?
                .and_then(|(answer, _)| answer.file.map(|f| f.meta)),
        };
        Ok(meta
            .as_ref()
            .and_then(|m| m.protocol["gone"].as_str())
            .and_then(UploadKey::from_hex))
    }
}

pub(super) fn check_pinned(pinned: &UploadMeta, declared: &UploadMeta) -> Result<(), CoreError> {
    if pinned.agrees_with(declared) {
        Ok(())
    } else {
        Err(CoreError::Conflict {
            pinned: Box::new(pinned.clone()),
        })
    }
}

/// If parts 1..=K are stored and part K ends exactly at `length`, returns K.
pub(super) fn complete_len(parts: &PartIndex, length: Option<u64>) -> Option<u64> {
    parts.complete_count(length?)
}

/// An append under way: the lease, and where the upload stood when it was taken.
struct Appending {
    lease: crate::store::Lease,
    meta: UploadMeta,
    current: u64,
    room: u64,
    next: u64,
}

/// A piece being made durable and kept while the next one is received.
type Keeping<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), CoreError>> + Send + 'a>>;

/// What receiving the next piece of an append came to.
enum Piece {
    /// A piece staged, from a window of this many bytes.
    Staged(Staged, u64),
    /// The body ended before another piece began (broken off, if so).
    End(Option<BodyError>),
}

/// A body that ends at once when `stop` turns true (keeping the piece before failed: what
/// comes after it cannot be kept).
struct Stoppable<'a> {
    body: &'a mut dyn BodySource,
    stop: tokio::sync::watch::Receiver<bool>,
}

#[async_trait::async_trait]
impl BodySource for Stoppable<'_> {
    async fn next_piece(&mut self) -> Result<Option<bytes::Bytes>, BodyError> {
        if *self.stop.borrow() {
            return Ok(None);
        }
        let mut stop = self.stop.clone();
        tokio::select! {
            piece = self.body.next_piece() => piece,
            _ = stop.wait_for(|stop| *stop) => Ok(None),
        }
    }
}

/// At most `left` bytes of a body; the rest of a piece that passes it waits in `carry` for
/// the next window.
struct Window<'a> {
    body: &'a mut dyn BodySource,
    carry: &'a mut Option<bytes::Bytes>,
    left: u64,
}

#[async_trait::async_trait]
impl BodySource for Window<'_> {
    async fn next_piece(&mut self) -> Result<Option<bytes::Bytes>, BodyError> {
        if self.left == 0 {
            return Ok(None);
        }
        let mut bytes = match self.carry.take() {
            Some(bytes) => bytes,
            None => match self.body.next_piece().await? {
                Some(bytes) => bytes,
                None => return Ok(None),
            },
        };
        if bytes.len() as u64 > self.left {
            *self.carry = Some(bytes.split_off(self.left as usize));
        }
        self.left -= bytes.len() as u64;
        Ok(Some(bytes))
    }
}
