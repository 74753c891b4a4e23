//! Bad input gets the status both clients read right (415: both give the file up; 400:
//! the body itself was broken) and never changes what is stored.

mod common;

use common::raw::RawConnection;
use common::*;

/// Sends chunk 2 of a file (chunk 1 already stored) with one parameter changed, and checks the
/// status and that storage did not change.
async fn refused(h: &Harness, file: &ChunkedFile, name: &str, value: &str, expected: u16) {
    let before = h.stored_files();
    let mut params = file.params(2);
    match params.iter_mut().find(|(n, _)| n == name) {
        Some(param) => param.1 = value.to_string(),
        None => params.push((name.to_string(), value.to_string())),
    }
    let response = file.upload_with(h, 2, params.clone()).await;
    assert_eq!(response.status(), expected, "{name}={value:?}");
    let message = response.text().await.unwrap();
    assert!(!message.is_empty(), "the refusal explains itself");
    assert_eq!(
        h.stored_files(),
        before,
        "{name}={value:?} changed stored data"
    );
}

async fn harness_with_first_chunk() -> (Harness, ChunkedFile) {
    let h = Harness::start().await;
    let file = ChunkedFile::resumable("report.pdf", random_bytes(3000, 30), 1000);
    assert_eq!(file.upload(&h, 1).await.status(), 200);
    (h, file)
}

#[tokio::test]
async fn missing_or_non_numeric_parameters_are_refused_with_415() {
    let (h, file) = harness_with_first_chunk().await;
    let before = h.stored_files();
    let params: Vec<_> = file
        .params(2)
        .into_iter()
        .filter(|(n, _)| n != "resumableIdentifier")
        .collect();
    assert_eq!(file.upload_with(&h, 2, params).await.status(), 415);
    assert_eq!(h.stored_files(), before);
    refused(&h, &file, "resumableChunkNumber", "two", 415).await;
    refused(&h, &file, "resumableTotalSize", "-3000", 415).await;
    refused(&h, &file, "resumableChunkSize", "1e3", 415).await;
    refused(&h, &file, "resumableCurrentChunkSize", "", 415).await;
}

#[tokio::test]
async fn chunk_numbers_zero_or_past_the_end_are_refused_with_415() {
    let (h, file) = harness_with_first_chunk().await;
    refused(&h, &file, "resumableChunkNumber", "0", 415).await;
    refused(&h, &file, "resumableChunkNumber", "4", 415).await;
    refused(
        &h,
        &file,
        "resumableChunkNumber",
        "18446744073709551615",
        415,
    )
    .await;
}

#[tokio::test]
async fn a_current_size_that_does_not_match_the_body_is_refused_with_415() {
    let (h, file) = harness_with_first_chunk().await;
    // Declares 1000 bytes (a full middle chunk), carries 999.
    let before = h.stored_files();
    let response = file
        .send_chunk(&h, file.params(2), random_bytes(999, 31))
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
    assert_eq!(h.stored_files(), before);
    let response = file
        .send_chunk(&h, file.params(2), random_bytes(1001, 31))
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
    assert_eq!(h.stored_files(), before);
}

#[tokio::test]
async fn sizes_disagreeing_with_the_first_chunk_are_refused_with_415() {
    let (h, file) = harness_with_first_chunk().await;
    let mut other = file.clone();
    other.data = Content::Bytes(random_bytes(4000, 30));
    refused(&h, &other, "resumableTotalSize", "4000", 415).await;
    let mut params = file.params(2);
    params.retain(|(n, _)| n != "resumableChunkSize" && n != "resumableCurrentChunkSize");
    params.push(("resumableChunkSize".into(), "1500".into()));
    params.push(("resumableCurrentChunkSize".into(), "1500".into()));
    let before = h.stored_files();
    let response = file
        .send_chunk(&h, params, random_bytes(1500, 32))
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
    assert_eq!(h.stored_files(), before);
    refused(&h, &file, "resumableFilename", "other-name.pdf", 415).await;
    refused(&h, &file, "resumableType", "image/png", 415).await;
}

#[tokio::test]
async fn dangerous_identifiers_are_refused_with_415() {
    let (h, file) = harness_with_first_chunk().await;
    refused(&h, &file, "resumableIdentifier", "../../etc/passwd", 415).await;
    refused(&h, &file, "resumableIdentifier", "abc\0def", 415).await;
    refused(
        &h,
        &file,
        "resumableIdentifier",
        &"x".repeat(10 * 1024),
        415,
    )
    .await;
    refused(&h, &file, "resumableIdentifier", "", 415).await;
}

#[tokio::test]
async fn file_names_with_path_separators_are_refused_with_415() {
    // Fresh uploads (nothing pinned), so only the name itself can be the reason.
    let h = Harness::start().await;
    for name in ["../evil.sh", "dir\\evil.sh", "..", "a/b.txt"] {
        let file = ChunkedFile::resumable(name, random_bytes(3000, 35), 1000);
        assert_eq!(file.test(&h, 1).await.status(), 415, "{name}");
        assert_eq!(file.upload(&h, 1).await.status(), 415, "{name}");
    }
    let fine = ChunkedFile::resumable("fine name (1).txt", random_bytes(3000, 35), 1000);
    assert_eq!(fine.upload(&h, 1).await.status(), 200);
    assert_eq!(h.part_count(), 1);
}

