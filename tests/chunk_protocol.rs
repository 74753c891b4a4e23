//! Resumable.js- and Flow.js-shaped traffic through Stitch: every shape the clients produce ends
//! as ONE multipart request at the upstream with the whole file and the site's own fields.

mod common;

use common::raw::RawConnection;
use common::*;
use futures::future::join_all;

#[tokio::test]
async fn resumable_multipart_upload_reaches_the_upstream_as_one_file_with_custom_fields() {
    let h = Harness::start().await;
    let mut file = ChunkedFile::resumable("Résumé (final) #1.txt", random_bytes(2500, 1), 1000);
    file.extra = vec![
        ("csrf".into(), "tok3n".into()),
        ("folder".into(), "42".into()),
    ];
    h.upstream.answer_with(201, r#"{"id":7}"#);

    let last = file.upload_all(&h).await;

    assert_eq!(last.status(), 201);
    assert_eq!(last.text().await.unwrap(), r#"{"id":7}"#);
    let request = assert_delivered_once(&h, &file);
    assert_eq!(request.field("csrf"), Some("tok3n"));
    assert_eq!(request.field("folder"), Some("42"));
    assert_eq!(
        request.field("resumableIdentifier"),
        None,
        "protocol fields stay out"
    );
    assert_eq!(request.files[0].content_type.as_deref(), Some("text/plain"));
}

#[tokio::test]
async fn flow_multipart_upload_reaches_the_upstream_as_one_file() {
    let h = Harness::start().await;
    let mut file = ChunkedFile::flow("photo.png", random_bytes(5500, 2), 1000);
    file.mime = "image/png".into();
    file.extra = vec![("album".into(), "summer".into())];

    let last = file.upload_all(&h).await;

    assert_eq!(last.status(), 200);
    let request = assert_delivered_once(&h, &file);
    assert_eq!(request.field("album"), Some("summer"));
    assert_eq!(request.files[0].content_type.as_deref(), Some("image/png"));
}

#[tokio::test]
async fn octet_chunks_by_put_work_for_both_clients() {
    let h = Harness::start().await;
    for (client, route) in [(Client::Resumable, "/upload"), (Client::Flow, "/flow")] {
        let data = Content::Bytes(random_bytes(3000, 3));
        let mut file = ChunkedFile::new(client, route, &format!("{client:?}.bin"), data, 1024);
        file.body = Body::Octet;
        file.method = reqwest::Method::PUT;
        let last = file.upload_all(&h).await;
        assert_eq!(last.status(), 200, "{client:?}");
    }
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), 2);
    let expected = Content::Bytes(random_bytes(3000, 3)).sha256();
    assert!(received.iter().all(|r| r.files[0].sha256 == expected));
}

#[tokio::test]
async fn chunks_in_random_order_three_at_a_time_complete_the_file_once() {
    let h = Harness::start().await;
    let file = ChunkedFile::resumable("shuffled.dat", random_bytes(20_000 + 777, 4), 1000);
    let mut order: Vec<u64> = (1..=file.count()).collect();
    // A fixed shuffle: last chunk early, first chunk late.
    order.sort_by_key(|n| (n * 7919) % 23);
    let mut statuses = Vec::new();
    for group in order.chunks(3) {
        let responses = join_all(group.iter().map(|n| file.upload(&h, *n))).await;
        statuses.extend(responses.iter().map(|r| r.status().as_u16()));
    }
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_delivered_once(&h, &file);
}

#[tokio::test]
async fn force_chunk_size_uploads_a_short_last_chunk() {
    let h = Harness::start().await;
    let mut file = ChunkedFile::resumable("forced.txt", random_bytes(2500, 5), 1000);
    file.force_chunk_size = true;
    assert_eq!(file.count(), 3);
    file.upload_all(&h).await;
    assert_delivered_once(&h, &file);
}

#[tokio::test]
async fn a_file_smaller_than_one_chunk_is_one_chunk() {
    let h = Harness::start().await;
    let file = ChunkedFile::flow("tiny.txt", random_bytes(10, 6), 1 << 20);
    assert_eq!(file.upload_all(&h).await.status(), 200);
    assert_delivered_once(&h, &file);
}

#[tokio::test]
async fn flow_uploads_a_zero_byte_file_as_one_empty_chunk() {
    let h = Harness::start().await;
    let file = ChunkedFile::flow("empty.txt", bytes::Bytes::new(), 1 << 20);
    assert_eq!(file.upload_all(&h).await.status(), 200);
    let request = assert_delivered_once(&h, &file);
    assert_eq!(request.files[0].len, 0);
}

#[tokio::test]
async fn test_requests_report_stored_chunks_with_200_and_missing_ones_with_204() {
    let h = Harness::start().await;
    let file = ChunkedFile::resumable("probe.txt", random_bytes(3000, 7), 1000);
    assert_eq!(file.test(&h, 2).await.status(), 204);
    assert_eq!(file.upload(&h, 2).await.status(), 200);
    let stored = file.test(&h, 2).await;
    assert_eq!(stored.status(), 200);
    assert_eq!(
        stored.headers().get("cache-control").unwrap(),
        "no-store",
        "test answers must never be cached"
    );
    assert_eq!(file.test(&h, 1).await.status(), 204);
    assert!(h.upstream.received().is_empty(), "nothing forwarded yet");
}

