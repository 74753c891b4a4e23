//! The local-disk engine (the default): blobs, state and locks in one directory, which several
//! Stitch processes may share (a zero-downtime restart starts the new process before the old
//! one has drained).
//!
//! ```text
//! <dir>/tmp/<process>/<random>                  bytes being staged by one process
//! <dir>/tmp/<process>.lock                      held (flock) while that process lives
//! <dir>/blobs/<aa>/<blake3>                     one file per distinct content (deduplication)
//! <dir>/uploads/<key>/meta.json                 pinned metadata
//! <dir>/uploads/<key>/parts/<n>-<len>-<blake3>  a hard link to the blob: one part
//! <dir>/uploads/<key>/answer                    the upstream's recorded answer
//! <dir>/uploads/<key>/delivering                present while a delivery is being sent
//! <dir>/uploads/<key>/activity                  its modification time is the last activity
//! <dir>/activity/<from>-<to>/<key>              index: the upload is due a look in that span
//! <dir>/locks/upload-<n>, locks/blob-<n>        lock files (flock), keys hashed into stripes
//! <dir>/stops/<key>                             when another process asked the upload's
//!                                               running append to stop (ns since the epoch)
//! ```
//!
//! Crash safety: a blob is published by `rename`, a part by `link`, each atomic, with the file
//! and every directory it is entered in fsynced first when `fsync` is on. A crash leaves either
//! no part or a whole one. State files are written to a temporary name and renamed.
//!
//! References: a blob's link count says how many parts use it, so whoever lets go of it last
//! (under the blob's lock) deletes it; a blob orphaned by a crash between `rename` and `link`
//! is collected later.
//!
//! Two processes: every change happens under the upload's lock, which here is a `flock` on a
//! lock file, so it excludes other processes too; the kernel releases it when its holder dies,
//! so a lease never outlives its holder and no stale holder can exist (fencing tokens are
//! issued, and the state store has nothing to refuse). Each process keeps upload part indexes,
//! metadata and "no answer yet" in memory (a chunk test then reads nothing from disk), and
//! trusts them only while no other process has taken that upload's lock stripe
//! since (the stripe's token counter, on disk, tells) and no change of its own was under way
//! while it was read (a generation counter per upload tells).
//!
//! Deliveries read each part through its own link, not the blob's name: the link is what is
//! fsynced, and a part copied past the file system's link limit has only that.

mod blobs;
mod locker;
mod state;

use super::{Engines, PartIndex, StoredBytes, StoredReader, UploadKey};
use crate::locks::KeyedLocks;
use bytes::Bytes;
use dashmap::DashMap;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Lock files the upload keys are hashed onto, and the blob digests.
const UPLOAD_STRIPES: u64 = 1024;
const BLOB_STRIPES: u64 = 256;

/// What the engine's three parts share.
pub(crate) struct Fs {
    root: PathBuf,
    fsync: bool,
    /// This process's staging directory, and the lock that says it is alive.
    staging: PathBuf,
    _staging_lock: std::fs::File,
    /// Orders this process's tasks before they take a lock file.
    local: Arc<KeyedLocks<super::LockKey>>,
    /// Per lock stripe, what this process holds of it (see `locker`).
    stripes: Vec<locker::Stripe>,
    blob_stripes: Vec<locker::Stripe>,
    /// Part indexes read from disk (see [`CachedIndex`]).
    indexes: DashMap<UploadKey, CachedIndex>,
    /// Changes so far to uploads without an entry in `indexes` (removals included): a read
    /// that saw no entry stores one only if no such change happened meanwhile (it may have
    /// read the upload just before the change).
    unentered: std::sync::atomic::AtomicU64,
    /// How long a span of the activity index lasts (a fraction of the shortest TTL).
    span: u64,
    /// The span each upload was last indexed in by this process, and the activity time this
    /// process last wrote for it.
    indexed_spans: DashMap<UploadKey, (u64, std::time::SystemTime)>,
    /// Per upload, the newest link this process made without its directory's fsync (see
    /// `StateStore::add_part_unsynced`), entered before the link is made, or the newest
    /// listing of the directory that found links. Removed by an fsync that began after it.
    unsynced: DashMap<UploadKey, Unsynced>,
    /// Per upload, the last listing of its parts directory (see `listing_print`) that an fsync
    /// which began after it covered.
    covered: DashMap<UploadKey, u64>,
    /// Numbers the entries of `unsynced`.
    links: std::sync::atomic::AtomicU64,
    closed: Arc<AtomicBool>,
}

