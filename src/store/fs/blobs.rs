//! Blobs on local disk: staged in `tmp/`, kept as `blobs/<aa>/<blake3>`.

use super::{remove_if_present, Fs};
use crate::store::{BlobStore, BodySource, Cut, Digest, Staged, StoreError, StoredReader};
use async_trait::async_trait;
use blake3::Hasher;
use std::io::ErrorKind;
use std::sync::Arc;

pub(super) struct FsBlobs(pub(super) Arc<Fs>);

/// A staged body reaches the disk in writes of about this size...
const STAGE_WRITE: usize = 1 << 20;
/// ...or of what arrived in this long, whichever comes first: a slow client's bytes are not
/// held in memory while it trickles the rest (250 slow clients would hold a chunk each).
const STAGE_LINGER: std::time::Duration = std::time::Duration::from_millis(20);

/// `STITCH_BENCH_SKIP_HASH=1` (benchmarks only: `cargo bench --bench metrics` compares ingest
/// with and without hashing) names each blob by random bytes instead of its BLAKE3 hash, which
/// turns deduplication off. Read once.
fn skip_hash() -> bool {
    static SKIP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SKIP.get_or_init(|| std::env::var_os("STITCH_BENCH_SKIP_HASH").is_some_and(|v| v == "1"))
}

/// The staging file and whether it is durable as it stands, or the write under way with them.
enum Writer {
    Idle(Box<Staging>),
    Writing(tokio::task::JoinHandle<std::io::Result<Staging>>),
}

struct Staging {
    file: std::fs::File,
    /// Fsynced since its last write.
    synced: bool,
    /// Bytes written so far.
    written: u64,
    /// Each write's writeback is started at once (the file will be fsynced: see `write`).
    writeback: bool,
}

impl Writer {
    /// Waits for the write under way, then starts writing `batch`, and fsyncing the file after
    /// it if `sync` (the last bytes of a body: one trip to the blocking pool for both).
    async fn write(self, batch: Vec<bytes::Bytes>, sync: bool) -> std::io::Result<Writer> {
        let mut staging = self.idle().await?;
        let len: u64 = batch.iter().map(|piece| piece.len() as u64).sum();
        if len == 0 && !sync {
            return Ok(Writer::Idle(Box::new(staging)));
        }
        Ok(Writer::Writing(tokio::task::spawn_blocking(move || {
            write_all(&mut staging.file, &batch)?;
            if staging.writeback && !sync && len > 0 {
                // The disk starts on these bytes now, while the next ones are received, so
                // the fsync at the body's end waits for its last write only (on a VM's
                // disk: an 8 MiB body's fsync took 7 ms, about 2 with this). Only a hint:
                // whatever it fails on, the fsync reports.
                use std::os::fd::AsRawFd;
                // SAFETY: a valid descriptor, and a range within the file's bytes.
                unsafe {
                    libc::sync_file_range(
                        staging.file.as_raw_fd(),
                        staging.written as libc::off64_t,
                        len as libc::off64_t,
                        libc::SYNC_FILE_RANGE_WRITE,
                    );
                }
            }
            staging.written += len;
            staging.synced = len == 0 && staging.synced;
            if sync {
                staging.file.sync_all()?;
                staging.synced = true;
            }
            Ok(staging)
        })))
    }

    /// [`write`](Self::write), then adds `batch`'s bytes to `hasher` while the pool writes
    /// them (the pieces are shared with the write, not copied).
    async fn write_hashed(
        self,
        batch: Vec<bytes::Bytes>,
        sync: bool,
        hasher: &mut Option<Hasher>,
    ) -> std::io::Result<Writer> {
        let writer = self.write(batch.clone(), sync).await?;
        hash(hasher, &batch);
        Ok(writer)
    }

    async fn idle(self) -> std::io::Result<Staging> {
        match self {
            Writer::Idle(state) => Ok(*state),
            Writer::Writing(task) => task
                .await
                .map_err(|e| std::io::Error::other(format!("a staging write failed: {e}")))?,
        }
    }

    /// Waits for the last write and makes the file durable if asked (unless that write did).
    async fn finish(self, fsync: bool) -> std::io::Result<()> {
        let Staging { file, synced, .. } = self.idle().await?;
        if fsync && !synced {
            Fs::blocking(move || file.sync_all()).await?;
        }
        Ok(())
    }
}

