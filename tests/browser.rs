//! The real clients: Resumable.js 1.1.0 and Flow.js 2.14.1 in headless Chromium (driven by
//! playwright-core), uploading through Stitch to a recording upstream, and the demo page with
//! those two and tus-js-client 4.3.1. `.ci/setup` installs Chromium and the npm packages.

mod common;

use common::process::StitchProcess;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const ROUTES: &str = r#"
routes:
  - path: /upload
    protocol: resumable
    forward: { path: /app/upload, field: document }
  - path: /flow-upload
    protocol: flow
    forward: { path: /app/upload, field: document }
  - path: /ns-upload
    protocol: resumable
    parameters: { namespace: "ns_", type: "" }
    forward: { path: /app/upload, field: document }
"#;

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Starts Stitch in front of an upstream that also serves the demo page and the libraries.
async fn harness() -> Harness {
    let node_modules = browser_dir().join("node_modules");
    assert!(
        node_modules.join("playwright-core").exists() && Path::new("/usr/bin/chromium").exists(),
        "browser tests need Chromium and the npm packages: run .ci/setup"
    );
    let h = Harness::with_routes(ROUTES).await;
    let page = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/demo/page.html"));
    h.upstream
        .serve_static("/", "text/html", page.unwrap().into());
    for (url, file) in [
        ("/lib/resumable.js", "resumablejs/resumable.js"),
        ("/lib/flow.js", "@flowjs/flow.js/dist/flow.js"),
    ] {
        let script = std::fs::read(node_modules.join(file)).unwrap();
        h.upstream
            .serve_static(url, "text/javascript", script.into());
    }
    h
}

/// Runs a browser driver (`tests/browser/*.mjs`) and reads the one JSON line it prints.
async fn run_driver<T: serde::de::DeserializeOwned>(script: &str, args: Vec<String>) -> T {
    let script = browser_dir().join(script);
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .args(args)
            .output()
            .expect("node runs (Node.js 18+ is required)")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "browser: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the driver prints one JSON line")
}

#[derive(Debug, serde::Deserialize)]
struct BrowserResult {
    size: u64,
    sha256: String,
    result: Outcome,
}

#[derive(Debug, serde::Deserialize)]
struct Outcome {
    ok: bool,
    message: String,
}

/// Uploads one file of `size` random bytes from the browser; returns what the page saw.
async fn browser_upload(
    h: &Harness,
    library: &str,
    size: u64,
    name: &str,
    options: &str,
) -> BrowserResult {
    let page = h.url("/");
    let args = [
        page,
        library.to_string(),
        size.to_string(),
        name.to_string(),
        options.to_string(),
    ];
    run_driver("upload.mjs", args.to_vec()).await
}

/// The one request the upstream got carries the browser's file, and the browser's success
/// message is the upstream's answer.
fn assert_browser_file_delivered(h: &Harness, seen: &BrowserResult, name: &str) -> Received {
    assert!(
        seen.result.ok,
        "the browser reports success: {}",
        seen.result.message
    );
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), 1, "exactly one upstream request");
    let file = &received[0].files[0];
    assert_eq!(file.field, "document");
    assert_eq!(file.file_name, name);
    assert_eq!(file.len, seen.size);
    assert_eq!(file.sha256, seen.sha256);
    received[0].clone()
}