/// Links in an upload's parts directory that no fsync has covered yet (see `Fs::unsynced`).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Unsynced {
    /// Numbers the entries: an fsync removes only the entry it saw.
    link: u64,
    /// The link is made (a listing's links always are).
    made: bool,
    /// The listing that found the links (`listing_print`), if a listing did.
    listing: Option<u64>,
}

/// An upload's part index as this process last knew it. `generation` moves on at the start
/// and at the end of every change this process makes, so that a listing read while a change
/// was under way is never kept; `parts` is trusted only while no other process has taken the
/// upload's lock stripe since (see `Fs::stripe_untouched`).
///
/// The upload's metadata and the absence of an answer are kept the same way (each with the
/// epoch it was read in), so that a chunk test, the request clients send before every chunk,
/// reads nothing from disk for an upload this process knows.
#[derive(Default)]
struct CachedIndex {
    generation: u64,
    /// The stripe's epoch when `parts` was read.
    epoch: u64,
    parts: Option<Arc<PartIndex>>,
    /// The metadata (`None` inside: there is none), and the epoch it was read in.
    meta: Option<(u64, Option<Arc<super::UploadMeta>>)>,
    /// The epoch in which the upload was found to have no recorded answer.
    no_answer: Option<u64>,
}

impl Drop for Fs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.staging);
        let _ = std::fs::remove_file(self.staging.with_extension("lock"));
        self.closed.store(true, Ordering::SeqCst);
    }
}

/// Opens (creating if needed) a storage directory. `span`: the width of the activity index's
/// time spans (expiry finds an upload at most this late).
pub fn open(root: &Path, fsync: bool, span: Duration) -> std::io::Result<Engines> {
    let indexed = root.join("activity").exists();
    for sub in ["tmp", "blobs", "uploads", "activity", "locks", "queue"] {
        std::fs::create_dir_all(root.join(sub))?;
    }
    // Every blob shard exists from the start: keeping a blob then allocates no directory,
    // which a disk filled meanwhile (by the next piece of the same body) could refuse.
    for shard in 0..=255u8 {
        std::fs::create_dir_all(root.join("blobs").join(hex::encode([shard])))?;
    }
    if !indexed {
        index_existing_uploads(root)?;
    }
    remove_dead_staging(&root.join("tmp"));
    let name = hex::encode(rand::random::<[u8; 8]>());
    let staging_lock = std::fs::File::create(root.join("tmp").join(format!("{name}.lock")))?;
    staging_lock.lock()?;
    let staging = root.join("tmp").join(name);
    std::fs::create_dir(&staging)?;
    let closed = Arc::new(AtomicBool::new(false));
    let fs = Arc::new(Fs {
        root: root.to_path_buf(),
        fsync,
        staging,
        _staging_lock: staging_lock,
        local: Arc::default(),
        stripes: (0..UPLOAD_STRIPES)
            .map(|n| locker::Stripe::new(root, &format!("upload-{n}")))
            .collect(),
        blob_stripes: (0..BLOB_STRIPES)
            .map(|n| locker::Stripe::new(root, &format!("blob-{n}")))
            .collect(),
        indexes: DashMap::new(),
        unentered: std::sync::atomic::AtomicU64::new(0),
        span: span.as_secs().max(1),
        indexed_spans: DashMap::new(),
        unsynced: DashMap::new(),
        covered: DashMap::new(),
        links: std::sync::atomic::AtomicU64::new(0),
        closed: closed.clone(),
    });
    Ok(Engines::new(
        Arc::new(blobs::FsBlobs(fs.clone())),
        Arc::new(state::FsState(fs.clone())),
        Arc::new(locker::FsLocker(fs)),
        closed,
    ))
}

