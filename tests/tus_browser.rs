//! tus clients in headless Chromium (driven by playwright-core): tus-js-client 4.3.1's browser
//! bundle and Uppy 6.0.1's (`@uppy/tus`), each uploading a file through Stitch's tus route from
//! a page the application serves (same origin, so no CORS), once with the client's default (the
//! whole file in one PATCH) and once in 256 KiB PATCHes. The application gets each file exactly
//! once, byte-exact by sha256, and the page reads the application's answer from the upload's
//! URL. `.ci/setup` installs Chromium and the npm packages.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const ROUTES: &str = r#"
routes:
  - path: /files
    protocol: tus
    forward: { path: /app/upload, field: document }
"#;

/// What the application answers to each file.
const ANSWER: &str = r#"{"id":"doc-1","stored":true}"#;

/// The test page and the libraries it loads: URL, and the file under `tests/browser`.
const PAGE_FILES: [(&str, &str, &str); 3] = [
    ("/", "text/html", "tus.html"),
    (
        "/lib/tus.js",
        "text/javascript",
        "node_modules/tus-js-client/dist/tus.js",
    ),
    (
        "/lib/uppy.min.js",
        "text/javascript",
        "node_modules/uppy/dist/uppy.min.js",
    ),
];

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Stitch with a tus route, in front of an upstream that also serves the test page and the
/// libraries (through Stitch, which passes them on as the application's).
async fn harness() -> Harness {
    harness_with(ROUTES).await
}

async fn harness_with(routes: &str) -> Harness {
    let dir = browser_dir();
    let ready = Path::new("/usr/bin/chromium").exists()
        && dir.join("node_modules/playwright-core").exists()
        && PAGE_FILES
            .iter()
            .all(|(_, _, file)| dir.join(file).is_file());
    assert!(
        ready,
        "tus browser tests need Chromium and the npm packages (tus-js-client, uppy, \
         playwright-core): run .ci/setup"
    );
    let h = Harness::with_routes(routes).await;
    for (url, content_type, file) in PAGE_FILES {
        let body = std::fs::read(dir.join(file)).unwrap();
        h.upstream.serve_static(url, content_type, body.into());
    }
    h.upstream.answer_with(201, ANSWER);
    h
}

#[derive(Debug, serde::Deserialize)]
struct Seen {
    size: u64,
    sha256: String,
    result: PageResult,
    /// Every request the client made, as "METHOD path".
    requests: Vec<String>,
}

#[derive(Debug, serde::Deserialize)]
struct PageResult {
    ok: bool,
    error: Option<String>,
    status: Option<u16>,
    url: Option<String>,
    answer: Option<PageAnswer>,
}

/// What a GET on the upload's URL returned to the page.
#[derive(Debug, serde::Deserialize, PartialEq)]
struct PageAnswer {
    status: u16,
    body: String,
}

/// Uploads a file of `size` random bytes named `name` with `client` ("tus-js-client" or
/// "uppy") and its `options` (JSON); returns what the page saw.
async fn browser_upload(h: &Harness, client: &str, size: u64, name: &str, options: &str) -> Seen {
    browser_upload_from(&h.url("/"), client, size, name, options).await
}

/// The same, from the page at `page` (its query may name the endpoint).
async fn browser_upload_from(
    page: &str,
    client: &str,
    size: u64,
    name: &str,
    options: &str,
) -> Seen {
    let mut driver = tokio::process::Command::new("node");
    driver
        .arg(browser_dir().join("tus-browser.mjs"))
        .args([page, client, &size.to_string(), name, options])
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(150), driver.output())
        .await
        .expect("the browser finishes within 150 s")
        .expect("node runs (Node.js 18+ is required)");
    assert!(
        output.status.success(),
        "browser: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the driver prints one JSON line")
}

