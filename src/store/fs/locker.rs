//! Locks on local disk: an in-process lock per key orders this process's tasks, and a `flock`
//! on a lock file keeps other processes out. Keys are hashed onto a fixed set of lock files
//! (stripes), so lock files are never created and deleted per key (which races with `flock`).
//!
//! Within a process, tasks holding different keys of one stripe share its `flock` (the first
//! takes it, the last lets it go), so a long delivery never holds up another upload of this
//! process that happens to hash onto the same stripe. Another process waits for the stripe as
//! a whole.
//!
//! Each upload stripe's file holds a counter: the fencing token, one more for every lease
//! taken by any process. A process that finds the counter moved on since its own last lease
//! knows another process took the stripe in between, and stops trusting what it cached about
//! the uploads hashed onto it.

use super::{Fs, BLOB_STRIPES};
use crate::locks::KeyGuard;
use crate::store::{Fence, Lease, LockKey, Locker, StoreError};
use async_trait::async_trait;
use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

pub(super) struct FsLocker(pub(super) Arc<Fs>);

/// One lock file, and what this process holds of it.
///
/// Nothing here that can wait for the disk runs on a worker thread while it holds `held`:
/// lock files are created, and tokens written, on the blocking pool (a stalled or frozen
/// disk then holds the leases, never the proxy). Opening an existing lock file for reading
/// and `flock`ing it write nothing to the file system (opening it for writing waits for a
/// frozen one).
pub(super) struct Stripe {
    path: PathBuf,
    held: Mutex<Held>,
    /// Taken (on the blocking pool) while a token is read and written.
    token_io: Mutex<()>,
    /// Moves on whenever this process finds that another one took the stripe since its own
    /// last lease: what it cached before about the stripe's uploads is stale.
    epoch: AtomicU64,
    /// The lock file opened for reading, kept once it exists (see [`Stripe::read_counter`]).
    reader: OnceLock<File>,
}

/// Lock files a process keeps open for reading their counter: a quarter of its limit on open
/// files, up to one per stripe (see [`Stripe::read_counter`]).
fn readers_allowed() -> usize {
    static ALLOWED: OnceLock<usize> = OnceLock::new();
    *ALLOWED.get_or_init(|| {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: a valid pointer to a struct of the right type.
        let soft = match unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } {
            0 => usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX),
            _ => 0,
        };
        soft / 4
    })
}

/// Lock files kept open for reading so far, in this process.
static READERS_KEPT: AtomicUsize = AtomicUsize::new(0);

#[derive(Default)]
struct Held {
    /// Tasks of this process holding a key of this stripe.
    holders: usize,
    /// The lock file, `flock`ed, while `holders > 0`.
    file: Option<Arc<File>>,
    /// The last token this process took.
    last_token: u64,
    /// `last_token` was taken while this process held the `flock` without a break since:
    /// the counter on disk is that token, for nobody else can change it meanwhile.
    fresh: bool,
    /// The token this process is writing now, if it is: the counter on disk may already be
    /// that one (this process's own, not another's).
    writing: Option<u64>,
}

/// What trying to hold a stripe found.
enum Tried {
    Held,
    /// Another process holds it.
    Busy,
    /// Its lock file does not exist yet.
    NoFile,
}

impl Stripe {
    pub(super) fn new(root: &Path, name: &str) -> Stripe {
        Stripe {
            path: root.join("locks").join(name),
            held: Mutex::default(),
            token_io: Mutex::default(),
            epoch: AtomicU64::new(0),
            reader: OnceLock::new(),
        }
    }

