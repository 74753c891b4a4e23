//! Applications in processes of their own, for tests that stop (SIGSTOP) or kill them: the
//! recorder in `tests/apps/recorder.py`, and PyPI's `uploadserver`, an application nobody
//! here wrote (installed by `.ci/setup` into `target/venv`).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};

/// A child process, killed when dropped.
pub struct App {
    pub child: Child,
    pub addr: SocketAddr,
}

impl App {
    /// Sends `signal` (e.g. "STOP", "CONT", "KILL") to the process.
    pub fn signal(&self, signal: &str) {
        send_signal(&self.child, signal);
    }
}

/// `kill -SIGNAL` to a child process.
fn send_signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} failed");
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The recording application: every request's outcome, one JSON object per line.
pub struct Recorder {
    pub app: App,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Recorder {
    /// Starts it; it waits `delay_s` seconds before answering each complete upload.
    pub fn start(delay_s: f64) -> Recorder {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("requests.jsonl");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/apps/recorder.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(&log)
            .args(["--delay", &delay_s.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs the recorder application");
        let line = first_line(child.stdout.take().unwrap());
        let port = line
            .strip_prefix("listening ")
            .and_then(|p| p.trim().parse::<u16>().ok())
            .unwrap_or_else(|| panic!("the recorder said {line:?}"));
        Recorder {
            app: App {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
            },
            log,
            _dir: dir,
        }
    }

    /// Every request received so far.
    pub fn records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    /// The uploads received whole.
    pub fn complete(&self) -> Vec<serde_json::Value> {
        self.records()
            .into_iter()
            .filter(|r| r["complete"] == true)
            .collect()
    }
}

/// PyPI's `uploadserver`, saving uploads (form field `files`, `POST /upload`) into `dir`.
pub struct UploadServer {
    pub app: App,
    log: PathBuf,
    pub dir: tempfile::TempDir,
}

impl UploadServer {
    /// `basic_auth`: `user:password` required for uploads.
    pub fn start(basic_auth: Option<&str>) -> UploadServer {
        let program = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/venv/bin/uploadserver");
        assert!(
            program.exists(),
            "{} is missing: run .ci/setup (it installs PyPI's uploadserver into target/venv)",
            program.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().with_extension("log");
        let mut command = Command::new(program);
        command.current_dir(dir.path()).args(["-b", "127.0.0.1"]);
        if let Some(auth) = basic_auth {
            command.args(["--basic-auth-upload", auth]);
        }
        let mut child = command
            .arg("0")
            .env("PYTHONUNBUFFERED", "1")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let port = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|line| {
                let rest = line.strip_prefix("Serving HTTP on 127.0.0.1 port ")?;
                rest.split_whitespace().next()?.parse::<u16>().ok()
            })
            .expect("uploadserver says where it listens");
        UploadServer {
            app: App {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
            },
            log,
            dir,
        }
    }

    /// How many upload requests it has logged (`"POST /upload ..."` lines).
    pub fn posts(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains("\"POST /upload"))
            .count()
    }

    /// The files it saved, with their contents.
    pub fn saved(&self) -> Vec<(String, Vec<u8>)> {
        let mut saved: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|entry| {
                let entry = entry.unwrap();
                let name = entry.file_name().to_string_lossy().into_owned();
                (name, std::fs::read(entry.path()).unwrap())
            })
            .collect();
        saved.sort();
        saved
    }
}

/// The real `stitch` binary on `dir`, its log in `<dir>.log`; killed when dropped.
pub struct StitchProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl StitchProcess {
    /// Starts it with `routes` in front of `upstream`, and waits until it accepts connections.
    pub fn start(upstream: SocketAddr, dir: &Path, routes: &str) -> StitchProcess {
        StitchProcess::start_yaml(dir, &super::config_yaml(upstream, dir, "", routes))
    }

