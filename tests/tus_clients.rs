//! Real tus clients through Stitch: tus-js-client 4.x in Node running the flow Wix documents
//! for its resumable upload API (upload, then a finalize PUT whose answer is the application's),
//! and surviving a SIGKILL of Stitch mid-upload. Each file is checked by sha256 at the upstream.
//! `.ci/setup` installs the npm packages.

mod common;

use common::process::StitchProcess;
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
    assert!(
        result.ok,
        "tus-js-client reports success: {:?}",
        result.error
    );
    let finalized = result.finalize.expect("finalized");
    assert_eq!(
        (finalized.status, finalized.data.as_str()),
        (201, r#"{"saved":true}"#)
    );
    let received = upstream.received_at("/files");
    assert!(
        received.is_empty(),
        "no tus request reached the application"
    );
    let received = upstream.received_at("/app/upload");
    assert_eq!(received.len(), 1, "delivered exactly once");
    assert_eq!(received[0].files[0].sha256, sha256, "byte-exact");
    assert_eq!(received[0].files[0].len, len as u64);
}
