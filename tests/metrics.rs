//! The operators' listener (`metrics.listen`): Prometheus metrics that count what users did,
//! in an exposition `promtool check metrics` accepts; `/healthz`; `/readyz` that follows the
//! upstream. Never on the public listener. `.ci/setup` installs promtool (Debian's
//! `prometheus` package).

mod common;

use common::*;
use reqwest::Method;
use std::net::SocketAddr;

fn routes(metrics: SocketAddr) -> String {
    format!(
        r#"
metrics:
  listen: {metrics}
routes:
  - path: /upload
    protocol: resumable
    forward: {{ path: /app/upload, field: document }}
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
    let created = h
        .client
        .post(h.url("/files"))
        .header("tus-resumable", "1.0.0")
        .header("upload-length", "4")
        .send()
        .await
        .unwrap();
    let location = created.headers().get("location").unwrap().to_str().unwrap();
    let patched = h
        .client
        .request(Method::PATCH, location)
        .header("tus-resumable", "1.0.0")
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", "0")
        .body("tus!")
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 204);
    assert_eq!(
        h.client
            .get(h.url("/elsewhere"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let text = scrape(metrics).await;
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