/// The page reports success and reads the application's answer from the upload's URL; the
/// client created one upload and sent it in `patches` PATCH requests, nothing else; the
/// application got the file once, whole. Returns the application's request.
fn assert_uploaded(
    h: &Harness,
    seen: &Seen,
    name: &str,
    content_type: &str,
    patches: usize,
) -> Received {
    let result = &seen.result;
    assert!(
        result.ok,
        "the client reports success: {:?} (status {:?})",
        result.error, result.status
    );
    let url = result.url.as_deref().expect("the upload's URL");
    let upload_path = url
        .strip_prefix(&h.url(""))
        .expect("the upload's URL is on Stitch");
    assert!(upload_path.starts_with("/files/"), "{upload_path}");
    let mut expected = vec!["POST /files".to_string()];
    expected.extend(std::iter::repeat_n(format!("PATCH {upload_path}"), patches));
    assert_eq!(seen.requests, expected, "the client's requests");
    assert_eq!(
        result.answer,
        Some(PageAnswer {
            status: 201,
            body: ANSWER.to_string()
        }),
        "a GET on the upload's URL returns the application's answer"
    );

    assert!(
        h.upstream
            .received()
            .iter()
            .all(|r| !r.path.starts_with("/files")),
        "no tus request reaches the application"
    );
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), 1, "the application gets the file once");
    let request = &received[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.files.len(), 1, "one file");
    let file = &request.files[0];
    assert_eq!(file.field, "document");
    assert_eq!(file.file_name, name);
    assert_eq!(file.content_type.as_deref(), Some(content_type));
    assert_eq!(file.len, seen.size);
    assert_eq!(file.sha256, seen.sha256, "byte-exact");
    request.clone()
}

/// Uppy sends the file's name and type twice in the metadata (`name`/`type`, and `filename`/
/// `filetype` for tusd); Stitch takes them for the file part, and neither copy becomes a field.
/// Nothing else of Uppy's (`relativePath`, ...) reaches the application either.
fn assert_no_fields(request: &Received) {
    assert!(
        request.fields.is_empty(),
        "the file's name and type are no fields: {:?}",
        request.fields
    );
}

#[tokio::test]
async fn tus_js_client_in_chromium_uploads_a_file_in_one_patch_by_default() {
    let h = harness().await;
    let name = "Résumé 2026 (final).pdf";
    let seen = browser_upload(&h, "tus-js-client", 2_500_000, name, "{}").await;
    let request = assert_uploaded(&h, &seen, name, "application/pdf", 1);
    assert!(
        request.fields.is_empty(),
        "the file's name and type are no fields: {:?}",
        request.fields
    );
}

#[tokio::test]
async fn tus_js_client_in_chromium_uploads_a_file_in_256_kib_patches() {
    let h = harness().await;
    let options = r#"{"chunkSize":262144}"#;
    let seen = browser_upload(&h, "tus-js-client", 2_700_000, "clip.mp4", options).await;
    // 2,700,000 bytes: ten PATCHes of 256 KiB and one of the rest.
    assert_uploaded(&h, &seen, "clip.mp4", "video/mp4", 11);
}

#[tokio::test]
async fn uppy_tus_in_chromium_uploads_a_file_in_one_patch_by_default() {
    let h = harness().await;
    let seen = browser_upload(&h, "uppy", 2_300_000, "photo.png", "{}").await;
    let request = assert_uploaded(&h, &seen, "photo.png", "image/png", 1);
    assert_no_fields(&request);
}

#[tokio::test]
async fn uppy_tus_in_chromium_uploads_a_file_in_256_kib_patches() {
    let h = harness().await;
    let options = r#"{"chunkSize":262144}"#;
    let seen = browser_upload(&h, "uppy", 3_000_000, "notes.txt", options).await;
    // 3,000,000 bytes: eleven PATCHes of 256 KiB and one of the rest.
    let request = assert_uploaded(&h, &seen, "notes.txt", "text/plain", 12);
    assert_no_fields(&request);
}

#[tokio::test]
async fn tus_js_client_in_chromium_uploads_an_empty_file() {
    let h = harness().await;
    let seen = browser_upload(&h, "tus-js-client", 0, "empty.txt", "{}").await;
    // tus-js-client creates an empty upload and, having nothing to send, reports success.
    assert_uploaded(&h, &seen, "empty.txt", "text/plain", 0);
}

#[tokio::test]
async fn a_page_on_another_origin_uploads_through_a_route_with_cors() {
    let routes = r#"
routes:
  - path: /files
    protocol: tus
    cors: { origins: ["*"] }
    forward: { path: /app/upload, field: document }
"#;
    let h = harness_with(routes).await;
    // The page comes from the application's own address, another origin than Stitch's.
    let endpoint = h.url("/files");
    let page = format!("http://{}/?endpoint={endpoint}", h.upstream.addr);
    let seen = browser_upload_from(
        &page,
        "tus-js-client",
        1_500_000,
        "cross.bin",
        r#"{"chunkSize":524288}"#,
    )
    .await;
    assert_uploaded(&h, &seen, "cross.bin", "application/octet-stream", 3);
}
