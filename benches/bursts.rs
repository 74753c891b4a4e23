//! Memory after bursts: 250 slow clients, each sending a 256 KiB chunk in 8 pieces over about
//! two seconds, come and go three times; Stitch's resident memory and thread count are read
//! before, after each burst (once idle blocking threads have ended), and at the end. Then
//! memory with deliveries stalled: 100 uploads of 32 MiB complete at once against an
//! application that accepts connections and never reads them.
//! Results replace the "bursts" section of `benches/results.md`.
//!
//! Run: `cargo bench --bench bursts` (CLIENTS=… BURSTS=… STALLED=… to change the sizes).

#[path = "common/bench.rs"]
mod bench;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "common/report.rs"]
mod report;

use bench::{env_u64, proc_mib, proc_status, send_chunk, Stitch};
use common::*;
use report::Goal;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// The settings this bench reads from the environment.
const KNOBS: [&str; 3] = ["CLIENTS", "BURSTS", "STALLED"];

/// "Near the start": RSS after the last burst within this many times the RSS at the start
/// (the README counts 22 to 30 MiB against 11 to 12 at the start as near).
const AFTER_BURSTS_AIM: f64 = 3.0;

/// (resident MiB, threads) of process `pid`.
fn footprint(pid: u32) -> (f64, u64) {
    (proc_mib(pid, "VmRSS:"), proc_status(pid, "Threads:") as u64)
}

/// One slow client: a 256 KiB chunk of upload `id`, in 8 pieces 250 ms apart.
async fn slow_chunk(listen: SocketAddr, id: u64) {
    let file = ChunkedFile::resumable(
        &format!("slow-{id}.bin"),
        random_bytes(262_144, id),
        262_144,
    );
    let mut stream = tokio::net::TcpStream::connect(listen).await.unwrap();
    let head = format!(
        "POST /upload?{} HTTP/1.1\r\nHost: a\r\nContent-Length: 262144\r\nConnection: close\r\n\r\n",
        file.query_string(1)
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    for piece in 0..8u64 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let body = file.data.slice(piece * 32_768, (piece + 1) * 32_768);
        stream.write_all(&body).await.unwrap();
    }
    let mut answer = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut answer)
        .await
        .unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "slow client {id}");
}

/// Stitch's resident MiB once `uploads` uploads of four 8 MiB parts are stored but for their
/// last part, and 5 s after those last parts are all sent at once to an application that
/// accepts connections and never reads them (every delivery stalls, past what the kernel's
/// socket buffers take).
async fn stalled_deliveries(uploads: u64) -> (f64, f64) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    let never_reads = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let root = tempfile::tempdir_in(".").unwrap();
    let stitch = Stitch::start(root.path(), app, ROUTES, true, &[]);
    let (listen, pid) = (stitch.listen, stitch.child.id());
    let client = reqwest::Client::new();
    let part = random_bytes(8 << 20, 5);
    for upload in 0..uploads {
        for n in 1..=3 {
            let id = format!("stalled-{upload}");
            send_chunk(&client, listen, &id, n, 4, part.clone()).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stored = proc_mib(pid, "VmRSS:");
    let last: Vec<_> = (0..uploads)
        .map(|upload| {
            let (client, part) = (client.clone(), part.clone());
            let id = format!("stalled-{upload}");
            tokio::spawn(async move { send_chunk(&client, listen, &id, 4, 4, part).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stalled = proc_mib(pid, "VmRSS:");
    for request in last {
        request.abort();
    }
    drop(stitch);
    never_reads.abort();
    (stored, stalled)
}

#[tokio::main]
async fn main() {
    let clients = env_u64("CLIENTS", 250);
    let bursts = env_u64("BURSTS", 3);
    let upstream = Upstream::start().await;
    let root = tempfile::tempdir_in(".").unwrap();
    let stitch = Stitch::start(root.path(), upstream.addr, ROUTES, true, &[]);
    let listen = stitch.listen;
    let pid = stitch.child.id();
    let mut rows = vec![("start".to_string(), footprint(pid))];
    let mut peak = footprint(pid);
    for burst in 0..bursts {
        let tasks: Vec<_> = (0..clients)
            .map(|i| tokio::spawn(slow_chunk(listen, burst * clients + i)))
            .collect();
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = footprint(pid);
            peak = (peak.0.max(now.0), peak.1.max(now.1));
        }
        for task in tasks {
            task.await.unwrap();
        }
        // Idle blocking threads end after 10 s.
        tokio::time::sleep(Duration::from_secs(12)).await;
        rows.push((format!("after burst {}", burst + 1), footprint(pid)));
    }
    drop(stitch);
    let uploads = env_u64("STALLED", 100);
    let (stored, stalled) = stalled_deliveries(uploads).await;
    let per_stalled_kib = (stalled - stored) * 1024.0 / uploads as f64;
    let machine = report::Machine::of(std::path::Path::new("."));
    let command = report::command("bursts", &KNOBS);
    let (start_rss, last) = (rows[0].1 .0, rows[rows.len() - 1].clone());
    let goal = Goal::at_most(
        format!("Stitch RSS {} / at the start (near the start)", last.0),
        last.1 .0 / start_rss,
        AFTER_BURSTS_AIM,
    );
    let mut report = format!(
        "# Benchmark: bursts of slow clients\n\n\
         Machine: {machine}. The release binary, fs storage with fsync; {bursts} bursts of \
         {clients} clients each sending a 256 KiB chunk in 8 pieces over 2 s; readings 12 s \
         after each burst (idle blocking threads end after 10 s). During the bursts: at most \
         {:.1} MiB and {} threads.\n\n| when | RSS (MiB) | threads |\n|---|---|---|\n",
        peak.0, peak.1
    );
    for (when, (rss, threads)) in rows {
        report.push_str(&format!("| {when} | {rss:.1} | {threads} |\n"));
    }
    report.push_str(&format!(
        "\nDeliveries stalled: {uploads} uploads of four 8 MiB parts, stored but for their last \
         part: {stored:.1} MiB; 5 s after the last parts were all sent at once to an application \
         that never reads: {stalled:.1} MiB ({per_stalled_kib:.0} KiB more per stalled \
         delivery).\n"
    ));
    report.push_str(&format!("\nProduced by `{command}`.\n"));
    report::save_section("bursts", &report);
    let figures = serde_json::json!({
        "clients": clients,
        "bursts": bursts,
        "peak_during_bursts": { "rss_mib": peak.0, "threads": peak.1 },
        "stalled_deliveries": {
            "uploads": uploads,
            "rss_mib_stored": stored,
            "rss_mib_stalled": stalled,
            "kib_per_stalled_delivery": per_stalled_kib,
        },
    });
    report::save_json("bursts", &report, &command, &machine, &[goal], figures);
    println!("{report}");
}
