//! tus benchmark: a 1 GiB file uploaded by a tus 1.0 client through the real `stitch` binary's
//! tus route, which stores it and delivers it to a recording upstream (with per-part fsync, the
//! default, and without; with early delivery, `forward.early`, and without; answering the last
//! PATCH once the file is stored, `forward.wait: 1ms`, and not after its delivery), and, for
//! comparison, through `@tus/server` with `@tus/file-store`
//! (Node.js, pinned in `benches/tus-peer/`, installed with `npm ci` when missing). Each server
//! gets the file in 8 MiB PATCHes and in one PATCH of the whole file. The client is written
//! here in Rust, the same for every server, so that on two cores it is not the bottleneck.
//! Reports MiB/s to the last PATCH's answer and to the file stored, each server's peak memory
//! (VmHWM) and CPU time, and when Stitch's delivery reached the upstream and ended. Results
//! replace the tus section of `benches/results.md`, keeping the rest.
//!
//! Run: `cargo bench --bench tus` (FILE_MIB=… PATCH_MIB=… RUNS=… to change the sizes,
//! SERVERS=stitch,stitch-nofsync,stitch-nowait,stitch-early,stitch-early-nofsync,tus-node to
//! choose the servers).

#[path = "common/bench.rs"]
mod bench;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "common/report.rs"]
mod report;

use bench::env_u64;
use bytes::{Bytes, BytesMut};
use common::{config_yaml, multipart_frame, random_bytes, Upstream};
use futures::StreamExt;
use report::Goal;
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use url::Url;

/// The settings this bench reads from the environment.
const KNOBS: [&str; 4] = ["FILE_MIB", "PATCH_MIB", "RUNS", "SERVERS"];

/// Stitch against @tus/server, to the last answer and to the file stored.
const PEER_AIM: f64 = 1.5;

/// Where both servers take uploads.
const COLLECTION: &str = "/files";
/// Where Stitch delivers the finished file (as in `conf/tus.yaml`).
const DELIVERY_PATH: &str = "/api/upload";
/// How long one upload (creation to last answer, and the delivery) may take before the bench
/// gives up.
const CASE_LIMIT: Duration = Duration::from_secs(300);
/// How long a server may take to start listening.
const START_LIMIT: Duration = Duration::from_secs(30);
/// The most bytes the client reads from the file at a time.
const READ_PIECE: u64 = 1 << 20;

fn mib_per_s(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / seconds
}

/// The file the client uploads: pseudo-random bytes on disk (so nothing deduplicates).
struct Source {
    path: PathBuf,
    len: u64,
    sha256: String,
}

fn write_source(dir: &Path, len: u64) -> Source {
    let path = dir.join("source.bin");
    let mut file = std::fs::File::create(&path).expect("create the source file");
    let mut hasher = Sha256::new();
    let mut at = 0;
    while at < len {
        let piece = random_bytes((8 << 20).min(len - at) as usize, at);
        hasher.update(&piece);
        file.write_all(&piece).expect("write the source file");
        at += piece.len() as u64;
    }
    Source {
        path,
        len,
        sha256: hex::encode(hasher.finalize()),
    }
}

/// Refuses to start without room for the source file, one stored copy and a margin.
fn check_free_space(dir: &Path, file_len: u64) {
    let output = Command::new("df")
        .args(["-Pk"])
        .arg(dir)
        .output()
        .expect("df runs");
    let text = String::from_utf8_lossy(&output.stdout);
    let free_kib: Option<u64> = text
        .lines()
        .nth(1)
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok());
    let needed = 3 * file_len;
    if let Some(free) = free_kib {
        assert!(
            free * 1024 >= needed,
            "{} has {} MiB free; the bench needs {} MiB (FILE_MIB=… for a smaller file)",
            dir.display(),
            free / 1024,
            needed >> 20
        );
    }
}

