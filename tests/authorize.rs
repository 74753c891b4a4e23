//! The authorization hook (`authorize:` on a route, every protocol): before a new upload
//! stores its first byte, the application is asked (a JSON POST with the client's
//! credentials); only a 2xx lets the upload start. A refusal reaches the client in its
//! protocol's terms and nothing is stored.

mod common;

use common::*;
use reqwest::Method;

const ROUTES: &str = r#"
routes:
  - path: /files
    protocol: tus
    authorize: { path: /app/may-upload }
    forward: { path: /app/upload, field: document }
  - path: /upload
    protocol: resumable
    authorize: { path: /app/may-upload, timeout: 2s }
    forward: { path: /app/upload, field: document }
"#;

fn question(request: &Received) -> serde_json::Value {
    assert_eq!(request.method, "POST");
    assert_eq!(request.header("content-type"), Some("application/json"));
    serde_json::from_str(request.text.as_deref().expect("a JSON body")).expect("JSON")
}

fn create(h: &Harness, user: &str) -> reqwest::RequestBuilder {
    h.client
        .request(Method::POST, h.url("/files"))
        .header("tus-resumable", "1.0.0")
        .header("authorization", format!("Bearer {user}"))
        .header("upload-length", "5")
        .header(
            "upload-metadata",
            "filename cmVwb3J0LnBkZg==,folder aW5ib3g=",
        )
}

#[tokio::test]
async fn a_tus_creation_is_refused_or_allowed_by_the_application() {
    let h = Harness::with_routes(ROUTES).await;
    h.upstream.require_authorization("Bearer alice");
    h.upstream.answer_with(201, "stored");

    let refused = create(&h, "bob").send().await.unwrap();
    assert_eq!(refused.status(), 401, "the application's answer");
    assert_eq!(refused.headers().get("tus-resumable").unwrap(), "1.0.0");
    assert!(refused.headers().get("location").is_none());
    assert_eq!((h.upload_files(), h.blob_count()), (0, 0), "nothing stored");
    let asked = h.upstream.received_at("/app/may-upload");
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].header("authorization"), Some("Bearer bob"));
    let q = question(&asked[0]);
    assert_eq!(q["protocol"], "tus");
    assert_eq!(q["name"], "report.pdf");
    assert_eq!(q["size"], 5);
    assert_eq!(q["metadata"]["folder"], "inbox");

    let allowed = create(&h, "alice").send().await.unwrap();
    assert_eq!(allowed.status(), 201);
    let location = allowed.headers().get("location").unwrap().to_str().unwrap();
    let done = h
        .client
        .patch(location)
        .header("tus-resumable", "1.0.0")
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", "0")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 204);
    assert_eq!(
        h.upstream.received_at("/app/may-upload").len(),
        2,
        "asked once per upload"
    );
    let delivered = h.upstream.received_at("/app/upload");
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].files[0].len, 5);
}

#[tokio::test]
async fn a_chunk_upload_is_asked_about_once_and_a_final_refusal_stops_the_client() {
    let h = Harness::with_routes(ROUTES).await;
    h.upstream.answer_with(422, "no PDFs here");
    let file = ChunkedFile::resumable("a.pdf", random_bytes(3000, 9), 1000);
    for n in [1, 1, 2] {
        let refused = file.upload(&h, n).await;
        assert_eq!(refused.status(), 415, "final for Resumable.js and Flow.js");
        assert_eq!(refused.text().await.unwrap(), "no PDFs here");
    }
    assert_eq!(
        h.upstream.received_at("/app/may-upload").len(),
        1,
        "kept for the upload"
    );
    assert_eq!((h.upload_files(), h.blob_count()), (0, 0), "nothing stored");
    let q = question(&h.upstream.received_at("/app/may-upload")[0]);
    assert_eq!(q["protocol"], "resumable");
    assert_eq!(
        (q["name"].as_str(), q["size"].as_u64()),
        (Some("a.pdf"), Some(3000))
    );

    // Another file is asked about on its own; allowed, it is stored and delivered once.
    h.upstream.answer_with(200, "{}");
    let other = ChunkedFile::resumable("b.txt", random_bytes(2000, 10), 1000);
    assert_eq!(other.upload_all(&h).await.status(), 200);
    assert_eq!(
        h.upstream.received_at("/app/may-upload").len(),
        2,
        "once for b.txt"
    );
    assert_delivered_once(&h, &other);
}

#[tokio::test]
async fn an_unreachable_hook_is_a_retryable_503_and_stores_nothing() {
    let h = Harness::with_routes(ROUTES).await;
    h.upstream.go_down();
    let tus = create(&h, "alice").send().await.unwrap();
    assert_eq!(tus.status(), 503);
    let file = ChunkedFile::resumable("c.bin", random_bytes(1000, 11), 1000);
    assert_eq!(file.upload(&h, 1).await.status(), 503);
    assert_eq!((h.upload_files(), h.blob_count()), (0, 0));
    h.upstream.resume().await;
    assert_eq!(
        file.upload(&h, 1).await.status(),
        200,
        "asked again: allowed"
    );
    assert_eq!(h.upstream.received_at("/app/may-upload").len(), 1);
}