/// Enters the uploads of a directory written by a version without the activity index into
/// it, by the newest of their files, so that they still expire.
fn index_existing_uploads(root: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(root.join("uploads"))?.flatten() {
        let Some(key) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let latest = ["meta.json", "parts", "answer"]
            .iter()
            .filter_map(|name| std::fs::metadata(entry.path().join(name)).ok())
            .filter_map(|meta| meta.modified().ok())
            .max()
            .unwrap_or_else(SystemTime::now);
        let at = unix_seconds(latest);
        let span = root.join("activity").join(format!("{at}-{}", at + 1));
        std::fs::create_dir_all(&span)?;
        std::fs::File::create(span.join(key))?;
    }
    Ok(())
}

/// Deletes what processes that died left in staging: each process stages in a directory of
/// its own, next to a lock file it holds while it lives; a lock file nobody holds belongs to a
/// dead process. (Files of older versions, directly in `tmp/`, go too.)
fn remove_dead_staging(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path
            .extension()
            .filter(|e| *e == "lock")
            .and(path.file_stem())
        else {
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        };
        let Ok(lock) = std::fs::File::open(&path) else {
            continue;
        };
        if lock.try_lock().is_ok() {
            let _ = std::fs::remove_dir_all(tmp.join(name));
            let _ = std::fs::remove_file(&path);
        }
    }
}

impl Fs {
    /// An upload's entry in the delivery queue.
    fn queue_path(&self, upload: &UploadKey) -> PathBuf {
        self.root.join("queue").join(upload.hex())
    }

    fn upload_dir(&self, upload: &UploadKey) -> PathBuf {
        self.root.join("uploads").join(upload.hex())
    }

    /// Where another process asks for the upload's append to stop (see `ask_to_stop`).
    fn stop_path(&self, upload: &UploadKey) -> PathBuf {
        self.root.join("stops").join(upload.hex())
    }

    fn blob_path(&self, digest: &super::Digest) -> PathBuf {
        let hex = hex::encode(digest);
        self.root.join("blobs").join(&hex[..2]).join(hex)
    }

    /// A new name in this process's staging directory.
    fn tmp_path(&self) -> (String, PathBuf) {
        let name = hex::encode(rand::random::<[u8; 16]>());
        let path = self.staging.join(&name);
        (name, path)
    }

    /// The key's first four bytes, big-endian (its first eight hex digits, as every version
    /// has read them: processes of two versions must agree), modulo the stripes.
    fn upload_stripe(upload: &UploadKey) -> usize {
        let first: [u8; 4] = upload.0[..4].try_into().expect("32-byte keys");
        (u64::from(u32::from_be_bytes(first)) % UPLOAD_STRIPES) as usize
    }

    /// True if what this process cached about the upload in `epoch` still holds: no other
    /// process has taken the upload's lock stripe since (neither before this process's last
    /// lease, which would have moved the epoch on, nor after it).
    fn cache_holds(&self, upload: &UploadKey, epoch: u64) -> bool {
        let stripe = &self.stripes[Fs::upload_stripe(upload)];
        // The epoch again after the counter: a token taken after another process's moves it
        // on in the same step as it becomes this process's last token.
        stripe.epoch() == epoch && stripe.untouched() && stripe.epoch() == epoch
    }

    fn epoch(&self, upload: &UploadKey) -> u64 {
        self.stripes[Fs::upload_stripe(upload)].epoch()
    }

