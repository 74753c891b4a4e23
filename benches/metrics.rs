//! Metrics must not cost throughput: pass-through requests per second, and ingest of 8 MiB
//! chunks, through one Stitch with the metrics listener on and one with it off (requests are
//! then not counted), measured alternately in the same run; the medians are compared. Hashing
//! must not be the bottleneck: ingest with content hashing against a Stitch that skips it
//! (`STITCH_BENCH_SKIP_HASH=1`, a switch for this bench only), the same way.
//! Results replace the metrics section of `benches/results.md`.
//!
//! Run: `cargo bench --bench metrics` (ROUNDS=… SECONDS=… FILE_MIB=… to change the sizes;
//! STORAGE_IN=/dev/shm keeps the stores in memory, so that the disk's swings leave the CPU
//! cost alone to compare).

#[path = "common/bench.rs"]
mod bench;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "common/report.rs"]
mod report;

use bench::{env_u64, median, rate, send_chunk, Stitch};
use common::*;
use futures::StreamExt;
use report::Goal;
use std::net::SocketAddr;
use std::time::Instant;

/// The settings this bench reads from the environment.
const KNOBS: [&str; 4] = ["ROUNDS", "SECONDS", "FILE_MIB", "STORAGE_IN"];

/// Metrics on / off: no slowdown beyond the 3 % this bench allows for (see README).
const METRICS_AIM: f64 = 0.97;
/// Ingest with content hashing / without.
const HASHING_AIM: f64 = 0.9;

/// Where the stores' directories are made (`STORAGE_IN`, else the working directory).
fn storage_in() -> String {
    std::env::var("STORAGE_IN").unwrap_or_else(|_| ".".into())
}

/// A release Stitch with the metrics listener or not, hashing or not, and its directory.
fn start(upstream: SocketAddr, metrics: bool, hashing: bool) -> (Stitch, tempfile::TempDir) {
    let root = tempfile::tempdir_in(storage_in()).unwrap();
    let mut routes = String::from(
        "routes:\n  - path: /upload\n    protocol: resumable\n    limits: { max_chunk_size: 16MiB }\n    \
         forward: { path: /app/upload, field: document }\n",
    );
    if metrics {
        routes = format!("metrics:\n  listen: {}\n{routes}", free_addr());
    }
    let skip = if hashing { "0" } else { "1" };
    let stitch = Stitch::start(
        root.path(),
        upstream,
        &routes,
        false,
        &[("STITCH_BENCH_SKIP_HASH", skip)],
    );
    (stitch, root)
}

/// Pass-through GETs per second, `clients` keep-alive connections for `seconds`.
async fn requests_per_second(listen: SocketAddr, clients: usize, seconds: u64) -> f64 {
    rate(
        clients,
        seconds,
        std::sync::Arc::new(move |_| format!("http://{listen}/page")),
        &[200],
    )
    .await
}

