//! Restarts without downtime (the real binary): a new Stitch started with `--upgrade` takes the
//! listeners of the running one, which hands them over on SIGQUIT, finishes what is in flight
//! and exits; `--daemon` runs in the background with a pid file, as the systemd unit in
//! `conf/deploy/` does it.

mod common;

use common::process::StitchProcess;
use common::raw::RawConnection;
use common::*;
use std::path::Path;
use std::time::Duration;

/// A config whose processes share `root`'s upgrade socket and pid file.
fn yaml(upstream: std::net::SocketAddr, dir: &Path, root: &Path) -> String {
    let process = format!(
        "process:\n  upgrade_socket: {}\n  pid_file: {}\n",
        root.join("upgrade.sock").display(),
        root.join("stitch.pid").display()
    );
    config_yaml(upstream, dir, "", &format!("{process}{ROUTES}"))
        .replace("shutdown_grace: 0", "shutdown_grace: 30s")
}

#[tokio::test]
async fn an_upgrade_during_an_upload_hands_over_the_listener_and_the_file_arrives_once() {
    let upstream = Upstream::start().await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    let mut old = StitchProcess::start_yaml(&dir, &yaml(upstream.addr, &dir, root.path()));
    let file = ChunkedFile::resumable("upgrade.bin", random_bytes(4000, 130), 1000);
    let addr = old.addr;
    let url = |n: u64| format!("http://{addr}/upload?{}", file.query_string(n));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let post = |n: u64| {
        let (start, end) = file.bounds(n);
        client.post(url(n)).body(file.data.slice(start, end)).send()
    };
    assert_eq!(post(1).await.unwrap().status(), 200);
    // Chunk 2 is half-sent to the old process when the upgrade starts.
    let mut in_flight = RawConnection::open(addr).await;
    let head = format!(
        "POST /upload?{} HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n",
        file.query_string(2)
    );
    assert!(in_flight.send(head.as_bytes()).await);
    assert!(in_flight.send(&file.data.slice(1000, 1400)).await);

    let mut new = old.start_beside(&dir, &["--upgrade"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    old.signal("QUIT");
    assert!(
        StitchProcess::wait_owned_by(new.child.id(), addr, Duration::from_secs(15)),
        "the new process takes the listener: {}",
        new.log_text()
    );
    assert!(
        new.exited_within(Duration::ZERO).is_none(),
        "{}",
        new.log_text()
    );
    // Requests keep being answered throughout (by either process).
    assert_eq!(post(3).await.unwrap().status(), 200);
    assert!(in_flight.send(&file.data.slice(1400, 2000)).await);
    let answer = in_flight.response(Duration::from_secs(10)).await;
    assert_eq!(
        answer.map(|r| r.status),
        Some(200),
        "the chunk in flight is stored by the old process"
    );
    let status = old.exited_within(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "the old process drains and exits: {status:?}"
    );

    // Only the new process is left: it completes the upload and delivers it, once.
    assert!(stitch::server::owns_listener(new.child.id(), addr));
    let last = post(4).await.unwrap();
    assert_eq!(last.status(), 200);
    assert_delivered_once_to(&upstream, &file);
    let test = client.get(url(2)).send().await.unwrap();
    assert_eq!(test.status(), 204, "a test of a delivered file");
}

/// A background Stitch, known by its pid file; killed when dropped.
struct Daemon(u32);

impl Daemon {
    /// Waits until the pid file names a process other than `not` that listens on `addr`.
    fn from_pid_file(path: &Path, addr: std::net::SocketAddr, not: Option<u32>) -> Daemon {
        for _ in 0..750 {
            let pid = std::fs::read_to_string(path)
                .ok()
                .and_then(|text| text.trim().parse::<u32>().ok());
            if let Some(pid) = pid.filter(|pid| Some(*pid) != not) {
                if StitchProcess::wait_owned_by(pid, addr, Duration::from_millis(20)) {
                    return Daemon(pid);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no new process in {} listens on {addr}", path.display());
    }

    fn signal(&self, signal: &str) {
        let sent = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.0.to_string())
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{signal} {} failed", self.0);
    }

    fn exited_within(&self, within: Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            // Gone, or a zombie waiting for init to reap it (a daemon's parent is init).
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.0));
            let state = stat
                .as_deref()
                .ok()
                .and_then(|s| s.rsplit_once(')'))
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            if matches!(state, None | Some('Z')) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if !self.exited_within(Duration::ZERO) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &self.0.to_string()])
                .status();
        }
    }
}

/// Runs `stitch` with `args` to its end (the daemon's parent exits once it has forked; the
/// daemon keeps its output, so nothing here waits for that to close).
fn stitch(config: &Path, args: &[&str]) -> std::process::ExitStatus {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(config.with_extension("log"))
        .unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_stitch"))
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .status()
        .unwrap()
}

#[tokio::test]
async fn a_daemon_writes_its_pid_file_and_is_upgraded_the_way_the_systemd_unit_does_it() {
    let upstream = Upstream::start().await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    let addr = free_addr();
    let config = root.path().join("stitch.yaml");
    let text = yaml(upstream.addr, &dir, root.path());
    let text = format!("listen: {addr}\n{}", text.split_once('\n').unwrap().1);
    std::fs::write(&config, &text).unwrap();
    let pid_file = root.path().join("stitch.pid");

    // ExecStart
    let started = stitch(&config, &["--daemon"]);
    assert!(started.success(), "{started:?}");
    let first = Daemon::from_pid_file(&pid_file, addr, None);
    let file = ChunkedFile::resumable("daemon.bin", random_bytes(3000, 131), 1000);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let post = |n: u64| {
        let (start, end) = file.bounds(n);
        client
            .post(format!("http://{addr}/upload?{}", file.query_string(n)))
            .body(file.data.slice(start, end))
            .send()
    };
    assert_eq!(post(1).await.unwrap().status(), 200);

    // ExecReload with a broken config: `check` fails, so nothing else runs.
    std::fs::write(&config, format!("{text}\nlisten_typo: 1\n")).unwrap();
    let checked = stitch(&config, &["check"]);
    assert!(!checked.success(), "a broken config is refused");
    std::fs::write(&config, &text).unwrap();
    // ExecReload: check, SIGQUIT to the running one, a new daemon that takes over.
    assert!(stitch(&config, &["check"]).success());
    first.signal("QUIT");
    let upgraded = stitch(&config, &["--daemon", "--upgrade"]);
    assert!(upgraded.success(), "{upgraded:?}");
    let second = Daemon::from_pid_file(&pid_file, addr, Some(first.0));
    assert_eq!(post(2).await.unwrap().status(), 200);
    assert!(
        first.exited_within(Duration::from_secs(20)),
        "the old daemon drains and exits"
    );
    assert_eq!(post(3).await.unwrap().status(), 200);
    assert_delivered_once_to(&upstream, &file);

    // ExecStop: SIGTERM, and the daemon exits.
    second.signal("TERM");
    assert!(second.exited_within(Duration::from_secs(20)));
}
