//! Starting, stopping and failing as an operator sees it, through the real binary: start-up
//! errors before the "listening" line, SIGTERM that ends as soon as nothing is in flight,
//! short messages for clients and detailed ones in the log.

mod common;

use common::process::StitchProcess;
use common::raw::RawConnection;
use common::*;
use std::time::Duration;

/// A config for the binary with `shutdown_grace: 30s` (a graceful stop must not wait it out).
fn yaml(upstream: std::net::SocketAddr, dir: &std::path::Path) -> String {
    config_yaml(upstream, dir, "", ROUTES).replace("shutdown_grace: 0", "shutdown_grace: 30s")
}

#[tokio::test]
async fn sigterm_on_an_idle_stitch_exits_at_once_not_after_the_grace_period() {
    let upstream = Upstream::start().await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    let mut stitch = StitchProcess::start_yaml(&dir, &yaml(upstream.addr, &dir));
    stitch.signal("TERM");
    let status = stitch.exited_within(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

#[tokio::test]
async fn sigterm_during_a_chunk_upload_lets_it_finish_then_exits() {
    let upstream = Upstream::start().await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    let mut stitch = StitchProcess::start_yaml(&dir, &yaml(upstream.addr, &dir));
    let file = ChunkedFile::resumable("drain.bin", random_bytes(4000, 120), 1000);
    let mut client = RawConnection::open(stitch.addr).await;
    let head = format!(
        "POST /upload?{} HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n",
        file.query_string(1)
    );
    assert!(client.send(head.as_bytes()).await);
    assert!(client.send(&file.data.slice(0, 400)).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stitch.signal("TERM");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        stitch.exited_within(Duration::ZERO).is_none(),
        "a request was in flight: Stitch waits for it"
    );
    assert!(client.send(&file.data.slice(400, 1000)).await);
    let answer = client.response(Duration::from_secs(10)).await;
    assert_eq!(
        answer.map(|r| r.status),
        Some(200),
        "the chunk in flight is stored"
    );
    let status = stitch.exited_within(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "then it exits: {status:?}"
    );

    let restarted = StitchProcess::start(upstream.addr, &dir, ROUTES);
    let test = reqwest::get(format!(
        "http://{}/upload?{}",
        restarted.addr,
        file.query_string(1)
    ))
    .await
    .unwrap();
    assert_eq!(test.status(), 200, "the chunk survived the stop");
    // The upload finishes through the restarted process, and arrives once.
    let client = reqwest::Client::new();
    for n in 2..=4 {
        let (start, end) = file.bounds(n);
        let sent = client
            .post(format!(
                "http://{}/upload?{}",
                restarted.addr,
                file.query_string(n)
            ))
            .body(file.data.slice(start, end))
            .send()
            .await
            .unwrap();
        assert_eq!(sent.status(), 200, "chunk {n}");
    }
    assert_delivered_once_to(&upstream, &file);
}

#[tokio::test]
async fn sigterm_during_a_whole_file_tus_patch_keeps_its_bytes_answers_it_and_exits_at_once() {
    // tus-js-client and Uppy send a whole file in one PATCH by default: waiting for it could
    // outlast any grace period, and cutting it at the end would lose every byte of it.
    let upstream = Upstream::start().await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    let yaml = config_yaml(upstream.addr, &dir, "", common::tus::TUS_ROUTE)
        .replace("shutdown_grace: 0", "shutdown_grace: 30s");
    let mut stitch = StitchProcess::start_yaml(&dir, &yaml);
    let data = random_bytes(200_000, 121);
    let client = reqwest::Client::new();
    let path = common::tus::create_at(stitch.addr, data.len()).await;
    let mut patch = RawConnection::open(stitch.addr).await;
    let head = common::tus::patch_head(&path, 0, data.len());
    assert!(patch.send(head.as_bytes()).await);
    assert!(patch.send(&data[..80_000]).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stitch.signal("TERM");
    let answer = patch
        .response(Duration::from_secs(5))
        .await
        .expect("the PATCH is answered at once, not after the grace period");
    assert_eq!(answer.status, 503, "retryable");
    let offset = answer.headers.iter().find(|(n, _)| n == "upload-offset");
    assert_eq!(offset.map(|(_, v)| v.as_str()), Some("80000"));
    let status = stitch.exited_within(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "then it exits: {status:?}"
    );

    // The client resumes from the bytes that arrived, on the process that follows.
    let restarted = StitchProcess::start_yaml(&dir, &yaml);
    let url = format!("http://{}{path}", restarted.addr);
    let progress = client
        .head(&url)
        .header("tus-resumable", "1.0.0")
        .send()
        .await
        .unwrap();
    assert_eq!(progress.headers()["upload-offset"], "80000");
    let rest = common::tus::patch_at(restarted.addr, &path, 80_000, data.slice(80_000..)).await;
    assert_eq!(rest.status(), 204);
    common::tus::assert_delivered_once(&upstream, &data);
}

#[tokio::test]
async fn a_storage_directory_that_cannot_be_opened_is_reported_before_any_listening_line() {
    let upstream = Upstream::start().await;
    let root = tempfile::tempdir().unwrap();
    // A file where the directory should be.
    let dir = root.path().join("data");
    std::fs::write(&dir, "not a directory").unwrap();
    let path = root.path().join("stitch.yaml");
    std::fs::write(&path, config_yaml(upstream.addr, &dir, "", ROUTES)).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_stitch"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot open storage directory"), "{stderr}");
    assert!(
        !stderr.contains("listening"),
        "no listening line before the error: {stderr}"
    );
}

#[tokio::test]
async fn a_failed_delivery_tells_the_client_little_and_the_log_the_details() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    // Nothing listens here.
    let down = free_addr();
    let stitch = StitchProcess::start(down, &dir, ROUTES);
    let file = ChunkedFile::resumable("down.txt", random_bytes(10, 121), 1000);
    let response = file
        .send_to(&reqwest::Client::new(), stitch.addr, 1)
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let body = response.text().await.unwrap();
    assert_eq!(
        body,
        "the application could not be reached; the file is kept, retry\n"
    );
    let log = stitch.log_text();
    assert!(log.contains("delivery failed"), "{log}");
    assert!(
        log.contains(&down.to_string()),
        "the log names the address: {log}"
    );
}

