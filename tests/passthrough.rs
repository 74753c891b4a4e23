//! Everything that is not chunk traffic reaches the application unchanged.

mod common;

use common::raw::RawConnection;
use common::*;
use sha2::{Digest, Sha256};

#[tokio::test]
async fn a_get_to_another_path_reaches_the_upstream_unchanged() {
    let h = Harness::start().await;
    h.upstream.answer_with(200, "hello from the app");
    let response = h
        .client
        .get(h.url("/dashboard?tab=files&q=%C3%A9"))
        .header("x-custom", "kept")
        .header("cookie", "sid=1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers().get("x-upstream").unwrap(), "demo-app");
    assert_eq!(response.text().await.unwrap(), "hello from the app");
    let received = h.upstream.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].method, "GET");
    assert_eq!(received[0].target, "/dashboard?tab=files&q=%C3%A9");
    assert_eq!(received[0].header("x-custom"), Some("kept"));
    assert_eq!(received[0].header("cookie"), Some("sid=1"));
    assert_eq!(received[0].header("x-forwarded-for"), Some("127.0.0.1"));
}

#[tokio::test]
async fn the_client_address_is_appended_to_x_forwarded_for() {
    let h = Harness::start().await;
    h.client
        .get(h.url("/page"))
        .header("x-forwarded-for", "203.0.113.5")
        .send()
        .await
        .unwrap();
    let received = h.upstream.received_at("/page");
    assert_eq!(
        received[0].header("x-forwarded-for"),
        Some("203.0.113.5, 127.0.0.1")
    );
}

#[tokio::test]
async fn a_streamed_post_to_another_path_reaches_the_upstream_byte_for_byte() {
    let h = Harness::start().await;
    let body = random_bytes(5 << 20, 40);
    let pieces: Vec<reqwest::Result<bytes::Bytes>> = body
        .chunks(64 << 10)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    let response = h
        .client
        .post(h.url("/api/import"))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(pieces)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let received = h.upstream.received_at("/api/import");
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].body_len, body.len() as u64);
    assert_eq!(received[0].body_sha256, hex::encode(Sha256::digest(&body)));
}

#[tokio::test]
async fn requests_on_an_upload_route_without_chunk_parameters_pass_through() {
    let h = Harness::start().await;
    let page = h.client.get(h.url("/upload")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let form = h
        .client
        .post(h.url("/upload"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("name=value")
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 200);
    assert_eq!(h.upstream.received_at("/upload").len(), 2);
}

#[tokio::test]
async fn one_connection_carries_chunk_answers_and_proxied_answers_alike() {
    let h = Harness::start().await;
    let file = ChunkedFile::resumable("keepalive.txt", random_bytes(3000, 41), 1000);
    let query = file.query_string(1);
    let addr = h.stitch.as_ref().unwrap().addr;
    let mut connection = RawConnection::open(addr).await;
    let mut statuses = Vec::new();
    for path in [
        format!("/upload?{query}"),
        "/elsewhere".to_string(),
        format!("/upload?{query}"),
    ] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        connection.send(request.as_bytes()).await;
        let response = connection
            .response(std::time::Duration::from_secs(20))
            .await;
        statuses.push(response.map_or(0, |r| r.status));
    }
    assert_eq!(statuses, vec![204, 200, 204]);
}

#[tokio::test]
async fn a_plain_form_upload_to_a_resumable_route_reaches_the_application() {
    // The application's own non-JavaScript form keeps working at the same URL.
    let h = Harness::start().await;
    let file = random_bytes(3000, 42);
    let fields = vec![("title".to_string(), "plain form".to_string())];
    let response = h.post_form("/upload", &fields, "form.txt", &file).await;
    assert_eq!(response.status(), 200);
    let received = h.upstream.received_at("/upload");
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].field("title"), Some("plain form"));
    assert_eq!(
        received[0].files[0].sha256,
        hex::encode(Sha256::digest(&file))
    );
}
