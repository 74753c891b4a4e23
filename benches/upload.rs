//! Ingest and forward benchmark: a 1 GiB file uploaded in 8 MiB multipart chunks, 3 in flight,
//! through the real `stitch` binary to a recording upstream, with and without per-part fsync.
//! Compares ingest speed with the disk's own fsync'd write speed, measured in the same run, and
//! reports Stitch's peak memory (VmHWM). Results go to `benches/results.md`.
//!
//! Run: `cargo bench --bench upload` (FILE_MIB=… CHUNK_MIB=… to change the sizes).

#[path = "common/bench.rs"]
mod bench;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "common/report.rs"]
mod report;

use bench::{env_u64, proc_mib, send_chunk, Stitch};
use common::*;
use std::io::Write;
use std::process::Command;
use std::time::Instant;

/// Writes `total` bytes as files of `piece` bytes, each fsynced (as Stitch does per part).
fn disk_baseline(dir: &std::path::Path, total: u64, piece: u64, fsync: bool) -> f64 {
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
    mib_per_s(total, seconds)
}

fn mib_per_s(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / seconds
}

struct Run {
    fsync: bool,
    ingest_mib_s: f64,
    forward_mib_s: f64,
    /// `curl -F` posting the same file to the same upstream.
    curl_mib_s: f64,
    peak_rss_mib: f64,
}

async fn run(file_mib: u64, chunk_mib: u64, fsync: bool) -> Run {
    let upstream = Upstream::start().await;
    let root = tempfile::tempdir_in(".").unwrap();
    let routes = format!(
        "routes:\n  - path: /upload\n    protocol: resumable\n    limits: {{ max_chunk_size: {}MiB }}\n    \
         forward: {{ path: /app/upload, field: document, timeout: 30m }}\n",
        chunk_mib * 2
    );
    let stitch = Stitch::start(root.path(), upstream.addr, &routes, fsync, &[]);
    let listen = stitch.listen;

    let chunk = chunk_mib << 20;
    let count = file_mib / chunk_mib;
    let client = reqwest::Client::new();
    let identifier = format!("bench-{fsync}");
    let send = |n: u64| {
        let body = random_bytes(chunk as usize, n);
        send_chunk(&client, listen, &identifier, n, count, body)
    };
    let started = Instant::now();
    let mut in_flight = futures::stream::iter((1..count).map(send)).buffer_unordered(3);
    use futures::StreamExt;
    while in_flight.next().await.is_some() {}
    let ingest = started.elapsed().as_secs_f64();
    let started = Instant::now();
    send(count).await;
    let forward = started.elapsed().as_secs_f64();
    let peak = proc_mib(stitch.child.id(), "VmHWM:");
    drop(stitch);
    let received = upstream.received_at("/app/upload");
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].files[0].len, count * chunk);
    // The same file, posted by curl to the same upstream: the forward's ceiling.
    let file = root.path().join("bench.bin");
    {
        let mut out = std::fs::File::create(&file).unwrap();
        for n in 1..=count {
            out.write_all(&random_bytes(chunk as usize, n)).unwrap();
        }
    }
    let started = Instant::now();
    let curl = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-F"])
        .arg(format!("document=@{}", file.display()))
        .arg(format!("http://{}/app/upload", upstream.addr))
        .output()
        .expect("curl posts the file (apt-get install curl)");
    let curl_seconds = started.elapsed().as_secs_f64();
    assert_eq!(String::from_utf8_lossy(&curl.stdout), "200");
    let received = upstream.received_at("/app/upload");
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].files[0].sha256, received[0].files[0].sha256);
    Run {
        fsync,
        ingest_mib_s: mib_per_s((count - 1) * chunk, ingest),
        forward_mib_s: mib_per_s(count * chunk, forward),
        curl_mib_s: mib_per_s(count * chunk, curl_seconds),
        peak_rss_mib: peak,
    }
}

#[tokio::main]
async fn main() {
    let file_mib = env_u64("FILE_MIB", 1024);
    // 8 MiB: the memory target's setting; 1 MiB: both clients' default chunk size.
    let chunk_sizes = match std::env::var("CHUNK_MIB") {
        Ok(v) => vec![v.parse().expect("CHUNK_MIB is a number of MiB")],
        Err(_) => vec![8, 1],
    };
    let here = std::path::Path::new(".");
    let mut report = format!(
        "# Benchmark: upload, {file_mib} MiB file, multipart chunks, 3 in flight\n\n\
         Machine: {} cores. The disk baseline writes the same pieces, in the same directory, \
         as files of their own, in the same run.\n\n\
         | chunk | per-part fsync | disk baseline (MiB/s) | ingest (MiB/s) | ingest / disk | final chunk + forward of the whole file (MiB/s) | curl -F of the file (MiB/s) | forward / curl | Stitch peak RSS (MiB) |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    for chunk_mib in chunk_sizes {
        for fsync in [true, false] {
            let disk = disk_baseline(here, file_mib << 20, chunk_mib << 20, fsync);
            let r = run(file_mib, chunk_mib, fsync).await;
            report.push_str(&format!(
                "| {chunk_mib} MiB | {} | {disk:.0} | {:.0} | {:.0}% | {:.0} | {:.0} | {:.2} | {:.1} |\n",
                if r.fsync { "on" } else { "off" },
                r.ingest_mib_s,
                100.0 * r.ingest_mib_s / disk,
                r.forward_mib_s,
                r.curl_mib_s,
                r.forward_mib_s / r.curl_mib_s,
                r.peak_rss_mib
            ));
        }
    }
    report.push_str("\nProduced by `cargo bench --bench upload`.\n");
    report::save_section("upload", &report);
    println!("{report}");
}
