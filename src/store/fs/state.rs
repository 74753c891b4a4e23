//! Upload state on local disk, under `uploads/<key>/`, and the activity index under
//! `activity/<hour>/`. Leases on this engine never outlive their holder (see the engine's
//! module comment), so the fencing tokens these calls take have nothing to refuse.

use super::{remove_if_present, unix_seconds, CachedIndex, Fs};
use crate::store::{
    Digest, Fence, PartIndex, QueuedDelivery, RecordedAnswer, StateStore, StoreError, StoredPart,
    StoredReader, UploadKey, UploadMeta,
};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Linux's "too many links" (a blob shared by ~65,000 parts on ext4).
const EMLINK: i32 = 31;

/// Blobs whose references are checked in one blocking-pool trip (a few ms of stat calls).
const REFERENCE_BATCH: usize = 4096;

/// Does a part reference the blob at `blob`? (One link is the blob's own name.) A blob gone
/// is referenced by nothing.
fn referenced(blob: &Path) -> std::io::Result<bool> {
    match std::fs::metadata(blob) {
        Ok(meta) => Ok(meta.nlink() > 1),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Links a part to its blob; past the file system's link limit, the part is a copy of the
/// blob (at `tmp` first, fsynced if `fsync`, then renamed).
fn link_part(blob: &Path, part: &Path, tmp: &Path, fsync: bool) -> std::io::Result<()> {
    match std::fs::hard_link(blob, part) {
        Err(e) if e.raw_os_error() == Some(EMLINK) => {
            let copied = (|| {
                std::fs::copy(blob, tmp)?;
                if fsync {
                    std::fs::File::open(tmp)?.sync_all()?;
                }
                std::fs::rename(tmp, part)
            })();
            if copied.is_err() {
                let _ = std::fs::remove_file(tmp);
            }
            copied
        }
        other => other,
    }
}

/// Activity within this long after the activity last written is not written again.
const ACTIVITY_GRAIN: Duration = Duration::from_millis(100);

pub(super) struct FsState(pub(super) Arc<Fs>);

/// The first line of an `answer` file; the body follows.
#[derive(Serialize, Deserialize)]
struct AnswerHeader {
    #[serde(flatten)]
    answer: RecordedAnswer,
    /// When it was recorded, in milliseconds since the epoch (older files: see their mtime).
    #[serde(default)]
    recorded_ms: Option<u64>,
}

impl FsState {
    fn part_path(&self, upload: &UploadKey, part: &StoredPart) -> PathBuf {
        let name = format!("{}-{}-{}", part.number, part.len, hex::encode(part.digest));
        self.0.upload_dir(upload).join("parts").join(name)
    }

    /// Reads the parts directory: each entry is `<number>-<len>-<blob name>`. One trip to the
    /// blocking pool for the whole listing (`tokio::fs::read_dir` makes one per 32 entries:
    /// a 1 GiB file in 1 MiB chunks has 1,024).
    async fn list_parts(&self, upload: &UploadKey) -> std::io::Result<PartIndex> {
        let dir = self.0.upload_dir(upload).join("parts");
        let fsync = self.0.fsync;
        let (stat, parts) = Fs::blocking(move || {
            let none = || Ok((None, PartIndex::new()));
            // Taken first (and only where listings are fsynced): a change to the directory
            // after it shows in the next listing's.
            let stat = match fsync {
                true => match std::fs::metadata(&dir) {
                    Ok(stat) => Some(stat),
                    Err(e) if e.kind() == ErrorKind::NotFound => return none(),
                    Err(e) => return Err(e),
                },
                false => None,
            };
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == ErrorKind::NotFound => return none(),
                Err(e) => return Err(e),
            };
            let mut parts = PartIndex::new();
            for entry in entries {
                if let Some(part) = entry?.file_name().to_str().and_then(parse_part_name) {
                    parts.insert(part.number, part);
                }
            }
            Ok((stat, parts))
        })
        .await?;
        if let (Some(stat), false) = (stat, parts.is_empty()) {
            // Links found on disk may not be durable yet (another process's, or this one's
            // before a restart): one fsync that begins after this listing covers them before
            // any of them is said to be stored (see `sync_parts`), unless one did already for
            // a listing that found the same links in the directory as it was then.
            let listing = listing_print(&stat, &parts);
            if self.0.covered.get(upload).map(|c| *c) != Some(listing) {
                self.enter_unsynced(upload, true, Some(listing));
            }
        }
        Ok(parts)
    }

    /// Enters links of the upload that an fsync has yet to cover (`made`: already made; with
    /// the listing that found them, if one did), under a new number, in place of the entry
    /// before (see `sync_parts`).
    fn enter_unsynced(&self, upload: &UploadKey, made: bool, listing: Option<u64>) -> u64 {
        let link = self
            .0
            .links
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        self.0.unsynced.insert(
            *upload,
            super::Unsynced {
                link,
                made,
                listing,
            },
        );
        link
    }

    /// A change of this process's to the upload's parts begins: a listing begun before it is
    /// not kept, and the cached index is gone until [`changed`](Self::changed) puts the new
    /// one in place of whatever a read kept meanwhile.
    fn changing(&self, upload: &UploadKey) {
        let mut cached = self.0.indexes.entry(*upload).or_default();
        cached.generation += 1;
        cached.parts = None;
    }

    /// A part is being added (under the upload's lease): as [`changing`](Self::changing), but
    /// the index stays readable meanwhile. It is what the directory held before the change
    /// and every part in it stays: a read now answers as if it came just before the link
    /// (the new part missing, a chunk sent again). Dropping it instead sent the chunks of the
    /// same upload that were answered meanwhile to the disk for the whole listing.
    /// The add must end with [`changed`](Self::changed) (or
    /// [`changed_adding`](Self::changed_adding)) whatever happens (an error drops the
    /// index): it runs to its end (see `add_part_with`).
    fn adding(&self, upload: &UploadKey) {
        self.0.indexes.entry(*upload).or_default().generation += 1;
    }

    /// A change of this process's to the upload's metadata or answer begins or ends: what was
    /// cached of them (`forget`) is not trusted, nor kept by a read under way.
    fn invalidate(&self, upload: &UploadKey, forget: impl Fn(&mut CachedIndex)) {
        match self.0.indexes.get_mut(upload) {
            Some(mut cached) => {
                cached.generation += 1;
                forget(&mut cached);
            }
            None => {
                self.0
                    .unentered
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }

    /// Where reading `upload`'s state from disk starts: the entry's generation, the changes to
    /// uploads without an entry so far (see [`keep`](Self::keep)), and the stripe's epoch.
    fn read_start(&self, upload: &UploadKey) -> (Option<u64>, u64, u64) {
        let generation = self.0.indexes.get(upload).map(|c| c.generation);
        let unentered = self.0.unentered.load(std::sync::atomic::Ordering::SeqCst);
        (generation, unentered, self.0.epoch(upload))
    }

    /// Keeps what a read found (`remember`) if nothing changed the upload meanwhile: no change
    /// of this process's began or ended, and (for an upload without an entry) no upload without
    /// an entry changed.
    /// An upload without an entry gets one only if `worth_an_entry` (an unknown upload that
    /// clients probe must not take memory).
    fn keep(
        &self,
        upload: &UploadKey,
        (generation, unentered, _): (Option<u64>, u64, u64),
        worth_an_entry: bool,
        remember: impl FnOnce(&mut CachedIndex),
    ) {
        match (self.0.indexes.entry(*upload), generation) {
            (dashmap::Entry::Occupied(mut cached), Some(g)) if cached.get().generation == g => {
                remember(cached.get_mut())
            }
            (dashmap::Entry::Vacant(vacant), None)
                if worth_an_entry
                    && self.0.unentered.load(std::sync::atomic::Ordering::SeqCst) == unentered =>
            {
                let mut cached = CachedIndex::default();
                remember(&mut cached);
                vacant.insert(cached);
            }
            _ => {}
        }
    }

    /// The change is done (under the upload's lease): `parts` is the index now (`None`:
    /// unknown, read it again).
    fn changed(&self, upload: &UploadKey, parts: Option<PartIndex>) {
        let epoch = self.0.epoch(upload);
        let mut cached = self.0.indexes.entry(*upload).or_default();
        cached.generation += 1;
        cached.epoch = epoch;
        cached.parts = parts.map(Arc::new);
    }

    /// [`changed`](Self::changed) after `part` was added to `parts` (the index the add began
    /// from). The index is changed in place unless a reader holds it still: a copy of it for
    /// every part made each chunk of a long upload slower than the one before.
    fn changed_adding(&self, upload: &UploadKey, mut parts: Arc<PartIndex>, part: StoredPart) {
        let epoch = self.0.epoch(upload);
        let mut cached = self.0.indexes.entry(*upload).or_default();
        // The cache's reference to the same index goes first (readers find the new one in its
        // place before they can look again: the entry is held meanwhile).
        if cached
            .parts
            .as_ref()
            .is_some_and(|held| Arc::ptr_eq(held, &parts))
        {
            cached.parts = None;
        }
        Arc::make_mut(&mut parts).insert(part.number, part);
        cached.generation += 1;
        cached.epoch = epoch;
        cached.parts = Some(parts);
    }

    /// Links the part to its blob on the blocking pool, durably if `sync` (with the directory's
    /// fsync: one trip; otherwise [`sync_parts`](StateStore::sync_parts) makes it durable). A
    /// link is a metadata change of microseconds, but one that waits while the disk is
    /// stalled, and a worker thread must not.
    async fn add_part_on_disk(
        &self,
        part: &StoredPart,
        path: &Path,
        sync: bool,
    ) -> std::io::Result<()> {
        let blob = self.0.blob_path(&part.digest);
        let (_, tmp) = self.0.tmp_path();
        let (path, fsync) = (path.to_path_buf(), self.0.fsync);
        Fs::blocking(move || {
            let dir = path.parent().expect("part paths have a parent");
            match link_part(&blob, &path, &tmp, fsync) {
                // No parts directory yet (or no blob: the second attempt reports it).
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    super::create_dir_durable(dir, fsync)?;
                    link_part(&blob, &path, &tmp, fsync)?;
                }
                other => other?,
            }
            super::sync_dir(dir, fsync && sync)
        })
        .await
    }

    /// Runs a change to an upload's parts on a task of its own, so that it runs to its end
    /// even if the request goes away: a link or an unlink, once on the blocking pool, lands
    /// whatever happens to the request, and the cached index must then be told what became
    /// of it (a listing read before it landed would otherwise be kept).
    async fn to_end<T: Send + 'static, F>(
        &self,
        change: impl FnOnce(FsState) -> F,
    ) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        tokio::spawn(change(FsState(self.0.clone())))
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
    }

    /// Adds a part (see `add_part`): the link, and the directory's fsync if `sync`, to its end
    /// (see [`to_end`](Self::to_end) and [`adding`](Self::adding)).
    async fn add_part_with(
        &self,
        upload: &UploadKey,
        part: StoredPart,
        sync: bool,
    ) -> Result<bool, StoreError> {
        let upload = *upload;
        self.to_end(move |state| async move { state.add_part_to_end(&upload, part, sync).await })
            .await
    }

    async fn add_part_to_end(
        &self,
        upload: &UploadKey,
        part: StoredPart,
        sync: bool,
    ) -> Result<bool, StoreError> {
        let parts = self.parts(upload).await?;
        if parts.contains_key(&part.number) {
            return Ok(false);
        }
        let path = self.part_path(upload, &part);
        let unsynced = (!sync && self.0.fsync).then(|| self.enter_unsynced(upload, false, None));
        self.adding(upload);
        let added = self.add_part_on_disk(&part, &path, sync).await;
        if let Some(link) = unsynced {
            // Marked made even if this link failed: the entry it replaced may stand for an
            // earlier link that no fsync has covered yet (at most one fsync more).
            self.0.unsynced.insert(
                *upload,
                super::Unsynced {
                    link,
                    made: true,
                    listing: None,
                },
            );
        }
        match added {
            Ok(()) => {
                self.changed_adding(upload, parts, part);
                Ok(true)
            }
            // Stored already by someone this process did not know of: keep theirs.
            Err(e) if e.kind() == ErrorKind::AlreadyExists => match self.list_parts(upload).await {
                Ok(listed) => {
                    self.changed(upload, Some(listed));
                    Ok(false)
                }
                Err(e) => {
                    self.changed(upload, None);
                    Err(e.into())
                }
            },
            Err(e) => {
                // Leave no link the index does not know about (a retry would trip over it).
                let _ = tokio::fs::remove_file(&path).await;
                self.changed(upload, None);
                Err(e.into())
            }
        }
    }

    /// Sets the last activity (if `activity`), and enters the upload in the index at `index`
    /// unless this process did so for that span already.
    async fn write_activity(
        &self,
        upload: &UploadKey,
        activity: Option<SystemTime>,
        index: SystemTime,
    ) -> Result<(), StoreError> {
        let span = unix_seconds(index) / self.0.span;
        let (span_dir, written) = match self.0.indexed_spans.get(upload).map(|e| *e) {
            Some((indexed, written)) if indexed == span => (None, Some(written)),
            Some((_, written)) => (Some(self.span_dir(span)), Some(written)),
            None => (Some(self.span_dir(span)), None),
        };
        // An activity this close after the one written already changes nothing that expiry
        // could tell (the shortest TTL is a second): one trip to the disk saved per chunk.
        let activity = activity.filter(|at| {
            written.is_none_or(|w| !matches!(at.duration_since(w), Ok(d) if d < ACTIVITY_GRAIN))
        });
        if activity.is_none() && span_dir.is_none() {
            return Ok(());
        }
        let dir = self.0.upload_dir(upload);
        let key = upload.hex();
        let fsync = self.0.fsync;
        Fs::blocking(move || -> std::io::Result<()> {
            if let Some(at) = activity {
                std::fs::create_dir_all(&dir)?;
                let file = std::fs::File::options()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(dir.join("activity"))?;
                file.set_modified(at)?;
            }
            if let Some(span_dir) = span_dir {
                // Once per upload and span: the index entry must survive a power loss, or an
                // abandoned upload would never be found to expire.
                std::fs::create_dir_all(&span_dir)?;
                std::fs::File::create(span_dir.join(key))?;
                if fsync {
                    std::fs::File::open(&span_dir)?.sync_all()?;
                }
            }
            Ok(())
        })
        .await?;
        let written = activity.or(written).unwrap_or(std::time::UNIX_EPOCH);
        self.0.indexed_spans.insert(*upload, (span, written));
        Ok(())
    }

    /// The index directory of span number `span`, named by the seconds it covers, so that
    /// a change of span width never misreads older ones.
    fn span_dir(&self, span: u64) -> PathBuf {
        let from = span * self.0.span;
        let to = from + self.0.span;
        self.0.root.join("activity").join(format!("{from}-{to}"))
    }

    /// The index directories that end no later than `before`, with their paths.
    async fn spans_before(&self, before: SystemTime) -> std::io::Result<Vec<PathBuf>> {
        let mut spans = Vec::new();
        let mut entries = tokio::fs::read_dir(self.0.root.join("activity")).await?;
        while let Some(entry) = entries.next_entry().await? {
            let end = entry
                .file_name()
                .to_str()
                .and_then(|n| n.split_once('-'))
                .and_then(|(_, to)| to.parse::<u64>().ok());
            if end.is_some_and(|end| end <= unix_seconds(before)) {
                spans.push(entry.path());
            }
        }
        Ok(spans)
    }
}

