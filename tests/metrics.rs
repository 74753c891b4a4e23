//! The operators' listener (`metrics.listen`): Prometheus metrics that count what users did,
//! in an exposition `promtool check metrics` accepts; `/healthz`; `/readyz` that follows the
//! upstream. Never on the public listener. `.ci/setup` installs promtool (Debian's
//! `prometheus` package).

mod common;

use common::*;
use reqwest::Method;
use std::net::SocketAddr;

fn routes(metrics: SocketAddr) -> String {
    routes_with(metrics, "")
}

/// `extra`: more keys for the `metrics:` section, each on its own line indented by two.
fn routes_with(metrics: SocketAddr, extra: &str) -> String {
    format!(
        r#"
metrics:
  listen: {metrics}
{extra}
routes:
  - path: /upload
    protocol: resumable
    forward: {{ path: /app/upload, field: document, retry_pause: 100ms }}
  - path: /files
    protocol: tus
    forward: {{ path: /app/upload, field: document }}
"#
    )
}

async fn scrape(metrics: SocketAddr) -> String {
    let response = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

/// Creates a tus upload of `length` bytes on `/files` and sends `first` as its first PATCH;
/// returns the PATCH's status.
async fn tus_start(h: &Harness, length: u64, metadata: Option<&str>, first: &'static str) -> u16 {
    let mut create = h
        .client
        .post(h.url("/files"))
        .header("tus-resumable", "1.0.0")
        .header("upload-length", length.to_string());
    if let Some(metadata) = metadata {
        create = create.header("upload-metadata", metadata);
    }
    let created = create.send().await.unwrap();
    let location = created.headers().get("location").unwrap().to_str().unwrap();
    h.client
        .request(Method::PATCH, location)
        .header("tus-resumable", "1.0.0")
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", "0")
        .body(first)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// The sum of `stitch_requests_total`'s samples.
fn requests_counted(text: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with("stitch_requests_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn requests_lines(text: &str) -> String {
    let lines = text
        .lines()
        .filter(|line| line.starts_with("stitch_requests_total{"));
    lines.collect::<Vec<_>>().join("\n")
}

/// A scrape taken once `settled` holds of it, or after 5 s. A request is counted as its
/// exchange ends, just after the client has the answer; a delivered upload's parts are removed
/// just after its answer is published.
async fn scrape_when(metrics: SocketAddr, settled: impl Fn(&str) -> bool) -> String {
    let mut text = scrape(metrics).await;
    for _ in 0..100 {
        if settled(&text) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        text = scrape(metrics).await;
    }
    text
}

/// The value of the sample whose name and labels (in the exposition's order) are `series`.
fn sample(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn metrics_count_requests_parts_dedup_and_deliveries_and_pass_promtool() {
    let metrics = free_addr();
    let h = Harness::with_routes(&routes(metrics)).await;
    let data = random_bytes(3000, 5);
    let first = ChunkedFile::resumable("a.bin", data.clone(), 1000);
    first.upload(&h, 1).await;
    first.upload(&h, 2).await;
    // The same bytes under another name while the first is under way: the parts it shares
    // with the first are deduplicated.
    let second = ChunkedFile::resumable("b.bin", data, 1000);
    assert_eq!(second.upload_all(&h).await.status(), 200);
    assert_eq!(first.upload(&h, 3).await.status(), 200);
    assert_eq!(tus_start(&h, 4, None, "tus!").await, 204);
    assert_eq!(
        h.client
            .get(h.url("/elsewhere"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let text = scrape_when(metrics, |text| {
        requests_counted(text) == 12.0 && sample(text, "stitch_stored_bytes") == 0.0
    })
    .await;
    assert_eq!(requests_counted(&text), 12.0, "{}", requests_lines(&text));
    let requests = |route: &str, protocol: &str, kind: &str, status: &str| {
        sample(
            &text,
            &format!(
                r#"stitch_requests_total{{kind="{kind}",protocol="{protocol}",route="{route}",status="{status}"}}"#
            ),
        )
    };
    assert_eq!(requests("/upload", "resumable", "chunk", "2xx"), 6.0);
    assert_eq!(
        requests("/upload", "resumable", "test", "2xx"),
        3.0,
        "tests answer 204"
    );
    assert_eq!(requests("/files", "tus", "create", "2xx"), 1.0);
    assert_eq!(requests("/files", "tus", "patch", "2xx"), 1.0);
    assert_eq!(requests("", "", "pass-through", "2xx"), 1.0);
    assert_eq!(sample(&text, "stitch_parts_stored_total"), 7.0);
    assert_eq!(sample(&text, "stitch_parts_deduplicated_total"), 2.0);
    assert_eq!(sample(&text, "stitch_deduplicated_bytes_total"), 2000.0);
    assert_eq!(
        sample(&text, r#"stitch_uploads_total{event="delivered"}"#),
        3.0
    );
    assert_eq!(
        sample(
            &text,
            r#"stitch_delivery_attempts_total{outcome="delivered"}"#
        ),
        3.0
    );
    assert_eq!(
        sample(&text, r#"stitch_upstream_responses_total{status="2xx"}"#),
        3.0
    );
    assert_eq!(sample(&text, "stitch_delivery_duration_seconds_count"), 3.0);
    let received = sample(
        &text,
        r#"stitch_received_bytes_total{protocol="resumable",route="/upload"}"#,
    );
    assert!(received >= 6000.0, "the chunks' bodies: {received}");
    assert_eq!(sample(&text, "stitch_uploads_in_progress"), 0.0);
    assert_eq!(sample(&text, "stitch_stored_bytes"), 0.0);
    assert!(text.contains("process_resident_memory_bytes"));
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            !line.contains("a.bin") && !line.contains("127.0.0.1"),
            "{line}"
        );
    }

    let unpacked =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/promtool/usr/bin/promtool");
    let program = if unpacked.exists() {
        unpacked
    } else {
        "promtool".into()
    };
    let promtool = std::process::Command::new(program)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut promtool = promtool.expect(
        "promtool checks the exposition: run .ci/setup (Debian's `prometheus` package has it)",
    );
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // Not on the public listener: there, /metrics is the application's.
    h.client.get(h.url("/metrics")).send().await.unwrap();
    assert_eq!(h.upstream.received_at("/metrics").len(), 1);

    // A refused request, an upstream failure then a retry from the queue, an upload left
    // half-way: each shows in the counters and gauges, exactly.
    let refused = h
        .client
        .get(h.url("/upload?resumableChunkNumber=none"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 415);
    h.upstream.answer_with(503, "busy");
    let failing = ChunkedFile::resumable("c.bin", random_bytes(2000, 9), 1000);
    assert_eq!(failing.upload(&h, 1).await.status(), 200);
    assert_ne!(failing.upload(&h, 2).await.status(), 200);
    h.upstream.answer_with(200, "stored at last");
    wait_for_requests(&h, "/app/upload", 5, std::time::Duration::from_secs(20)).await;
    let half = ChunkedFile::resumable("d.bin", random_bytes(3000, 10), 1000);
    assert_eq!(half.upload(&h, 1).await.status(), 200);
    let mut text = scrape_when(metrics, |text| {
        requests_counted(text) == 17.0 && sample(text, "stitch_stored_bytes") == 1000.0
    })
    .await;
    assert_eq!(requests_counted(&text), 17.0, "{}", requests_lines(&text));
    // The queue records its answer just after the upstream gave it.
    for _ in 0..100 {
        if sample(
            &text,
            r#"stitch_delivery_attempts_total{outcome="delivered"}"#,
        ) == 4.0
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        text = scrape(metrics).await;
    }
    let requests = |kind: &str, status: &str| {
        sample(
            &text,
            &format!(
                r#"stitch_requests_total{{kind="{kind}",protocol="resumable",route="/upload",status="{status}"}}"#
            ),
        )
    };
    assert_eq!(requests("test", "4xx"), 1.0, "the refused test");
    assert_eq!(
        requests("chunk", "5xx"),
        1.0,
        "the chunk whose delivery failed"
    );
    assert_eq!(requests("chunk", "2xx"), 8.0);
    let attempts = |outcome: &str| {
        sample(
            &text,
            &format!(r#"stitch_delivery_attempts_total{{outcome="{outcome}"}}"#),
        )
    };
    assert_eq!(attempts("retry-later"), 1.0);
    assert_eq!(attempts("delivered"), 4.0);
    assert_eq!(
        sample(&text, r#"stitch_upstream_responses_total{status="5xx"}"#),
        1.0
    );
    assert_eq!(
        sample(&text, r#"stitch_upstream_responses_total{status="2xx"}"#),
        4.0
    );
    assert_eq!(
        sample(&text, r#"stitch_uploads_total{event="delivered"}"#),
        4.0
    );
    assert_eq!(sample(&text, "stitch_delivery_queue_length"), 0.0);
    assert_eq!(sample(&text, "stitch_uploads_in_progress"), 1.0, "d.bin");
    assert_eq!(
        sample(&text, "stitch_stored_bytes"),
        1000.0,
        "d.bin's first chunk"
    );
}

async fn list(metrics: SocketAddr, token: Option<&str>) -> reqwest::Response {
    let request = reqwest::Client::new().get(format!("http://{metrics}/uploads"));
    match token {
        Some(token) => request.bearer_auth(token),
        None => request,
    }
    .send()
    .await
    .unwrap()
}

#[tokio::test]
async fn the_listing_shows_uploads_in_progress_byte_exact_and_wants_its_token() {
    let metrics = free_addr();
    let token = "listing-token-for-this-test";
    let h = Harness::with_routes(&routes_with(metrics, &format!("  token: {token}"))).await;
    let chunked = ChunkedFile::resumable("private-name.bin", random_bytes(2500, 11), 1000);
    assert_eq!(chunked.upload(&h, 1).await.status(), 200);
    assert_eq!(chunked.upload(&h, 3).await.status(), 200);
    let metadata = Some("filename cHJpdmF0ZS50eHQ=");
    assert_eq!(tus_start(&h, 10, metadata, "four").await, 204);

    for wrong in [
        None,
        Some("not-the-token"),
        Some("listing-token-for-this-tesT"),
    ] {
        let refused = list(metrics, wrong).await;
        assert_eq!(refused.status(), 401, "{wrong:?}");
        assert!(refused.headers().contains_key("www-authenticate"));
    }
    let listed = list(metrics, Some(token)).await;
    assert_eq!(listed.status(), 200);
    let body: serde_json::Value = serde_json::from_slice(&listed.bytes().await.unwrap()).unwrap();
    let uploads = body["uploads"].as_array().unwrap();
    assert_eq!(uploads.len(), 2, "{body}");
    let by_protocol = |protocol: &str| {
        uploads
            .iter()
            .find(|u| u["protocol"] == protocol)
            .unwrap_or_else(|| panic!("no {protocol} upload in {body}"))
    };
    let resumable = by_protocol("resumable");
    assert_eq!(resumable["route"], "/upload");
    assert_eq!(resumable["declared_bytes"], 2500);
    assert_eq!(
        resumable["stored_bytes"], 1500,
        "parts 1 and 3: {resumable}"
    );
    assert_eq!(resumable["parts"], 2);
    assert_eq!(resumable["delivery"], "receiving");
    assert_eq!(resumable["attempts"], 0);
    let tus = by_protocol("tus");
    assert_eq!(tus["route"], "/files");
    assert_eq!(tus["declared_bytes"], 10);
    assert_eq!(tus["stored_bytes"], 4);
    assert_eq!(tus["delivery"], "receiving");
    assert_eq!(body["stored_bytes"], 1504);
    let text = body.to_string();
    assert!(
        !text.contains("private") && !text.contains("127.0.0.1"),
        "no file names or addresses unless asked: {text}"
    );
    // Metrics and health need no token.
    assert_eq!(
        reqwest::get(format!("http://{metrics}/metrics"))
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn the_listing_shows_file_names_when_the_operator_asks() {
    let metrics = free_addr();
    let h = Harness::with_routes(&routes_with(metrics, "  file_names: true")).await;
    let chunked = ChunkedFile::resumable("quarterly report.pdf", random_bytes(2000, 12), 1000);
    assert_eq!(chunked.upload(&h, 2).await.status(), 200);
    let listed = list(metrics, None).await;
    assert_eq!(listed.status(), 200, "no token configured: open");
    let body: serde_json::Value = serde_json::from_slice(&listed.bytes().await.unwrap()).unwrap();
    assert_eq!(body["uploads"][0]["file_name"], "quarterly report.pdf");
    assert_eq!(body["uploads"][0]["stored_bytes"], 1000);
}

#[tokio::test]
async fn readiness_follows_the_upstream_and_health_the_process() {
    let metrics = free_addr();
    let h = Harness::with_routes(&routes(metrics)).await;
    let get = |path: &'static str| reqwest::get(format!("http://{metrics}{path}"));
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    h.upstream.go_down();
    let unready = get("/readyz").await.unwrap();
    assert_eq!(unready.status(), 503);
    assert!(unready.text().await.unwrap().contains("upstream"));
    assert_eq!(
        get("/healthz").await.unwrap().status(),
        200,
        "the process still serves"
    );
    h.upstream.resume().await;
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
}

#[tokio::test]
async fn early_deliveries_are_counted_by_how_their_stream_ended() {
    let metrics = free_addr();
    let yaml = format!(
        r#"
metrics:
  listen: {metrics}
routes:
  - path: /upload
    protocol: resumable
    forward: {{ path: /app/upload, field: document, early: {{ stall: 300ms }} }}
"#
    );
    let h = Harness::with_routes(&yaml).await;
    // One upload whose stream the delivery finishes.
    let used = ChunkedFile::resumable("used.bin", random_bytes(3000, 6), 1000);
    assert_eq!(used.upload_all(&h).await.status(), 200);
    // One whose client pauses past the stall time: cut off, then delivered once complete.
    let paused = ChunkedFile::resumable("paused.bin", random_bytes(3000, 7), 1000);
    assert_eq!(paused.upload(&h, 1).await.status(), 200);
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    for n in 2..=3 {
        assert_eq!(paused.upload(&h, n).await.status(), 200);
    }
    // One whose last chunk carries another application field: the stream begun early is not
    // the delivery's request, which sends the file anew.
    let changed = ChunkedFile::resumable("changed.bin", random_bytes(3000, 8), 1000);
    for n in 1..=2 {
        assert_eq!(changed.upload(&h, n).await.status(), 200);
    }
    let mut params = changed.params(3);
    params.push(("folder".into(), "other".into()));
    assert_eq!(changed.upload_with(&h, 3, params).await.status(), 200);
    let whole = h
        .upstream
        .received_at("/app/upload")
        .into_iter()
        .filter(Received::whole)
        .count();
    assert_eq!(whole, 3, "each file delivered once");
    // A stream is counted as its task ends, just after the answer it carried went out.
    let series = |outcome: &str| format!(r#"stitch_early_deliveries_total{{outcome="{outcome}"}}"#);
    let text = scrape_when(metrics, |text| {
        ["used", "stalled", "discarded"]
            .iter()
            .all(|outcome| text.contains(&series(outcome)))
    })
    .await;
    let early = |outcome: &str| sample(&text, &series(outcome));
    assert_eq!(early("used"), 1.0);
    assert_eq!(early("stalled"), 1.0);
    assert_eq!(early("discarded"), 1.0);
}

#[tokio::test]
async fn the_listing_shows_a_delivered_upload_while_its_answer_is_kept() {
    let metrics = free_addr();
    let h = Harness::with_routes(&routes_with(metrics, "")).await;
    let chunked = ChunkedFile::resumable("done.bin", random_bytes(2500, 12), 1000);
    for n in 1..=chunked.count() {
        assert_eq!(chunked.upload(&h, n).await.status(), 200, "chunk {n}");
    }
    assert_eq!(h.upstream.received_at("/app/upload").len(), 1, "delivered");
    // (Its parts are removed just after the answer is given: counting them waits for that.)
    assert_eq!(h.part_count(), 0);
    let listed = list(metrics, None).await;
    assert_eq!(listed.status(), 200);
    let body: serde_json::Value = serde_json::from_slice(&listed.bytes().await.unwrap()).unwrap();
    let uploads = body["uploads"].as_array().unwrap();
    assert_eq!(uploads.len(), 1, "{body}");
    let done = &uploads[0];
    assert_eq!(done["delivery"], "delivered", "{body}");
    assert_eq!(done["route"], "/upload");
    assert_eq!(done["declared_bytes"], 2500);
    assert_eq!(
        done["stored_bytes"], 0,
        "its parts went once the answer was recorded"
    );
    // Not counted as in progress.
    let text = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(sample(&text, "stitch_uploads_in_progress"), 0.0);
}

#[tokio::test]
async fn the_operators_listener_cuts_a_trickled_header_and_limits_connections_per_client() {
    // Meant for a private network, but a client gone wrong there cannot hold it: a header
    // trickled a byte at a time is cut at `connections.header_timeout`, and one address holds
    // at most 32 connections (more get 503) while a scrape from a freed slot works.
    use common::raw::RawConnection;
    use std::time::Duration;
    let metrics = free_addr();
    let config = format!("connections:\n  header_timeout: 2s\n{}", routes(metrics));
    let _h = Harness::with_routes(&config).await;

    let mut slow = RawConnection::open(metrics).await;
    let cut = slow
        .trickle_header_until_cut(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
        .await
        .expect("the trickling client was never cut");
    assert!(cut < Duration::from_secs(10), "cut after {cut:?}");

    // 32 connections that have each had an answer and stay open (within the idle timeout).
    let mut held = Vec::new();
    for _ in 0..32 {
        held.push(RawConnection::served(metrics, "/healthz").await);
    }
    let mut over = RawConnection::open(metrics).await;
    assert!(over.send(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n").await);
    let refused = over.response(Duration::from_secs(10)).await;
    assert_eq!(refused.map(|r| r.status), Some(503), "the 33rd connection");
    held.pop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        scrape(metrics).await.contains("stitch_"),
        "a freed slot serves"
    );
}
