//! Upload benchmark: a 1 GiB file uploaded in multipart chunks (8 MiB and 1 MiB, 3 in flight)
//! through the real `stitch` binary to an application in a process of its own that saves the
//! file with fsync (`benches/common/app.rs`), with and without per-part fsync, and with and
//! without early delivery (`forward.early`). In the same run: the disk's own write speed for the
//! same pieces, and `curl -F` posting the same file straight to the same application. Reports
//! ingest against the disk, the forward of the stored file against curl, the whole upload
//! (first chunk sent to the application's answer relayed) against the direct post, and Stitch's
//! peak memory (VmHWM). Results replace the upload section of `benches/results.md`.
//!
//! Run: `cargo bench --bench upload` (FILE_MIB=… CHUNK_MIB=… RUNS=… to change the sizes and
//! the rounds, FSYNC=1|0 and EARLY=1|0 for one case only; STITCH_LOG=info for Stitch's log;
//! STORAGE_IN=DIR to write everything, the disk baseline included, in another file system).

#[path = "common/app.rs"]
mod app;
#[path = "common/bench.rs"]
mod bench;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "common/report.rs"]
mod report;

use app::App;
use bench::{env_u64, proc_mib, send_chunk, Stitch};
use bytes::Bytes;
use common::*;
use futures::StreamExt;
use report::Goal;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

/// The settings this bench reads from the environment.
const KNOBS: [&str; 7] = [
    "RUNS",
    "FILE_MIB",
    "CHUNK_MIB",
    "FSYNC",
    "EARLY",
    "STITCH_LOG",
    "STORAGE_IN",
];

/// Where the bench's files go (`STORAGE_IN`, else the working directory): the file, the disk
/// baseline's, Stitch's stores and the application's saves.
fn storage_in() -> String {
    std::env::var("STORAGE_IN").unwrap_or_else(|_| ".".into())
}