/// What a listing of a parts directory found, in a number: the directory (its inode and last
/// change, which every link and unlink moves on) and the parts in it.
fn listing_print(stat: &std::fs::Metadata, parts: &PartIndex) -> u64 {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::MetadataExt;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (
        stat.ino(),
        stat.mtime(),
        stat.mtime_nsec(),
        stat.ctime(),
        stat.ctime_nsec(),
    )
        .hash(&mut hasher);
    for part in parts.values() {
        (part.number, part.len, part.digest).hash(&mut hasher);
    }
    hasher.finish()
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
            tracing::warn!("{upload:?}: ignoring a damaged {what} ({e})");
            None
        }
    }
}

/// The modification time of `path`, if it exists.
/// The arrival written by `ask_to_stop`.
fn stop_stamp(text: &str) -> Option<SystemTime> {
    let nanos: u64 = text.trim().parse().ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos))
}

async fn modified(path: &Path) -> std::io::Result<Option<SystemTime>> {
    match tokio::fs::metadata(path).await {
        Ok(meta) => Ok(Some(meta.modified()?)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[async_trait]
impl StateStore for FsState {
    async fn meta(&self, upload: &UploadKey) -> Result<Option<UploadMeta>, StoreError> {
        if let Some(cached) = self.0.indexes.get(upload) {
            if let Some((epoch, meta)) = &cached.meta {
                if self.0.cache_holds(upload, *epoch) {
                    return Ok(meta.as_deref().cloned());
                }
            }
        }
        let start = self.read_start(upload);
        let meta: Option<UploadMeta> =
            match tokio::fs::read(self.0.upload_dir(upload).join("meta.json")).await {
                Ok(bytes) => parse_or_absent(upload, "meta.json", || {
                    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
                }),
                Err(e) if e.kind() == ErrorKind::NotFound => None,
                Err(e) => return Err(e.into()),
            };
        let kept = meta.clone().map(Arc::new);
        self.keep(upload, start, meta.is_some(), |c| {
            c.meta = Some((start.2, kept))
        });
        Ok(meta)
    }

    async fn save_meta(
        &self,
        upload: &UploadKey,
        meta: &UploadMeta,
        _fence: Fence,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_vec(meta).expect("metadata serializes");
        let path = self.0.upload_dir(upload).join("meta.json");
        self.invalidate(upload, |c| c.meta = None);
        let written = self.0.write_atomic(&path, json).await;
        self.invalidate(upload, |c| c.meta = None);
        written?;
        // The parts directory too, before any part: adding a part then allocates no directory,
        // which a disk filled meanwhile (by the next piece of the same body) could refuse.
        let (parts, fsync) = (self.0.upload_dir(upload).join("parts"), self.0.fsync);
        Ok(Fs::blocking(move || super::create_dir_durable(&parts, fsync)).await?)
    }

    async fn remove_meta(&self, upload: &UploadKey, _fence: Fence) -> Result<(), StoreError> {
        self.invalidate(upload, |c| c.meta = None);
        let removed = remove_if_present(&self.0.upload_dir(upload).join("meta.json")).await;
        self.invalidate(upload, |c| c.meta = None);
        Ok(removed?)
    }

    async fn parts(&self, upload: &UploadKey) -> Result<Arc<PartIndex>, StoreError> {
        if let Some(cached) = self.0.indexes.get(upload) {
            if let Some(parts) = &cached.parts {
                if self.0.cache_holds(upload, cached.epoch) {
                    return Ok(Arc::clone(parts));
                }
            }
        }
        let start = self.read_start(upload);
        let parts = Arc::new(self.list_parts(upload).await?);
        // Kept only if no change of this process's began or ended while the listing was read.
        self.keep(upload, start, !parts.is_empty(), |c| {
            c.parts = Some(Arc::clone(&parts));
            c.epoch = start.2;
        });
        Ok(parts)
    }

    async fn add_part(
        &self,
        upload: &UploadKey,
        part: StoredPart,
        _fence: Fence,
    ) -> Result<bool, StoreError> {
        self.add_part_with(upload, part, true).await
    }

    /// The link only: the parts directory's fsync comes with `sync_parts`, out of the lease,
    /// where one fsync covers every link made in the directory before it began (the parts
    /// that parallel chunks added meanwhile).
    async fn add_part_unsynced(
        &self,
        upload: &UploadKey,
        part: StoredPart,
        _fence: Fence,
    ) -> Result<bool, StoreError> {
        self.add_part_with(upload, part, false).await
    }

    /// Nothing to do (no trip to the disk) unless this process made a link in the upload's
    /// parts directory that no fsync has covered yet: a chunk test for a stored part, which
    /// calls this before it says so, costs nothing more once the part is durable.
    ///
    /// Why the check is enough: this process sees a part either in its cached index, which
    /// gets a part it links only after the link's entry is marked made, or in a listing of
    /// the directory, after which an entry is made for the links it found (`list_parts`:
    /// another process's, or links from before a restart that may still be in the page cache
    /// only), unless an fsync already covered a listing that found the directory the same
    /// (`covered`: the same parts, and the directory's inode and change times unmoved). A link
    /// of this process's is entered before it is made, so a listing that sees it finds an
    /// entry too. An entry is removed only by an fsync that began after the entry
    /// was seen made, and only if nothing replaced it meanwhile; an upload's links are made
    /// one at a time (under its lease), so that fsync covered every link seen before it.
    async fn sync_parts(&self, upload: &UploadKey) -> Result<(), StoreError> {
        if !self.0.fsync {
            return Ok(());
        }
        let Some(seen) = self.0.unsynced.get(upload).map(|entry| *entry) else {
            return Ok(());
        };
        let dir = self.0.upload_dir(upload).join("parts");
        Fs::blocking(move || match super::sync_dir(&dir, true) {
            // Gone with the upload (discarded meanwhile): nothing of it to make durable.
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            other => other,
        })
        .await?;
        if seen.made
            && self
                .0
                .unsynced
                .remove_if(upload, |_, now| *now == seen)
                .is_some()
        {
            // A later listing that finds the directory as this one did needs no fsync.
            if let Some(listing) = seen.listing {
                self.0.covered.insert(*upload, listing);
            } else {
                self.0.covered.remove(upload);
            }
        }
        Ok(())
    }

    async fn remove_part(
        &self,
        upload: &UploadKey,
        number: u64,
        _fence: Fence,
    ) -> Result<Option<Digest>, StoreError> {
        let upload = *upload;
        self.to_end(move |state| async move {
            let parts = state.list_parts(&upload).await?;
            let Some(part) = parts.get(&number).copied() else {
                return Ok(None);
            };
            state.changing(&upload);
            let removed = remove_if_present(&state.part_path(&upload, &part)).await;
            let mut updated = parts;
            updated.remove(&number);
            state.changed(&upload, removed.is_ok().then_some(updated));
            removed?;
            Ok(Some(part.digest))
        })
        .await
    }

    async fn remove_parts(
        &self,
        upload: &UploadKey,
        _fence: Fence,
    ) -> Result<Vec<Digest>, StoreError> {
        let parts = self.list_parts(upload).await?;
        let mut seen = std::collections::HashSet::new();
        let released: Vec<Digest> = parts
            .values()
            .filter(|part| seen.insert(part.digest))
            .map(|part| part.digest)
            .collect();
        let paths: Vec<PathBuf> = parts
            .values()
            .map(|part| self.part_path(upload, part))
            .collect();
        let dir = self.0.upload_dir(upload).join("parts");
        let key = *upload;
        self.to_end(move |state| async move {
            state.changing(&key);
            // One trip to the blocking pool for every link (a 1 GiB file in 1 MiB chunks has
            // 1,024), not one each.
            let removed = Fs::blocking(move || {
                for path in &paths {
                    match std::fs::remove_file(path) {
                        Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
                        _ => {}
                    }
                }
                match std::fs::remove_dir(&dir) {
                    Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                }
            })
            .await;
            state.changed(&key, removed.is_ok().then(PartIndex::new));
            removed?;
            Ok(released)
        })
        .await
    }

    async fn open_part(
        &self,
        upload: &UploadKey,
        part: &StoredPart,
    ) -> Result<Option<StoredReader>, StoreError> {
        let (upload, number, len) = (*upload, part.number, part.len);
        let corrupt =
            move |actual| format!("{upload:?} part {number} has {actual} bytes, expected {len}");
        Ok(Some(
            super::open_stored(self.part_path(&upload, part), len, corrupt).await?,
        ))
    }

    async fn is_referenced(&self, digest: &Digest) -> Result<bool, StoreError> {
        let blob = self.0.blob_path(digest);
        Ok(Fs::blocking(move || referenced(&blob)).await?)
    }

    /// Up to [`REFERENCE_BATCH`] blobs per blocking-pool trip: a collection over 200,000 blobs
    /// took 4.2 to 4.75 s of CPU with a trip per blob.
    async fn unreferenced(&self, digests: Vec<Digest>) -> Result<Vec<Digest>, StoreError> {
        let mut unreferenced = Vec::new();
        for batch in digests.chunks(REFERENCE_BATCH) {
            let blobs: Vec<(Digest, PathBuf)> = batch
                .iter()
                .map(|digest| (*digest, self.0.blob_path(digest)))
                .collect();
            unreferenced.extend(
                Fs::blocking(move || {
                    let mut unreferenced = Vec::new();
                    for (digest, blob) in blobs {
                        if !referenced(&blob)? {
                            unreferenced.push(digest);
                        }
                    }
                    Ok(unreferenced)
                })
                .await?,
            );
        }
        Ok(unreferenced)
    }

    async fn answer(
        &self,
        upload: &UploadKey,
    ) -> Result<Option<(RecordedAnswer, SystemTime)>, StoreError> {
        if let Some(cached) = self.0.indexes.get(upload) {
            if cached
                .no_answer
                .is_some_and(|epoch| self.0.cache_holds(upload, epoch))
            {
                return Ok(None);
            }
        }
        let start = self.read_start(upload);
        let path = self.0.upload_dir(upload).join("answer");
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                // Remembered only for an upload this process has an entry for already.
                self.keep(upload, start, false, |c| c.no_answer = Some(start.2));
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let header = parse_or_absent(upload, "answer", || {
            let newline = bytes
                .iter()
                .position(|b| *b == b'\n')
                .ok_or("no header line")?;
            let mut header: AnswerHeader =
                serde_json::from_slice(&bytes[..newline]).map_err(|e| e.to_string())?;
            header.answer.body = bytes::Bytes::copy_from_slice(&bytes[newline + 1..]);
            Ok(header)
        });
        let Some(header) = header else {
            return Ok(None);
        };
        let at = match header.recorded_ms {
            Some(ms) => SystemTime::UNIX_EPOCH + Duration::from_millis(ms),
            None => tokio::fs::metadata(&path).await?.modified()?,
        };
        Ok(Some((header.answer, at)))
    }

    async fn save_answer(
        &self,
        upload: &UploadKey,
        answer: &RecordedAnswer,
        at: SystemTime,
        _fence: Fence,
    ) -> Result<(), StoreError> {
        let header = AnswerHeader {
            answer: answer.clone(),
            recorded_ms: Some(
                at.duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
            ),
        };
        let mut bytes = serde_json::to_vec(&header).expect("answers serialize");
        bytes.push(b'\n');
        bytes.extend_from_slice(&answer.body);
        let path = self.0.upload_dir(upload).join("answer");
        self.invalidate(upload, |c| c.no_answer = None);
        let written = self.0.write_atomic(&path, bytes).await;
        self.invalidate(upload, |c| c.no_answer = None);
        Ok(written?)
    }

    async fn remove_answer(&self, upload: &UploadKey, _fence: Fence) -> Result<(), StoreError> {
        self.invalidate(upload, |c| c.no_answer = None);
        let removed = remove_if_present(&self.0.upload_dir(upload).join("answer")).await;
        self.invalidate(upload, |c| c.no_answer = None);
        Ok(removed?)
    }

    async fn mark_delivering(
        &self,
        upload: &UploadKey,
        delivering: bool,
        _fence: Fence,
    ) -> Result<(), StoreError> {
        let path = self.0.upload_dir(upload).join("delivering");
        if delivering {
            Ok(self.0.write_atomic(&path, Vec::new()).await?)
        } else {
            Ok(remove_if_present(&path).await?)
        }
    }

    async fn was_delivering(&self, upload: &UploadKey) -> Result<bool, StoreError> {
        Ok(tokio::fs::try_exists(self.0.upload_dir(upload).join("delivering")).await?)
    }

    async fn touch(&self, upload: &UploadKey, at: SystemTime) -> Result<(), StoreError> {
        self.write_activity(upload, Some(at), at).await
    }

    async fn reindex(&self, upload: &UploadKey, at: SystemTime) -> Result<(), StoreError> {
        self.write_activity(upload, None, at).await
    }

    async fn last_activity(&self, upload: &UploadKey) -> Result<Option<SystemTime>, StoreError> {
        let dir = self.0.upload_dir(upload);
        if let Some(at) = modified(&dir.join("activity")).await? {
            return Ok(Some(at));
        }
        // An upload from before the activity file: its newest state file.
        let mut latest = None;
        for name in ["meta.json", "parts", "answer"] {
            latest = latest.max(modified(&dir.join(name)).await?);
        }
        Ok(latest)
    }

    async fn idle_since(&self, before: SystemTime) -> Result<Vec<UploadKey>, StoreError> {
        let mut found = Vec::new();
        for span in self.spans_before(before).await? {
            let mut entries = match tokio::fs::read_dir(span).await {
                Ok(entries) => entries,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            while let Some(entry) = entries.next_entry().await? {
                if let Some(key) = entry.file_name().to_str().and_then(UploadKey::from_hex) {
                    if !found.contains(&key) {
                        found.push(key);
                    }
                }
            }
        }
        Ok(found)
    }

    async fn prune_activity(&self, before: SystemTime) -> Result<(), StoreError> {
        for span in self.spans_before(before).await? {
            match tokio::fs::remove_dir_all(span).await {
                Err(e) if e.kind() != ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    }

    /// A file `stops/<key>` holding the asker's arrival in nanoseconds since the Unix epoch
    /// (a file's time is too coarse on some file systems: to the second on ext4 with small
    /// inodes, on NFS and FAT, where a request made within the second of the holder's arrival
    /// would not count). Read, compared and written under the file's own `flock`, so that two
    /// asking processes cannot undo each other. Not made durable: a request to stop that a
    /// crash loses is asked again by the request that waits.
    async fn ask_to_stop(&self, upload: &UploadKey, arrived: SystemTime) -> Result<(), StoreError> {
        let path = self.0.stop_path(upload);
        Ok(Fs::blocking(move || {
            use std::io::{Read, Seek, Write};
            let open = || {
                std::fs::File::options()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
            };
            let mut file = match open() {
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    std::fs::create_dir_all(path.parent().expect("stop paths have a parent"))?;
                    open()?
                }
                other => other?,
            };
            // Released when the file closes, at the end.
            file.lock()?;
            let mut text = String::new();
            file.read_to_string(&mut text)?;
            // The newest asker's arrival stands (two may ask in either order). One in the
            // future is not believed: the clock was set back since.
            if let Some(kept) = stop_stamp(&text) {
                if kept >= arrived && kept <= SystemTime::now() {
                    return Ok(());
                }
            }
            let nanos = arrived
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            // One write of a fixed width: a reader never sees half of it.
            file.rewind()?;
            file.write_all(format!("{nanos:020}").as_bytes())
        })
        .await?)
    }

    async fn stop_asked(&self, upload: &UploadKey) -> Result<Option<SystemTime>, StoreError> {
        let path = self.0.stop_path(upload);
        match tokio::fs::read_to_string(&path).await {
            Ok(text) => Ok(stop_stamp(&text)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Requests to stop count for appends that arrived before them, and an append looks for
    /// them twice a second: one older than `before` (a minute or more) has been seen by the
    /// append it was meant for, or that append has ended. What stays is an empty weight, e.g.
    /// the request of a PATCH whose upload another process removed meanwhile.
    async fn forget_stop_requests(&self, before: SystemTime) -> Result<(), StoreError> {
        let dir = self.0.root.join("stops");
        Ok(Fs::blocking(move || {
            let entries = match std::fs::read_dir(&dir) {
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                other => other?,
            };
            for entry in entries.flatten() {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                // (A stamp that cannot be read is forgotten as soon as its file is old.)
                let stamp = stop_stamp(&text).or_else(|| entry.metadata().ok()?.modified().ok());
                if stamp.is_none_or(|at| at < before) {
                    match std::fs::remove_file(entry.path()) {
                        Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
                        _ => {}
                    }
                }
            }
            Ok(())
        })
        .await?)
    }

    async fn remove(&self, upload: &UploadKey, _fence: Fence) -> Result<(), StoreError> {
        let upload = *upload;
        self.to_end(move |state| async move {
            let fs = &state.0;
            // A listing read before this is not kept (see `parts`).
            state.changing(&upload);
            fs.indexed_spans.remove(&upload);
            remove_if_present(&fs.queue_path(&upload)).await?;
            remove_if_present(&fs.stop_path(&upload)).await?;
            let removed = match tokio::fs::remove_dir_all(fs.upload_dir(&upload)).await {
                Err(e) if e.kind() != ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            };
            fs.unentered
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            fs.indexes.remove(&upload);
            if removed.is_ok() {
                fs.unsynced.remove(&upload);
                fs.covered.remove(&upload);
            }
            removed
        })
        .await
    }

    async fn queue(
        &self,
        upload: &UploadKey,
        entry: &QueuedDelivery,
        _fence: Fence,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
        Ok(self
            .0
            .write_atomic(&self.0.queue_path(upload), json)
            .await?)
    }

    async fn queued(&self, upload: &UploadKey) -> Result<Option<QueuedDelivery>, StoreError> {
        let bytes = match tokio::fs::read(self.0.queue_path(upload)).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(parse_or_absent(upload, "queued delivery", || {
            serde_json::from_slice(&bytes).map_err(|e| e.to_string())
        }))
    }

    async fn unqueue(&self, upload: &UploadKey, _fence: Fence) -> Result<(), StoreError> {
        Ok(remove_if_present(&self.0.queue_path(upload)).await?)
    }

    async fn all_queued(&self) -> Result<Vec<(UploadKey, QueuedDelivery)>, StoreError> {
        let mut found = Vec::new();
        let mut entries = tokio::fs::read_dir(self.0.root.join("queue")).await?;
        while let Some(entry) = entries.next_entry().await? {
            let Some(key) = entry.file_name().to_str().and_then(UploadKey::from_hex) else {
                continue;
            };
            if let Some(queued) = self.queued(&key).await? {
                found.push((key, queued));
            }
        }
        Ok(found)
    }

    async fn uploads(&self) -> Result<Vec<UploadKey>, StoreError> {
        let dir = self.0.root.join("uploads");
        let list = move || -> std::io::Result<Vec<UploadKey>> {
            Ok(std::fs::read_dir(dir)?
                .flatten()
                .filter_map(|entry| entry.file_name().to_str().and_then(UploadKey::from_hex))
                .collect())
        };
        Ok(Fs::blocking(list).await?)
    }
}