    /// Reads the counter on disk (0 for a new file). Through a handle kept open while the
    /// process's allowance lasts: opening the file for every read was a quarter of the CPU of
    /// a chunk test (a path walk, a file opened and closed), and a chunk test reads it up to
    /// three times. A kept handle reads what any process writes, for lock files are written
    /// in place and never replaced (see the module's doc).
    fn read_counter(&self) -> std::io::Result<u64> {
        if let Some(reader) = self.reader.get() {
            return read_token(reader);
        }
        let file = File::open(&self.path)?;
        let token = read_token(&file)?;
        let kept = READERS_KEPT.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |kept| {
            (kept < readers_allowed()).then_some(kept + 1)
        });
        if kept.is_ok() && self.reader.set(file).is_err() {
            // Another task kept one first.
            READERS_KEPT.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(token)
    }

    /// Joins the holders if this process holds the stripe already, or takes its `flock` if
    /// no other process does.
    fn try_hold(&self) -> std::io::Result<Tried> {
        let mut held = self.held.lock().expect("stripe");
        if held.holders > 0 {
            held.holders += 1;
            return Ok(Tried::Held);
        }
        // An existing file, opened for reading only: nothing waits for the disk. (A `flock`
        // does not need write access.)
        let file = match File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Tried::NoFile),
            Err(e) => return Err(e),
        };
        match file.try_lock() {
            Ok(()) => {
                held.file = Some(Arc::new(file));
                held.holders = 1;
                Ok(Tried::Held)
            }
            Err(std::fs::TryLockError::WouldBlock) => Ok(Tried::Busy),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }

    /// Creates the lock file (blocking: run it on the pool).
    fn create_file(&self) -> std::io::Result<()> {
        File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.path)
            .map(drop)
    }

    fn release(&self) {
        let mut held = self.held.lock().expect("stripe");
        held.holders -= 1;
        if held.holders == 0 {
            // Closing the file releases the `flock` (once a token write under way, which
            // holds the file too, is done).
            held.file = None;
            held.fresh = false;
        }
    }

    /// Takes the next token (the stripe must be held). Blocking: run it on the pool.
    fn next_token(&self) -> std::io::Result<u64> {
        let _io = self.token_io.lock().expect("stripe tokens");
        let file = self.held.lock().expect("stripe").file.clone();
        // The lease was given up before its token was taken (its taker went away).
        let file = file.ok_or_else(|| std::io::Error::other("the lock was let go"))?;
        let last = read_token(&file)?;
        let token = last + 1;
        {
            let mut held = self.held.lock().expect("stripe");
            // Ours while it is written only if the counter was where this process left it:
            // after another process's token, what this process cached is stale (the epoch
            // moves on below, once the token is recorded).
            if last == held.last_token {
                held.writing = Some(token);
            }
        }
        // Written through a second handle: the `flock` stays with `file`'s, which is kept open
        // until the write is done.
        let written = File::options()
            .write(true)
            .open(&self.path)
            .and_then(|writer| writer.write_all_at(&token.to_be_bytes(), 0));
        let mut held = self.held.lock().expect("stripe");
        held.writing = None;
        written?;
        if last != held.last_token {
            self.epoch.fetch_add(1, Ordering::SeqCst);
        }
        held.last_token = token;
        // Fresh only if the `flock` was held all along (not let go and taken again).
        held.fresh = held.file.as_ref().is_some_and(|f| Arc::ptr_eq(f, &file));
        Ok(token)
    }

    pub(super) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// True if the counter on disk is where this process left it: nobody else took the stripe
    /// since. (False when unsure.) Read from memory while this process holds the stripe since
    /// its last token (a chunk's lease reads the cache several times): from disk otherwise,
    /// where a token this process is writing counts as its own (it holds the `flock` for
    /// it). Taking that for another process's made every chunk test and chunk that read
    /// meanwhile list the upload's parts directory again: on a 16,384-part upload, a few
    /// times in a hundred chunks, 10 to 200 ms each.
    pub(super) fn untouched(&self) -> bool {
        let ours = |held: &Held| [Some(held.last_token), held.writing];
        let before = {
            let held = self.held.lock().expect("stripe");
            if held.fresh && held.file.is_some() {
                return true;
            }
            ours(&held)
        };
        let Ok(on_disk) = self.read_counter() else {
            return false;
        };
        // Every token this process had or was writing, before the read or after it: a write
        // may have begun or ended meanwhile.
        let after = ours(&self.held.lock().expect("stripe"));
        on_disk > 0
            && before
                .into_iter()
                .chain(after)
                .any(|token| token == Some(on_disk))
    }
}