/// The disk's own speed for the file written as files of `piece` bytes (as Stitch stores
/// PATCHes), each fsynced or not, in MiB/s.
fn disk_speed(dir: &Path, total: u64, piece: u64, fsync: bool) -> f64 {
    settle_disk();
    let data = random_bytes(piece.min(64 << 20) as usize, 7);
    let path = |i: u64| dir.join(format!("disk-{i}"));
    let started = Instant::now();
    for i in 0..total / piece {
        let mut file = std::fs::File::create(path(i)).expect("create a disk test file");
        let mut left = piece;
        while left > 0 {
            let n = left.min(data.len() as u64) as usize;
            file.write_all(&data[..n]).expect("write a disk test file");
            left -= n as u64;
        }
        if fsync {
            file.sync_all().expect("fsync a disk test file");
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    for i in 0..total / piece {
        let _ = std::fs::remove_file(path(i));
    }
    settle_disk();
    mib_per_s(total, seconds)
}

/// Writes dirty pages out, so that no run pays for the previous one's writeback.
fn settle_disk() {
    let _ = Command::new("sync").status();
}

/// A server in a process of its own, ended by its PID (`Child::kill`) when dropped.
struct Process {
    child: Child,
    /// Kept open so that the server never writes into a closed pipe.
    _stdout: Option<BufReader<ChildStdout>>,
}

impl Process {
    fn proc_file(&self, name: &str) -> String {
        std::fs::read_to_string(format!("/proc/{}/{name}", self.child.id()))
            .unwrap_or_else(|e| panic!("/proc/{}/{name}: {e}", self.child.id()))
    }

    /// The most memory the process has held (VmHWM), in MiB.
    fn peak_rss_mib(&self) -> f64 {
        let kib: f64 = self
            .proc_file("status")
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/<pid>/status");
        kib / 1024.0
    }

    /// User and system CPU time so far, in seconds.
    fn cpu_seconds(&self) -> f64 {
        bench::stat_cpu_seconds(&self.proc_file("stat"))
    }
}

/// This process's CPU time (the client and, for Stitch, the upstream).
fn own_cpu_seconds() -> f64 {
    bench::stat_cpu_seconds(&std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat"))
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_listener(addr: SocketAddr) {
    let deadline = Instant::now() + START_LIMIT;
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Stitch with one tus route like `conf/tus.yaml`, storing in `dir` (each part fsynced or
/// not), delivering to `upstream`.
fn start_stitch(
    upstream: SocketAddr,
    dir: &Path,
    file_len: u64,
    fsync: bool,
    mode: Mode,
) -> (Process, Url) {
    let max_mib = (file_len >> 20).max(5 << 10);
    let forward = match mode {
        Mode::AfterDelivery => "",
        Mode::OnceStored => ", wait: 1ms",
        Mode::Early => ", early: true",
    };
    let routes = format!(
        "routes:\n  - path: {COLLECTION}\n    protocol: tus\n    limits: {{ max_file_size: {max_mib}MiB }}\n    \
         forward: {{ path: {DELIVERY_PATH}, field: file{forward} }}\n"
    );
    // The test helper writes `fsync: true`; YAML keys may not repeat, so it is replaced.
    let yaml = config_yaml(upstream, &dir.join("data"), "", &routes)
        .replace("  fsync: true\n", &format!("  fsync: {fsync}\n"));
    let path = dir.join("stitch.yaml");
    std::fs::write(&path, &yaml).expect("write the config");
    let listen: SocketAddr = yaml.lines().next().unwrap()["listen: ".len()..]
        .parse()
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_stitch"))
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start stitch");
    let process = Process {
        child,
        _stdout: None,
    };
    wait_for_listener(listen);
    let collection = Url::parse(&format!("http://{listen}{COLLECTION}")).unwrap();
    (process, collection)
}

fn peer_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/tus-peer")
}

/// Installs `benches/tus-peer`'s pinned packages if they are missing.
fn install_peer() {
    let peer = peer_dir();
    let installed = ["@tus/server", "@tus/file-store"].iter().all(|p| {
        peer.join("node_modules")
            .join(p)
            .join("package.json")
            .exists()
    });
    if installed {
        return;
    }
    let how = "install it with `npm ci --prefix benches/tus-peer` (npm, Node.js >= 20.19)";
    println!("installing @tus/server in benches/tus-peer (npm ci)");
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&peer)
        .status()
        .unwrap_or_else(|e| {
            panic!("benches/tus-peer is not installed and npm did not run ({e}): {how}")
        });
    assert!(
        status.success(),
        "benches/tus-peer is not installed and `npm ci` failed: {how}"
    );
}

/// The version of a package installed in `benches/tus-peer`.
fn peer_version(package: &str) -> String {
    let manifest = peer_dir()
        .join("node_modules")
        .join(package)
        .join("package.json");
    let text = std::fs::read_to_string(manifest).unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["version"].as_str().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn node_version() -> String {
    Command::new("node")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// `@tus/server` with `@tus/file-store` storing in `dir` (`benches/tus-peer/server.mjs`).
fn start_tus_node(dir: &Path) -> (Process, Url) {
    let mut child = Command::new("node")
        .arg(peer_dir().join("server.mjs"))
        .arg(dir)
        .stdout(Stdio::piped())
        .spawn()
        .expect("`node` runs benches/tus-peer/server.mjs (Node.js >= 20.19)");
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut process = Process {
        child,
        _stdout: None,
    };
    let mut line = String::new();
    stdout
        .read_line(&mut line)
        .expect("read the server's first line");
    let port: u16 = line
        .strip_prefix("listening ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("benches/tus-peer/server.mjs said {line:?}"));
    process._stdout = Some(stdout);
    let collection = Url::parse(&format!("http://127.0.0.1:{port}{COLLECTION}")).unwrap();
    (process, collection)
}

/// `len` bytes of the file at `path` from `offset`, read piece by piece as the connection
/// takes them; `sent` is set when the last piece is handed over.
fn file_body(
    path: &Path,
    offset: u64,
    len: u64,
    sent: Arc<Mutex<Option<Instant>>>,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    let path = path.to_path_buf();
    futures::stream::try_unfold(None, move |file| {
        let path = path.clone();
        let sent = sent.clone();
        async move {
            let mut file = match file {
                Some(file) => file,
                None => {
                    let mut file = tokio::fs::File::open(&path).await?;
                    file.seek(std::io::SeekFrom::Start(offset)).await?;
                    file.take(len)
                }
            };
            let mut piece = BytesMut::with_capacity(READ_PIECE as usize);
            if file.read_buf(&mut piece).await? == 0 {
                return Ok::<_, std::io::Error>(None);
            }
            if file.limit() == 0 {
                // The connection does not ask past Content-Length: this is the last piece.
                *sent.lock().unwrap() = Some(Instant::now());
            }
            Ok(Some((piece.freeze(), Some(file))))
        }
    })
}

/// What the client saw of one upload.
struct Uploaded {
    started: Instant,
    /// When the last PATCH's last bytes were handed to the connection.
    body_sent: Instant,
    /// When the last PATCH was answered.
    answered: Instant,
    /// The upload's URL.
    url: Url,
    /// The last PATCH's answer headers.
    last: reqwest::header::HeaderMap,
}

/// The tus client: a creation with `Upload-Length`, then PATCHes of `patch` bytes in order,
/// each body streamed from the file, each answer checked (204, the new `Upload-Offset`).
async fn tus_upload(
    client: &reqwest::Client,
    collection: &Url,
    source: &Source,
    patch: u64,
) -> Uploaded {
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(s)
    };
    let metadata = format!(
        "filename {},filetype {}",
        b64("bench.bin"),
        b64("application/octet-stream")
    );
    let started = Instant::now();
    let created = client
        .post(collection.clone())
        .header("tus-resumable", "1.0.0")
        .header("upload-length", source.len)
        .header("upload-metadata", metadata)
        .send()
        .await
        .expect("creation request");
    let status = created.status();
    let location = created
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = created.text().await.unwrap_or_default();
    assert_eq!(status, 201, "creation: {text}");
    let url = collection
        .join(&location.expect("a creation answers with Location"))
        .expect("Location is a URL");
    let sent = Arc::new(Mutex::new(None));
    let mut offset = 0;
    let mut last = reqwest::header::HeaderMap::new();
    while offset < source.len {
        let len = patch.min(source.len - offset);
        let response = client
            .patch(url.clone())
            .header("tus-resumable", "1.0.0")
            .header("upload-offset", offset)
            .header("content-type", "application/offset+octet-stream")
            .header("content-length", len)
            .body(reqwest::Body::wrap_stream(file_body(
                &source.path,
                offset,
                len,
                sent.clone(),
            )))
            .send()
            .await
            .expect("PATCH request");
        let status = response.status();
        last = response.headers().clone();
        let text = response.text().await.unwrap_or_default();
        assert_eq!(status, 204, "PATCH at {offset}: {text}");
        let new_offset = last
            .get("upload-offset")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        assert_eq!(
            new_offset,
            Some(offset + len),
            "Upload-Offset after a PATCH"
        );
        offset += len;
    }
    let answered = Instant::now();
    let body_sent = sent.lock().unwrap().expect("the last body was sent");
    Uploaded {
        started,
        body_sent,
        answered,
        url,
        last,
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(CASE_LIMIT)
        .build()
        .expect("http client")
}

/// When Stitch answers the last PATCH, and when it delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// After the delivery (up to `forward.wait`, 30 s): the route's default.
    AfterDelivery,
    /// Once the file is stored (`forward.wait: 1ms`): the delivery goes on after the answer.
    OnceStored,
    /// `forward.early`: the delivery begins while the file arrives.
    Early,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    Stitch { fsync: bool, mode: Mode },
    TusNode,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Stitch {
                fsync: true,
                mode: Mode::AfterDelivery,
            } => "Stitch (fsync on, the default)",
            Server::Stitch {
                fsync: false,
                mode: Mode::AfterDelivery,
            } => "Stitch (fsync off)",
            Server::Stitch {
                fsync: true,
                mode: Mode::OnceStored,
            } => "Stitch, answering once stored (fsync on, `forward.wait: 1ms`)",
            Server::Stitch {
                fsync: false,
                mode: Mode::OnceStored,
            } => "Stitch, answering once stored (fsync off, `forward.wait: 1ms`)",
            Server::Stitch {
                fsync: true,
                mode: Mode::Early,
            } => "Stitch, early delivery (fsync on)",
            Server::Stitch {
                fsync: false,
                mode: Mode::Early,
            } => "Stitch, early delivery (fsync off)",
            Server::TusNode => "@tus/server",
        }
    }

    /// Every Stitch variant, in the order of the report.
    const STITCHES: [Server; 6] = [
        Server::Stitch {
            fsync: true,
            mode: Mode::AfterDelivery,
        },
        Server::Stitch {
            fsync: false,
            mode: Mode::AfterDelivery,
        },
        Server::Stitch {
            fsync: true,
            mode: Mode::OnceStored,
        },
        Server::Stitch {
            fsync: false,
            mode: Mode::OnceStored,
        },
        Server::Stitch {
            fsync: true,
            mode: Mode::Early,
        },
        Server::Stitch {
            fsync: false,
            mode: Mode::Early,
        },
    ];
}

/// When Stitch's upstream saw the delivery, and Stitch's CPU time before and during it.
struct Delivery {
    /// The request's head arrived.
    started: Instant,
    /// The whole body was read (the file parsed and hashed).
    held: Instant,
    cpu_storing: f64,
    cpu_delivering: f64,
}

/// Stitch's phases, in seconds.
#[derive(Debug, Clone, Copy)]
struct Phases {
    /// From the creation request until the delivery's head reached the upstream.
    started: f64,
    /// From the creation request until the upstream had read the whole file.
    held: f64,
    /// Stitch's CPU time until the delivery started, and during it.
    cpu_storing: f64,
    cpu_delivering: f64,
}

/// One upload's numbers, in seconds from the creation request unless said otherwise.
#[derive(Debug, Clone)]
struct Measured {
    /// The last PATCH answered.
    answered: f64,
    /// The last PATCH's last bytes handed to the connection.
    body_sent: f64,
    /// Stitch: when its delivery started and ended.
    delivery: Option<Phases>,
    peak_rss_mib: f64,
    /// The server's CPU time over its life.
    cpu_seconds: f64,
    /// The bench process's CPU time during the upload (client, and Stitch's upstream).
    bench_cpu_seconds: f64,
    /// Stitch with early delivery: its delivery begins with the first part.
    early: bool,
}

impl Measured {
    fn of(
        uploaded: &Uploaded,
        delivery: Option<Delivery>,
        process: &Process,
        bench_cpu_seconds: f64,
    ) -> Measured {
        let since_start = |t: Instant| t.duration_since(uploaded.started).as_secs_f64();
        Measured {
            early: false,
            answered: since_start(uploaded.answered),
            body_sent: since_start(uploaded.body_sent),
            delivery: delivery.map(|d| Phases {
                started: since_start(d.started),
                held: since_start(d.held),
                cpu_storing: d.cpu_storing,
                cpu_delivering: d.cpu_delivering,
            }),
            peak_rss_mib: process.peak_rss_mib(),
            cpu_seconds: process.cpu_seconds(),
            bench_cpu_seconds,
        }
    }
}

impl Measured {
    /// When the server had stored every byte: Stitch starts its delivery only then (after the
    /// last fsync); @tus/server answers the last PATCH then.
    /// With early delivery the upstream's view does not tell: its last answer, a bound.
    fn stored(&self) -> f64 {
        match self.delivery {
            Some(d) if !self.early => d.started,
            _ => self.answered,
        }
    }
}

/// Stitch in front of a recording upstream; checks that the upstream got the whole file once.
async fn run_stitch(source: &Source, patch: u64, fsync: bool, mode: Mode) -> Measured {
    let upstream = Arc::new(Upstream::start().await);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (process, collection) = start_stitch(upstream.addr, dir.path(), source.len, fsync, mode);
    // Notes when the upstream has read the whole delivered body (it records a request then),
    // and Stitch's CPU time meanwhile.
    let watch = {
        let upstream = upstream.clone();
        let stat = format!("/proc/{}/stat", process.child.id());
        tokio::spawn(async move {
            let mut cpu = Vec::new();
            loop {
                if let Ok(line) = std::fs::read_to_string(&stat) {
                    cpu.push((Instant::now(), bench::stat_cpu_seconds(&line)));
                }
                if let Some(received) = upstream.received_at(DELIVERY_PATH).into_iter().next() {
                    return (received, Instant::now(), cpu);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let cpu_before = own_cpu_seconds();
    let uploaded = tus_upload(&http_client(), &collection, source, patch).await;
    let said = uploaded
        .last
        .get("stitch-delivery")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("nothing")
        .to_string();
    let watched = tokio::time::timeout(CASE_LIMIT, watch).await;
    let (received, held, cpu) = watched
        .unwrap_or_else(|_| panic!("the upstream did not get the file (stitch-delivery: {said})"))
        .expect("the watch ran");
    let bench_cpu = own_cpu_seconds() - cpu_before;
    assert_eq!(received.files.len(), 1, "one file part");
    assert_eq!(received.files[0].len, source.len, "the whole file");
    assert_eq!(received.files[0].sha256, source.sha256, "the same bytes");
    assert_eq!(
        upstream.received_at(DELIVERY_PATH).len(),
        1,
        "delivered once"
    );
    upstream.go_down();
    // Stitch's CPU time at `t`: the last sample taken by then.
    let cpu_at = |t: Instant| {
        cpu.iter()
            .take_while(|(at, _)| *at <= t)
            .last()
            .map_or(0.0, |(_, seconds)| *seconds)
    };
    let delivery = Delivery {
        started: received.at,
        held,
        cpu_storing: cpu_at(received.at),
        cpu_delivering: cpu_at(held) - cpu_at(received.at),
    };
    Measured {
        early: mode == Mode::Early,
        ..Measured::of(&uploaded, Some(delivery), &process, bench_cpu)
    }
}

/// `@tus/server`; checks the file it stored.
async fn run_tus_node(source: &Source, patch: u64) -> Measured {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (process, collection) = start_tus_node(dir.path());
    let cpu_before = own_cpu_seconds();
    let uploaded = tus_upload(&http_client(), &collection, source, patch).await;
    let measured = Measured::of(&uploaded, None, &process, own_cpu_seconds() - cpu_before);
    let id = uploaded
        .url
        .path_segments()
        .and_then(|mut s| s.next_back())
        .expect("an upload id")
        .to_string();
    let mut file = std::fs::File::open(dir.path().join(id)).expect("@tus/server stored the file");
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).expect("read the stored file");
    assert_eq!(
        hex::encode(hasher.finalize()),
        source.sha256,
        "the same bytes"
    );
    measured
}

/// How long the recording upstream alone takes to read the file as one multipart POST straight
/// from the client, in seconds: the least that Stitch's delivery to it can take.
async fn upstream_alone(source: &Source) -> f64 {
    settle_disk();
    let upstream = Upstream::start().await;
    let (boundary, head, tail) =
        multipart_frame(&[], "file", "bench.bin", "application/octet-stream");
    let len = head.len() as u64 + source.len + tail.len() as u64;
    let file = file_body(&source.path, 0, source.len, Arc::default());
    let body = futures::stream::once(async { Ok(head) })
        .chain(file)
        .chain(futures::stream::once(async { Ok(tail) }));
    let started = Instant::now();
    let response = http_client()
        .post(format!("http://{}{DELIVERY_PATH}", upstream.addr))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .header("content-length", len)
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .expect("a POST to the upstream");
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(response.status(), 200, "the upstream took the file");
    let received = upstream.received_at(DELIVERY_PATH);
    assert_eq!(received[0].files[0].sha256, source.sha256, "the same bytes");
    upstream.go_down();
    seconds
}

/// One upload on a new server, with the disk settled before and after.
async fn run(server: Server, source: &Source, patch: u64) -> Measured {
    settle_disk();
    let run = async {
        match server {
            Server::Stitch { fsync, mode } => run_stitch(source, patch, fsync, mode).await,
            Server::TusNode => run_tus_node(source, patch).await,
        }
    };
    let measured = tokio::time::timeout(CASE_LIMIT, run)
        .await
        .unwrap_or_else(|_| panic!("{} took over {CASE_LIMIT:?}", server.name()));
    settle_disk();
    measured
}

/// The run with the median time, with the highest peak memory of all runs.
fn median(mut runs: Vec<Measured>) -> Measured {
    runs.sort_by(|a, b| a.answered.total_cmp(&b.answered));
    let peak = runs.iter().map(|r| r.peak_rss_mib).fold(0.0, f64::max);
    Measured {
        peak_rss_mib: peak,
        ..runs[runs.len() / 2].clone()
    }
}

fn size_label(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

struct Case {
    server: Server,
    patch: u64,
    result: Measured,
}

/// What the numbers were measured under.
struct Conditions {
    runs: u64,
    /// The 1-minute load average before and after the runs (other work on the machine).
    load: (String, String),
    /// The recording upstream's own time for the file (median of the runs), if measured.
    upstream_alone: Option<f64>,
    /// The disk's speed for the file in pieces of each PATCH size: (piece, fsynced, MiB/s).
    disk: Vec<(u64, bool, f64)>,
}

/// The 1-minute load average.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// The section for `benches/results.md`, and the goals it reports.
fn report(
    cases: &[Case],
    file_len: u64,
    conditions: &Conditions,
    machine: &report::Machine,
    command: &str,
) -> (String, Vec<Goal>) {
    let runs = conditions.runs;
    let mut out = format!(
        "# Benchmark: tus, {} file, one PATCH at a time\n\n\
         Machine: {machine}. Client: the bench's own tus client (Rust, reqwest: a creation with \
         Upload-Length, then PATCHes in order), streaming each body from a file in the page \
         cache; the same for every server. Stitch: the release binary, one tus route as in \
         `conf/tus.yaml`, delivering the finished file to a recording upstream in the bench \
         process, which parses the multipart body and hashes the file; its last PATCH is \
         answered after the delivery (answering once stored, `forward.wait: 1ms`: once the \
         file is stored, the delivery going on after the answer). @tus/server {} with @tus/file-store {} on Node.js {}: \
         it stores the file (without fsync) and delivers nothing. \"To the last answer\": from \
         the creation request to the last PATCH's answer, as the client sees it. \"To the file \
         stored\": until the server had every byte stored (Stitch: when its delivery reached \
         the upstream, which it starts after the last fsync; @tus/server: its last answer; \
         Stitch with early delivery, `forward.early: true`, whose delivery begins with the \
         first part: its last answer, a bound). Each case: the median of {runs} runs, a new server each run; peak RSS is the highest \
         of the runs.\n\n\
         | server | PATCH size | MiB/s to the last answer | MiB/s to the file stored | server peak RSS (MiB) | server CPU (s) |\n\
         |---|---|---|---|---|---|\n",
        size_label(file_len),
        peer_version("@tus/server"),
        peer_version("@tus/file-store"),
        node_version(),
    );
    for case in cases {
        let r = &case.result;
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {:.1} | {:.1} |\n",
            case.server.name(),
            size_label(case.patch),
            mib_per_s(file_len, r.answered),
            mib_per_s(file_len, r.stored()),
            r.peak_rss_mib,
            r.cpu_seconds,
        ));
    }
    out.push('\n');
    let (lines, goals) = ratios(cases);
    out.push_str(&lines);
    out.push_str(&timeline(cases));
    if let Some(seconds) = conditions.upstream_alone {
        out.push_str(&format!(
            "\nThe recording upstream alone, sent the file as one multipart POST straight from \
             the client, reads it in {seconds:.2} s ({:.0} MiB/s): the least Stitch's delivery \
             can take.\n",
            mib_per_s(file_len, seconds)
        ));
    }
    let disk: Vec<String> = conditions
        .disk
        .iter()
        .map(|(piece, fsync, speed)| {
            let how = if *fsync { "each fsynced" } else { "no fsync" };
            format!("{speed:.0} MiB/s in {} files, {how}", size_label(*piece))
        })
        .collect();
    if !disk.is_empty() {
        out.push_str(&format!(
            "\nThe disk alone, writing the file in the same directory: {}.\n",
            disk.join("; ")
        ));
    }
    out.push_str(&format!(
        "\nLoad average (1 min) before the runs: {}, after: {} (the bench itself counts for \
         about 1 to 2; more means other work shared the 2 cores).\n",
        conditions.load.0, conditions.load.1
    ));
    out.push_str(&format!("\nProduced by `{command}`.\n"));
    (out, goals)
}

/// Stitch against @tus/server for each PATCH size, and Stitch's memory for each; and those
/// ratios as goals.
fn ratios(cases: &[Case]) -> (String, Vec<Goal>) {
    let mut out = String::new();
    let mut goals = Vec::new();
    let find = |server, patch| {
        cases
            .iter()
            .find(|c| c.server == server && c.patch == patch)
    };
    let mut patches: Vec<u64> = cases.iter().map(|c| c.patch).collect();
    patches.sort_unstable();
    patches.dedup();
    for stitch in Server::STITCHES {
        for patch in &patches {
            if let (Some(s), Some(n)) = (find(stitch, *patch), find(Server::TusNode, *patch)) {
                let answered = n.result.answered / s.result.answered;
                let stored = n.result.stored() / s.result.stored();
                let case = format!("{}, {} PATCHes", stitch.name(), size_label(*patch));
                out.push_str(&format!(
                    "- {case}: {answered:.2}x @tus/server's speed to the last answer, \
                     {stored:.2}x to the file stored (goal: 1.5x or more)\n",
                ));
                goals.push(Goal::at_least(
                    format!("{case}: speed to the file stored / @tus/server's"),
                    stored,
                    PEER_AIM,
                ));
                goals.push(Goal::at_least(
                    format!("{case}: speed to the last answer / @tus/server's"),
                    answered,
                    PEER_AIM,
                ));
            }
        }
        let rss: Vec<String> = cases
            .iter()
            .filter(|c| c.server == stitch)
            .map(|c| {
                let patch = size_label(c.patch);
                format!("{:.1} MiB with {patch} PATCHes", c.result.peak_rss_mib)
            })
            .collect();
        if !rss.is_empty() {
            out.push_str(&format!(
                "- {} peak RSS: {} (goal: the same whatever the PATCH size)\n",
                stitch.name(),
                rss.join(", ")
            ));
        }
    }
    (out, goals)
}

/// Where each upload's time went, in seconds from the creation request.
fn timeline(cases: &[Case]) -> String {
    let mut out = String::from(
        "\nWhere the time goes (seconds from the creation request; the delivery columns are \
         the upstream's view; Stitch's CPU sampled every few ms):\n\n\
         | server | PATCH size | last body byte sent | delivery starts | upstream has the file | last PATCH answered | Stitch CPU storing / delivering (s) | bench process CPU (s) |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for case in cases {
        let r = &case.result;
        let (started, held, cpu) = match r.delivery {
            Some(d) => (
                format!("{:.2}", d.started),
                format!("{:.2}", d.held),
                format!("{:.1} / {:.1}", d.cpu_storing, d.cpu_delivering),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        out.push_str(&format!(
            "| {} | {} | {:.2} | {started} | {held} | {:.2} | {cpu} | {:.1} |\n",
            case.server.name(),
            size_label(case.patch),
            r.body_sent,
            r.answered,
            r.bench_cpu_seconds,
        ));
    }
    out
}

/// The servers to run: `SERVERS=stitch,stitch-nofsync,stitch-nowait,stitch-nowait-nofsync,
/// stitch-early,stitch-early-nofsync,tus-node` (default: all but `stitch-nowait-nofsync`).
fn servers() -> Vec<Server> {
    let chosen = std::env::var("SERVERS").unwrap_or_else(|_| {
        "stitch,stitch-nofsync,stitch-nowait,stitch-early,stitch-early-nofsync,tus-node".into()
    });
    chosen
        .split(',')
        .map(|name| {
            let (fsync, mode) = match name.trim() {
                "stitch" => (true, Mode::AfterDelivery),
                "stitch-nofsync" => (false, Mode::AfterDelivery),
                "stitch-nowait" => (true, Mode::OnceStored),
                "stitch-nowait-nofsync" => (false, Mode::OnceStored),
                "stitch-early" => (true, Mode::Early),
                "stitch-early-nofsync" => (false, Mode::Early),
                "tus-node" => return Server::TusNode,
                other => panic!(
                    "SERVERS: {other:?} is none of stitch, stitch-nofsync, stitch-nowait, \
                     stitch-nowait-nofsync, stitch-early, stitch-early-nofsync, tus-node"
                ),
            };
            Server::Stitch { fsync, mode }
        })
        .collect()
}

#[tokio::main]
async fn main() {
    let file_len = env_u64("FILE_MIB", 1024) << 20;
    let patch_len = env_u64("PATCH_MIB", 8) << 20;
    let runs = env_u64("RUNS", 3).max(1);
    let servers = servers();
    let has_stitch = servers.iter().any(|s| matches!(s, Server::Stitch { .. }));
    let mut alone = Vec::new();
    let load_before = load_average();
    if servers.contains(&Server::TusNode) {
        install_peer();
    }
    let work = tempfile::tempdir().expect("a temporary directory");
    check_free_space(work.path(), file_len);
    let source = write_source(work.path(), file_len);
    let mut disk = Vec::new();
    for patch in [patch_len.min(file_len), file_len] {
        for fsync in [true, false] {
            if !disk.iter().any(|(p, f, _)| *p == patch && *f == fsync) {
                disk.push((
                    patch,
                    fsync,
                    disk_speed(work.path(), file_len, patch, fsync),
                ));
            }
        }
    }
    let patches = if patch_len < file_len {
        vec![patch_len, file_len]
    } else {
        vec![file_len]
    };
    let mut plan = Vec::new();
    for server in servers {
        for patch in &patches {
            plan.push((server, *patch, Vec::new()));
        }
    }
    // Round after round, so that a slow spell of the machine touches every case alike.
    for round in 1..=runs {
        for (server, patch, results) in plan.iter_mut() {
            let measured = run(*server, &source, *patch).await;
            println!(
                "run {round}/{runs}: {} with {} PATCHes: {:.0} MiB/s, peak RSS {:.1} MiB",
                server.name(),
                size_label(*patch),
                mib_per_s(file_len, measured.answered),
                measured.peak_rss_mib
            );
            results.push(measured);
        }
        if has_stitch {
            alone.push(upstream_alone(&source).await);
        }
    }
    let cases: Vec<Case> = plan
        .into_iter()
        .map(|(server, patch, results)| Case {
            server,
            patch,
            result: median(results),
        })
        .collect();
    alone.sort_by(f64::total_cmp);
    let conditions = Conditions {
        runs,
        load: (load_before, load_average()),
        upstream_alone: alone.get(alone.len() / 2).copied(),
        disk,
    };
    let machine = report::Machine::of(&std::env::temp_dir());
    let command = report::command("tus", &KNOBS);
    let (report, goals) = report(&cases, file_len, &conditions, &machine, &command);
    report::save_section("tus", &report);
    let disk: Vec<serde_json::Value> = conditions
        .disk
        .iter()
        .map(|(piece, fsync, speed)| {
            serde_json::json!({ "piece_mib": piece >> 20, "fsync": fsync, "mib_s": speed })
        })
        .collect();
    let figures = serde_json::json!({
        "file_mib": file_len >> 20,
        "runs": runs,
        "upstream_alone_seconds": conditions.upstream_alone,
        "disk_alone": disk,
        "load_average_1min": {
            "before": conditions.load.0.parse::<f64>().ok(),
            "after": conditions.load.1.parse::<f64>().ok(),
        },
        "tus_server": peer_version("@tus/server"),
        "tus_file_store": peer_version("@tus/file-store"),
        "node": node_version(),
    });
    report::save_json("tus", &report, &command, &machine, &goals, figures);
    println!("\n{report}");
}