/// MiB/s of `file_mib` in 8 MiB multipart chunks, 3 in flight (the last chunk, which would
/// deliver, is not sent: this measures ingest).
async fn ingest(listen: SocketAddr, file_mib: u64, round: u64) -> f64 {
    let chunk = 8u64 << 20;
    let count = file_mib / 8;
    let body = random_bytes(chunk as usize, round);
    let client = reqwest::Client::new();
    let identifier = format!("metrics-{round}");
    let send = |n: u64| {
        // Each chunk differs (its number leads), so nothing is deduplicated.
        let mut first = bytes::BytesMut::from(&body[..]);
        first[..8].copy_from_slice(&n.to_be_bytes());
        send_chunk(&client, listen, &identifier, n, count, first.freeze())
    };
    let started = Instant::now();
    let mut in_flight = futures::stream::iter((1..count).map(send)).buffer_unordered(3);
    while in_flight.next().await.is_some() {}
    ((count - 1) * 8) as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let rounds = env_u64("ROUNDS", 5);
    let seconds = env_u64("SECONDS", 3);
    let file_mib = env_u64("FILE_MIB", 128).max(16);
    let upstream = Upstream::start().await;
    upstream.serve_static("/page", "text/html", bytes::Bytes::from(vec![b'x'; 1024]));
    let (on, _on_dir) = start(upstream.addr, true, true);
    let (off, _off_dir) = start(upstream.addr, false, true);
    let (unhashed, _unhashed_dir) = start(upstream.addr, true, false);
    let (mut rps, mut mib) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    let mut skipped = Vec::new();
    // Warm both up, then alternate which goes first.
    for stitch in [&on, &off] {
        requests_per_second(stitch.listen, 16, 1).await;
    }
    for round in 0..rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let stitch = [&on, &off][i];
            rps[i].push(requests_per_second(stitch.listen, 16, seconds).await);
        }
        for i in order {
            let stitch = [&on, &off][i];
            mib[i].push(ingest(stitch.listen, file_mib, round * 3 + i as u64).await);
        }
        skipped.push(ingest(unhashed.listen, file_mib, round * 3 + 2).await);
    }
    let unhashed_mib = median(skipped.clone());
    // Each round's pair ran back to back: their ratio shrugs off the disk's slower spells.
    let paired = median(
        mib[0]
            .iter()
            .zip(&skipped)
            .map(|(on, off)| on / off)
            .collect(),
    );
    let [rps_on, rps_off] = rps.clone().map(median);
    let [mib_on, mib_off] = mib.clone().map(median);
    let (rps_ratio, mib_ratio, hashing) =
        (rps_on / rps_off, mib_on / mib_off, mib_on / unhashed_mib);
    let machine = report::Machine::of(std::path::Path::new(&storage_in()));
    let command = report::command("metrics", &KNOBS);
    let [rounds_rps_off, rounds_rps_on] =
        [&rps[1], &rps[0]].map(|r| r.iter().map(|v| v.round()).collect::<Vec<_>>());
    let [rounds_mib_off, rounds_mib_on, rounds_unhashed] =
        [&mib[1], &mib[0], &skipped].map(|r| r.iter().map(|v| v.round()).collect::<Vec<_>>());
    let report = format!(
        "# Benchmark: metrics and hashing on and off, same run\n\n\
         Machine: {machine}. Two release Stitch processes, one with `metrics.listen` (every request \
         counted) and one without, measured alternately, {rounds} rounds; medians. Pass-through: \
         16 keep-alive clients GET a 1 KiB page for {seconds} s. Ingest: a {file_mib} MiB file \
         in 8 MiB multipart chunks, 3 in flight, `storage.fsync: false`, stores in `{}`.\n\n\
         | measure | metrics off | metrics on | on / off |\n|---|---|---|---|\n\
         | pass-through (requests/s) | {rps_off:.0} | {rps_on:.0} | {rps_ratio:.3} |\n\
         | ingest, 8 MiB chunks (MiB/s) | {mib_off:.0} | {mib_on:.0} | {mib_ratio:.3} |\n\n\
         Hashing: ingest as above with content hashing (metrics on) {mib_on:.0} MiB/s, without \
         {unhashed_mib:.0} MiB/s: with / without {hashing:.3} (median of each round's ratio: \
         {paired:.3}).\n\n\
         Every round (requests/s off, on): {rounds_rps_off:?}, {rounds_rps_on:?}; (MiB/s off, \
         on, unhashed): {rounds_mib_off:?}, {rounds_mib_on:?}, {rounds_unhashed:?}.\n\n\
         Produced by `{command}`.\n",
        storage_in(),
    );
    report::save_section("metrics", &report);
    let goals = [
        Goal::at_least(
            "metrics on / off, pass-through (requests/s)",
            rps_ratio,
            METRICS_AIM,
        ),
        Goal::at_least(
            "metrics on / off, ingest of 8 MiB chunks (MiB/s)",
            mib_ratio,
            METRICS_AIM,
        ),
        Goal::at_least(
            "ingest with content hashing / without (medians)",
            hashing,
            HASHING_AIM,
        ),
        Goal::at_least(
            "ingest with content hashing / without (median of each round's ratio)",
            paired,
            HASHING_AIM,
        ),
    ];
    let figures = serde_json::json!({
        "storage_in": storage_in(),
        "ingest_hashing_mib_s": mib_on,
        "ingest_unhashed_mib_s": unhashed_mib,
        "rounds": {
            "requests_per_s_off": rounds_rps_off,
            "requests_per_s_on": rounds_rps_on,
            "ingest_mib_s_off": rounds_mib_off,
            "ingest_mib_s_on": rounds_mib_on,
            "ingest_mib_s_unhashed": rounds_unhashed,
        },
    });
    report::save_json("metrics", &report, &command, &machine, &goals, figures);
    println!("{report}");
}
