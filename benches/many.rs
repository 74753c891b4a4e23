//! Many uploads at once: 1,000 uploads in progress (two 4 KiB chunks of four each), then chunk
//! tests (the request Resumable.js and Flow.js send before every chunk) against pass-through
//! requests, measured alternately in the same run, and Stitch's memory. Then one long upload
//! (16,384 chunks): whether its chunks slow down as its parts add up.
//! Results replace the "many uploads" section of `benches/results.md`.
//!
//! Run: `cargo bench --bench many` (UPLOADS=… ROUNDS=… SECONDS=… PARTS=… to change the sizes).

#[path = "common/bench.rs"]
mod bench;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "common/report.rs"]
mod report;

use bench::{env_u64, median, proc_mib as rss_mib, rate, Stitch};
use common::*;
use futures::StreamExt;
use report::Goal;
use std::sync::Arc;
use std::time::Instant;

/// The settings this bench reads from the environment.
const KNOBS: [&str; 4] = ["UPLOADS", "ROUNDS", "SECONDS", "PARTS"];

/// Sends chunk `n` of `file` (its bytes as the body, its parameters in the URL).
async fn send(client: &reqwest::Client, listen: std::net::SocketAddr, file: &ChunkedFile, n: u64) {
    let (start, end) = file.bounds(n);
    let response = client
        .post(format!("http://{listen}/upload?{}", file.query_string(n)))
        .body(file.data.slice(start, end))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "chunk {n}");
}

