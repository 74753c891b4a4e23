//! Real tus clients through Stitch: tus-js-client 4.x in Node running the flow Wix documents
//! for its resumable upload API (upload, then a finalize PUT whose answer is the application's),
//! also with `parallelUploads` (partial uploads and a final one), and surviving a SIGKILL of
//! Stitch mid-upload. Each file is checked by sha256 at the upstream.
//! tuspy (PyPI) uploads in 256 KiB PATCHes with sha1 checksums and, with its aiohttp uploader,
//! in one PATCH. Node's own HTTP client sends each PATCH's checksum as a trailer. `.ci/setup`
//! installs the npm packages and tuspy.

mod common;

use common::process::StitchProcess;
use common::relay::SlowLine;
use common::*;
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const TUS_ROUTES: &str = r#"
routes:
  - path: /files
    protocol: tus
    forward: { path: /app/upload, field: document }
"#;

fn clients_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        dir.join("node_modules/tus-js-client").exists(),
        "tus client tests need the npm packages: run .ci/setup (npm ci in tests/browser)"
    );
    dir
}

/// What the Node driver reports at the end.
#[derive(Debug, serde::Deserialize)]
struct NodeResult {
    ok: bool,
    error: Option<String>,
    url: Option<String>,
    finalize: Option<Finalized>,
}

impl NodeResult {
    /// The finalize call's answer, once the upload is known to have succeeded.
    fn finalized(self) -> Finalized {
        assert!(self.ok, "tus-js-client reports success: {:?}", self.error);
        self.finalize.expect("the finalize call was made")
    }
}

#[derive(Debug, serde::Deserialize)]
struct Finalized {
    status: u16,
    data: String,
}

/// tus-js-client running in Node (`tests/browser/tus-node.mjs`), its output read line by line.
struct TusNode {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl TusNode {
    fn start(args: serde_json::Value) -> TusNode {
        let mut child = Command::new("node")
            .arg(clients_dir().join("tus-node.mjs"))
            .arg(args.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node runs (Node.js 18+ is required)");
        let stdout = child.stdout.take().unwrap();
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    return;
                }
            }
        });
        TusNode { child, lines }
    }

    /// Waits until the client reports at least `bytes` sent.
    fn sent_at_least(&self, bytes: u64, within: Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
        {
            let sent = line
                .strip_prefix("progress ")
                .and_then(|rest| rest.split(' ').next())
                .and_then(|n| n.parse::<u64>().ok());
            if sent.is_some_and(|sent| sent >= bytes) {
                return true;
            }
        }
        false
    }

    /// Waits for the final JSON line.
    fn result(mut self, within: Duration) -> NodeResult {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with('{') => {
                    return serde_json::from_str(&line).expect("the driver's JSON line")
                }
                Ok(_) => {}
                Err(_) => {
                    let _ = self.child.kill();
                    panic!("tus-js-client did not finish within {within:?}");
                }
            }
        }
    }
}

impl Drop for TusNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A file of random bytes in `dir`; returns its path and sha256.
fn random_file(dir: &Path, name: &str, len: usize, seed: u64) -> (PathBuf, String) {
    let data = random_bytes(len, seed);
    let path = dir.join(name);
    std::fs::write(&path, &data).unwrap();
    (path, hex::encode(Sha256::digest(&data)))
}