/// Writes `total` bytes as files of `piece` bytes, each fsynced if asked (as Stitch does per
/// part), one after the other; returns the seconds it took (the files are removed after).
fn disk_baseline(dir: &Path, total: u64, piece: u64, fsync: bool) -> f64 {
    let data = random_bytes(piece as usize, 1);
    let started = Instant::now();
    for i in 0..total / piece {
        let path = dir.join(format!("baseline-{i}"));
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(&data).unwrap();
        if fsync {
            file.sync_all().unwrap();
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    for i in 0..total / piece {
        let _ = std::fs::remove_file(dir.join(format!("baseline-{i}")));
    }
    seconds
}

/// Ingest is measured in segments of this many bytes, each right after the disk wrote the
/// same amount: this VM's disk swings from one second to the next, and taking turns lets both
/// meet the same swings.
const SEGMENT: u64 = 64 << 20;

fn mib_per_s(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / seconds
}

fn settle_disk() {
    let _ = Command::new("sync").status();
}

fn sha256_of(path: &Path) -> String {
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(path).expect("a saved file");
    std::io::copy(&mut file, &mut hasher).expect("read a saved file");
    hex::encode(hasher.finalize())
}

/// The file, in memory and on disk (for curl).
struct Source {
    data: Bytes,
    path: std::path::PathBuf,
    sha256: String,
}

struct Run {
    chunk_mib: u64,
    fsync: bool,
    early: bool,
    disk_mib_s: f64,
    /// Every chunk but the last, stored.
    ingest_mib_s: f64,
    /// Stitch's CPU time per MiB ingested, in ms.
    ingest_cpu_ms_per_mib: f64,
    /// The share of the machine's CPU time (every core) busy while Stitch ingested.
    ingest_busy: f64,
    /// The last chunk: the forward of the whole file (store-then-forward), or what was left
    /// of it (early delivery), and the application's answer.
    last_chunk_seconds: f64,
    /// From the first chunk sent to the application's answer relayed (in the upload that
    /// went straight through).
    end_to_end_seconds: f64,
    /// `curl -F` posting the same file straight to the application.
    direct_seconds: f64,
    peak_rss_mib: f64,
}

impl Run {
    /// Each figure's median over the rounds (the peak memory: the highest).
    fn median(runs: Vec<Run>) -> Run {
        let of = |f: fn(&Run) -> f64| bench::median(runs.iter().map(f).collect());
        Run {
            chunk_mib: runs[0].chunk_mib,
            fsync: runs[0].fsync,
            early: runs[0].early,
            disk_mib_s: of(|r| r.disk_mib_s),
            ingest_mib_s: of(|r| r.ingest_mib_s),
            ingest_cpu_ms_per_mib: of(|r| r.ingest_cpu_ms_per_mib),
            ingest_busy: of(|r| r.ingest_busy),
            last_chunk_seconds: of(|r| r.last_chunk_seconds),
            end_to_end_seconds: of(|r| r.end_to_end_seconds),
            direct_seconds: of(|r| r.direct_seconds),
            peak_rss_mib: runs.iter().map(|r| r.peak_rss_mib).fold(0.0, f64::max),
        }
    }
}

/// What one upload through a new Stitch measured.
struct Upload {
    /// Every chunk but the last, stored (the disk's turns left out).
    ingest_seconds: f64,
    /// The disk's turns: the same bytes written in the same pieces, before each segment.
    disk_seconds: f64,
    /// Stitch's CPU time over the segments, and the machine's busy and whole CPU time over
    /// them (every core; the client shares them).
    ingest_cpu: IngestCpu,
    last_chunk_seconds: f64,
    /// From the first chunk sent to the answer.
    end_to_end_seconds: f64,
    peak_rss_mib: f64,
}

/// CPU time over the ingest segments, in seconds.
#[derive(Default, Clone, Copy)]
struct IngestCpu {
    stitch: f64,
    busy: f64,
    all: f64,
}

impl IngestCpu {
    /// Stitch's and the machine's CPU time so far.
    fn now(pid: u32) -> IngestCpu {
        let (busy, all) = bench::machine_cpu_seconds();
        IngestCpu {
            stitch: bench::cpu_seconds(pid),
            busy,
            all,
        }
    }

    /// What was used from `before` to `self`, added to `total`.
    fn add_since(self, before: IngestCpu, total: &mut IngestCpu) {
        total.stitch += self.stitch - before.stitch;
        total.busy += self.busy - before.busy;
        total.all += self.all - before.all;
    }
}

/// Uploads the file through a new Stitch (storage in `dir`) to `app`. `taking_turns`: the
/// chunks before the last go in segments, each after the disk wrote the same bytes (for the
/// ingest / disk ratio); otherwise they go without a pause (for the end-to-end time: an early
/// delivery would gain on the pauses).
async fn upload(
    source: &Source,
    dir: &Path,
    app: &App,
    chunk_mib: u64,
    fsync: bool,
    early: bool,
    taking_turns: bool,
) -> Upload {
    std::fs::create_dir_all(dir).unwrap();
    let routes = format!(
        "routes:\n  - path: /upload\n    protocol: resumable\n    limits: {{ max_chunk_size: {}MiB }}\n    \
         forward: {{ path: /app/upload, field: document, timeout: 30m, early: {early} }}\n",
        chunk_mib * 2
    );
    settle_disk();
    let log = std::env::var("STITCH_LOG").unwrap_or_else(|_| "warn".into());
    let stitch = Stitch::start(dir, app.addr, &routes, fsync, &[("RUST_LOG", &log)]);
    let listen = stitch.listen;
    let chunk = chunk_mib << 20;
    let count = source.data.len() as u64 / chunk;
    let client = reqwest::Client::new();
    let identifier = format!("bench-{chunk_mib}-{fsync}-{early}");
    let send = |n: u64| {
        let body = source
            .data
            .slice(((n - 1) * chunk) as usize..(n * chunk) as usize);
        send_chunk(&client, listen, &identifier, n, count, body)
    };
    let per_segment = match taking_turns {
        true => (SEGMENT / chunk).max(1),
        false => count,
    };
    let (mut disk_seconds, mut ingest_seconds) = (0.0, 0.0);
    let mut ingest_cpu = IngestCpu::default();
    let pid = stitch.child.id();
    let mut first_sent = None;
    let mut next = 1;
    while next < count {
        let end = (next + per_segment).min(count);
        if taking_turns {
            disk_seconds += disk_baseline(dir, (end - next) * chunk, chunk, fsync);
        }
        let cpu = IngestCpu::now(pid);
        let segment = Instant::now();
        first_sent.get_or_insert(segment);
        let mut in_flight = futures::stream::iter((next..end).map(send)).buffer_unordered(3);
        while in_flight.next().await.is_some() {}
        ingest_seconds += segment.elapsed().as_secs_f64();
        IngestCpu::now(pid).add_since(cpu, &mut ingest_cpu);
        next = end;
    }
    let started = first_sent.unwrap_or_else(Instant::now);
    let last = Instant::now();
    send(count).await;
    let last_chunk_seconds = last.elapsed().as_secs_f64();
    Upload {
        ingest_seconds,
        disk_seconds,
        ingest_cpu,
        last_chunk_seconds,
        end_to_end_seconds: started.elapsed().as_secs_f64(),
        peak_rss_mib: proc_mib(stitch.child.id(), "VmHWM:"),
    }
}

/// Two uploads through new Stitches to a new application (one taking turns with the disk,
/// one straight through), then the direct post.
async fn run(source: &Source, root: &Path, chunk_mib: u64, fsync: bool, early: bool) -> Run {
    let work = tempfile::tempdir_in(root).unwrap();
    let app = App::start(&work.path().join("app"));
    let turns = upload(
        source,
        &work.path().join("turns"),
        &app,
        chunk_mib,
        fsync,
        early,
        true,
    )
    .await;
    let straight = upload(
        source,
        &work.path().join("straight"),
        &app,
        chunk_mib,
        fsync,
        early,
        false,
    )
    .await;
    let saved = app.saved();
    assert_eq!(saved.len(), 2, "the application saved each upload once");
    for file in &saved {
        assert_eq!(sha256_of(file), source.sha256, "the same bytes");
    }
    let ingested = source.data.len() as u64 - (chunk_mib << 20);

    settle_disk();
    let started = Instant::now();
    let curl = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-F"])
        .arg(format!("document=@{}", source.path.display()))
        .arg(format!("http://{}/app/upload", app.addr))
        .output()
        .expect("curl posts the file (apt-get install curl)");
    let direct_seconds = started.elapsed().as_secs_f64();
    assert_eq!(String::from_utf8_lossy(&curl.stdout), "200");
    let saved = app.saved();
    assert_eq!(saved.len(), 3);
    assert_eq!(
        sha256_of(&saved[2]),
        source.sha256,
        "curl's post, the same bytes"
    );
    Run {
        chunk_mib,
        fsync,
        early,
        disk_mib_s: mib_per_s(ingested, turns.disk_seconds),
        ingest_mib_s: mib_per_s(ingested, turns.ingest_seconds),
        ingest_cpu_ms_per_mib: turns.ingest_cpu.stitch * 1000.0 / (ingested >> 20) as f64,
        ingest_busy: turns.ingest_cpu.busy / turns.ingest_cpu.all,
        last_chunk_seconds: straight.last_chunk_seconds,
        end_to_end_seconds: straight.end_to_end_seconds,
        direct_seconds,
        peak_rss_mib: turns.peak_rss_mib.max(straight.peak_rss_mib),
    }
}

/// The section for `benches/results.md`, and the goals it reports.
fn report(
    runs: &[Run],
    file_mib: u64,
    rounds: u64,
    machine: &report::Machine,
    command: &str,
) -> (String, Vec<Goal>) {
    let mut goals = Vec::new();
    let mut out = format!(
        "# Benchmark: upload, {file_mib} MiB file, multipart chunks, 3 in flight\n\n\
         Machine: {machine}. The application runs in a process of its own and saves each file \
         to disk with fsync before it answers (`benches/common/app.rs`). Ingest: every chunk but \
         the last, stored, sent in segments of 64 MiB, each right after the disk's turn. Disk: \
         the same pieces written as files of their own (each fsynced when per-part fsync is on), \
         one after the other, in the same directory, taking turns with Stitch segment by segment \
         (this VM's disk speed swings from one second to the next: taking turns lets both meet \
         the same swings). Last chunk and end to end come from a second upload, straight \
         through: last chunk, from the last chunk sent to the application's answer relayed \
         (store-then-forward: the whole file's forward; early delivery: what was left of it); \
         end to end, from the first chunk sent to that answer. Direct: `curl -F` posting the \
         same file straight to the same application, right after. \
         Each figure: the median of {rounds} rounds (the cases taken in turn in each round; this \
         machine's disk speed swings within a run); peak RSS: the highest. Stitch CPU \
         ingesting: its user and system time over the ingest segments, per MiB; CPU busy \
         ingesting: the share of the machine's CPU time, every core (the client's share \
         included), busy over those segments: near 100, ingest waits for a CPU, not the disk.\n\n\
         | chunk | per-part fsync | delivery | disk (MiB/s) | ingest (MiB/s) | ingest / disk | Stitch CPU ingesting (ms/MiB) | CPU busy ingesting (%) | last chunk (s) | forward / curl | end to end (s) | direct (s) | end to end / direct | Stitch peak RSS (MiB) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in runs {
        let fsync = if r.fsync { "on" } else { "off" };
        let delivery = if r.early {
            "early"
        } else {
            "store, then forward"
        };
        let case = format!("{} MiB chunks, fsync {fsync}, {delivery}", r.chunk_mib);
        let ingest_ratio = r.ingest_mib_s / r.disk_mib_s;
        let end_to_end_ratio = r.end_to_end_seconds / r.direct_seconds;
        // Store-then-forward: the last chunk's time is the forward of the whole file.
        let forward_ratio = (!r.early).then(|| r.direct_seconds / r.last_chunk_seconds);
        let forward = match forward_ratio {
            Some(ratio) => format!("{ratio:.2}"),
            None => "-".to_string(),
        };
        if r.chunk_mib == 1 && r.fsync {
            goals.push(Goal::at_least(
                format!("ingest / disk, {case}"),
                ingest_ratio,
                0.9,
            ));
        }
        if let Some(ratio) = forward_ratio {
            goals.push(Goal::at_least(
                format!("forward / curl, {case}"),
                ratio,
                0.9,
            ));
        }
        goals.push(Goal::at_most(
            format!("end to end / direct, {case}"),
            end_to_end_ratio,
            if r.fsync { 2.2 } else { 1.3 },
        ));
        out.push_str(&format!(
            "| {} MiB | {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {forward} | {:.2} | {:.2} | {:.2} | {:.1} |\n",
            r.chunk_mib,
            fsync,
            delivery,
            r.disk_mib_s,
            r.ingest_mib_s,
            ingest_ratio,
            r.ingest_cpu_ms_per_mib,
            r.ingest_busy * 100.0,
            r.last_chunk_seconds,
            r.end_to_end_seconds,
            r.direct_seconds,
            end_to_end_ratio,
            r.peak_rss_mib
        ));
    }
    let peak = runs.iter().map(|r| r.peak_rss_mib).fold(0.0, f64::max);
    goals.push(
        Goal::at_most(
            format!("Stitch peak RSS, {file_mib} MiB file, highest of the cases"),
            peak,
            64.0,
        )
        .in_unit("MiB"),
    );
    out.push_str(&format!(
        "\nGoals: forward / curl >= 0.9; end to end / direct <= 2.2 with \
         per-part fsync, <= 1.3 without; ingest / disk >= 0.9 with 1 MiB chunks and fsync. \
         forward / curl is the direct post's time over the forward's (higher is faster).\n\n\
         Produced by `{command}`.\n",
    ));
    (out, goals)
}

/// The cases of `all` that the variable `name` (1 or 0) picks; all of them if it is unset.
fn only(name: &str, all: [bool; 2]) -> Vec<bool> {
    match std::env::var(name) {
        Ok(v) => vec![v == "1"],
        Err(_) => all.to_vec(),
    }
}

#[tokio::main]
async fn main() {
    app::serve_if_asked().await;
    let file_mib = env_u64("FILE_MIB", 1024);
    // 8 MiB: the memory target's setting; 1 MiB: both clients' default chunk size.
    let chunk_sizes = match std::env::var("CHUNK_MIB") {
        Ok(_) => vec![env_u64("CHUNK_MIB", 8)],
        Err(_) => vec![8, 1],
    };
    let root = tempfile::tempdir_in(storage_in()).unwrap();
    let data = random_bytes((file_mib << 20) as usize, 7);
    let path = root.path().join("bench.bin");
    std::fs::write(&path, &data).expect("write the file");
    let source = Source {
        sha256: hex::encode(Sha256::digest(&data)),
        data,
        path,
    };
    let rounds = env_u64("RUNS", 3).max(1);
    let mut plan: Vec<(u64, bool, bool, Vec<Run>)> = Vec::new();
    for chunk_mib in chunk_sizes {
        for fsync in only("FSYNC", [true, false]) {
            for early in only("EARLY", [false, true]) {
                plan.push((chunk_mib, fsync, early, Vec::new()));
            }
        }
    }
    // Round after round, so that a slow spell of the machine's disk touches every case alike.
    for round in 1..=rounds {
        for (chunk_mib, fsync, early, results) in plan.iter_mut() {
            let r = run(&source, root.path(), *chunk_mib, *fsync, *early).await;
            println!(
                "round {round}/{rounds}: {chunk_mib} MiB chunks, fsync {fsync}, early {early}: \
                 ingest {:.0} MiB/s, last chunk {:.2} s, end to end {:.2} s, direct {:.2} s",
                r.ingest_mib_s, r.last_chunk_seconds, r.end_to_end_seconds, r.direct_seconds
            );
            results.push(r);
        }
    }
    let runs: Vec<Run> = plan
        .into_iter()
        .map(|(_, _, _, results)| Run::median(results))
        .collect();
    let machine = report::Machine::of(std::path::Path::new(&storage_in()));
    let command = report::command("upload", &KNOBS);
    let (report, goals) = report(&runs, file_mib, rounds, &machine, &command);
    report::save_section("upload", &report);
    let figures = serde_json::json!({ "file_mib": file_mib, "rounds": rounds });
    report::save_json("upload", &report, &command, &machine, &goals, figures);
    println!("{report}");
}