    /// Starts it with a whole config whose first line is `listen: ADDRESS`: on a free port,
    /// chosen again should another process take it before Stitch binds it.
    pub fn start_yaml(dir: &Path, yaml: &str) -> StitchProcess {
        let rest = yaml.split_once('\n').map_or("", |(_, rest)| rest);
        for _ in 0..5 {
            let addr = super::free_addr();
            let path = dir.with_extension("yaml");
            std::fs::write(&path, format!("listen: {addr}\n{rest}")).unwrap();
            let mut process = StitchProcess::spawn(&path, dir, addr, &[]);
            if process.wait_listening(&[addr]) {
                return process;
            }
            let _ = process.child.kill();
            let _ = process.child.wait();
        }
        panic!("stitch did not start");
    }

    /// Starts it again on `addr` (where an earlier process listened) with the config of
    /// `start`/`start_yaml` on `dir`: clients that knew the old one find the new one.
    pub fn start_again(addr: SocketAddr, dir: &Path) -> StitchProcess {
        let path = dir.with_extension("yaml");
        for _ in 0..50 {
            let mut process = StitchProcess::spawn(&path, dir, addr, &[]);
            if process.wait_listening(&[addr]) {
                return process;
            }
            let _ = process.child.kill();
            let _ = process.child.wait();
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("stitch did not start again on {addr}");
    }

    /// `stitch demo` with `routes`, storing in `dir`, started from outside the source tree;
    /// returns it and the demo application's address.
    pub fn demo(dir: &Path, routes: &str) -> (StitchProcess, SocketAddr) {
        for _ in 0..5 {
            let (addr, app) = (super::free_addr(), super::free_addr());
            let yaml = format!(
                "listen: {addr}\nupstream: {app}\nshutdown_grace: 0\nstorage:\n  dir: {}\n{routes}",
                dir.display()
            );
            let path = dir.with_extension("yaml");
            std::fs::write(&path, yaml).unwrap();
            let mut process = StitchProcess::spawn(&path, dir, addr, &["demo"]);
            if process.wait_listening(&[addr, app]) {
                return (process, app);
            }
            let _ = process.child.kill();
            let _ = process.child.wait();
        }
        panic!("stitch demo did not start");
    }

    /// Starts another Stitch with the config of `start_yaml` on `dir` and `args` (such as
    /// `--upgrade`), without waiting for it to listen.
    pub fn start_beside(&self, dir: &Path, args: &[&str]) -> StitchProcess {
        StitchProcess::spawn(&dir.with_extension("yaml"), dir, self.addr, args)
    }

    /// Waits up to `within` until process `pid` accepts connections on `addr`.
    pub fn wait_owned_by(pid: u32, addr: SocketAddr, within: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if std::net::TcpStream::connect(addr).is_ok()
                && stitch::server::owns_listener(pid, addr)
            {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        false
    }

    fn spawn(config: &Path, dir: &Path, addr: SocketAddr, args: &[&str]) -> StitchProcess {
        let log = dir.with_extension("log");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_stitch"))
            .current_dir(dir.parent().expect("a storage directory has a parent"))
            .arg("--config")
            .arg(config)
            .args(args)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        StitchProcess { child, addr, log }
    }

    /// Waits until this process (not another) accepts connections on every one of `addrs`.
    fn wait_listening(&mut self, addrs: &[SocketAddr]) -> bool {
        for _ in 0..1000 {
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            if addrs
                .iter()
                .all(|addr| std::net::TcpStream::connect(addr).is_ok())
            {
                let pid = self.child.id();
                return addrs
                    .iter()
                    .all(|addr| stitch::server::owns_listener(pid, *addr));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        false
    }

    /// kill -9.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Sends `signal` ("TERM", "INT"...) to the process.
    pub fn signal(&self, signal: &str) {
        send_signal(&self.child, signal);
    }

    /// Waits up to `within` for the process to exit; its exit status if it did.
    pub fn exited_within(
        &mut self,
        within: std::time::Duration,
    ) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Everything it logged (all runs on this directory).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for StitchProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn first_line(stdout: ChildStdout) -> String {
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    line
}