#[tokio::test]
async fn tus_js_client_runs_wix_flow_and_finalize_returns_the_applications_answer() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    let descriptor = r#"{"file":{"id":"wix-1","displayName":"clip.mp4","sizeInBytes":"6000000"}}"#;
    h.upstream.answer_with(200, descriptor);
    let (file, sha256) = random_file(h.dir.path(), "clip.mp4", 6_000_000, 11);
    let endpoint = h.url("/files");
    let node = TusNode::start(serde_json::json!({
        "endpoint": endpoint,
        "file": file,
        "filename": "clip.mp4",
        "contentType": "video/mp4",
        "token": "eyJhbGciOiJIUzI1NiJ9.upload-token",
    }));
    let result = tokio::task::spawn_blocking(move || node.result(Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(
        result.ok,
        "tus-js-client reports success: {:?}",
        result.error
    );
    assert!(result.url.unwrap().starts_with(&endpoint));
    let finalized = result.finalize.expect("the finalize call was made");
    assert_eq!(finalized.status, 200);
    assert_eq!(
        finalized.data, descriptor,
        "finalize returns the application's answer"
    );

    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), 1, "the application gets the file once");
    let request = &received[0];
    assert_eq!(request.files.len(), 1);
    let part = &request.files[0];
    assert_eq!(part.field, "document");
    assert_eq!(part.file_name, "clip.mp4");
    assert_eq!(part.content_type.as_deref(), Some("video/mp4"));
    assert_eq!(part.len, 6_000_000);
    assert_eq!(part.sha256, sha256);
    assert_eq!(
        request.field("token"),
        Some("eyJhbGciOiJIUzI1NiJ9.upload-token"),
        "the token reaches the application as a field"
    );
    assert!(
        h.upstream
            .received()
            .iter()
            .all(|r| r.path == "/app/upload"),
        "the finalize call is answered by Stitch, not passed through"
    );
}