/// Writes every piece of `batch`, in order (one `writev` for up to 1,024 of them).
fn write_all(file: &mut std::fs::File, batch: &[bytes::Bytes]) -> std::io::Result<()> {
    use std::io::{IoSlice, Write};
    let mut slices: Vec<IoSlice> = batch.iter().map(|piece| IoSlice::new(piece)).collect();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        match file.write_vectored(slices) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A body's pieces gathered for one write: the pieces themselves (each read is a buffer of its
/// own), not a copy of their bytes.
#[derive(Default)]
struct Gathered {
    pieces: Vec<bytes::Bytes>,
    len: usize,
}

impl Gathered {
    fn push(&mut self, piece: bytes::Bytes) {
        self.len += piece.len();
        if !piece.is_empty() {
            self.pieces.push(piece);
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces gathered since the last write.
    fn take(&mut self) -> Vec<bytes::Bytes> {
        self.len = 0;
        std::mem::take(&mut self.pieces)
    }
}

/// Adds `batch`'s bytes to `hasher` (none: hashing skipped, a bench's switch).
fn hash(hasher: &mut Option<Hasher>, batch: &[bytes::Bytes]) {
    if let Some(hasher) = hasher.as_mut() {
        for piece in batch {
            hasher.update(piece);
        }
    }
}

impl FsBlobs {
    /// The body is gathered into writes of up to 1 MiB (or of what arrived within 20 ms), each
    /// written on the blocking pool while the next one is being received: one pool round trip
    /// per MiB instead of one per piece for a fast client, and a slow client's bytes go to disk
    /// as they come. No thread is held while the client sends nothing. The pieces are gathered
    /// as they were read, not copied (a copy and its buffer's growth were a tenth of the CPU of
    /// a fast upload), and each gathered write is hashed here once it has gone to the pool (a
    /// MiB is 0.2 to 0.35 ms of BLAKE3 here), so the hashing overlaps the pool's write of those
    /// same bytes: for a 1 MiB chunk, its write and fsync (the `Bytes` are shared, not copied).
    /// Durable at the end if `sync` and the engine fsyncs.
    async fn stage_with(
        &self,
        body: &mut dyn BodySource,
        limit: u64,
        sync: bool,
    ) -> Result<Staged, StoreError> {
        let (token, path) = self.0.tmp_path();
        let staging = path.clone();
        // Also when this call does not fsync: a piece's `sync_staged` follows.
        let writeback = self.0.fsync;
        // The file is created while the body's first bytes arrive (its first write waits for
        // it): creating a file allocates an inode, which took 0.7 to 1.4 ms here, a sixth of a
        // 1 MiB chunk's time. A failure shows at that first write, before anything is kept.
        let mut writer = Writer::Writing(tokio::task::spawn_blocking(move || {
            Ok(Staging {
                file: std::fs::File::create(staging)?,
                synced: false,
                written: 0,
                writeback,
            })
        }));
        let mut hasher = (!skip_hash()).then(Hasher::new);
        let fsync = self.0.fsync && sync;
        let mut gathered = Gathered::default();
        let mut since = std::time::Instant::now();
        let mut len = 0u64;
        let mut cut = None;
        let received = async {
            loop {
                // Bytes gathered for a write wait at most `STAGE_LINGER` for more: a client
                // that stalls after a few KiB has them on disk, not held for its body timeout.
                let next = {
                    let next = body.next_piece();
                    tokio::pin!(next);
                    // A piece that is there already needs no timer (a fast client's every
                    // piece): only a wait arms one.
                    let ready = std::future::poll_fn(|cx| {
                        std::task::Poll::Ready(std::future::Future::poll(next.as_mut(), cx))
                    })
                    .await;
                    if let std::task::Poll::Ready(piece) = ready {
                        piece
                    } else {
                        loop {
                            let linger = tokio::time::Instant::from_std(since + STAGE_LINGER);
                            tokio::select! {
                                piece = &mut next => break piece,
                                _ = tokio::time::sleep_until(linger), if !gathered.is_empty() => {
                                    let batch = gathered.take();
                                    writer = writer.write_hashed(batch, false, &mut hasher).await?;
                                }
                            }
                        }
                    }
                };
                let piece = match next {
                    Ok(Some(piece)) => piece,
                    Ok(None) => break,
                    Err(e) => {
                        cut = Some(Cut::Body(e));
                        break;
                    }
                };
                let room = (limit - len).min(piece.len() as u64) as usize;
                if gathered.is_empty() {
                    since = std::time::Instant::now();
                }
                gathered.push(piece.slice(..room));
                len += room as u64;
                // The declared length reached: most likely the body's end, so the file is
                // fsynced with its last write (if more comes, it is cut and let go).
                let end = len == limit;
                if gathered.len >= STAGE_WRITE || since.elapsed() >= STAGE_LINGER || end {
                    let batch = gathered.take();
                    writer = writer
                        .write_hashed(batch, end && fsync, &mut hasher)
                        .await?;
                }
                if room < piece.len() {
                    cut = Some(Cut::TooLong(limit));
                    break;
                }
            }
            let batch = gathered.take();
            writer = writer.write_hashed(batch, false, &mut hasher).await?;
            writer.finish(fsync).await
        };
        match received.await {
            Ok(()) => Ok(Staged {
                len,
                digest: match hasher {
                    Some(hasher) => hasher.finalize().into(),
                    None => rand::random(),
                },
                cut,
                token,
            }),
            Err(e) => {
                let _ = tokio::fs::remove_file(&path).await;
                Err(e.into())
            }
        }
    }
}

#[async_trait]
impl BlobStore for FsBlobs {
    async fn stage(&self, body: &mut dyn BodySource, limit: u64) -> Result<Staged, StoreError> {
        self.stage_with(body, limit, true).await
    }

    async fn stage_unsynced(
        &self,
        body: &mut dyn BodySource,
        limit: u64,
    ) -> Result<Staged, StoreError> {
        self.stage_with(body, limit, false).await
    }

    /// An fsync of the staging file, on the blocking pool (a no-op without `fsync`).
    async fn sync_staged(&self, staged: &Staged) -> Result<(), StoreError> {
        if !self.0.fsync {
            return Ok(());
        }
        let path = self.0.staging.join(&staged.token);
        Ok(Fs::blocking(move || std::fs::File::open(path)?.sync_all()).await?)
    }

    /// A rename, on the blocking pool: a metadata change of microseconds, but one that waits
    /// while the disk is stalled (or frozen), and a worker thread must not (no fsync: see
    /// below).
    async fn keep(&self, staged: Staged) -> Result<bool, StoreError> {
        let tmp = self.0.staging.join(&staged.token);
        let blob = self.0.blob_path(&staged.digest);
        let kept = Fs::blocking(move || {
            let kept = (|| {
                if std::fs::exists(&blob)? {
                    return match std::fs::remove_file(&tmp) {
                        Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
                        _ => Ok(true),
                    };
                }
                // The blob's own directory entry needs no fsync: the part's link that
                // references it is what makes the bytes reachable, and that is fsynced.
                let shard = blob.parent().expect("blob paths have a parent");
                match std::fs::rename(&tmp, &blob) {
                    Err(e) if e.kind() == ErrorKind::NotFound && !shard.exists() => {
                        std::fs::create_dir_all(shard)?;
                        std::fs::rename(&tmp, &blob)?;
                    }
                    other => other?,
                }
                Ok(false)
            })();
            if kept.is_err() {
                // Give the space back at once.
                let _ = std::fs::remove_file(&tmp);
            }
            kept
        })
        .await;
        Ok(kept?)
    }

    async fn discard(&self, staged: Staged) {
        let _ = tokio::fs::remove_file(self.0.staging.join(staged.token)).await;
    }

    async fn open(&self, digest: &Digest, len: u64) -> Result<StoredReader, StoreError> {
        let name = hex::encode(&digest[..6]);
        let corrupt = move |actual| format!("blob {name} has {actual} bytes, expected {len}");
        super::open_stored(self.0.blob_path(digest), len, corrupt).await
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StoreError> {
        Ok(remove_if_present(&self.0.blob_path(digest)).await?)
    }

    async fn stored_bytes(&self) -> Result<u64, StoreError> {
        let blobs = self.0.root.join("blobs");
        let walk = move || -> std::io::Result<u64> {
            let mut total = 0;
            for shard in std::fs::read_dir(blobs)?.flatten() {
                for blob in std::fs::read_dir(shard.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    total += blob.metadata().map_or(0, |m| m.len());
                }
            }
            Ok(total)
        };
        Ok(Fs::blocking(walk).await?)
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
