//! Early delivery (`forward.early`): the file goes to the application while it still arrives,
//! and the application still gets it exactly once, whole; a stream whose client stalls is cut
//! off and the file delivered whole once complete.

mod common;

use bytes::Bytes;
use common::tus::{header, location_of, patch, tus};
use common::*;
use futures::SinkExt;
use reqwest::Method;
use std::time::Duration;

const EARLY_ROUTES: &str = r#"
routes:
  - path: /files
    protocol: tus
    forward: { path: /app/upload, field: document, early: { stall: 2s } }
  - path: /upload
    protocol: resumable
    forward: { path: /app/upload, field: document, early: true }
"#;

/// The same routes with a short stall, for the tests that stall.
const STALLING_ROUTES: &str = r#"
routes:
  - path: /files
    protocol: tus
    forward: { path: /app/upload, field: document, early: { stall: 300ms } }
"#;

/// Creates a tus upload of `length` bytes named `name`; returns its path.
async fn create(h: &Harness, length: u64, name: &str) -> String {
    use base64::Engine;
    let name = base64::engine::general_purpose::STANDARD.encode(name);
    let response = tus(h, Method::POST, "/files")
        .header("upload-length", length.to_string())
        .header("upload-metadata", format!("filename {name}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "creation");
    location_of(h, &response)
}

/// Waits until `ready` holds, for at most `within`.
async fn until(within: Duration, what: &str, ready: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !ready() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {within:?} for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The requests the application got whole.
fn whole(h: &Harness) -> Vec<Received> {
    h.upstream
        .received_at("/app/upload")
        .into_iter()
        .filter(Received::whole)
        .collect()
}

#[tokio::test]
async fn tus_parts_reach_the_application_while_the_upload_arrives_and_the_file_once() {
    let h = Harness::with_routes(EARLY_ROUTES).await;
    let data = random_bytes(3 << 20, 71);
    let file = ChunkedFile::resumable("early.bin", data.clone(), 1 << 20);
    let location = create(&h, data.len() as u64, "early.bin").await;
    for n in 0..2u64 {
        let piece = data.slice((n << 20) as usize..((n + 1) << 20) as usize);
        assert_eq!(patch(&h, &location, n << 20, piece).await.status(), 204);
    }
    // The first two MiB are at the application before the last byte is sent.
    until(Duration::from_secs(10), "the first parts upstream", || {
        h.upstream.body_bytes() >= 2 << 20
    })
    .await;
    assert_eq!(h.upstream.heads(), 1, "one request, begun early");
    assert!(
        h.upstream.received_at("/app/upload").is_empty(),
        "the request is not whole before the upload is"
    );
    let last = patch(&h, &location, 2 << 20, data.slice(2 << 20..)).await;
    assert_eq!(last.status(), 204);
    assert_eq!(header(&last, "upload-offset"), Some("3145728"));
    assert_eq!(header(&last, "stitch-delivery"), Some("delivered"));
    assert_eq!(header(&last, "stitch-upstream-status"), Some("200"));
    let received = assert_delivered_once(&h, &file);
    assert!(received.whole());
    assert_eq!(h.upstream.heads(), 1, "the early request was the delivery");
    // The upload is finished: its parts are gone.
    assert_eq!(h.blob_count(), 0);
}

#[tokio::test]
async fn a_single_patch_is_sent_on_in_pieces_while_it_arrives() {
    let h = Harness::with_routes(EARLY_ROUTES).await;
    let data = random_bytes(72 << 20, 72);
    let file = ChunkedFile::resumable("one-patch.bin", data.clone(), 72 << 20);
    let location = create(&h, data.len() as u64, "one-patch.bin").await;
    // The body comes in two halves; the second only once the application has bytes of the
    // first: a PATCH kept whole before it is sent on would never let that happen.
    let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(rx);
    let sending = {
        let request = tus(&h, Method::PATCH, &location)
            .header("content-type", "application/offset+octet-stream")
            .header("upload-offset", "0")
            .header("content-length", data.len().to_string())
            .body(body);
        tokio::spawn(async move { request.send().await.unwrap() })
    };
    let half = 40 << 20;
    for piece in data.slice(..half).chunks(1 << 20) {
        tx.send(Ok(Bytes::copy_from_slice(piece))).await.unwrap();
    }
    until(Duration::from_secs(30), "the first piece upstream", || {
        h.upstream.body_bytes() >= 32 << 20
    })
    .await;
    assert!(h.upstream.received_at("/app/upload").is_empty());
    for piece in data.slice(half..).chunks(1 << 20) {
        tx.send(Ok(Bytes::copy_from_slice(piece))).await.unwrap();
    }
    drop(tx);
    let answer = sending.await.unwrap();
    assert_eq!(answer.status(), 204);
    assert_eq!(header(&answer, "stitch-delivery"), Some("delivered"));
    assert_delivered_once(&h, &file);
    assert_eq!(h.upstream.heads(), 1);
}

#[tokio::test]
async fn a_stalled_early_delivery_is_cut_off_and_the_file_delivered_whole_once_complete() {
    let h = Harness::with_routes(STALLING_ROUTES).await;
    let data = random_bytes(2 << 20, 73);
    let file = ChunkedFile::resumable("paused.bin", data.clone(), 1 << 20);
    let location = create(&h, data.len() as u64, "paused.bin").await;
    assert_eq!(
        patch(&h, &location, 0, data.slice(..1 << 20))
            .await
            .status(),
        204
    );
    // The client pauses longer than the stall time: the application sees a request that
    // broke off, never a whole one.
    until(Duration::from_secs(10), "the cut request upstream", || {
        !h.upstream.received_at("/app/upload").is_empty()
    })
    .await;
    let cut = h.upstream.received_at("/app/upload");
    assert_eq!(cut.len(), 1);
    assert!(!cut[0].whole(), "the cut request is not whole");
    assert!(
        cut[0].files.iter().all(|f| f.len < data.len() as u64),
        "and holds no whole file"
    );
    let last = patch(&h, &location, 1 << 20, data.slice(1 << 20..)).await;
    assert_eq!(last.status(), 204);
    assert_eq!(header(&last, "stitch-delivery"), Some("delivered"));
    let whole = whole(&h);
    assert_eq!(whole.len(), 1, "delivered once");
    assert_eq!(whole[0].files[0].sha256, file.sha256());
    assert_eq!(whole[0].files[0].len, data.len() as u64);
    // Not streamed again after the cut: the one whole request came when the upload was
    // complete.
    assert_eq!(h.upstream.heads(), 2);
}

#[tokio::test]
async fn a_terminated_upload_s_early_delivery_is_cut_at_once_not_after_the_stall_time() {
    // The application's request for an upload the client terminated holds one of its
    // connections (and one of the route's streams) for nothing: it ends with the upload.
    let routes = r#"
routes:
  - path: /files
    protocol: tus
    forward: { path: /app/upload, field: document, early: { stall: 30s } }
"#;
    let h = Harness::with_routes(routes).await;
    let data = random_bytes(2 << 20, 74);
    let location = create(&h, data.len() as u64, "dropped.bin").await;
    let first = patch(&h, &location, 0, data.slice(..1 << 20)).await;
    assert_eq!(first.status(), 204);
    until(Duration::from_secs(10), "the first part upstream", || {
        h.upstream.body_bytes() >= 1 << 20
    })
    .await;
    let deleted = tus(&h, Method::DELETE, &location).send().await.unwrap();
    assert_eq!(deleted.status(), 204);
    until(Duration::from_secs(5), "the early request cut", || {
        !h.upstream.received_at("/app/upload").is_empty()
    })
    .await;
    let cut = h.upstream.received_at("/app/upload");
    assert_eq!(cut.len(), 1);
    assert!(
        !cut[0].whole(),
        "it broke off: no file reached the application"
    );
    let gone = tus(&h, Method::HEAD, &location).send().await.unwrap();
    assert_eq!(gone.status(), 410);
}

#[tokio::test]
async fn resumable_chunks_reach_the_application_while_the_upload_arrives() {
    let h = Harness::with_routes(EARLY_ROUTES).await;
    let file = ChunkedFile::resumable("chunks.bin", random_bytes(3 << 20, 74), 1 << 20);
    for n in 1..=2 {
        assert_eq!(file.upload(&h, n).await.status(), 200);
    }
    until(Duration::from_secs(10), "the first chunks upstream", || {
        h.upstream.body_bytes() >= 2 << 20
    })
    .await;
    assert!(h.upstream.received_at("/app/upload").is_empty());
    let last = file.upload(&h, 3).await;
    assert_eq!(last.status(), 200);
    assert_eq!(last.text().await.unwrap(), r#"{"stored":true}"#);
    assert_delivered_once(&h, &file);
    assert_eq!(h.upstream.heads(), 1);
}

#[tokio::test]
async fn an_application_that_refuses_while_the_file_arrives_is_asked_again_once_complete() {
    let h = Harness::with_routes(EARLY_ROUTES).await;
    // It answers 413 at once, without reading: the early stream breaks off.
    h.upstream.refuse_early(413, "too big for us");
    let data = random_bytes(2 << 20, 75);
    let location = create(&h, data.len() as u64, "refused.bin").await;
    assert_eq!(
        patch(&h, &location, 0, data.slice(..1 << 20))
            .await
            .status(),
        204
    );
    until(
        Duration::from_secs(10),
        "the early request upstream",
        || h.upstream.heads() >= 1,
    )
    .await;
    let last = patch(&h, &location, 1 << 20, data.slice(1 << 20..)).await;
    // The application's refusal, relayed as a tus server refuses.
    assert_eq!(last.status(), 413);
    assert_eq!(header(&last, "upload-offset"), Some("2097152"));
    assert_eq!(header(&last, "stitch-upstream-status"), Some("413"));
    assert_eq!(last.text().await.unwrap(), "too big for us");
    // Its refusal of the request begun early broke that request off; the completed upload
    // was sent again and refused again: two requests, none whole.
    assert_eq!(h.upstream.heads(), 2);
    assert!(whole(&h).is_empty());
    // The answer is recorded: GET on the upload gives it.
    let answer = tus(&h, Method::GET, &location).send().await.unwrap();
    assert_eq!(answer.status(), 413);
    assert_eq!(answer.text().await.unwrap(), "too big for us");
}