#[tokio::test]
async fn tus_js_client_resumes_after_stitch_is_killed_and_the_file_arrives_once() {
    let upstream = Upstream::start().await;
    upstream.answer_with(201, r#"{"saved":true}"#);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    let stitch = StitchProcess::start(upstream.addr, &dir, TUS_ROUTES);
    let addr = stitch.addr;
    let len = 24 << 20;
    let (file, sha256) = random_file(tmp.path(), "big.bin", len, 12);
    let node = TusNode::start(serde_json::json!({
        "endpoint": format!("http://{addr}/files"),
        "file": file,
        "filename": "big.bin",
        "contentType": "application/octet-stream",
        "token": "t-1",
        "chunkSize": 256 * 1024,
        "progress": true,
    }));
    let dir_again = dir.clone();
    let result = tokio::task::spawn_blocking(move || {
        assert!(
            node.sent_at_least(len as u64 / 3, Duration::from_secs(60)),
            "the upload got a third of the way"
        );
        stitch.kill();
        let again = StitchProcess::start_again(addr, &dir_again);
        let result = node.result(Duration::from_secs(90));
        drop(again);
        result
    })
    .await
    .unwrap();
    let finalized = result.finalized();
    assert_eq!(
        (finalized.status, finalized.data.as_str()),
        (201, r#"{"saved":true}"#)
    );
    assert!(
        upstream.received().iter().all(|r| r.path == "/app/upload"),
        "no tus request, nor the finalize call, reached the application"
    );
    let received = upstream.received_at("/app/upload");
    assert_eq!(received.len(), 1, "delivered exactly once");
    assert_eq!(received[0].files[0].sha256, sha256, "byte-exact");
    assert_eq!(received[0].files[0].len, len as u64);
}

#[tokio::test]
async fn tus_js_client_sending_the_file_in_one_patch_resumes_from_the_kept_bytes_after_a_graceful_restart(
) {
    // A slow line: 32 MiB at 2 MiB/s in tus-js-client's default single PATCH. Stitch is
    // stopped (SIGTERM, a 30 s grace) half of the way: it stops reading at once, keeps what
    // arrived and answers 503; the client retries against the process that follows, from
    // there.
    let upstream = Upstream::start().await;
    upstream.answer_with(201, r#"{"saved":true}"#);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let yaml = config_yaml(upstream.addr, &dir, "", TUS_ROUTES)
        .replace("shutdown_grace: 0", "shutdown_grace: 30s");
    let mut stitch = StitchProcess::start_yaml(&dir, &yaml);
    let addr = stitch.addr;
    let line = SlowLine::start(addr, 2 << 20).await;
    let len = 32 << 20;
    let (file, sha256) = random_file(tmp.path(), "slow.bin", len, 13);
    let node = one_patch_over(line.addr, &file, "slow.bin");
    let dir_again = dir.clone();
    let (result, stopped_in, received_after) = tokio::task::spawn_blocking(move || {
        // (Progress counts what the client handed to its socket: the relay holds some.)
        assert!(
            node.sent_at_least(len as u64 / 2, Duration::from_secs(60)),
            "the upload got half of the way"
        );
        stitch.signal("TERM");
        let asked = std::time::Instant::now();
        let status = stitch.exited_within(Duration::from_secs(40));
        let stopped_in = asked.elapsed();
        assert!(status.is_some_and(|s| s.success()), "{status:?}");
        let logged = stitch.log_text().len();
        let again = StitchProcess::start_again(addr, &dir_again);
        let result = node.result(Duration::from_secs(90));
        let received_after = patch_bytes_received(&again, logged);
        drop(again);
        (result, stopped_in, received_after)
    })
    .await
    .unwrap();
    // (The 503 goes out at once; the connection is then read for up to 2 s more, so that
    // the client sees the answer rather than a reset. The body had at least 8 s to go.)
    assert!(
        stopped_in < Duration::from_secs(6),
        "the PATCH was answered and Stitch exited in {stopped_in:?}, not after the body"
    );
    assert_resumed_once(result, &upstream, &sha256, received_after, len);
}

/// tus-js-client in Node sending `file` (read into a Buffer) in one PATCH, its default,
/// through `line`, reporting its progress.
fn one_patch_over(line: std::net::SocketAddr, file: &Path, name: &str) -> TusNode {
    TusNode::start(serde_json::json!({
        "endpoint": format!("http://{line}/files"),
        "file": file,
        "filename": name,
        "contentType": "application/octet-stream",
        "token": format!("t-{name}"),
        "buffer": true,
        "progress": true,
    }))
}

/// The client finished and finalized; the application got the file once, byte-exact; and the
/// process that followed received only what was missing (`received_after` of `len` bytes):
/// the client resumed from the bytes kept, not from the start.
fn assert_resumed_once(
    result: NodeResult,
    upstream: &Upstream,
    sha256: &str,
    received_after: u64,
    len: usize,
) {
    let finalized = result.finalized();
    assert_eq!(finalized.status, 201);
    let received = upstream.received_at("/app/upload");
    assert_eq!(received.len(), 1, "delivered exactly once");
    assert_eq!(received[0].files[0].sha256, sha256, "byte-exact");
    assert!(
        received_after > 0 && received_after < len as u64,
        "the client resumed from the bytes kept: the process that followed received \
         {received_after} of {len} bytes"
    );
}

/// The body bytes of PATCHes answered 204, from the access log of `stitch` past the first
/// `skip` bytes of its log file (processes on the same directory append to one file; the old
/// one's stopped PATCH is answered 503). Access lines are written once each answer has gone
/// out: this waits up to 10 s for the first.
fn patch_bytes_received(stitch: &StitchProcess, skip: usize) -> u64 {
    const STORED: &str = "PATCH patch 204";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !stitch.log_text()[skip..].contains(STORED) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    stitch.log_text()[skip..]
        .lines()
        .filter(|line| line.contains(STORED))
        .filter_map(|line| line.split("received=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn tus_js_client_sending_the_file_in_one_patch_resumes_on_the_new_process_of_an_upgrade() {
    // As above, through a zero-downtime upgrade (SIGQUIT; the new process started with
    // `--upgrade` takes the listener): once the listener is handed over, the old process stops
    // the PATCH, keeping its bytes, and the client resumes on the new one.
    let upstream = Upstream::start().await;
    upstream.answer_with(201, r#"{"saved":true}"#);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let process = format!(
        "process:\n  upgrade_socket: {}\n  pid_file: {}\n",
        tmp.path().join("upgrade.sock").display(),
        tmp.path().join("stitch.pid").display()
    );
    let yaml = config_yaml(upstream.addr, &dir, "", &format!("{process}{TUS_ROUTES}"))
        .replace("shutdown_grace: 0", "shutdown_grace: 30s");
    let mut old = StitchProcess::start_yaml(&dir, &yaml);
    let addr = old.addr;
    let line = SlowLine::start(addr, 1 << 20).await;
    let len = 24 << 20;
    let (file, sha256) = random_file(tmp.path(), "upgrade.bin", len, 14);
    let node = one_patch_over(line.addr, &file, "upgrade.bin");
    let dir_beside = dir.clone();
    let (result, stopped_in, received_after) = tokio::task::spawn_blocking(move || {
        assert!(
            node.sent_at_least(len as u64 / 4, Duration::from_secs(60)),
            "the upload got a quarter of the way"
        );
        let logged = old.log_text().len();
        let new = old.start_beside(&dir_beside, &["--upgrade"]);
        std::thread::sleep(Duration::from_millis(300));
        old.signal("QUIT");
        let asked = std::time::Instant::now();
        let status = old.exited_within(Duration::from_secs(40));
        let stopped_in = asked.elapsed();
        assert!(status.is_some_and(|s| s.success()), "{status:?}");
        let result = node.result(Duration::from_secs(90));
        let received_after = patch_bytes_received(&new, logged);
        drop(new);
        (result, stopped_in, received_after)
    })
    .await
    .unwrap();
    // The hand-over takes up to 5.5 s, the answered connection is read for up to 2 s more;
    // the body had at least 18 s to go.
    assert!(
        stopped_in < Duration::from_secs(14),
        "the old process exited {stopped_in:?} after SIGQUIT, not after the body"
    );
    assert_resumed_once(result, &upstream, &sha256, received_after, len);
}

/// What `tests/clients/tuspy_upload.py` reports.
#[derive(Debug, serde::Deserialize)]
struct TuspyResult {
    ok: bool,
    error: Option<String>,
    url: Option<String>,
    patches: usize,
    answer: Option<Answered>,
}

#[derive(Debug, serde::Deserialize)]
struct Answered {
    status: u16,
    body: String,
}

/// Uploads `file` with tuspy (PyPI), installed by `.ci/setup` into target/venv.
async fn tuspy_upload(args: serde_json::Value) -> TuspyResult {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("target/venv/bin/python");
    let ready = python.exists()
        && Command::new(&python)
            .args(["-c", "import tusclient"])
            .output()
            .is_ok_and(|output| output.status.success());
    assert!(
        ready,
        "tuspy is missing from target/venv: run .ci/setup (it installs PyPI's tuspy there)"
    );
    let mut client = tokio::process::Command::new(python);
    client
        .arg(root.join("tests/clients/tuspy_upload.py"))
        .arg(args.to_string())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(90), client.output())
        .await
        .expect("tuspy finishes within 90 s")
        .expect("python runs");
    assert!(
        output.status.success(),
        "tuspy: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the driver prints one JSON line")
}

/// tuspy created one upload, sent it in `patches` PATCHes, and read the application's answer
/// (201, `answer`) from the upload's URL; the application got the file once, whole.
fn assert_tuspy_delivered(
    h: &Harness,
    result: &TuspyResult,
    patches: usize,
    answer: &str,
    (name, content_type, len, sha256): (&str, &str, u64, &str),
) {
    assert!(result.ok, "tuspy reports success: {:?}", result.error);
    let url = result.url.as_deref().expect("the upload's URL");
    assert!(url.starts_with(&h.url("/files/")), "{url}");
    assert_eq!(result.patches, patches, "PATCH requests");
    let answered = result.answer.as_ref().expect("a GET on the upload's URL");
    assert_eq!((answered.status, answered.body.as_str()), (201, answer));
    assert!(
        h.upstream.received_at("/files").is_empty(),
        "no tus request reached the application"
    );
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), 1, "the application gets the file once");
    let request = &received[0];
    assert!(request.fields.is_empty(), "{:?}", request.fields);
    assert_eq!(request.files.len(), 1);
    let part = &request.files[0];
    assert_eq!(part.field, "document");
    assert_eq!(part.file_name, name);
    assert_eq!(part.content_type.as_deref(), Some(content_type));
    assert_eq!(part.len, len);
    assert_eq!(part.sha256, sha256, "byte-exact");
}

#[tokio::test]
async fn tuspy_uploads_in_256_kib_patches_with_sha1_checksums_and_the_file_arrives_once() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    let answer = r#"{"id":"py-1"}"#;
    h.upstream.answer_with(201, answer);
    let (file, sha256) = random_file(h.dir.path(), "scan.tiff", 2_000_000, 21);
    let result = tuspy_upload(serde_json::json!({
        "endpoint": h.url("/files"),
        "file": file,
        "filename": "Scan – März.tiff",
        "filetype": "image/tiff",
        "chunk_size": 256 * 1024,
        "checksum": true,
    }))
    .await;
    // 2,000,000 bytes: seven PATCHes of 256 KiB and one of the rest.
    let expected = ("Scan – März.tiff", "image/tiff", 2_000_000, sha256.as_str());
    assert_tuspy_delivered(&h, &result, 8, answer, expected);
}

#[tokio::test]
async fn tuspys_async_uploader_sends_the_whole_file_in_one_patch_and_it_arrives_once() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    let answer = r#"{"id":"py-2"}"#;
    h.upstream.answer_with(201, answer);
    let (file, sha256) = random_file(h.dir.path(), "data.bin", 3_000_000, 22);
    let result = tuspy_upload(serde_json::json!({
        "endpoint": h.url("/files"),
        "file": file,
        "filename": "data.bin",
        "filetype": "application/octet-stream",
        "async": true,
    }))
    .await;
    let expected = (
        "data.bin",
        "application/octet-stream",
        3_000_000,
        sha256.as_str(),
    );
    assert_tuspy_delivered(&h, &result, 1, answer, expected);
}