#[tokio::test]
async fn resumable_with_default_options_uploads_through_stitch() {
    let h = harness().await;
    h.upstream.answer_with(201, r#"{"id":"r1"}"#);
    let seen = browser_upload(
        &h,
        "resumable",
        3_500_000,
        "Résumé (final) #1.pdf",
        r#"{"chunkSize":1000000}"#,
    )
    .await;
    let request = assert_browser_file_delivered(&h, &seen, "Résumé (final) #1.pdf");
    assert_eq!(seen.result.message, r#"{"id":"r1"}"#);
    assert_eq!(
        request.files[0].content_type.as_deref(),
        Some("application/pdf")
    );
}

#[tokio::test]
async fn flow_with_default_options_uploads_through_stitch() {
    let h = harness().await;
    h.upstream.answer_with(200, r#"{"id":"f1"}"#);
    let seen = browser_upload(
        &h,
        "flow",
        2_600_000,
        "photo.png",
        r#"{"chunkSize":500000}"#,
    )
    .await;
    assert_browser_file_delivered(&h, &seen, "photo.png");
    assert_eq!(seen.result.message, r#"{"id":"f1"}"#);
}

#[tokio::test]
async fn resumable_octet_put_without_tests_and_forced_chunk_size_uploads_once() {
    let h = harness().await;
    let options = r#"{"chunkSize":300000,"method":"octet","uploadMethod":"PUT","testChunks":false,
        "forceChunkSize":true,"prioritizeFirstAndLastChunk":true,"query":{"folder":"7"}}"#;
    let seen = browser_upload(&h, "resumable", 1_000_001, "data.bin", options).await;
    let request = assert_browser_file_delivered(&h, &seen, "data.bin");
    assert_eq!(request.field("folder"), Some("7"));
}

#[tokio::test]
async fn flow_octet_put_with_custom_query_fields_forwards_them() {
    let h = harness().await;
    let options = r#"{"chunkSize":250000,"method":"octet","uploadMethod":"PUT",
        "query":{"csrf_token":"t0k","album":"summer"}}"#;
    let seen = browser_upload(&h, "flow", 1_100_000, "noext", options).await;
    let request = assert_browser_file_delivered(&h, &seen, "noext");
    assert_eq!(request.field("csrf_token"), Some("t0k"));
    assert_eq!(request.field("album"), Some("summer"));
}

#[tokio::test]
async fn resumable_with_a_parameter_namespace_and_a_dropped_type_uploads() {
    let h = harness().await;
    let options = r#"{"target":"/ns-upload","chunkSize":400000,"parameterNamespace":"ns_",
        "typeParameterName":null,"query":{"token":"abc"}}"#;
    let seen = browser_upload(&h, "resumable", 1_300_000, "namespaced.txt", options).await;
    let request = assert_browser_file_delivered(&h, &seen, "namespaced.txt");
    // Resumable.js prefixes the site's own fields with the namespace too; the application gets
    // them by the names it gave them.
    assert_eq!(request.field("token"), Some("abc"));
    assert_eq!(request.field("ns_token"), None);
}

#[tokio::test]
async fn flow_uploads_an_empty_file() {
    let h = harness().await;
    let seen = browser_upload(&h, "flow", 0, "empty.txt", "{}").await;
    let request = assert_browser_file_delivered(&h, &seen, "empty.txt");
    assert_eq!(request.files[0].len, 0);
}

#[tokio::test]
async fn the_demo_pages_identifiers_keep_a_half_sent_file_of_the_same_name_and_size_apart() {
    let h = harness().await;
    // Chunks 1-2 of another report.bin (3 MiB, 1 MiB chunks) sent with the library's default
    // identifier, size and name, as curl or an older page would.
    let other = ChunkedFile::new(
        Client::Resumable,
        "/upload",
        "report.bin",
        Content::Bytes(random_bytes(3 << 20, 110)),
        1 << 20,
    );
    assert_eq!(other.identifier, "3145728-reportbin");
    for n in 1..=2 {
        assert_eq!(other.upload(&h, n).await.status(), 200);
    }
    // The demo page identifies the browser's file by size, lastModified and name.
    let seen = browser_upload(
        &h,
        "resumable",
        3 << 20,
        "report.bin",
        r#"{"chunkSize":1048576}"#,
    )
    .await;
    assert_browser_file_delivered(&h, &seen, "report.bin");
}

/// `stitch demo` (the real binary), started from a directory outside the source tree, with
/// files over 8 MiB refused by the routes.
fn start_demo() -> (StitchProcess, tempfile::TempDir) {
    assert!(
        browser_dir().join("node_modules/playwright-core").exists(),
        "browser tests need Chromium and the npm packages: run .ci/setup"
    );
    let dir = tempfile::tempdir().unwrap();
    let routes = r#"
routes:
  - path: /upload
    protocol: resumable
    scope: { cookie: session }
    limits: { max_file_size: 8MiB }
    forward: { path: /upload, field: file }
  - path: /flow-upload
    protocol: flow
    scope: { cookie: session }
    limits: { max_file_size: 8MiB }
    forward: { path: /upload, field: file }
  - path: /files
    protocol: tus
    scope: { cookie: session }
    limits: { max_file_size: 8MiB }
    forward: { path: /upload, field: file }
"#;
    let (demo, _) = StitchProcess::demo(&dir.path().join("data"), routes);
    (demo, dir)
}

#[derive(Debug, serde::Deserialize)]
struct DemoRun {
    files: Vec<DemoFile>,
    received: Vec<serde_json::Value>,
    sha256: std::collections::HashMap<String, String>,
    paused: Paused,
    text: String,
}

#[derive(Debug, serde::Deserialize)]
struct DemoFile {
    name: String,
    state: String,
    status: Option<u16>,
    message: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
struct Paused {
    before: f64,
    after: f64,
    states: Vec<String>,
}

/// The files the demo test picks (name:size); the last one is over the routes' limit.
const DEMO_FILES: [&str; 4] = [
    "holiday.mov:4000000",
    "notes.txt:3000000",
    "empty.txt:0",
    "too-big.iso:9000000",
];

/// Picks `files` on the demo page with `library`, pauses and resumes; every file but
/// too-big.iso arrives, and too-big.iso fails with `refusal` (status, words of the message).
async fn drive_demo(library: &str, files: &[&str], refusal: (u16, &str)) {
    let (demo, _dir) = start_demo();
    let screenshots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
    std::fs::create_dir_all(&screenshots).unwrap();
    let screenshot = screenshots.join(format!("demo-{library}.png"));
    let _ = std::fs::remove_file(&screenshot);
    let mut args = vec![
        format!("http://{}/", demo.addr),
        library.to_string(),
        screenshot.display().to_string(),
    ];
    args.extend(files.iter().map(|f| f.to_string()));
    let run: DemoRun = run_driver("demo.mjs", args).await;

    assert_eq!(
        run.files.len(),
        files.len(),
        "one row per file: {:?}",
        run.files
    );
    for file in &run.files {
        if file.name == "too-big.iso" {
            assert_eq!(file.state, "failed", "{file:?}");
            assert_eq!(file.status, Some(refusal.0), "{file:?}");
            let message = file.message.as_deref().unwrap_or_default();
            assert!(message.contains(refusal.1), "{message}");
        } else {
            assert_eq!(file.state, "uploaded", "{file:?}");
        }
    }
    assert!(run.paused.states.iter().any(|s| s == "paused"));
    assert_eq!(
        run.paused.before, run.paused.after,
        "nothing moved while paused"
    );
    let mut received: Vec<(String, String)> = run
        .received
        .iter()
        .flat_map(|upload| upload["files"].as_array().unwrap().clone())
        .map(|f| {
            let name = f["filename"].as_str().unwrap().to_string();
            (name, f["sha256"].as_str().unwrap().to_string())
        })
        .collect();
    received.sort();
    let mut expected: Vec<(String, String)> = run
        .sha256
        .iter()
        .filter(|(name, _)| *name != "too-big.iso")
        .map(|(n, h)| (n.clone(), h.clone()))
        .collect();
    expected.sort();
    assert_eq!(
        received, expected,
        "the application got each file once, whole"
    );
    let failed = format!("Failed ({})", refusal.0);
    assert!(run.text.contains(&failed), "{}", run.text);
    assert!(
        run.text.contains("The application received holiday.mov"),
        "{}",
        run.text
    );
    let png = std::fs::read(&screenshot).expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is a PNG");
}

#[tokio::test]
async fn the_demo_page_uploads_several_files_with_resumable_pauses_resumes_and_shows_a_refusal() {
    drive_demo("resumable", &DEMO_FILES, (415, "accepts at most")).await;
}

#[tokio::test]
async fn the_demo_page_uploads_several_files_with_flow_pauses_resumes_and_shows_a_refusal() {
    drive_demo("flow", &DEMO_FILES, (415, "accepts at most")).await;
}

/// tus-js-client's rows show the application's answer, read from each upload's URL. The empty
/// file is left out: Stitch does not deliver a zero-length tus upload yet (see
/// `tus_js_client_in_chromium_uploads_an_empty_file` in tests/tus_browser.rs).
#[tokio::test]
async fn the_demo_page_uploads_several_files_with_tus_pauses_resumes_and_shows_a_refusal() {
    let files: Vec<&str> = DEMO_FILES
        .into_iter()
        .filter(|f| !f.starts_with("empty"))
        .collect();
    drive_demo("tus", &files, (413, "takes files of at most")).await;
}

#[derive(Debug, serde::Deserialize)]
struct ReloadRun {
    /// The share of the file sent before the reload.
    before: f64,
    sha256: String,
    result: DemoResult,
    /// The requests on the tus route after the reload, by method.
    requests: std::collections::HashMap<String, usize>,
    received: Vec<serde_json::Value>,
}

#[derive(Debug, serde::Deserialize)]
struct DemoResult {
    ok: bool,
    status: Option<u16>,
    message: Option<String>,
}

#[tokio::test]
async fn the_demo_pages_tus_uploader_goes_on_where_it_was_after_a_page_reload() {
    let (demo, _dir) = start_demo();
    let size: u64 = 6_000_000;
    let args = vec![format!("http://{}/", demo.addr), size.to_string()];
    let run: ReloadRun = run_driver("demo-reload.mjs", args).await;

    assert!(run.before > 0.4, "{}", run.before);
    assert!(run.result.ok, "{:?}", run.result);
    assert_eq!(run.result.status, Some(200));
    let answer = run.result.message.as_deref().unwrap_or_default();
    assert!(
        answer.contains(&run.sha256),
        "the page shows the application's answer, naming the file's sha256"
    );
    let count = |method: &str| run.requests.get(method).copied().unwrap_or(0);
    assert_eq!(count("POST"), 0, "no new upload: {:?}", run.requests);
    assert_eq!(
        count("HEAD"),
        1,
        "one HEAD finds the offset: {:?}",
        run.requests
    );
    // 92 PATCHes of 64 KiB make the whole file; more than 40% were sent before the reload.
    let patches = count("PATCH");
    assert!(
        patches > 0 && patches < 60,
        "{patches} PATCHes after the reload"
    );
    let received: Vec<(&str, u64, &str)> = run
        .received
        .iter()
        .flat_map(|upload| upload["files"].as_array().unwrap())
        .map(|f| {
            let name = f["filename"].as_str().unwrap();
            (
                name,
                f["size"].as_u64().unwrap(),
                f["sha256"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        received,
        [("video.mp4", size, run.sha256.as_str())],
        "the application got the file once, whole"
    );
}

#[test]
fn the_demo_refuses_to_start_without_the_client_libraries_and_says_how_to_get_them() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_stitch"))
        .current_dir(dir.path())
        .args(["demo", "--node-modules", "missing/node_modules"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains(".ci/setup --demo"), "{message}");
    assert!(message.contains("npm install resumablejs"), "{message}");
    assert!(message.contains("tus-js-client@4.3.1"), "{message}");
}