fn read_token(file: &File) -> std::io::Result<u64> {
    let mut bytes = [0u8; 8];
    match file.read_exact_at(&mut bytes, 0) {
        Ok(()) => Ok(u64::from_be_bytes(bytes)),
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => Ok(0),
        Err(e) => Err(e),
    }
}

/// A held lock: the stripe (let go by the last of this process's holders), then the
/// in-process lock on the key.
struct Holding {
    fs: Arc<Fs>,
    key: LockKey,
    _local: KeyGuard<LockKey>,
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.fs.stripe(&self.key).release();
    }
}

impl Fs {
    fn stripe(&self, key: &LockKey) -> &Stripe {
        match key {
            LockKey::Upload(upload) => &self.stripes[Fs::upload_stripe(upload)],
            LockKey::Blob(digest) => {
                let n = u64::from(u16::from_be_bytes([digest[0], digest[1]])) % BLOB_STRIPES;
                &self.blob_stripes[n as usize]
            }
        }
    }
}

#[async_trait]
impl Locker for FsLocker {
    /// Leases here last as long as their holder: the kernel releases a `flock` when its
    /// process dies, never before, so `lease` needs no renewal.
    async fn lock(&self, key: LockKey, _lease: Duration) -> Result<Lease, StoreError> {
        let local = self.0.local.lock(key).await;
        let stripe = self.0.stripe(&key);
        let mut wait = Duration::from_millis(1);
        loop {
            match stripe.try_hold()? {
                Tried::Held => break,
                Tried::NoFile => {
                    let fs = self.0.clone();
                    Fs::blocking(move || fs.stripe(&key).create_file()).await?;
                }
                Tried::Busy => {
                    // Held by another process: wait without holding a thread.
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(50));
                }
            }
        }
        let holding = Holding {
            fs: self.0.clone(),
            key,
            _local: local,
        };
        let fence = match key {
            LockKey::Upload(_) => {
                let fs = self.0.clone();
                Fence(Fs::blocking(move || fs.stripe(&key).next_token()).await?)
            }
            LockKey::Blob(_) => Fence(0),
        };
        Ok(Lease::new(fence, holding))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_files() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    /// Lock files kept open stay within a quarter of the open-file limit; past it, the counter
    /// is read all the same, and kept or not, a read sees what another handle wrote. (The
    /// count is the process's: nextest runs each test in a process of its own.)
    #[test]
    fn kept_lock_files_stay_within_a_quarter_of_the_open_file_limit() {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: valid pointers to structs of the right type.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
            limit.rlim_cur = 256;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("locks")).unwrap();
        let stripes: Vec<Stripe> = (0..200)
            .map(|n| Stripe::new(dir.path(), &format!("s{n}")))
            .collect();
        for stripe in &stripes {
            stripe.create_file().unwrap();
        }
        let before = open_files();
        for stripe in &stripes {
            assert_eq!(stripe.read_counter().unwrap(), 0);
        }
        assert_eq!(open_files() - before, 64, "a quarter of 256 kept open");
        for stripe in &stripes {
            assert_eq!(stripe.read_counter().unwrap(), 0);
        }
        assert_eq!(open_files() - before, 64, "none more on reading again");
        for (n, stripe) in [&stripes[0], &stripes[199]].into_iter().enumerate() {
            let token = 7 + n as u64;
            File::options()
                .write(true)
                .open(&stripe.path)
                .unwrap()
                .write_all_at(&token.to_be_bytes(), 0)
                .unwrap();
            assert_eq!(stripe.read_counter().unwrap(), token);
        }
    }
}