/// What `tests/browser/tus-trailer.mjs` reports.
#[derive(Debug, serde::Deserialize)]
struct TrailerResult {
    ok: bool,
    error: Option<String>,
    statuses: Option<Vec<u16>>,
    offset: Option<u64>,
}

#[tokio::test]
async fn nodes_http_client_sends_checksums_as_trailers_and_the_file_arrives_once() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    let dir = tempfile::tempdir().unwrap();
    let len = 5 * 1024 * 1024 + 17;
    let (file, sha256) = random_file(dir.path(), "trailed.bin", len, 31);
    for (algorithm, patch_size) in [("sha1", 2 << 20), ("sha256", 1 << 20), ("md5", len)] {
        let script = clients_dir().join("tus-trailer.mjs");
        let args = serde_json::json!({
            "endpoint": h.url("/files"),
            "file": file,
            "filename": "trailed.bin",
            "patchSize": patch_size,
            "algorithm": algorithm,
        });
        let output = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new("node")
                .arg(script)
                .arg(args.to_string())
                .output(),
        )
        .await
        .expect("the Node client finishes within 60 s")
        .expect("node runs (Node.js 18+ is required)");
        let line = String::from_utf8_lossy(&output.stdout);
        let result: TrailerResult = serde_json::from_str(line.trim()).expect("its JSON line");
        assert!(result.ok, "{algorithm}: {:?}", result.error);
        let statuses = result.statuses.unwrap();
        assert_eq!(statuses[0], 460, "{algorithm}: a wrong trailer checksum");
        let patches = len.div_ceil(patch_size);
        assert_eq!(statuses[1..], vec![204; patches], "{algorithm}");
        assert_eq!(result.offset, Some(len as u64));
    }
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), 3, "each upload delivered once");
    for request in received {
        assert_eq!(request.files[0].sha256, sha256);
        assert_eq!(request.files[0].file_name, "trailed.bin");
    }
}

