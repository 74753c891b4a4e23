//! What the benchmarks share: settings from the environment, a release Stitch in a process of
//! its own, a Resumable.js multipart chunk, readings from /proc, medians.

#![allow(dead_code)] // each bench uses its own share

use crate::common::{config_yaml, multipart_frame};
use bytes::Bytes;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A number from the environment, or `default` when unset; a value that is no number stops the
/// bench rather than silently measuring something else.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} is a number")))
        .unwrap_or(default)
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// A field of `/proc/PID/status` (`VmRSS:`, `VmHWM:` in kB; `Threads:`).
pub fn proc_status(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// User and system CPU time in seconds, from the text of a `/proc/PID/stat` (its utime and
/// stime, in clock ticks).
pub fn stat_cpu_seconds(stat: &str) -> f64 {
    // The fields after the command name, which is in parentheses and may hold spaces.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: u64 = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|f| f.parse::<u64>().expect("ticks in /proc/PID/stat"))
        .sum();
    ticks as f64 / clock_ticks()
}

/// Process `pid`'s user and system CPU time so far, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    stat_cpu_seconds(&stat)
}

/// The machine's CPU time so far, busy and in all (every core), in seconds, from `/proc/stat`.
pub fn machine_cpu_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let cpu = stat.lines().next().expect("the cpu line of /proc/stat");
    let ticks: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().expect("ticks in /proc/stat"))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is within user and nice).
    let all: u64 = ticks.iter().take(8).sum();
    let idle = ticks[3] + ticks.get(4).copied().unwrap_or(0);
    (
        (all - idle) as f64 / clock_ticks(),
        all as f64 / clock_ticks(),
    )
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// MiB from a `/proc/PID/status` field in kB.
pub fn proc_mib(pid: u32, field: &str) -> f64 {
    proc_status(pid, field) / 1024.0
}

/// The release `stitch`, storing in `root/data`, in front of `upstream` with `routes` (YAML
/// after the storage section), `storage.fsync` as given, logging warnings only, with `envs`;
/// killed when dropped.
pub struct Stitch {
    pub child: Child,
    pub listen: SocketAddr,
}

impl Stitch {
    pub fn start(
        root: &Path,
        upstream: SocketAddr,
        routes: &str,
        fsync: bool,
        envs: &[(&str, &str)],
    ) -> Stitch {
        // The test helper writes `fsync: true`; YAML keys may not repeat, so it is replaced.
        let yaml = config_yaml(upstream, &root.join("data"), "", routes)
            .replace("  fsync: true\n", &format!("  fsync: {fsync}\n"));
        let path = root.join("stitch.yaml");
        std::fs::write(&path, &yaml).unwrap();
        let listen: SocketAddr = yaml.lines().next().unwrap()["listen: ".len()..]
            .parse()
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_stitch"))
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "warn")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(listen).is_err() {
            assert!(Instant::now() < deadline, "stitch did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Stitch { child, listen }
    }
}

impl Drop for Stitch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends chunk `n` (`body`) of a `count`-chunk file as Resumable.js does with multipart
/// uploads (parameters in the body and repeated in the URL), to the route `/upload`.
pub async fn send_chunk(
    client: &reqwest::Client,
    listen: SocketAddr,
    identifier: &str,
    n: u64,
    count: u64,
    body: Bytes,
) {
    let chunk = body.len() as u64;
    let params = [
        ("resumableChunkNumber", n.to_string()),
        ("resumableChunkSize", chunk.to_string()),
        ("resumableCurrentChunkSize", chunk.to_string()),
        ("resumableTotalSize", (count * chunk).to_string()),
        ("resumableIdentifier", identifier.to_string()),
        ("resumableFilename", "bench.bin".to_string()),
    ];
    let pairs: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let (boundary, head, tail) =
        multipart_frame(&pairs, "file", "bench.bin", "application/octet-stream");
    let len = head.len() + body.len() + tail.len();
    let pieces: Vec<reqwest::Result<Bytes>> = vec![Ok(head), Ok(body), Ok(tail)];
    let query = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(&pairs)
        .finish();
    let response = client
        .post(format!("http://{listen}/upload?{query}"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .header("content-length", len)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(pieces)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "chunk {n}");
}

/// Requests per second: `clients` keep-alive clients for `seconds`, each GETting `url(i)`.
pub async fn rate(
    clients: usize,
    seconds: u64,
    url: Arc<dyn Fn(u64) -> String + Send + Sync>,
    expect: &'static [u16],
) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients as u64)
        .map(|c| {
            let url = url.clone();
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut done = 0u64;
                while Instant::now() < deadline {
                    let response = client.get(url(c * 7919 + done)).send().await.unwrap();
                    assert!(expect.contains(&response.status().as_u16()));
                    response.bytes().await.unwrap();
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    total as f64 / started.elapsed().as_secs_f64()
}