#[tokio::test]
async fn a_flood_of_multipart_fields_is_refused_with_415() {
    let h = Harness::start().await;
    let file = ChunkedFile::flow("flood.txt", random_bytes(1000, 36), 1000);
    let mut fields: Vec<(String, String)> = (0..20_000)
        .map(|_| (String::new(), String::new()))
        .collect();
    fields.extend(file.params(1));
    let response = h
        .post_form("/flow", &fields, &file.name, &random_bytes(1000, 36))
        .await;
    assert_eq!(response.status(), 415);
    assert_eq!(h.upload_files(), 0);
}

#[tokio::test]
async fn a_file_over_the_routes_limit_is_refused_with_415() {
    let h = Harness::with_routes(
        r#"
routes:
  - path: /upload
    protocol: resumable
    limits: { max_file_size: 10KiB, max_chunk_size: 4KiB }
    forward: { path: /app/upload, field: document }
"#,
    )
    .await;
    let big = ChunkedFile::resumable("big.bin", random_bytes(20 * 1024, 33), 1024);
    assert_eq!(big.test(&h, 1).await.status(), 415);
    assert_eq!(big.upload(&h, 1).await.status(), 415);
    let fat_chunks = ChunkedFile::resumable("fat.bin", random_bytes(8 * 1024, 34), 8 * 1024);
    assert_eq!(fat_chunks.upload(&h, 1).await.status(), 415);
    assert_eq!(h.upload_files(), 0);
}

/// Writes a raw HTTP/1.1 request and returns the response's status.
async fn raw_exchange(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> Option<u16> {
    let mut connection = RawConnection::open(addr).await;
    connection.send(head.as_bytes()).await;
    connection.send(body).await;
    connection.finish_sending().await;
    let response = connection
        .response(std::time::Duration::from_secs(20))
        .await;
    response.map(|r| r.status)
}

#[tokio::test]
async fn a_truncated_octet_body_is_refused_and_stores_nothing() {
    let (h, mut file) = harness_with_first_chunk().await;
    file.body = Body::Octet;
    let before = h.stored_files();
    let query = file.query_string(2);
    let addr = h.stitch.as_ref().unwrap().addr;
    let head = format!(
        "POST /upload?{query} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: 1000\r\n\r\n"
    );
    let status = raw_exchange(addr, &head, &[7u8; 600]).await;
    assert_eq!(status, Some(400));
    assert_eq!(h.stored_files(), before);
    assert_eq!(file.test(&h, 2).await.status(), 204);
}

#[tokio::test]
async fn a_truncated_multipart_body_is_refused_and_stores_nothing() {
    let (h, file) = harness_with_first_chunk().await;
    let before = h.stored_files();
    let (boundary, head_part, _) = multipart_frame(&file.params(2), "file", &file.name, "x/y");
    let addr = h.stitch.as_ref().unwrap().addr;
    let body = [head_part.to_vec(), vec![9u8; 500]].concat();
    let query = file.query_string(2);
    let head = format!(
        "POST /upload?{query} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n\
         Content-Length: {}\r\n\r\n",
        body.len() + 600
    );
    let status = raw_exchange(addr, &head, &body).await;
    assert_eq!(status, Some(400));
    assert_eq!(h.stored_files(), before);
}

#[tokio::test]
async fn multipart_part_headers_that_never_end_are_refused_without_being_held() {
    let h = Harness::start().await;
    let addr = h.stitch.as_ref().unwrap().addr;
    let mut connection = RawConnection::open(addr).await;
    let total = 8 << 20;
    let head = format!(
        "POST /flow HTTP/1.1\r\nHost: a\r\nContent-Type: multipart/form-data; boundary=BB\r\n\
         Content-Length: {total}\r\n\r\n--BB\r\nContent-Disposition: form-data; name=\"x\""
    );
    assert!(connection.send(head.as_bytes()).await);
    // Header bytes with no end, far more than any part's headers; Stitch gives up early
    // (the sends may fail once it has closed the connection).
    let filler = vec![b'a'; 64 << 10];
    for _ in 0..16 {
        if !connection.send(&filler).await {
            break;
        }
    }
    let answer = connection
        .response(std::time::Duration::from_secs(10))
        .await;
    assert_eq!(answer.map(|r| r.status), Some(400));
    assert_eq!(h.upload_files(), 0);
}

#[tokio::test]
async fn a_multipart_chunk_without_a_boundary_is_refused_with_400_and_stores_nothing() {
    // A multipart body Stitch cannot read is refused, on a Resumable.js route (whose
    // parameters are in the URL: the body must not be taken for the chunk's bytes) and on a
    // Flow.js route (whose parameters are in the body: it must not pass through either).
    let (h, file) = harness_with_first_chunk().await;
    let before = h.stored_files();
    let addr = h.stitch.as_ref().unwrap().addr;
    let (_, head_part, tail) = multipart_frame(&file.params(2), "file", &file.name, "x/y");
    let body = [head_part.to_vec(), vec![9u8; 1000], tail.to_vec()].concat();
    let query = file.query_string(2);
    for (path, content_type) in [
        (format!("/upload?{query}"), "multipart/form-data"),
        (format!("/upload?{query}"), "multipart/mixed; boundary=abc"),
        ("/flow".to_string(), "multipart/form-data"),
        ("/flow".to_string(), "Multipart/Form-Data; charset=utf-8"),
    ] {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        );
        let status = raw_exchange(addr, &head, &body).await;
        assert_eq!(status, Some(400), "{path} with {content_type}");
    }
    assert_eq!(h.stored_files(), before);
    assert!(
        h.upstream.received().is_empty(),
        "nothing passed through or delivered"
    );
    assert_eq!(file.test(&h, 2).await.status(), 204);
}