#[tokio::test]
async fn tus_js_client_with_parallel_uploads_is_concatenated_and_delivered_once() {
    // tus-js-client's `parallelUploads`: the file in three partial uploads sent at once, then a
    // final upload made of them (concatenation), which carries the metadata.
    let upstream = Upstream::start().await;
    upstream.answer_with(201, r#"{"id":"parallel"}"#);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    let stitch = StitchProcess::start(upstream.addr, &dir, TUS_ROUTES);
    let len = (9 << 20) + 12_345;
    let (file, sha256) = random_file(tmp.path(), "parts.bin", len, 13);
    let node = TusNode::start(serde_json::json!({
        "endpoint": format!("http://{}/files", stitch.addr),
        "file": file,
        "filename": "parts.bin",
        "contentType": "application/octet-stream",
        "token": "par-1",
        "parallelUploads": 3,
    }));
    let result = tokio::task::spawn_blocking(move || node.result(Duration::from_secs(90)))
        .await
        .unwrap();
    let finalized = result.finalized();
    assert_eq!(
        (finalized.status, finalized.data.as_str()),
        (201, r#"{"id":"parallel"}"#)
    );
    let received = upstream.received_at("/app/upload");
    assert_eq!(received.len(), 1, "the final upload, delivered once");
    assert_eq!(received[0].files[0].file_name, "parts.bin");
    assert_eq!(received[0].files[0].sha256, sha256, "byte-exact, in order");
    assert!(
        upstream.received().iter().all(|r| r.path == "/app/upload"),
        "the finalize call is answered by Stitch, not passed through"
    );
    stitch.kill();
}

#[tokio::test]
async fn tus_js_client_options_that_change_the_requests_all_deliver_the_file_once() {
    // Each option makes tus-js-client speak another part of the protocol: creation-with-upload,
    // a deferred length, POST with X-HTTP-Method-Override, parallel uploads in small chunks.
    let h = Harness::with_routes(TUS_ROUTES).await;
    let cases = [
        serde_json::json!({ "uploadDataDuringCreation": true, "chunkSize": 1 << 20 }),
        // (From a Buffer: with a stream, tus-js-client 4.3.1 announces a whole chunk's
        // Content-Length for the short last chunk of a deferred length and never sends it,
        // whatever the server; @tus/server waits the same way.)
        serde_json::json!({ "uploadLengthDeferred": true, "chunkSize": 1 << 20 }),
        serde_json::json!({ "overridePatchMethod": true, "chunkSize": 1 << 20 }),
        serde_json::json!({ "addRequestId": true, "removeFingerprintOnSuccess": true }),
    ];
    let mut sent = Vec::new();
    for (i, options) in cases.iter().enumerate() {
        let name = format!("case-{i}.bin");
        let (file, sha256) = random_file(h.dir.path(), &name, (3 << 20) + 777 * i, 20 + i as u64);
        let node = TusNode::start(serde_json::json!({
            "endpoint": h.url("/files"),
            "file": file,
            "filename": name,
            "contentType": "application/octet-stream",
            "token": format!("opt-{i}"),
            "buffer": options.get("uploadLengthDeferred").is_some(),
            "options": options,
        }));
        let result = tokio::task::spawn_blocking(move || node.result(Duration::from_secs(60)))
            .await
            .unwrap();
        assert!(result.ok, "{options}: {:?}", result.error);
        let finalized = result.finalize.expect("finalized");
        assert_eq!(finalized.status, 200, "{options}: {}", finalized.data);
        sent.push((name, sha256));
    }
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), cases.len(), "each file once");
    for (name, sha256) in &sent {
        let got: Vec<_> = received
            .iter()
            .filter(|r| &r.files[0].file_name == name)
            .collect();
        assert_eq!(got.len(), 1, "{name}");
        assert_eq!(&got[0].files[0].sha256, sha256, "{name}");
    }
    assert!(
        h.upstream
            .received()
            .iter()
            .all(|r| r.path == "/app/upload"),
        "every tus request and finalize call is answered by Stitch"
    );
}