#[tokio::test]
async fn head_is_treated_like_a_test_get() {
    let h = Harness::start().await;
    let file = ChunkedFile::flow("head.txt", random_bytes(3000, 8), 1000);
    file.upload(&h, 1).await;
    let query = file.query_string(1);
    let stored = h
        .client
        .head(h.url(&format!("/flow?{query}")))
        .send()
        .await
        .unwrap();
    assert_eq!(stored.status(), 200);
    let query = file.query_string(2);
    let missing = h
        .client
        .head(h.url(&format!("/flow?{query}")))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 204);
}

#[tokio::test]
async fn a_file_over_four_gibibytes_keeps_its_64_bit_sizes() {
    let h = Harness::with_routes(
        r#"
routes:
  - path: /upload
    protocol: resumable
    limits: { max_chunk_size: 2GiB }
    forward: { path: /app/upload, field: document }
"#,
    )
    .await;
    let size = (1u64 << 32) + 1000;
    let chunk = 1u64 << 30;
    let data = Content::Stripes {
        size,
        stripe: chunk,
    };
    let file = ChunkedFile::new(Client::Resumable, "/upload", "big.iso", data, chunk);
    assert_eq!(file.count(), 4);
    let last = file.upload_all(&h).await;
    assert_eq!(last.status(), 200);
    assert_delivered_once(&h, &file);
}

#[tokio::test]
async fn a_multipart_request_without_a_file_part_is_a_test() {
    // Flow.js with `testMethod: 'POST'` sends its test as multipart fields without a file.
    let h = Harness::start().await;
    let file = ChunkedFile::flow("posted-test.txt", random_bytes(3000, 9), 1000);
    let post_test = |n: u64| {
        let boundary = "----WebKitFormBoundaryPostTest";
        let mut body = String::new();
        for (name, value) in file.params(n) {
            body.push_str(&format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            ));
        }
        body.push_str(&format!("--{boundary}--\r\n"));
        h.client
            .post(h.url("/flow"))
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(body)
            .send()
    };
    assert_eq!(post_test(1).await.unwrap().status(), 204);
    file.upload(&h, 1).await;
    assert_eq!(post_test(1).await.unwrap().status(), 200);
    assert!(h.upstream.received().is_empty());
}

#[tokio::test]
async fn a_bodiless_post_with_chunk_parameters_is_a_test() {
    // Resumable.js with `testMethod: 'POST'` sends its parameters in the URL and no body.
    let h = Harness::start().await;
    let file = ChunkedFile::resumable("posted.txt", random_bytes(3000, 10), 1000);
    let query = file.query_string(2);
    let url = h.url(&format!("/upload?{query}"));
    assert_eq!(h.client.post(&url).send().await.unwrap().status(), 204);
    file.upload(&h, 2).await;
    assert_eq!(h.client.post(&url).send().await.unwrap().status(), 200);
}

/// Sends a request head with `Expect: 100-continue`; returns the first status and the
/// connection.
async fn first_status_after_expect(
    addr: std::net::SocketAddr,
    target: &str,
    len: usize,
) -> (Option<u16>, RawConnection) {
    let mut connection = RawConnection::open(addr).await;
    let head = format!(
        "PUT {target} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {len}\r\nExpect: 100-continue\r\n\r\n"
    );
    connection.send(head.as_bytes()).await;
    let first = connection
        .response(std::time::Duration::from_secs(20))
        .await;
    (first.map(|r| r.status), connection)
}

#[tokio::test]
async fn expect_continue_is_answered_for_valid_chunks_and_refused_ones_are_not_read() {
    let h = Harness::start().await;
    let mut file = ChunkedFile::resumable("expect.bin", random_bytes(3000, 11), 3000);
    file.body = Body::Octet;
    let addr = h.stitch.as_ref().unwrap().addr;
    let good = format!("/upload?{}", file.query_string(1));
    let bad = good.replace("resumableChunkNumber=1", "resumableChunkNumber=0");
    let data = random_bytes(3000, 11);
    let (refused, _) = first_status_after_expect(addr, &bad, 3000).await;
    let (accepted, mut connection) = first_status_after_expect(addr, &good, 3000).await;
    connection.send(&data).await;
    let last = connection
        .response(std::time::Duration::from_secs(20))
        .await;
    assert_eq!(refused, Some(415));
    assert_eq!(accepted, Some(100));
    assert_eq!(last.map(|r| r.status), Some(200));
    assert_delivered_once(&h, &file);
}

#[tokio::test]
async fn multipart_chunks_by_put_and_patch_work() {
    let h = Harness::start().await;
    for (method, name) in [
        (reqwest::Method::PUT, "put.txt"),
        (reqwest::Method::PATCH, "patch.txt"),
    ] {
        let mut file = ChunkedFile::resumable(name, random_bytes(2500, 12), 1000);
        file.method = method;
        assert_eq!(file.upload_all(&h).await.status(), 200, "{name}");
    }
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].files[0].file_name, "patch.txt");
    assert_eq!(
        received[1].files[0].sha256,
        Content::Bytes(random_bytes(2500, 12)).sha256()
    );
}