#[tokio::test]
async fn refused_chunks_and_deliveries_are_logged_with_their_reasons() {
    let upstream = Upstream::start().await;
    upstream.answer_with(201, "kept");
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    let stitch = StitchProcess::start(upstream.addr, &dir, ROUTES);
    let client = reqwest::Client::new();
    let file = ChunkedFile::resumable("logged.txt", random_bytes(1500, 122), 1000);
    let refused = client
        .post(format!(
            "http://{}/upload?{}",
            stitch.addr,
            file.query_string(1)
                .replace("resumableTotalSize=1500", "resumableTotalSize=x")
        ))
        .body(file.data.slice(0, file.data.len()))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 415);
    let delivered = file.send_to(&client, stitch.addr, 1).await.unwrap();
    assert_eq!(delivered.status(), 201);
    let log = stitch.log_text();
    assert!(
        log.contains("refused a request with 415: resumableTotalSize must be a whole number"),
        "{log}"
    );
    assert!(log.contains("sent 1500 bytes"), "{log}");
    assert!(log.contains("it answered 201"), "{log}");
}

#[tokio::test]
async fn the_demo_says_where_to_open_it_last_after_any_warning() {
    let root = tempfile::tempdir().unwrap();
    // Routes without a scope: start-up warns about them.
    let (demo, _) = StitchProcess::demo(&root.path().join("data"), ROUTES);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !demo.log_text().contains("demo: open") {
        assert!(std::time::Instant::now() < deadline, "{}", demo.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = demo.log_text();
    let lines: Vec<&str> = text.lines().collect();
    let open = lines.iter().position(|l| l.contains("demo: open"));
    assert_eq!(
        open,
        Some(lines.len() - 1),
        "the open line comes last:\n{text}"
    );
    assert!(text.contains("no `scope`"), "{text}");
    assert!(text.contains(&format!("http://{}/", demo.addr)), "{text}");
}

/// Sends chunk 1 of a file, then chunk 2 with another type (refused: it contradicts the
/// first), to a Stitch logging in `format`; returns its log.
async fn log_of_a_refused_chunk(format: &str) -> String {
    let upstream = Upstream::start().await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    let yaml = config_yaml(upstream.addr, &dir, "", ROUTES)
        .replace("routes:", &format!("log: {{ format: {format} }}\nroutes:"));
    let stitch = StitchProcess::start_yaml(&dir, &yaml);
    let file = ChunkedFile::resumable("logged.bin", random_bytes(3000, 123), 1000);
    let client = reqwest::Client::new();
    let url = |query: String| format!("http://{}/upload?{query}", stitch.addr);
    let first = client
        .post(url(file.query_string(1)))
        .body(file.data.slice(0, 1000))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let other = file
        .query_string(2)
        .replace("resumableType=text%2Fplain", "resumableType=image%2Fpng");
    let refused = client
        .post(url(other))
        .body(file.data.slice(1000, 2000))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 415);
    tokio::time::sleep(Duration::from_millis(100)).await;
    stitch.log_text()
}

#[tokio::test]
async fn log_lines_carry_the_route_protocol_upload_and_part_and_can_be_json() {
    let text = log_of_a_refused_chunk("text").await;
    let line = text
        .lines()
        .find(|l| l.contains("refused a request with 415"))
        .unwrap_or_else(|| panic!("{text}"));
    for span_field in ["route=", "protocol=resumable", "upload=", "part=2"] {
        assert!(line.contains(span_field), "{span_field} in {line}");
    }
    assert!(!line.contains("logged.bin"), "no file name: {line}");

    let json = log_of_a_refused_chunk("json").await;
    let refusal = json
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| {
            v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("refused a request with 415"))
        })
        .unwrap_or_else(|| panic!("no JSON refusal line in {json}"));
    let span = &refusal["span"];
    assert_eq!(span["protocol"], "resumable");
    assert_eq!(span["part"], 2);
    assert_eq!(span["upload"].as_str().map(str::len), Some(12));
    assert!(span["route"]
        .as_str()
        .is_some_and(|r| r.contains("/upload")));

    // One access line per request, with the request's span: the accepted and the refused chunk.
    let access: Vec<serde_json::Value> = json
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "stitch::access")
        .collect();
    let statuses: Vec<u64> = access
        .iter()
        .filter_map(|v| v["fields"]["status"].as_u64())
        .collect();
    assert_eq!(statuses, vec![200, 415], "{json}");
    let stored = &access[0];
    assert_eq!(stored["span"]["kind"], "chunk");
    assert_eq!(stored["span"]["part"], 1);
    assert_eq!(stored["span"]["upload"], span["upload"], "the same upload");
    assert_eq!(stored["fields"]["received"], 1000);
    assert!(stored["fields"]["ms"].is_u64());
}