#[tokio::main]
async fn main() {
    let uploads = env_u64("UPLOADS", 1000);
    let rounds = env_u64("ROUNDS", 3);
    let seconds = env_u64("SECONDS", 4);
    let upstream = Upstream::start().await;
    upstream.serve_static("/page", "text/html", bytes::Bytes::from(vec![b'x'; 1024]));
    let root = tempfile::tempdir_in(".").unwrap();
    let stitch = Stitch::start(root.path(), upstream.addr, ROUTES, true, &[]);
    let listen = stitch.listen;
    let pid = stitch.child.id();
    let baseline = rss_mib(pid, "VmRSS:");

    let files: Arc<Vec<ChunkedFile>> = Arc::new(
        (0..uploads)
            .map(|i| ChunkedFile::resumable(&format!("f{i}.bin"), random_bytes(16384, i), 4096))
            .collect(),
    );
    let client = reqwest::Client::new();
    let started = Instant::now();
    let sends = (0..uploads as usize).flat_map(|i| [(i, 1u64), (i, 2)]);
    let mut in_flight = futures::stream::iter(sends.map(|(i, n)| {
        let (files, client) = (files.clone(), client.clone());
        async move { send(&client, listen, &files[i], n).await }
    }))
    .buffer_unordered(16);
    while in_flight.next().await.is_some() {}
    let created = started.elapsed().as_secs_f64();
    let after = rss_mib(pid, "VmRSS:");

    let test_url: Arc<dyn Fn(u64) -> String + Send + Sync> = {
        let files = files.clone();
        Arc::new(move |i| {
            let file = &files[(i % uploads) as usize];
            // Parts 1 and 2 are stored (200), 3 and 4 are not (204).
            format!(
                "http://{listen}/upload?{}",
                file.query_string(1 + (i / uploads) % 4)
            )
        })
    };
    let page_url: Arc<dyn Fn(u64) -> String + Send + Sync> =
        Arc::new(move |_| format!("http://{listen}/page"));
    let (mut tests, mut passes) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        if round % 2 == 0 {
            tests.push(rate(16, seconds, test_url.clone(), &[200, 204]).await);
            passes.push(rate(16, seconds, page_url.clone(), &[200]).await);
        } else {
            passes.push(rate(16, seconds, page_url.clone(), &[200]).await);
            tests.push(rate(16, seconds, test_url.clone(), &[200, 204]).await);
        }
    }
    // One long upload: every chunk but the last (no delivery), 3 in flight; the rate over its
    // first and its last `window` chunks, then chunk tests for its stored parts.
    let parts = env_u64("PARTS", 16384);
    let window = (parts / 8).max(1);
    let long = Arc::new(ChunkedFile::resumable(
        "long.bin",
        random_bytes((parts * 4096) as usize, 99),
        4096,
    ));
    let mut windows = Vec::new();
    let mut next = 1;
    while next < parts {
        let end = (next + window).min(parts);
        let started = Instant::now();
        let mut in_flight = futures::stream::iter((next..end).map(|n| {
            let (long, client) = (long.clone(), client.clone());
            async move { send(&client, listen, &long, n).await }
        }))
        .buffer_unordered(3);
        while in_flight.next().await.is_some() {}
        windows.push((end - next) as f64 / started.elapsed().as_secs_f64());
        next = end;
    }
    let (first, last) = (windows[0], windows[windows.len() - 1]);
    let long_url: Arc<dyn Fn(u64) -> String + Send + Sync> = {
        let long = long.clone();
        Arc::new(move |i| {
            format!(
                "http://{listen}/upload?{}",
                long.query_string(1 + i % (parts - 1))
            )
        })
    };
    let long_tests = rate(16, seconds, long_url, &[200]).await;
    let peak = rss_mib(pid, "VmHWM:");
    drop(stitch);
    let (test, pass) = (median(tests.clone()), median(passes.clone()));
    let (tests_ratio, windows_ratio) = (test / pass, last / first);
    let machine = report::Machine::of(std::path::Path::new("."));
    let command = report::command("many", &KNOBS);
    let [rounds_tests, rounds_passes, every_window] =
        [&tests, &passes, &windows].map(|r| r.iter().map(|v| v.round()).collect::<Vec<_>>());
    let report = format!(
        "# Benchmark: many uploads at once\n\n\
         Machine: {machine}. The release binary, fs storage with fsync, {uploads} uploads in \
         progress (two 4 KiB chunks of four each, sent 16 at a time in {created:.1} s). Then, \
         alternately, {rounds} rounds of {seconds} s: 16 keep-alive clients sending chunk tests \
         (half for stored chunks: 200, half for missing ones: 204) or pass-through GETs of a 1 \
         KiB page; medians.\n\n\
         | measure | value |\n|---|---|\n\
         | chunk tests (requests/s) | {test:.0} |\n\
         | pass-through (requests/s) | {pass:.0} |\n\
         | tests / pass-through | {tests_ratio:.2} |\n\
         | Stitch RSS at start, with the uploads, peak (MiB) | {baseline:.1}, {after:.1}, {peak:.1} |\n\n\
         Every round (tests, pass-through): {rounds_tests:?}, {rounds_passes:?}.\n\n\
         One long upload next to them: {parts} chunks of 4 KiB (all but the last, so no \
         delivery), 3 in flight, in windows of {window}; then {seconds} s of chunk tests for its \
         stored parts (16 keep-alive clients). Whether a chunk costs more the more parts its \
         upload has:\n\n\
         | measure | value |\n|---|---|\n\
         | chunks/s, first window | {first:.0} |\n\
         | chunks/s, last window | {last:.0} |\n\
         | last / first | {windows_ratio:.2} |\n\
         | chunk tests for its parts (requests/s) | {long_tests:.0} |\n\n\
         Every window (chunks/s): {every_window:?}.\n\n\
         Produced by `{command}`.\n",
    );
    report::save_section("many uploads", &report);
    let goals = [
        Goal::at_least(
            format!("chunk tests / pass-through, {uploads} uploads in progress"),
            tests_ratio,
            0.8,
        ),
        Goal::at_most(
            format!("Stitch peak RSS, {uploads} uploads in progress and one of {parts} parts"),
            peak,
            256.0,
        )
        .in_unit("MiB"),
        Goal::at_least(
            format!("chunks/s, last window / first, one upload of {parts} parts (no slowdown)"),
            windows_ratio,
            1.0,
        ),
    ];
    let figures = serde_json::json!({
        "uploads": uploads,
        "uploads_sent_seconds": created,
        "rss_mib": { "start": baseline, "with_uploads": after, "peak": peak },
        "rounds": { "chunk_tests_per_s": rounds_tests, "pass_through_per_s": rounds_passes },
        "parts": parts,
        "window": window,
        "windows_chunks_per_s": every_window,
    });
    report::save_json("many uploads", &report, &command, &machine, &goals, figures);
    println!("{report}");
}
