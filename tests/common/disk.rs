//! A small real file system that can be filled to the edge: an ext4 image mounted through a
//! loop device (needs root, `mkfs.ext4` and `mount`, as on the CI machine).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct SmallDisk {
    _image_dir: tempfile::TempDir,
    pub mount: PathBuf,
    filler: PathBuf,
}

impl SmallDisk {
    /// An empty ext4 file system of `mib` MiB with 1 KiB blocks and no blocks reserved.
    pub fn new(mib: u64) -> SmallDisk {
        SmallDisk::made(mib, &[])
    }

    /// The same with 128-byte inodes, which keep file times to the second only (as FAT, and
    /// NFS servers on such file systems, do).
    pub fn with_times_to_the_second(mib: u64) -> SmallDisk {
        SmallDisk::made(mib, &["-I", "128"])
    }

    fn made(mib: u64, mkfs_args: &[&str]) -> SmallDisk {
        let image_dir = tempfile::tempdir().unwrap();
        let image = image_dir.path().join("disk.img");
        let mount = image_dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        std::fs::File::create(&image)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        let args = [&["-q", "-F", "-m", "0", "-b", "1024"], mkfs_args].concat();
        run("mkfs.ext4", &args, &image);
        let mounted = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mount)
            .status();
        assert!(
            mounted.is_ok_and(|s| s.success()),
            "mounting a loop device failed: the full-disk tests need root and a loop device \
             (`losetup -f` must find one)"
        );
        SmallDisk {
            filler: mount.join("filler"),
            _image_dir: image_dir,
            mount,
        }
    }

    /// A directory on the small disk.
    pub fn dir(&self, name: &str) -> PathBuf {
        let dir = self.mount.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Fills the disk, then gives back about `bytes` (rounded to whole blocks).
    pub fn leave_free(&self, bytes: u64) {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.filler)
            .unwrap();
        // A MiB at a time while it fits (ext4 reserves the blocks of each write), then a
        // block at a time, each made durable, to the last one.
        let mib = vec![0u8; 1 << 20];
        while file.write_all(&mib).is_ok() {}
        let _ = file.sync_data();
        let block = vec![0u8; 1024];
        while file
            .write_all(&block)
            .and_then(|_| file.sync_data())
            .is_ok()
        {}
        let len = file.metadata().unwrap().len();
        file.set_len(len.saturating_sub(bytes.div_ceil(1024) * 1024))
            .unwrap();
        file.sync_all().unwrap();
    }

    /// Gives all the filler's space back.
    pub fn free(&self) {
        let _ = std::fs::remove_file(&self.filler);
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg(&self.mount).status();
        if !unmounted.is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
    }
}

fn run(program: &str, args: &[&str], path: &Path) {
    let status = Command::new(program).args(args).arg(path).status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "{program} failed: install e2fsprogs (`apt-get install e2fsprogs`)"
    );
}

/// A file system frozen (`fsfreeze`: every write to it, data or metadata, waits) until the
/// value is dropped, which thaws it. A watchdog process thaws it after 60 s in any case, so
/// that a test killed meanwhile does not leave it frozen.
pub struct Frozen {
    mount: PathBuf,
    watchdog: std::process::Child,
}

impl SmallDisk {
    pub fn freeze(&self) -> Frozen {
        let watchdog = Command::new("setsid")
            .args(["sh", "-c", "sleep 60 && fsfreeze -u \"$0\""])
            .arg(&self.mount)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("setsid and sh (util-linux, dash)");
        let frozen = Command::new("fsfreeze").arg("-f").arg(&self.mount).status();
        let frozen_fs = Frozen {
            mount: self.mount.clone(),
            watchdog,
        };
        if !frozen.is_ok_and(|s| s.success()) {
            drop(frozen_fs);
            panic!("fsfreeze failed: it comes with util-linux and needs root");
        }
        frozen_fs
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.mount).status();
        // The watchdog's whole session: its shell and the shell's `sleep`.
        let group = format!("-{}", self.watchdog.id());
        let _ = Command::new("kill").args(["--", &group]).status();
        let _ = self.watchdog.wait();
    }
}