    /// Runs blocking file system work on the blocking pool: one trip there per call (each is a
    /// wait on a busy machine, often while the upload's lease is held).
    async fn blocking<T: Send + 'static>(
        work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        joined(tokio::task::spawn_blocking(work)).await
    }

    /// Writes a small file atomically: temporary name, fsync, rename, fsync the directory. Every
    /// step's error is reported (a full disk must never leave a short file in place), and the
    /// temporary file is removed when a step fails.
    async fn write_atomic(&self, path: &Path, bytes: Vec<u8>) -> std::io::Result<()> {
        let (_, tmp) = self.tmp_path();
        let (path, fsync) = (path.to_path_buf(), self.fsync);
        Fs::blocking(move || {
            let dir = path.parent().expect("store paths have a parent");
            create_dir_durable(dir, fsync)?;
            let written = write_then_rename(&tmp, &path, &bytes, fsync);
            if written.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            written?;
            sync_dir(dir, fsync)
        })
        .await
    }
}

/// Fsyncs a directory (its entries become durable), if `fsync`.
fn sync_dir(dir: &Path, fsync: bool) -> std::io::Result<()> {
    if fsync {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Creates `dir` and any missing parents, making each new entry durable in its parent.
fn create_dir_durable(dir: &Path, fsync: bool) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut cursor = dir;
    while !std::fs::exists(cursor)? {
        missing.push(cursor.to_path_buf());
        cursor = match cursor.parent() {
            Some(parent) => parent,
            None => break,
        };
    }
    for created in missing.iter().rev() {
        match std::fs::create_dir(created) {
            Err(e) if e.kind() != ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        if let Some(parent) = created.parent() {
            sync_dir(parent, fsync)?;
        }
    }
    Ok(())
}

/// The blocking steps of [`Fs::write_atomic`].
fn write_then_rename(tmp: &Path, path: &Path, bytes: &[u8], fsync: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(tmp)?;
    file.write_all(bytes)?;
    if fsync {
        file.sync_all()?;
    }
    drop(file);
    std::fs::rename(tmp, path)
}

/// A stored file is read in pieces of up to this size, each into a buffer of its own, while
/// the pieces every reader of the process holds (read, ahead or not, and not yet dropped by
/// the caller) stay within [`HELD_LIMIT`].
const READ_PIECE: u64 = 1 << 20;
/// Past this allowance, pieces are [`SMALL_PIECE`]s read when asked for, and nothing is read
/// ahead: deliveries held up by a slow application then hold a small piece each, not a MiB or
/// more.
const HELD_LIMIT: u64 = 64 << 20;
const SMALL_PIECE: u64 = 64 << 10;

static HELD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A claim on [`HELD_LIMIT`], given back when dropped.
struct Claim(u64);

impl Claim {
    /// A claim on `len` bytes, if the allowance has room for them.
    fn take(len: u64) -> Option<Claim> {
        use std::sync::atomic::Ordering::SeqCst;
        HELD.fetch_update(SeqCst, SeqCst, |held| {
            (held + len <= HELD_LIMIT).then_some(held + len)
        })
        .ok()
        .map(|_| Claim(len))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        HELD.fetch_sub(self.0, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A piece's bytes with their claim: given back when the last `Bytes` of them is dropped.
struct Held {
    bytes: Vec<u8>,
    _claim: Option<Claim>,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// The next piece to ask of `rest` bytes: a whole one with its claim, or a small one.
fn next_piece_size(rest: u64) -> (u64, Option<Claim>) {
    let want = rest.min(READ_PIECE);
    match Claim::take(want) {
        Some(claim) => (want, Some(claim)),
        None => (rest.min(SMALL_PIECE), None),
    }
}

/// Opens a stored file that must hold `len` bytes. Its bytes are read in pieces (see
/// [`READ_PIECE`]), each on the blocking pool into a buffer of its own that is handed on, not
/// copied (through `tokio::fs`, every byte was copied twice in user space, and a 1 MiB part
/// took several trips); the first piece is read in the same trip as the open and the length
/// check. The reader yields at most `len` bytes (fewer only if the file is cut meanwhile,
/// which the forward reports). A file of another length is reported with
/// `corrupt(actual length)`.
async fn open_stored(
    path: PathBuf,
    len: u64,
    corrupt: impl FnOnce(u64) -> String,
) -> Result<StoredReader, super::StoreError> {
    let (want, claim) = next_piece_size(len);
    let opened = Fs::blocking(move || {
        let file = std::fs::File::open(path)?;
        let actual = file.metadata()?.len();
        if actual != len {
            return Ok(Err(actual));
        }
        let first = read_piece(&file, want, claim)?;
        Ok(Ok((file, first)))
    })
    .await?;
    let (file, first) = opened.map_err(|actual| super::StoreError::Corrupt(corrupt(actual)))?;
    Ok(Box::new(StoredFile {
        // What was asked of the file, not what it gave: a short first read ends the reader
        // short, which the caller reports.
        rest: len - want,
        file: Arc::new(file),
        first: Some(first),
        ahead: None,
    }))
}

/// Up to `want` bytes from the file's position on, into a buffer of their own (filled by the
/// read, never zeroed first) that holds `claim` while it lives; fewer only at the file's end.
fn read_piece(file: &std::fs::File, want: u64, claim: Option<Claim>) -> std::io::Result<Bytes> {
    use std::io::Read;
    let mut piece = Vec::with_capacity(want as usize);
    file.take(want).read_to_end(&mut piece)?;
    Ok(Bytes::from_owner(Held {
        bytes: piece,
        _claim: claim,
    }))
}

/// A stored file opened by [`open_stored`]. The next piece is read while the caller writes
/// the last one out (one piece ahead at most, and only a whole one that the allowance has
/// room for).
struct StoredFile {
    file: Arc<std::fs::File>,
    /// The first piece, read with the open.
    first: Option<Bytes>,
    /// The read of the next piece, under way.
    ahead: Option<tokio::task::JoinHandle<std::io::Result<Bytes>>>,
    /// Bytes not yet asked of the file.
    rest: u64,
}

impl StoredFile {
    /// Starts reading the next piece, if any is left and the allowance has room for it.
    fn read_ahead(&mut self) {
        if self.rest == 0 {
            return;
        }
        // Only a whole piece the allowance has room for: a small one is read when asked for.
        let (want, claim @ Some(_)) = next_piece_size(self.rest) else {
            return;
        };
        self.rest -= want;
        let file = self.file.clone();
        let read = tokio::task::spawn_blocking(move || read_piece(&file, want, claim));
        self.ahead = Some(read);
    }
}

#[async_trait::async_trait]
impl StoredBytes for StoredFile {
    async fn next_piece(&mut self) -> std::io::Result<Option<Bytes>> {
        let piece = match (self.first.take(), self.ahead.take()) {
            (Some(first), _) => first,
            (None, Some(ahead)) => joined(ahead).await?,
            (None, None) if self.rest > 0 => {
                let (want, claim) = next_piece_size(self.rest);
                self.rest -= want;
                let file = self.file.clone();
                Fs::blocking(move || read_piece(&file, want, claim)).await?
            }
            (None, None) => return Ok(None),
        };
        if piece.is_empty() {
            // Cut since it was opened: the reader ends here, and the caller counts what it got.
            self.rest = 0;
            return Ok(None);
        }
        self.read_ahead();
        Ok(Some(piece))
    }
}

/// The result of blocking work on the pool (a panic there is an I/O error here).
async fn joined<T>(task: tokio::task::JoinHandle<std::io::Result<T>>) -> std::io::Result<T> {
    task.await.map_err(std::io::Error::other)?
}

async fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match tokio::fs::remove_file(path).await {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Seconds since the epoch, for activity hours.
fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two processes sharing a store must hash an upload onto the same lock file, whatever
    /// their versions: the stripe is still the key's first eight hex digits, and the key's hex
    /// still reads back as the key.
    #[test]
    fn an_upload_s_stripe_and_name_are_what_every_version_made_of_its_key() {
        for _ in 0..1000 {
            let key = UploadKey::random();
            let hex = key.hex();
            assert_eq!(hex, hex::encode(key.0));
            assert_eq!(UploadKey::from_hex(&hex), Some(key));
            let old = u64::from_str_radix(&hex[..8], 16).unwrap() % UPLOAD_STRIPES;
            assert_eq!(Fs::upload_stripe(&key) as u64, old);
        }
    }

    async fn read_all(reader: &mut StoredReader) -> (Vec<u8>, Vec<usize>) {
        let (mut bytes, mut sizes) = (Vec::new(), Vec::new());
        while let Some(piece) = reader.next_piece().await.unwrap() {
            sizes.push(piece.len());
            bytes.extend_from_slice(&piece);
        }
        (bytes, sizes)
    }

    fn content(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4093) as u8).collect()
    }

    #[tokio::test]
    async fn a_stored_file_is_read_whole_in_pieces_of_at_most_a_piece() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data = content(2 * READ_PIECE as usize + 12_345);
        std::fs::write(&path, &data).unwrap();
        let mut reader = open_stored(path, data.len() as u64, |_| unreachable!())
            .await
            .unwrap();
        let (bytes, sizes) = read_all(&mut reader).await;
        assert!(bytes == data, "the bytes read differ from the file's");
        assert_eq!(sizes, [READ_PIECE as usize, READ_PIECE as usize, 12_345]);
        assert!(reader.next_piece().await.unwrap().is_none());
    }

    // The allowance is the process's: the test runner (nextest) gives each test a process of
    // its own.
    #[tokio::test]
    async fn past_the_allowance_a_stored_file_is_read_whole_in_small_pieces() {
        let mut held = Vec::new();
        while let Some(claim) = Claim::take(READ_PIECE) {
            held.push(claim);
        }
        assert!(held.len() as u64 <= HELD_LIMIT / READ_PIECE);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data = content(2 * SMALL_PIECE as usize + 7);
        std::fs::write(&path, &data).unwrap();
        let mut reader = open_stored(path.clone(), data.len() as u64, |_| unreachable!())
            .await
            .unwrap();
        let (bytes, sizes) = read_all(&mut reader).await;
        assert!(bytes == data, "the bytes read differ from the file's");
        let small = SMALL_PIECE as usize;
        assert_eq!(sizes, [small, small, 7]);

        // Given back: whole pieces again, and a piece's claim lives as long as the piece.
        drop(held);
        let mut reader = open_stored(path, data.len() as u64, |_| unreachable!())
            .await
            .unwrap();
        let piece = reader.next_piece().await.unwrap().unwrap();
        assert_eq!(piece.len(), data.len());
        let before = HELD.load(std::sync::atomic::Ordering::SeqCst);
        assert!(before >= data.len() as u64, "the piece holds no claim");
        drop(piece);
        let after = HELD.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            before - after,
            data.len() as u64,
            "the claim outlived its piece"
        );
    }

    #[tokio::test]
    async fn a_file_of_another_length_is_reported_and_an_empty_one_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, content(10)).unwrap();
        let opened = open_stored(path.clone(), 11, |actual| format!("has {actual}")).await;
        assert!(matches!(opened, Err(super::super::StoreError::Corrupt(m)) if m == "has 10"));
        std::fs::write(&path, b"").unwrap();
        let mut reader = open_stored(path, 0, |_| unreachable!()).await.unwrap();
        assert_eq!(read_all(&mut reader).await.0, b"");
    }

    #[tokio::test]
    async fn a_file_cut_or_grown_after_its_open_yields_no_more_than_it_was_opened_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let len = READ_PIECE as usize + 100;
        let data = content(len);
        std::fs::write(&path, &data).unwrap();
        let mut reader = open_stored(path.clone(), len as u64, |_| unreachable!())
            .await
            .unwrap();
        // Cut after the first piece was read with the open: the reader ends short.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(READ_PIECE + 40)
            .unwrap();
        let (bytes, _) = read_all(&mut reader).await;
        assert!(
            bytes == data[..READ_PIECE as usize + 40],
            "a cut file read wrong"
        );

        std::fs::write(&path, &data).unwrap();
        let mut reader = open_stored(path.clone(), len as u64, |_| unreachable!())
            .await
            .unwrap();
        let mut longer = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut longer, &[1; 5000]).unwrap();
        let (bytes, _) = read_all(&mut reader).await;
        assert!(bytes == data, "a grown file read past its length");
    }
}