#[tokio::test]
async fn refusals_kept_for_retries_take_bounded_memory_and_past_it_the_hook_is_asked_again() {
    // Whoever the hook refuses picks identifiers freely: each refusal kept (an HTML login
    // page, here 1 MiB) would hold memory for minutes. Refusals are kept up to 16 MiB in
    // all; past that, a retry asks the hook again instead.
    let h = Harness::with_routes(ROUTES).await;
    let page = "<p>please log in</p>".repeat(1 << 20 >> 4);
    h.upstream.answer_with(422, &page);
    let files: Vec<ChunkedFile> = (0..20)
        .map(|n| ChunkedFile::resumable(&format!("f{n}.bin"), random_bytes(1000, n), 1000))
        .collect();
    for file in &files {
        let refused = file.upload(&h, 1).await;
        assert_eq!(refused.status(), 415);
        assert_eq!(
            refused.text().await.unwrap().len(),
            page.len(),
            "relayed whole"
        );
    }
    let asked = || h.upstream.received_at("/app/may-upload").len();
    assert_eq!(asked(), 20);
    assert_eq!(files[0].upload(&h, 1).await.status(), 415);
    assert_eq!(asked(), 20, "the first refusals are kept");
    let last = files[19].upload(&h, 1).await;
    assert_eq!(last.status(), 415);
    assert_eq!(last.text().await.unwrap().len(), page.len());
    assert_eq!(asked(), 21, "past 16 MiB, not kept: asked again");
    assert_eq!((h.upload_files(), h.blob_count()), (0, 0), "nothing stored");
}

#[tokio::test]
async fn chunks_sent_in_parallel_for_a_new_upload_ask_the_hook_once() {
    // Resumable.js and Flow.js send the first chunks of a file at once (three by default):
    // they share one question to the hook, and its answer, whatever it is.
    let h = Harness::with_routes(ROUTES).await;
    h.upstream
        .delay_answers(std::time::Duration::from_millis(300));
    h.upstream.answer_with(403, "not yours");
    let refused = ChunkedFile::resumable("r.bin", random_bytes(3000, 12), 1000);
    let statuses = futures::future::join_all((1..=3).map(|n| refused.upload(&h, n))).await;
    for response in statuses {
        assert_eq!(response.status(), 403);
    }
    assert_eq!(
        h.upstream.received_at("/app/may-upload").len(),
        1,
        "a refusal"
    );

    h.upstream.answer_with(200, "{}");
    let allowed = ChunkedFile::resumable("a.bin", random_bytes(3000, 13), 1000);
    let statuses = futures::future::join_all((1..=3).map(|n| allowed.upload(&h, n))).await;
    let mut statuses: Vec<u16> = statuses.iter().map(|r| r.status().as_u16()).collect();
    statuses.sort();
    assert_eq!(statuses, [200, 200, 200]);
    assert_eq!(
        h.upstream.received_at("/app/may-upload").len(),
        2,
        "an allowance"
    );
    assert_delivered_once(&h, &allowed);

    // A hook that cannot be reached: every parallel chunk is told to retry (503), and the
    // retry asks again (a failure to ask is not kept).
    h.upstream.go_down();
    let down = ChunkedFile::resumable("d.bin", random_bytes(3000, 14), 1000);
    let statuses = futures::future::join_all((1..=3).map(|n| down.upload(&h, n))).await;
    for response in statuses {
        assert_eq!(response.status(), 503);
    }
    h.upstream.resume().await;
    assert_eq!(down.upload_all(&h).await.status(), 200);
    assert_eq!(h.upstream.received_at("/app/may-upload").len(), 3);
}

#[tokio::test]
async fn a_refused_multipart_chunk_is_read_to_its_end_and_the_connection_serves_on() {
    // The client sees the refusal (not a reset while it still sends), and its kept-alive
    // connection carries the next request.
    use common::raw::RawConnection;
    let h = Harness::with_routes(ROUTES).await;
    h.upstream.answer_with(403, "not yours");
    // A chunk larger than what is read before the hook is asked, and smaller than the most
    // Stitch reads of a refused multipart body to keep the connection (256 KiB; past that it
    // answers and closes).
    let file = ChunkedFile::resumable("m.bin", random_bytes(256 << 10, 15), 128 << 10);
    let (boundary, head, tail) = multipart_frame(&file.params(1), "file", &file.name, "x/y");
    let body = [head.to_vec(), vec![5u8; 128 << 10], tail.to_vec()].concat();
    let addr = h.stitch.as_ref().unwrap().addr;
    let mut connection = RawConnection::open(addr).await;
    let request = format!(
        "POST /upload?{} HTTP/1.1\r\nHost: a\r\nContent-Type: multipart/form-data; \
         boundary={boundary}\r\nContent-Length: {}\r\n\r\n",
        file.query_string(1),
        body.len()
    );
    assert!(connection.send(request.as_bytes()).await);
    assert!(connection.send(&body).await);
    let refused = connection
        .response(std::time::Duration::from_secs(10))
        .await;
    assert_eq!(refused.map(|r| r.status), Some(403));
    h.upstream.answer_with(200, "page");
    assert!(
        connection
            .send(b"GET /elsewhere HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
    );
    let next = connection
        .response(std::time::Duration::from_secs(10))
        .await;
    assert_eq!(
        next.map(|r| r.status),
        Some(200),
        "the same connection serves on"
    );
    assert_eq!((h.upload_files(), h.blob_count()), (0, 0), "nothing stored");
}
