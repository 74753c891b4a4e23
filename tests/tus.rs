//! tus 1.0.0 at the HTTP level: every rule of the core protocol and of each extension Stitch
//! announces, each error status, that a refused request changes nothing stored, and that the
//! finished file reaches the application once, as an ordinary multipart upload.

mod common;

use base64::Engine;
use bytes::Bytes;
use common::raw::RawConnection;
use common::tus::{header, location_of, patch, tus};
use common::*;
use reqwest::{Method, Response};
use sha2::{Digest, Sha256};
use std::time::Duration;

const TUS_ROUTES: &str = r#"
routes:
  - path: /files
    protocol: tus
    limits: { max_file_size: 1MiB }
    forward: { path: /app/upload, field: document }
"#;

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Creates an upload; returns its path (the Location).
async fn create(h: &Harness, length: u64, metadata: &str) -> String {
    let response = tus(h, Method::POST, "/files")
        .header("upload-length", length.to_string())
        .header("upload-metadata", metadata)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "creation");
    location_of(h, &response)
}

async fn head(h: &Harness, location: &str) -> Response {
    tus(h, Method::HEAD, location).send().await.unwrap()
}

async fn offset_of(h: &Harness, location: &str) -> u64 {
    let response = head(h, location).await;
    assert_eq!(response.status(), 200, "HEAD {location}");
    header(&response, "upload-offset")
        .expect("Upload-Offset")
        .parse()
        .unwrap()
}

/// `bytes`' digest by `algorithm`, in base64, as `Upload-Checksum` carries it.
fn digest(algorithm: &str, bytes: &[u8]) -> String {
    let engine = base64::engine::general_purpose::STANDARD;
    match algorithm {
        "sha1" => engine.encode(sha1::Sha1::digest(bytes)),
        "sha256" => engine.encode(Sha256::digest(bytes)),
        "md5" => engine.encode(md5::Md5::digest(bytes)),
        _ => engine.encode(crc32fast::hash(bytes).to_be_bytes()),
    }
}

/// A request with a chunked body of `body` in chunks of `chunk` bytes and `trailers` (whole
/// lines) after the last chunk: what no client library here sends.
fn chunked_request(head: &str, body: &[u8], chunk: usize, trailers: &str) -> Vec<u8> {
    let mut request = format!(
        "{head}Host: x\r\nTus-Resumable: 1.0.0\r\n\
         Content-Type: application/offset+octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for piece in body.chunks(chunk) {
        request.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        request.extend_from_slice(piece);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(format!("0\r\n{trailers}\r\n").as_bytes());
    request
}

/// A PATCH of `body` at `offset` whose `Upload-Checksum` is announced as a trailer, and the
/// trailer lines that follow the body.
fn trailer_patch(
    location: &str,
    offset: u64,
    body: &[u8],
    chunk: usize,
    trailers: &str,
) -> Vec<u8> {
    let head = format!(
        "PATCH {location} HTTP/1.1\r\nUpload-Offset: {offset}\r\nTrailer: Upload-Checksum\r\n"
    );
    chunked_request(&head, body, chunk, trailers)
}

/// The one delivery the upstream got: its file's name, type and sha256, and its fields.
fn the_delivery(h: &Harness) -> Received {
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(
        received.len(),
        1,
        "the application gets the file exactly once"
    );
    let request = received.into_iter().next().unwrap();
    assert_eq!(request.files.len(), 1, "one file part");
    assert_eq!(request.files[0].field, "document");
    request
}

#[tokio::test]
async fn options_announce_the_version_extensions_limits_and_checksums() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    // No Tus-Resumable needed on OPTIONS.
    let response = h
        .client
        .request(Method::OPTIONS, h.url("/files"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "tus-version"), Some("1.0.0"));
    assert_eq!(header(&response, "tus-max-size"), Some("1048576"));
    let extensions: Vec<&str> = header(&response, "tus-extension")
        .unwrap()
        .split(',')
        .collect();
    for extension in [
        "creation",
        "creation-with-upload",
        "creation-defer-length",
        "expiration",
        "checksum",
        "checksum-trailer",
        "termination",
        "concatenation",
    ] {
        assert!(extensions.contains(&extension), "{extension} announced");
    }
    let algorithms = header(&response, "tus-checksum-algorithm").unwrap();
    for algorithm in ["sha1", "sha256", "md5", "crc32"] {
        assert!(algorithms.split(',').any(|a| a == algorithm));
    }
    assert!(h.upstream.received().is_empty(), "answered by Stitch");
}

#[tokio::test]
async fn an_upload_in_patches_reaches_the_application_once_with_its_metadata() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    h.upstream.answer_with(201, r#"{"id":"f-1"}"#);
    let data = random_bytes(300_000, 1);
    let metadata = format!(
        "filename {},filetype {},token {},empty",
        b64("report 2026.pdf"),
        b64("application/pdf"),
        b64("tok-123")
    );
    let location = create(&h, data.len() as u64, &metadata).await;
    let id = location.strip_prefix("/files/").expect("below the route");
    assert_eq!(id.len(), 32, "128 random bits, hex");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));

    let first = head(&h, &location).await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "upload-offset"), Some("0"));
    assert_eq!(header(&first, "upload-length"), Some("300000"));
    assert_eq!(header(&first, "upload-metadata"), Some(metadata.as_str()));
    assert_eq!(header(&first, "cache-control"), Some("no-store"));
    assert_eq!(header(&first, "tus-resumable"), Some("1.0.0"));

    let mut offset = 0u64;
    for piece in data.chunks(128 * 1024) {
        let response = patch(&h, &location, offset, Bytes::copy_from_slice(piece)).await;
        assert_eq!(response.status(), 204);
        offset += piece.len() as u64;
        assert_eq!(
            header(&response, "upload-offset"),
            Some(offset.to_string().as_str())
        );
        assert_eq!(header(&response, "tus-resumable"), Some("1.0.0"));
        if offset < data.len() as u64 {
            assert!(
                h.upstream.received().is_empty(),
                "not delivered before the end"
            );
            assert!(header(&response, "upload-expires").is_some());
        } else {
            assert_eq!(header(&response, "stitch-delivery"), Some("delivered"));
            assert_eq!(header(&response, "stitch-upstream-status"), Some("201"));
        }
    }
    let request = the_delivery(&h);
    let file = &request.files[0];
    assert_eq!(file.file_name, "report 2026.pdf");
    assert_eq!(file.content_type.as_deref(), Some("application/pdf"));
    assert_eq!(file.sha256, sha256_hex(&data));
    assert_eq!(
        request.fields,
        vec![
            ("token".to_string(), "tok-123".to_string()),
            ("empty".to_string(), String::new())
        ],
        "every other metadata pair is a field"
    );

    // The upstream's answer is there for the asking, and a resuming client sees every byte.
    let answer = h.client.get(h.url(&location)).send().await.unwrap();
    assert_eq!(answer.status(), 201);
    assert_eq!(answer.text().await.unwrap(), r#"{"id":"f-1"}"#);
    assert_eq!(offset_of(&h, &location).await, data.len() as u64);
    assert_eq!(h.upstream.received_at("/app/upload").len(), 1);
}

#[tokio::test]
async fn a_missing_or_other_version_is_412_and_creates_nothing() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    for version in [Some("0.2.2"), None] {
        let mut request = h.client.post(h.url("/files")).header("upload-length", "10");
        if let Some(version) = version {
            request = request.header("tus-resumable", version);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 412, "version {version:?}");
        assert_eq!(header(&response, "tus-version"), Some("1.0.0"));
    }
    assert_eq!(h.upload_files(), 0);
    assert!(h.upstream.received().is_empty());
}

#[tokio::test]
async fn a_method_that_does_not_apply_is_405_with_the_methods_that_do() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    let location = create(&h, 10, "").await;
    let files = h.upload_files();
    for (method, path, allow) in [
        (Method::PATCH, "/files", "OPTIONS, POST"),
        (Method::DELETE, "/files", "OPTIONS, POST"),
        (Method::HEAD, "/files", "OPTIONS, POST"),
        (
            Method::POST,
            location.as_str(),
            "OPTIONS, HEAD, PATCH, DELETE, GET",
        ),
    ] {
        let response = tus(&h, method.clone(), path).send().await.unwrap();
        assert_eq!(response.status(), 405, "{method} {path}");
        assert_eq!(header(&response, "allow"), Some(allow), "{method} {path}");
        assert_eq!(header(&response, "tus-resumable"), Some("1.0.0"));
    }
    assert_eq!(offset_of(&h, &location).await, 0, "the upload is untouched");
    assert_eq!(h.upload_files(), files, "nothing created or removed");
    assert!(h.upstream.received().is_empty(), "nothing passed through");
}

#[tokio::test]
async fn x_http_method_override_turns_a_post_into_patch_or_head() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    let location = create(&h, 5, "").await;
    let response = tus(&h, Method::POST, &location)
        .header("x-http-method-override", "PATCH")
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", "0")
        .body("abc")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(header(&response, "upload-offset"), Some("3"));
    let response = tus(&h, Method::POST, &location)
        .header("x-http-method-override", "HEAD")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "upload-offset"), Some("3"));
}

#[tokio::test]
async fn a_patch_at_the_wrong_offset_is_409_and_changes_nothing() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    let location = create(&h, 10, "").await;
    assert_eq!(
        patch(&h, &location, 0, Bytes::from("12345")).await.status(),
        204
    );
    let stored = h.stored_files();
    for wrong in [0, 3, 7] {
        let response = patch(&h, &location, wrong, Bytes::from("xx")).await;
        assert_eq!(response.status(), 409, "offset {wrong}");
    }
    // Two offsets, the right one among them: which one is meant is not guessed.
    let twice = tus(&h, Method::PATCH, &location)
        .header("upload-offset", "5")
        .header("upload-offset", "3")
        .header("content-type", "application/offset+octet-stream")
        .body("xx")
        .send()
        .await
        .unwrap();
    assert_eq!(twice.status(), 400);
    assert_eq!(offset_of(&h, &location).await, 5);
    assert_eq!(h.stored_files(), stored, "nothing stored changed");
}

#[tokio::test]
async fn patch_bodies_of_another_type_are_415() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    let location = create(&h, 10, "").await;
    let stored = h.stored_files();
    for content_type in [Some("application/octet-stream"), None] {
        let mut request = tus(&h, Method::PATCH, &location).header("upload-offset", "0");
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.body("12345").send().await.unwrap();
        assert_eq!(response.status(), 415, "{content_type:?}");
    }
    assert_eq!(offset_of(&h, &location).await, 0);
    assert_eq!(h.stored_files(), stored);
}

#[tokio::test]
async fn unknown_uploads_are_404_and_upload_urls_do_not_cross_scopes() {
    let routes = r#"
routes:
  - path: /files
    protocol: tus
    scope: { cookie: session }
    forward: { path: /app/upload }
"#;
    let h = Harness::with_routes(routes).await;
    for path in [
        "/files/00000000000000000000000000000000",
        "/files/not-an-id",
        "/files/..%2Fetc%2Fpasswd",
    ] {
        assert_eq!(head(&h, path).await.status(), 404, "{path}");
        assert_eq!(patch(&h, path, 0, Bytes::from("x")).await.status(), 404);
    }
    let response = tus(&h, Method::POST, "/files")
        .header("cookie", "session=alice")
        .header("upload-length", "4")
        .send()
        .await
        .unwrap();
    let location = location_of(&h, &response);
    let as_bob = tus(&h, Method::HEAD, &location)
        .header("cookie", "session=bob")
        .send()
        .await
        .unwrap();
    assert_eq!(as_bob.status(), 404, "another user's upload is not there");
    let as_alice = tus(&h, Method::HEAD, &location)
        .header("cookie", "session=alice")
        .send()
        .await
        .unwrap();
    assert_eq!(as_alice.status(), 200);
}

#[tokio::test]
async fn creation_with_upload_stores_the_first_bytes_or_the_whole_file() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    let data = random_bytes(50_000, 2);
    let response = tus(&h, Method::POST, "/files")
        .header("upload-length", "50000")
        .header("upload-metadata", format!("filename {}", b64("a.bin")))
        .header("content-type", "application/offset+octet-stream")
        .body(data.slice(..20_000))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(header(&response, "upload-offset"), Some("20000"));
    let location = location_of(&h, &response);
    assert_eq!(offset_of(&h, &location).await, 20_000);
    let rest = patch(&h, &location, 20_000, data.slice(20_000..)).await;
    assert_eq!(rest.status(), 204);
    assert_eq!(the_delivery(&h).files[0].sha256, sha256_hex(&data));

    // The whole file in the creation request: delivered by it.
    let small = random_bytes(1000, 3);
    let response = tus(&h, Method::POST, "/files")
        .header("upload-length", "1000")
        .header("upload-metadata", format!("filename {}", b64("b.bin")))
        .header("content-type", "application/offset+octet-stream")
        .body(small.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(header(&response, "upload-offset"), Some("1000"));
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].files[0].file_name, "b.bin");
    assert_eq!(received[1].files[0].sha256, sha256_hex(&small));
}

#[tokio::test]
async fn a_deferred_length_is_declared_by_a_later_patch() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    let response = tus(&h, Method::POST, "/files")
        .header("upload-defer-length", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let location = location_of(&h, &response);
    let state = head(&h, &location).await;
    assert_eq!(header(&state, "upload-defer-length"), Some("1"));
    assert_eq!(header(&state, "upload-length"), None);
    assert_eq!(
        patch(&h, &location, 0, Bytes::from("hello "))
            .await
            .status(),
        204
    );
    assert!(h.upstream.received().is_empty());
    let last = tus(&h, Method::PATCH, &location)
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", "6")
        .header("upload-length", "11")
        .body("world")
        .send()
        .await
        .unwrap();
    assert_eq!(last.status(), 204);
    assert_eq!(header(&last, "stitch-delivery"), Some("delivered"));
    assert_eq!(the_delivery(&h).files[0].sha256, sha256_hex(b"hello world"));
}

#[tokio::test]
async fn creation_needs_exactly_one_well_formed_length_within_the_limit() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    let cases: [(&[(&str, &str)], u16); 7] = [
        (&[], 400),
        (&[("upload-length", "10"), ("upload-length", "20")], 400),
        (&[("upload-length", "-1")], 400),
        (&[("upload-length", "ten")], 400),
        (&[("upload-defer-length", "2")], 400),
        (
            &[("upload-length", "10"), ("upload-defer-length", "1")],
            400,
        ),
        (&[("upload-length", "1048577")], 413),
    ];
    for (headers, status) in cases {
        let mut request = tus(&h, Method::POST, "/files");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        assert_eq!(
            request.send().await.unwrap().status(),
            status,
            "{headers:?}"
        );
    }
    assert_eq!(h.upload_files(), 0, "nothing created");
}

#[tokio::test]
async fn malformed_metadata_is_400_and_creates_nothing() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    let too_long = format!("big {}", b64(&"x".repeat(5000)));
    for metadata in [
        "name !!notbase64",
        "name YQ==,name Yg==",
        "name YQ==,,other Yg==",
        "a YQ== extra",
        too_long.as_str(),
    ] {
        let response = tus(&h, Method::POST, "/files")
            .header("upload-length", "10")
            .header("upload-metadata", metadata)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{metadata:.40}");
    }
    assert_eq!(h.upload_files(), 0);
}

#[tokio::test]
async fn a_patch_past_the_length_is_413_and_stores_nothing() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    let location = create(&h, 10, "").await;
    assert_eq!(
        patch(&h, &location, 0, Bytes::from("1234")).await.status(),
        204
    );
    let stored = h.stored_files();
    let response = patch(&h, &location, 4, Bytes::from("12345678")).await;
    assert_eq!(response.status(), 413);
    assert_eq!(offset_of(&h, &location).await, 4);
    assert_eq!(h.stored_files(), stored);
    // A chunked body (no Content-Length) that runs past the end is refused the same way.
    let stream = futures::stream::iter(vec![Ok::<_, std::io::Error>(Bytes::from("12345678"))]);
    let response = tus(&h, Method::PATCH, &location)
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", "4")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(offset_of(&h, &location).await, 4);
    assert_eq!(h.stored_files(), stored);
}

#[tokio::test]
async fn a_delivered_upload_takes_no_more_bytes_nor_another_length() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    h.upstream.answer_with(201, "saved");
    let location = create(&h, 10, "").await;
    let done = patch(&h, &location, 0, Bytes::from("0123456789")).await;
    assert_eq!(header(&done, "stitch-delivery"), Some("delivered"));
    let more = patch(&h, &location, 10, Bytes::from("abcde")).await;
    assert_eq!(more.status(), 413, "past the length, as before delivery");
    // The same bytes in a chunked body (no Content-Length): refused too, not taken for a
    // PATCH with nothing more.
    let stream = futures::stream::iter(vec![Ok::<_, std::io::Error>(Bytes::from("abcde"))]);
    let chunked = tus(&h, Method::PATCH, &location)
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", "10")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(chunked.status(), 413, "a chunked body past the length");
    assert_eq!(
        chunked.text().await.unwrap(),
        "the upload has room for 0 more bytes\n"
    );
    let longer = tus(&h, Method::PATCH, &location)
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", "10")
        .header("upload-length", "11")
        .send()
        .await
        .unwrap();
    assert_eq!(longer.status(), 400);
    // Asked again with nothing more, it is told the delivery's outcome.
    let again = patch(&h, &location, 10, Bytes::new()).await;
    assert_eq!(again.status(), 204);
    assert_eq!(header(&again, "stitch-delivery"), Some("delivered"));
    assert_eq!(offset_of(&h, &location).await, 10);
    let delivered = h.upstream.received_at("/app/upload");
    assert_eq!(delivered.len(), 1, "once");
    assert_eq!(delivered[0].files[0].len, 10);
}

#[tokio::test]
async fn checksums_are_checked_and_a_mismatch_is_460_with_the_bytes_discarded() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    let body = b"hello world";
    for algorithm in ["sha1", "sha256", "md5", "crc32"] {
        let location = create(&h, 22, "").await;
        let checked = |value: String| {
            tus(&h, Method::PATCH, &location)
                .header("content-type", "application/offset+octet-stream")
                .header("upload-offset", "0")
                .header("upload-checksum", value)
                .body(&body[..])
        };
        let stored = h.stored_files();
        let wrong = checked(format!("{algorithm} {}", digest(algorithm, b"hello wOrld")));
        assert_eq!(
            wrong.send().await.unwrap().status(),
            460,
            "{algorithm} mismatch"
        );
        assert_eq!(offset_of(&h, &location).await, 0);
        assert_eq!(
            h.stored_files(),
            stored,
            "{algorithm}: the bytes are discarded"
        );
        let right = checked(format!("{algorithm} {}", digest(algorithm, body)));
        assert_eq!(
            right.send().await.unwrap().status(),
            204,
            "{algorithm} match"
        );
        assert_eq!(offset_of(&h, &location).await, 11);
    }
    let location = create(&h, 11, "").await;
    for value in ["whirlpool AAAA", "sha1", "sha1 !!!"] {
        let response = tus(&h, Method::PATCH, &location)
            .header("content-type", "application/offset+octet-stream")
            .header("upload-offset", "0")
            .header("upload-checksum", value)
            .body(&body[..])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{value}");
    }
    assert_eq!(offset_of(&h, &location).await, 0);
}

#[tokio::test]
async fn checksum_trailers_are_checked_once_the_body_has_ended() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    let addr = h.stitch.as_ref().unwrap().addr;
    // A small body (it comes in with the header, trailer and all) and a large one in many
    // chunks and writes, for each announced algorithm.
    let small = random_bytes(11, 20);
    let large = random_bytes(300_000, 21);
    for algorithm in ["sha1", "sha256", "md5", "crc32"] {
        let location = create(&h, (small.len() + large.len()) as u64, "").await;
        let mut connection = RawConnection::open(addr).await;
        let stored = h.stored_files();
        let wrong = format!(
            "Upload-Checksum: {algorithm} {}\r\n",
            digest(algorithm, b"x")
        );
        assert!(
            connection
                .send(&trailer_patch(&location, 0, &small, 4, &wrong))
                .await
        );
        let refused = connection.response(Duration::from_secs(10)).await.unwrap();
        assert_eq!(refused.status, 460, "{algorithm}: a mismatch");
        assert_eq!(offset_of(&h, &location).await, 0);
        assert_eq!(
            h.stored_files(),
            stored,
            "{algorithm}: the bytes are discarded"
        );
        // The same connection goes on: the trailer was read to its end.
        let right = format!(
            "Upload-Checksum: {algorithm} {}\r\n",
            digest(algorithm, &small)
        );
        assert!(
            connection
                .send(&trailer_patch(&location, 0, &small, 4, &right))
                .await
        );
        let accepted = connection.response(Duration::from_secs(10)).await.unwrap();
        assert_eq!(accepted.status, 204, "{algorithm}: a match");
        assert_eq!(offset_of(&h, &location).await, small.len() as u64);
        let at = small.len() as u64;
        let wrong = format!(
            "Upload-Checksum: {algorithm} {}\r\n",
            digest(algorithm, &small)
        );
        let request = trailer_patch(&location, at, &large, 7_000, &wrong);
        for piece in request.chunks(20_000) {
            assert!(connection.send(piece).await);
        }
        let refused = connection.response(Duration::from_secs(10)).await.unwrap();
        assert_eq!(
            refused.status, 460,
            "{algorithm}: a mismatch after a large body"
        );
        assert_eq!(offset_of(&h, &location).await, at);
        let right = format!(
            "X-Before: 1\r\nUpload-Checksum: {algorithm} {}\r\nX-After: 2\r\n",
            digest(algorithm, &large)
        );
        let request = trailer_patch(&location, at, &large, 7_000, &right);
        for piece in request.chunks(20_000) {
            assert!(connection.send(piece).await);
        }
        let accepted = connection.response(Duration::from_secs(10)).await.unwrap();
        assert_eq!(
            accepted.status, 204,
            "{algorithm}: a large body that matches"
        );
        let offset = accepted
            .headers
            .iter()
            .find(|(name, _)| name == "upload-offset")
            .map(|(_, value)| value.as_str());
        assert_eq!(offset, Some("300011"));
    }
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), 4, "each file delivered once");
    let whole = [&small[..], &large[..]].concat();
    for request in received {
        assert_eq!(request.files[0].sha256, sha256_hex(&whole));
    }
}

#[tokio::test]
async fn checksum_trailers_that_cannot_be_checked_are_400_and_store_nothing() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    let addr = h.stitch.as_ref().unwrap().addr;
    let location = create(&h, 100, "").await;
    let body = b"hello world";
    let sum = format!("sha1 {}", digest("sha1", body));
    let stored = h.stored_files();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("no trailer came", trailer_patch(&location, 0, body, 5, "")),
        (
            "another trailer only",
            trailer_patch(&location, 0, body, 5, "X-Other: 1\r\n"),
        ),
        (
            "an unknown algorithm",
            trailer_patch(&location, 0, body, 5, "Upload-Checksum: whirlpool AAAA\r\n"),
        ),
        (
            "not base64",
            trailer_patch(&location, 0, body, 5, "Upload-Checksum: sha1 !!!\r\n"),
        ),
        (
            "twice",
            trailer_patch(
                &location,
                0,
                body,
                5,
                &format!("Upload-Checksum: {sum}\r\nUpload-Checksum: {sum}\r\n"),
            ),
        ),
        (
            "a malformed trailer line",
            trailer_patch(&location, 0, body, 5, "Upload Checksum: sha1 x\r\n"),
        ),
        (
            "a header and a trailer",
            chunked_request(
                &format!(
                    "PATCH {location} HTTP/1.1\r\nUpload-Offset: 0\r\n\
                     Trailer: Upload-Checksum\r\nUpload-Checksum: {sum}\r\n"
                ),
                body,
                5,
                &format!("Upload-Checksum: {sum}\r\n"),
            ),
        ),
        (
            "a body that cannot have trailers",
            format!(
                "PATCH {location} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n\
                 Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n\
                 Trailer: Upload-Checksum\r\nContent-Length: 11\r\n\r\nhello world"
            )
            .into_bytes(),
        ),
    ];
    for (case, request) in cases {
        let mut connection = RawConnection::open(addr).await;
        assert!(connection.send(&request).await);
        let response = connection.response(Duration::from_secs(10)).await.unwrap();
        assert_eq!(response.status, 400, "{case}");
        assert_eq!(offset_of(&h, &location).await, 0, "{case}");
        assert_eq!(h.stored_files(), stored, "{case}: nothing stored");
    }
    // A creation whose first bytes carry a trailer checksum: kept if it matches, and the
    // upload not created if it does not.
    let creation = |trailers: String| {
        chunked_request(
            "POST /files HTTP/1.1\r\nUpload-Length: 11\r\nTrailer: upload-checksum\r\n",
            body,
            3,
            &trailers,
        )
    };
    let uploads = h.upload_files();
    let mut connection = RawConnection::open(addr).await;
    let wrong = format!("Upload-Checksum: sha1 {}\r\n", digest("sha1", b"other"));
    assert!(connection.send(&creation(wrong)).await);
    let response = connection.response(Duration::from_secs(10)).await.unwrap();
    assert_eq!(response.status, 460);
    assert_eq!(h.upload_files(), uploads, "no upload made");
    assert!(
        connection
            .send(&creation(format!("Upload-Checksum: {sum}\r\n")))
            .await
    );
    let response = connection.response(Duration::from_secs(10)).await.unwrap();
    assert_eq!(response.status, 201);
    let offset = response.headers.iter().find(|(n, _)| n == "upload-offset");
    assert_eq!(offset.map(|(_, v)| v.as_str()), Some("11"));
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), 1, "the whole file, delivered once");
    assert_eq!(received[0].files[0].sha256, sha256_hex(body));
}

#[tokio::test]
async fn a_request_pipelined_behind_a_trailer_body_leaves_its_checksum_read() {
    // Pingora does not serve pipelined requests (it answers the first and closes), but the
    // first one's trailer is read where its body ends, not at the end of what was read.
    let h = Harness::with_routes(TUS_ROUTES).await;
    let addr = h.stitch.as_ref().unwrap().addr;
    let body = random_bytes(5_000, 23);
    let next = b"HEAD /files/x HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n\r\n";
    let location = create(&h, 2 * body.len() as u64, "").await;
    let right = format!("Upload-Checksum: sha256 {}\r\n", digest("sha256", &body));
    let mut connection = RawConnection::open(addr).await;
    let request = [
        trailer_patch(&location, 0, &body, 1_000, &right),
        next.to_vec(),
    ]
    .concat();
    assert!(connection.send(&request).await);
    let response = connection.response(Duration::from_secs(10)).await.unwrap();
    assert_eq!(response.status, 204, "the PATCH's trailer is read");
    assert_eq!(offset_of(&h, &location).await, body.len() as u64);
    // A mismatch is still one.
    let wrong = format!("Upload-Checksum: sha256 {}\r\n", digest("sha256", b"x"));
    let mut connection = RawConnection::open(addr).await;
    let request = [
        trailer_patch(&location, body.len() as u64, &body, 1_000, &wrong),
        next.to_vec(),
    ]
    .concat();
    assert!(connection.send(&request).await);
    let response = connection.response(Duration::from_secs(10)).await.unwrap();
    assert_eq!(response.status, 460);
    assert_eq!(offset_of(&h, &location).await, body.len() as u64);

    // A creation with its first bytes, a request right behind: the upload is made and kept.
    let creation = [
        chunked_request(
            &format!(
                "POST /files HTTP/1.1\r\nUpload-Length: {}\r\nTrailer: Upload-Checksum\r\n",
                body.len()
            ),
            &body,
            700,
            &right,
        ),
        next.to_vec(),
    ]
    .concat();
    let mut connection = RawConnection::open(addr).await;
    assert!(connection.send(&creation).await);
    let response = connection.response(Duration::from_secs(10)).await.unwrap();
    assert_eq!(response.status, 201);
    let offset = response.headers.iter().find(|(n, _)| n == "upload-offset");
    assert_eq!(offset.map(|(_, v)| v.as_str()), Some("5000"));
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(
        received.len(),
        1,
        "the created upload, complete, delivered once"
    );
    assert_eq!(received[0].files[0].sha256, sha256_hex(&body));
}

#[tokio::test]
async fn a_completing_patch_racing_a_termination_is_told_the_truth_about_the_delivery() {
    // The same client completes an upload and terminates it at once. Either may win, but a
    // PATCH answered 2xx means the file reached the application, and a terminated upload
    // that did not reach it is not reported as stored and owed.
    let h = Harness::with_routes(TUS_ROUTES).await;
    h.upstream.answer_with(201, "saved");
    let mut outcomes = std::collections::BTreeMap::new();
    for trial in 0..60u64 {
        let data = random_bytes(3000, trial);
        let location = create(&h, 3000, "").await;
        let first = patch(&h, &location, 0, data.slice(..2000)).await;
        assert_eq!(first.status(), 204);
        let before = h.upstream.received_at("/app/upload").len();
        let (last, deleted) = tokio::join!(patch(&h, &location, 2000, data.slice(2000..)), async {
            tokio::time::sleep(Duration::from_micros(trial % 6 * 500)).await;
            tus(&h, Method::DELETE, &location).send().await.unwrap()
        });
        assert_eq!(deleted.status(), 204);
        let received = h.upstream.received_at("/app/upload").len() - before;
        let status = last.status().as_u16();
        if (200..300).contains(&status) {
            assert_eq!(
                received, 1,
                "trial {trial}: answered {status}, so delivered"
            );
            assert_eq!(header(&last, "stitch-delivery"), Some("delivered"));
        } else {
            assert_eq!(
                received, 0,
                "trial {trial}: answered {status}, yet delivered"
            );
            assert!([409, 410].contains(&status), "trial {trial}: {status}");
        }
        assert_eq!(head(&h, &location).await.status(), 410, "trial {trial}");
        *outcomes.entry(status).or_insert(0) += 1;
    }
    eprintln!("completing PATCH statuses over 60 races: {outcomes:?}");
}

#[tokio::test]
async fn termination_removes_the_upload_and_its_bytes() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    let location = create(&h, 100, "").await;
    assert_eq!(
        patch(&h, &location, 0, random_bytes(60, 4)).await.status(),
        204
    );
    assert!(h.blob_count() > 0);
    let response = tus(&h, Method::DELETE, &location).send().await.unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(header(&response, "tus-resumable"), Some("1.0.0"));
    // Gone, not unknown: 410 for everything on its URL.
    assert_eq!(head(&h, &location).await.status(), 410);
    assert_eq!(
        patch(&h, &location, 60, random_bytes(40, 5)).await.status(),
        410
    );
    assert_eq!(
        tus(&h, Method::DELETE, &location)
            .send()
            .await
            .unwrap()
            .status(),
        410
    );
    assert_eq!(
        h.client
            .get(h.url(&location))
            .send()
            .await
            .unwrap()
            .status(),
        410
    );
    assert_eq!((h.blob_count(), h.part_count()), (0, 0), "no bytes kept");
    assert!(h.upstream.received().is_empty());
    // An id never handed out is still unknown.
    let unknown = format!("/files/{}", "0".repeat(32));
    assert_eq!(head(&h, &unknown).await.status(), 404);
}

#[tokio::test]
async fn uploads_announce_their_expiry_and_expire_when_idle() {
    let h = Harness::with_storage("  upload_ttl: 2s\n", TUS_ROUTES).await;
    let response = tus(&h, Method::POST, "/files")
        .header("upload-length", "10")
        .send()
        .await
        .unwrap();
    let expires = header(&response, "upload-expires").expect("Upload-Expires");
    let expires = httpdate::parse_http_date(expires).expect("an HTTP date");
    assert!(expires > std::time::SystemTime::now());
    let location = location_of(&h, &response);
    let progress = head(&h, &location).await;
    let again = header(&progress, "upload-expires").expect("Upload-Expires on HEAD");
    assert!(httpdate::parse_http_date(again).is_ok());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let expired = loop {
        let status = head(&h, &location).await.status();
        if status != 200 {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // (Its tombstone is there before it goes: never a moment of 404 between.)
    assert_eq!(expired, 410, "expired: gone");
    assert_eq!(h.blob_count(), 0);
    // The tombstone itself goes after another idle period.
    while head(&h, &location).await.status() == 410 {
        assert!(
            std::time::Instant::now() < deadline,
            "the tombstone never went"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(head(&h, &location).await.status(), 404);
    assert_eq!(h.upload_files(), 0);
}

#[tokio::test]
async fn a_patch_longer_than_the_idle_time_neither_expires_nor_holds_up_expiry() {
    // tus-js-client and Uppy send a whole file in one PATCH by default: a large file on a
    // slow line is one body for hours, longer than `upload_ttl`. That upload is in use, not
    // idle, and the expiry of every other upload goes on meanwhile.
    let h = Harness::with_storage("  upload_ttl: 2s\n", TUS_ROUTES).await;
    let data = random_bytes(60_000, 12);
    let slow = create(&h, data.len() as u64, "").await;
    let mut connection = RawConnection::open(h.stitch.as_ref().unwrap().addr).await;
    let head_bytes = format!(
        "PATCH {slow} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n\
         Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n\
         Content-Length: {}\r\n\r\n",
        data.len()
    );
    assert!(connection.send(head_bytes.as_bytes()).await);
    let started = std::time::Instant::now();
    // Made after the slow one began: idle from now on.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let idle = create(&h, 10, "").await;
    // The body trickles for 12 s, six times the idle time; meanwhile the idle upload goes.
    let mut idle_gone_at = None;
    for (n, piece) in data.chunks(1_000).enumerate() {
        assert!(connection.send(piece).await, "the slow body is still read");
        tokio::time::sleep(Duration::from_millis(200)).await;
        if n % 5 == 4 && idle_gone_at.is_none() && head(&h, &idle).await.status() == 410 {
            idle_gone_at = Some(started.elapsed());
        }
    }
    let sent_for = started.elapsed();
    let answer = connection
        .response(Duration::from_secs(10))
        .await
        .expect("the slow PATCH is answered");
    assert_eq!(
        answer.status, 204,
        "the slow upload was not expired under it"
    );
    let idle_gone_at = idle_gone_at.expect("the idle upload expired");
    assert!(
        idle_gone_at < sent_for,
        "the idle upload expired at {idle_gone_at:?}, while the slow body was still coming \
         (until {sent_for:?})"
    );
    assert_eq!(the_delivery(&h).files[0].sha256, sha256_hex(&data));
}

#[tokio::test]
async fn a_patch_that_breaks_off_keeps_the_bytes_that_arrived() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    let location = create(&h, 100_000, "").await;
    let addr = h.stitch.as_ref().unwrap().addr;
    let mut connection = RawConnection::open(addr).await;
    let head_bytes = format!(
        "PATCH {location} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n\
         Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n\
         Content-Length: 100000\r\n\r\n"
    );
    let data = random_bytes(100_000, 6);
    assert!(connection.send(head_bytes.as_bytes()).await);
    assert!(connection.send(&data[..20_000]).await);
    // A client that says it is done sending early hears where the upload stands.
    connection.finish_sending().await;
    let answer = connection
        .response(Duration::from_secs(10))
        .await
        .expect("answered");
    assert_eq!(answer.status, 400);
    let reason = String::from_utf8_lossy(&answer.body);
    assert!(reason.contains("at offset 20000"), "{reason}");
    assert_eq!(offset_of(&h, &location).await, 20_000);
    let mut connection = RawConnection::open(addr).await;
    let head_bytes = format!(
        "PATCH {location} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n\
         Content-Type: application/offset+octet-stream\r\nUpload-Offset: 20000\r\n\
         Content-Length: 80000\r\n\r\n"
    );
    assert!(connection.send(head_bytes.as_bytes()).await);
    assert!(connection.send(&data[20_000..40_000]).await);
    // Let the bytes arrive, then cut the connection.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    drop(connection);
    let mut offset = 0;
    while offset != 40_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "offset stays {offset}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        offset = offset_of(&h, &location).await;
    }
    let rest = patch(&h, &location, 40_000, data.slice(40_000..)).await;
    assert_eq!(rest.status(), 204);
    assert_eq!(the_delivery(&h).files[0].sha256, sha256_hex(&data));
}

/// `GET` on an upload once its answer is recorded (202 until then), within 10 s.
async fn recorded_answer(h: &Harness, location: &str) -> Response {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let response = h.client.get(h.url(location)).send().await.unwrap();
        if response.status() != 202 || std::time::Instant::now() > deadline {
            return response;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A tus route whose queue retries quickly (the default pause is 2 s, doubling).
const QUICK_RETRY_ROUTES: &str = r#"
routes:
  - path: /files
    protocol: tus
    forward: { path: /app/upload, field: document, retry_pause: 200ms }
"#;

#[tokio::test]
async fn a_delivery_that_fails_goes_on_from_the_queue_and_is_delivered_once() {
    let h = Harness::with_routes(QUICK_RETRY_ROUTES).await;
    let data = random_bytes(5000, 7);
    let location = create(&h, 5000, &format!("filename {}", b64("c.bin"))).await;
    h.upstream.go_down();
    let response = patch(&h, &location, 0, data.clone()).await;
    assert_eq!(
        response.status(),
        204,
        "every byte is stored: the PATCH succeeded"
    );
    assert_eq!(header(&response, "upload-offset"), Some("5000"));
    assert_eq!(header(&response, "stitch-delivery"), Some("retrying"));
    let pending = h.client.get(h.url(&location)).send().await.unwrap();
    assert_eq!(pending.status(), 202, "no answer yet");
    // tus-js-client resumes with HEAD; finding every byte there it sends nothing more.
    assert_eq!(offset_of(&h, &location).await, 5000);
    h.upstream.answer_with(200, "saved c.bin");
    h.upstream.resume().await;
    // Nobody asks again: the queue delivers on its own.
    wait_for_requests(&h, "/app/upload", 1, Duration::from_secs(20)).await;
    assert_eq!(the_delivery(&h).files[0].sha256, sha256_hex(&data));
    let answer = recorded_answer(&h, &location).await;
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.text().await.unwrap(), "saved c.bin");
    assert_eq!(offset_of(&h, &location).await, 5000);
    // Once answered, it is no longer owed: nothing more goes out.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(h.upstream.received_at("/app/upload").len(), 1);
}

#[tokio::test]
async fn an_owed_delivery_survives_a_restart_then_get_and_finalize_return_the_answer() {
    let mut h = Harness::with_routes(QUICK_RETRY_ROUTES).await;
    let data = random_bytes(3000, 8);
    let metadata = format!("filename {},token {}", b64("r.bin"), b64("t-42"));
    let location = create(&h, 3000, &metadata).await;
    h.upstream.go_down();
    let response = patch(&h, &location, 0, data.clone()).await;
    assert_eq!(response.status(), 204);
    assert_eq!(header(&response, "stitch-delivery"), Some("retrying"));
    h.restart();
    h.upstream.answer_with(201, r#"{"id":"r"}"#);
    h.upstream.resume().await;
    wait_for_requests(&h, "/app/upload", 1, Duration::from_secs(20)).await;
    assert_eq!(the_delivery(&h).files[0].sha256, sha256_hex(&data));
    let answer = recorded_answer(&h, &location).await;
    assert_eq!(answer.status(), 201);
    assert_eq!(answer.text().await.unwrap(), r#"{"id":"r"}"#);
    let finalized = h.client.put(h.url("/files/t-42")).send().await.unwrap();
    assert_eq!(finalized.status(), 201);
    assert_eq!(finalized.text().await.unwrap(), r#"{"id":"r"}"#);
    assert_eq!(h.upstream.received_at("/app/upload").len(), 1);
}

#[tokio::test]
async fn an_application_that_refuses_the_file_is_relayed_by_the_completing_patch() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    h.upstream.answer_with(422, "not a PDF");
    let location = create(&h, 3, "").await;
    let response = patch(&h, &location, 0, Bytes::from("abc")).await;
    assert_eq!(response.status(), 422);
    assert_eq!(header(&response, "upload-offset"), Some("3"));
    assert_eq!(header(&response, "stitch-upstream-status"), Some("422"));
    assert_eq!(response.text().await.unwrap(), "not a PDF");
    assert_eq!(h.upstream.received_at("/app/upload").len(), 1);
}

#[tokio::test]
async fn the_creating_clients_credentials_go_with_the_file() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    let response = tus(&h, Method::POST, "/files")
        .header("upload-length", "3")
        .header("cookie", "session=alice")
        .header("authorization", "Bearer abc")
        .send()
        .await
        .unwrap();
    let location = location_of(&h, &response);
    assert_eq!(
        patch(&h, &location, 0, Bytes::from("abc")).await.status(),
        204
    );
    let request = the_delivery(&h);
    assert_eq!(request.header("cookie"), Some("session=alice"));
    assert_eq!(request.header("authorization"), Some("Bearer abc"));
}

#[tokio::test]
async fn plain_requests_on_the_route_pass_through_to_the_application() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    let page = h.client.get(h.url("/files")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let put = h
        .client
        .put(h.url("/files/report"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let paths: Vec<String> = h.upstream.received().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, vec!["/files", "/files/report"]);
}

#[tokio::test]
async fn finalize_returns_the_answer_of_the_upload_carrying_the_token_in_its_scope() {
    let routes = r#"
routes:
  - path: /files
    protocol: tus
    scope: { cookie: session }
    forward: { path: /app/upload }
"#;
    let h = Harness::with_routes(routes).await;
    h.upstream.answer_with(200, r#"{"descriptor":1}"#);
    let response = tus(&h, Method::POST, "/files")
        .header("cookie", "session=alice")
        .header("upload-length", "6")
        .header(
            "upload-metadata",
            format!("filename {},token {}", b64("a.txt"), b64("tok 1/2")),
        )
        .send()
        .await
        .unwrap();
    let location = location_of(&h, &response);
    let finalize = |session: &str| {
        h.client
            .put(h.url("/files/tok%201%2F2?filename=a.txt"))
            .header("cookie", format!("session={session}"))
            .body("{}")
    };
    // Not complete yet: the client is told, nothing is delivered.
    let early = finalize("alice").send().await.unwrap();
    assert_eq!(early.status(), 409);
    assert!(h.upstream.received().is_empty());
    let done = tus(&h, Method::PATCH, &location)
        .header("cookie", "session=alice")
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", "0")
        .body("abcdef")
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 204);
    let answer = finalize("alice").send().await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.text().await.unwrap(), r#"{"descriptor":1}"#);
    assert_eq!(h.upstream.received_at("/app/upload").len(), 1);
    // Another user's PUT with the same token is the application's business.
    let other = finalize("bob").send().await.unwrap();
    assert_eq!(other.status(), 200);
    let passed: Vec<String> = h.upstream.received().into_iter().map(|r| r.path).collect();
    assert_eq!(passed, vec!["/app/upload", "/files/tok%201%2F2"]);
}

/// A tus route whose completing PATCH waits 1 s for an application that answers `201` after
/// `delay`: a 3-byte upload carrying `token` is completed, and left `pending`. Returns its URL.
async fn completed_before_a_slow_application(delay: Duration, token: &str) -> (Harness, String) {
    let routes = r#"
routes:
  - path: /files
    protocol: tus
    forward: { path: /app/upload, wait: 1s }
"#;
    let h = Harness::with_routes(routes).await;
    h.upstream.answer_with(201, "slowly saved");
    h.upstream.delay_answers(delay);
    let location = create(&h, 3, &format!("token {}", b64(token))).await;
    let response = patch(&h, &location, 0, Bytes::from("xyz")).await;
    assert_eq!(response.status(), 204, "the bytes are stored");
    assert_eq!(header(&response, "stitch-delivery"), Some("pending"));
    assert_eq!(header(&response, "upload-offset"), Some("3"));
    (h, location)
}

#[tokio::test]
async fn a_slow_application_leaves_the_patch_pending_and_finalize_waits_for_its_answer() {
    let (h, _) = completed_before_a_slow_application(Duration::from_millis(1500), "t9").await;
    // The delivery went on; finalize waits for it (up to forward.wait each time).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answer = h.client.put(h.url("/files/t9")).send().await.unwrap();
        if answer.status() == 201 {
            assert_eq!(answer.text().await.unwrap(), "slowly saved");
            break;
        }
        assert_eq!(
            answer.status(),
            202,
            "pending until the application answers"
        );
        assert!(std::time::Instant::now() < deadline, "never answered");
    }
    assert_eq!(h.upstream.received_at("/app/upload").len(), 1);
}

#[tokio::test]
async fn head_and_an_empty_patch_answer_at_once_while_the_application_takes_the_file() {
    // tus-js-client resumes by HEAD (its completing PATCH's connection broke): the delivery
    // under way holds the upload while the application takes the file, and must not hold up
    // a look at it, nor a second request that has nothing to store.
    let (h, location) = completed_before_a_slow_application(Duration::from_secs(8), "t10").await;
    async fn quickly<T>(what: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(3), what)
            .await
            .expect("answered while the application still takes the file")
    }
    let progress = quickly(head(&h, &location)).await;
    assert_eq!(progress.status(), 200);
    assert_eq!(header(&progress, "upload-offset"), Some("3"));
    let again = quickly(patch(&h, &location, 3, Bytes::new())).await;
    assert_eq!(again.status(), 204);
    assert_eq!(header(&again, "upload-offset"), Some("3"));
    // Finalize still waits for the answer (forward.wait), as the README says.
    let answer = h.client.put(h.url("/files/t10")).send().await.unwrap();
    assert_eq!(answer.status(), 202);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while h.upstream.received_at("/app/upload").is_empty() {
        assert!(std::time::Instant::now() < deadline, "never delivered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answer = loop {
        let answer = h.client.get(h.url(&location)).send().await.unwrap();
        if answer.status() != 202 {
            break answer;
        }
        assert!(std::time::Instant::now() < deadline, "never answered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(answer.status(), 201);
    assert_eq!(answer.text().await.unwrap(), "slowly saved");
    assert_eq!(h.upstream.received_at("/app/upload").len(), 1, "once");
}

#[tokio::test]
async fn an_empty_file_is_complete_at_creation_and_delivered_once() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    h.upstream.answer_with(201, "got it");
    let response = tus(&h, Method::POST, "/files")
        .header("upload-length", "0")
        .header("upload-metadata", format!("filename {}", b64("empty.txt")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(header(&response, "stitch-delivery"), Some("delivered"));
    let location = location_of(&h, &response);
    let progress = head(&h, &location).await;
    assert_eq!(progress.status(), 200);
    assert_eq!(header(&progress, "upload-offset"), Some("0"));
    assert_eq!(header(&progress, "upload-length"), Some("0"));
    let delivery = the_delivery(&h);
    assert_eq!(delivery.files[0].file_name, "empty.txt");
    assert_eq!(delivery.files[0].len, 0);
    let answer = h.client.get(h.url(&location)).send().await.unwrap();
    assert_eq!(answer.text().await.unwrap(), "got it");
}

#[tokio::test]
async fn a_creation_body_of_another_type_or_checksum_is_refused_and_stores_nothing() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    let wrong_type = tus(&h, Method::POST, "/files")
        .header("upload-length", "5")
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_type.status(), 415);
    let said = wrong_type.text().await.unwrap();
    assert!(
        said.contains("application/offset+octet-stream") && !said.contains("PATCH"),
        "a creation's refusal names what to send, not another request: {said}"
    );
    let sha1_of_other = base64::engine::general_purpose::STANDARD
        .encode(<sha1::Sha1 as sha1::Digest>::digest(b"other"));
    let wrong_sum = tus(&h, Method::POST, "/files")
        .header("upload-length", "5")
        .header("content-type", "application/offset+octet-stream")
        .header("upload-checksum", format!("sha1 {sha1_of_other}"))
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_sum.status(), 460);
    let unknown = tus(&h, Method::POST, "/files")
        .header("upload-length", "5")
        .header("content-type", "application/offset+octet-stream")
        .header("upload-checksum", "whirlpool AAAA")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 400);
    let non_ascii = tus(&h, Method::POST, "/files")
        .header("upload-length", "5")
        .header(
            "upload-metadata",
            reqwest::header::HeaderValue::from_bytes(b"filename \xff").unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(non_ascii.status(), 400);
    assert_eq!((h.blob_count(), h.upload_files()), (0, 0), "nothing stored");
}

#[tokio::test]
async fn upload_urls_behind_a_trusted_proxy_use_its_forwarded_host_and_scheme() {
    let routes = r#"
routes:
  - path: /files
    protocol: tus
    tus: { behind_proxy: true }
    forward: { path: /app/upload }
"#;
    let h = Harness::with_routes(routes).await;
    let created = |headers: &'static [(&'static str, &'static str)]| {
        let mut request = tus(&h, Method::POST, "/files").header("upload-length", "1");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send()
    };
    let forwarded = created(&[("forwarded", "for=192.0.2.1;proto=https;host=up.example")])
        .await
        .unwrap();
    let location = header(&forwarded, "location").unwrap();
    assert!(
        location.starts_with("https://up.example/files/"),
        "{location}"
    );
    let x_forwarded = created(&[
        ("x-forwarded-host", "media.example:8443"),
        ("x-forwarded-proto", "https"),
    ])
    .await
    .unwrap();
    let location = header(&x_forwarded, "location").unwrap();
    assert!(
        location.starts_with("https://media.example:8443/files/"),
        "{location}"
    );
    // The scheme's own port is left out.
    let default_port = created(&[
        ("x-forwarded-host", "media.example:443"),
        ("x-forwarded-proto", "https"),
    ])
    .await
    .unwrap();
    let location = header(&default_port, "location").unwrap();
    assert!(
        location.starts_with("https://media.example/files/"),
        "{location}"
    );
    // Not trusted on a route that is not behind a proxy.
    let plain = Harness::with_routes(TUS_ROUTES).await;
    let response = tus(&plain, Method::POST, "/files")
        .header("upload-length", "1")
        .header("x-forwarded-host", "evil.example")
        .send()
        .await
        .unwrap();
    let location = header(&response, "location").unwrap();
    assert!(location.starts_with(&plain.url("/files/")), "{location}");
}

#[tokio::test]
async fn a_final_upload_racing_the_termination_of_a_partial_is_made_whole_or_refused_as_unknown() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    h.upstream.answer_with(201, "whole");
    let mut outcomes = std::collections::BTreeMap::new();
    for trial in 0..30u64 {
        let data = random_bytes(4000, 100 + trial);
        let mut partials = Vec::new();
        for piece in [data.slice(..1500), data.slice(1500..)] {
            let response = tus(&h, Method::POST, "/files")
                .header("upload-length", piece.len().to_string())
                .header("upload-concat", "partial")
                .send()
                .await
                .unwrap();
            let location = location_of(&h, &response);
            assert_eq!(patch(&h, &location, 0, piece).await.status(), 204);
            partials.push(location);
        }
        let before = h.upstream.received_at("/app/upload").len();
        // The termination sent from a little before to a little after the final creation.
        let lead = Duration::from_micros(trial % 10 * 200);
        let (made, deleted) = tokio::join!(
            async {
                tokio::time::sleep(lead).await;
                tus(&h, Method::POST, "/files")
                    .header("upload-concat", format!("final;{}", partials.join(" ")))
                    .send()
                    .await
            },
            async {
                tokio::time::sleep(Duration::from_millis(1)).await;
                tus(&h, Method::DELETE, &partials[0]).send().await.unwrap()
            }
        );
        assert_eq!(deleted.status(), 204);
        let status = made.unwrap().status().as_u16();
        let received = h.upstream.received_at("/app/upload");
        if status == 201 {
            assert_eq!(received.len() - before, 1, "trial {trial}");
            assert_eq!(received[before].files[0].sha256, sha256_hex(&data));
        } else {
            assert_eq!(
                status, 404,
                "trial {trial}: a partial went, not the storage"
            );
            assert_eq!(received.len(), before, "trial {trial}");
        }
        *outcomes.entry(status).or_insert(0) += 1;
    }
    eprintln!("final creations over 30 races: {outcomes:?}");
}

#[tokio::test]
async fn three_partial_uploads_in_parallel_make_one_final_upload_delivered_once() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    h.upstream.answer_with(201, "whole");
    let data = random_bytes(30_000, 31);
    let pieces = [
        data.slice(0..10_000),
        data.slice(10_000..25_000),
        data.slice(25_000..),
    ];
    let partial = |piece: Bytes| {
        let h = &h;
        async move {
            let response = tus(h, Method::POST, "/files")
                .header("upload-length", piece.len().to_string())
                .header("upload-concat", "partial")
                .header("upload-metadata", format!("filename {}", b64("piece")))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 201);
            assert_eq!(header(&response, "upload-concat"), Some("partial"));
            let location = location_of(h, &response);
            let done = patch(h, &location, 0, piece).await;
            assert_eq!(done.status(), 204);
            let progress = head(h, &location).await;
            assert_eq!(header(&progress, "upload-concat"), Some("partial"));
            // Complete, and never delivered on its own: no answer to wait for.
            let answer = h.client.get(h.url(&location)).send().await.unwrap();
            assert_eq!(answer.status(), 409);
            location
        }
    };
    let locations = futures::future::join_all(pieces.iter().cloned().map(partial)).await;
    assert!(
        h.upstream.received().is_empty(),
        "partial uploads are not delivered"
    );
    let blobs = h.blob_count();

    // Not complete, unknown, or with a length: refused, nothing created.
    let unfinished = {
        let response = tus(&h, Method::POST, "/files")
            .header("upload-length", "10")
            .header("upload-concat", "partial")
            .send()
            .await
            .unwrap();
        location_of(&h, &response)
    };
    let final_of = |urls: String| {
        tus(&h, Method::POST, "/files")
            .header("upload-concat", format!("final;{urls}"))
            .header("upload-metadata", format!("filename {}", b64("whole.bin")))
    };
    let with_unfinished = final_of(format!("{} {unfinished}", locations[0]));
    assert_eq!(with_unfinished.send().await.unwrap().status(), 400);
    let unknown = final_of(format!("{} /files/{}", locations[0], "a".repeat(32)));
    assert_eq!(unknown.send().await.unwrap().status(), 404);
    let with_length = final_of(locations.join(" ")).header("upload-length", "30000");
    assert_eq!(with_length.send().await.unwrap().status(), 400);
    // Its bytes are its partial uploads': a body sent with it is refused as a PATCH would be.
    let with_body = final_of(locations.join(" "))
        .header("content-type", "application/offset+octet-stream")
        .body("more");
    assert_eq!(with_body.send().await.unwrap().status(), 403);
    assert!(h.upstream.received().is_empty());

    // The partial uploads' URLs as absolute URLs, as tus-js-client sends them.
    let absolute: Vec<String> = locations.iter().map(|l| h.url(l)).collect();
    let response = final_of(absolute.join(" ")).send().await.unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(header(&response, "stitch-delivery"), Some("delivered"));
    assert_eq!(
        header(&response, "upload-concat"),
        Some(format!("final;{}", absolute.join(" ")).as_str()),
        "the partial uploads' URLs, as sent"
    );
    let location = location_of(&h, &response);
    let delivery = the_delivery(&h);
    assert_eq!(delivery.files[0].file_name, "whole.bin");
    assert_eq!(
        delivery.files[0].sha256,
        sha256_hex(&data),
        "in order, byte-exact"
    );
    assert_eq!(
        h.blob_count(),
        blobs,
        "no byte copied: the final upload's parts are the partial uploads' blobs"
    );

    let progress = head(&h, &location).await;
    assert_eq!(header(&progress, "upload-offset"), Some("30000"));
    assert_eq!(header(&progress, "upload-length"), Some("30000"));
    assert_eq!(
        header(&progress, "upload-concat"),
        Some(format!("final;{}", absolute.join(" ")).as_str()),
        "HEAD returns Upload-Concat as received"
    );
    let patched = patch(&h, &location, 30_000, Bytes::from("x")).await;
    assert_eq!(patched.status(), 403);
    let answer = h.client.get(h.url(&location)).send().await.unwrap();
    assert_eq!(answer.text().await.unwrap(), "whole");
    assert_eq!(h.upstream.received_at("/app/upload").len(), 1);

    // Named by their paths, the same partial uploads make another final upload, whose HEAD
    // returns the paths as sent, not made absolute.
    let relative = locations.join(" ");
    let response = final_of(relative.clone()).send().await.unwrap();
    assert_eq!(response.status(), 201);
    let progress = head(&h, &location_of(&h, &response)).await;
    assert_eq!(
        header(&progress, "upload-concat"),
        Some(format!("final;{relative}").as_str())
    );
    assert_eq!(header(&progress, "upload-offset"), Some("30000"));
}

#[tokio::test]
async fn cors_preflights_are_answered_and_answers_carry_the_headers_for_allowed_origins() {
    let routes = r#"
routes:
  - path: /files
    protocol: tus
    cors: { origins: ["https://app.example"], credentials: true, max_age: 10m }
    forward: { path: /app/upload }
  - path: /chunks
    protocol: resumable
    cors: { origins: ["https://app.example"] }
    forward: { path: /app/upload }
"#;
    let h = Harness::with_routes(routes).await;
    let preflight = |path: &str, origin: &str| {
        h.client
            .request(Method::OPTIONS, h.url(path))
            .header("origin", origin.to_string())
            .header("access-control-request-method", "PATCH")
            .header(
                "access-control-request-headers",
                "tus-resumable, upload-offset, x-custom",
            )
            .send()
    };
    let allowed = preflight("/files/abc", "https://app.example")
        .await
        .unwrap();
    assert_eq!(allowed.status(), 204);
    assert_eq!(
        header(&allowed, "access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(
        header(&allowed, "access-control-allow-credentials"),
        Some("true")
    );
    assert_eq!(header(&allowed, "access-control-max-age"), Some("600"));
    let methods = header(&allowed, "access-control-allow-methods").unwrap();
    assert!(
        methods.contains("PATCH") && methods.contains("DELETE"),
        "{methods}"
    );
    let headers = header(&allowed, "access-control-allow-headers")
        .unwrap()
        .to_lowercase();
    for name in [
        "tus-resumable",
        "upload-offset",
        "upload-metadata",
        "x-custom",
    ] {
        assert!(headers.contains(name), "{name} in {headers}");
    }
    let other = preflight("/files", "https://evil.example").await.unwrap();
    assert_eq!(other.status(), 403);
    assert_eq!(header(&other, "access-control-allow-origin"), None);

    // An actual request from the allowed origin can read the tus headers.
    let created = tus(&h, Method::POST, "/files")
        .header("origin", "https://app.example")
        .header("upload-length", "3")
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    assert_eq!(
        header(&created, "access-control-allow-origin"),
        Some("https://app.example")
    );
    let exposed = header(&created, "access-control-expose-headers").unwrap();
    for name in [
        "Location",
        "Upload-Offset",
        "Upload-Expires",
        "Tus-Resumable",
    ] {
        assert!(exposed.contains(name), "{name} in {exposed}");
    }
    // A plain tus OPTIONS (no preflight) still tells the server's capabilities.
    let capabilities = h
        .client
        .request(Method::OPTIONS, h.url("/files"))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&capabilities, "tus-version"), Some("1.0.0"));

    // A chunk route answers its preflights too; its other OPTIONS are the application's.
    let chunk = preflight("/chunks", "https://app.example").await.unwrap();
    assert_eq!(chunk.status(), 204);
    assert_eq!(header(&chunk, "access-control-allow-credentials"), None);
    let plain = h
        .client
        .request(Method::OPTIONS, h.url("/chunks"))
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 200);
    assert_eq!(h.upstream.received_at("/chunks").len(), 1, "passed through");
    assert!(h.upstream.received_at("/files").is_empty());
}

#[tokio::test]
async fn a_metadata_token_can_be_the_scope_of_a_server_to_server_flow() {
    let routes = r#"
routes:
  - path: /files
    protocol: tus
    scope: { metadata: token }
    forward: { path: /app/upload }
"#;
    let h = Harness::with_routes(routes).await;
    h.upstream.answer_with(200, r#"{"file":"f-1"}"#);
    let without = tus(&h, Method::POST, "/files")
        .header("upload-length", "4")
        .send()
        .await
        .unwrap();
    assert_eq!(without.status(), 400, "the token is required");
    assert_eq!(h.upload_files(), 0);
    let created = tus(&h, Method::POST, "/files")
        .header("upload-length", "4")
        .header("cookie", "session=anything")
        .header(
            "upload-metadata",
            format!("filename {},token {}", b64("f"), b64("T-9")),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let location = location_of(&h, &created);
    // No cookie on the PATCH or the finalize: the URL and the token are enough.
    assert_eq!(
        patch(&h, &location, 0, Bytes::from("data")).await.status(),
        204
    );
    let finalized = h.client.put(h.url("/files/T-9")).send().await.unwrap();
    assert_eq!(finalized.status(), 200);
    assert_eq!(finalized.text().await.unwrap(), r#"{"file":"f-1"}"#);
    assert_eq!(h.upstream.received_at("/app/upload").len(), 1);
}

/// A PATCH of `data` at 0 whose client sent 50,000 bytes and then went quiet (a phone changing
/// networks): the request stays open on the server.
async fn quiet_patch(h: &Harness, location: &str, data: &[u8]) -> RawConnection {
    let mut quiet = RawConnection::open(h.stitch.as_ref().unwrap().addr).await;
    let head_bytes = format!(
        "PATCH {location} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n\
         Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n\
         Content-Length: {}\r\n\r\n",
        data.len()
    );
    assert!(quiet.send(head_bytes.as_bytes()).await);
    assert!(quiet.send(&data[..50_000]).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    quiet
}

/// The old request is answered 409 (taken over), and what its connection sends afterwards,
/// other bytes here, changes nothing: the file is delivered once, as sent the second time.
async fn the_quiet_patch_was_taken_over(
    h: &Harness,
    location: &str,
    mut quiet: RawConnection,
    data: &[u8],
) {
    let old = quiet
        .response(Duration::from_secs(5))
        .await
        .expect("the quiet request is answered");
    assert_eq!(old.status, 409, "taken over");
    let mut late = data.to_vec();
    late[100_000] ^= 0xff;
    let _ = quiet.send(&late[50_000..]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(offset_of(h, location).await, data.len() as u64);
    assert_eq!(the_delivery(h).files[0].sha256, sha256_hex(data));
}

#[tokio::test]
async fn a_client_resuming_on_a_new_connection_takes_over_from_its_quiet_patch_at_once() {
    // Its old request would hold the upload until the body timeout (60 s by default). The
    // client resumes as tus-js-client does: HEAD, which stops the old request (keeping the
    // bytes that arrived) and counts them, then PATCH from there.
    let h = Harness::with_routes(TUS_ROUTES).await;
    let data = random_bytes(200_000, 12);
    let location = create(&h, data.len() as u64, "").await;
    let quiet = quiet_patch(&h, &location, &data).await;
    let at = tokio::time::timeout(Duration::from_secs(5), offset_of(&h, &location))
        .await
        .expect("HEAD is not held up by the quiet request");
    assert_eq!(at, 50_000, "the bytes that arrived are kept");
    let rest = patch(&h, &location, at, data.slice(at as usize..)).await;
    assert_eq!(rest.status(), 204);
    assert_eq!(header(&rest, "upload-offset"), Some("200000"));
    the_quiet_patch_was_taken_over(&h, &location, quiet, &data).await;
}

#[tokio::test]
async fn a_patch_without_a_head_first_takes_over_and_is_told_the_offset_moved() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    let data = random_bytes(200_000, 13);
    let location = create(&h, data.len() as u64, "").await;
    let quiet = quiet_patch(&h, &location, &data).await;
    let retried = tokio::time::timeout(
        Duration::from_secs(5),
        patch(&h, &location, 0, data.clone()),
    )
    .await
    .expect("the PATCH is not held up by the quiet request");
    // 409, as for any offset that moved: tus-js-client retries, asking HEAD where to go on.
    assert_eq!(retried.status(), 409);
    assert_eq!(header(&retried, "upload-offset"), Some("50000"));
    let rest = patch(&h, &location, 50_000, data.slice(50_000..)).await;
    assert_eq!(rest.status(), 204);
    the_quiet_patch_was_taken_over(&h, &location, quiet, &data).await;
}

#[tokio::test]
async fn termination_takes_over_from_a_quiet_patch() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    let data = random_bytes(200_000, 14);
    let location = create(&h, data.len() as u64, "").await;
    let mut quiet = quiet_patch(&h, &location, &data).await;
    let deleted = tokio::time::timeout(
        Duration::from_secs(5),
        tus(&h, Method::DELETE, &location).send(),
    )
    .await
    .expect("DELETE is not held up by the quiet request")
    .unwrap();
    assert_eq!(deleted.status(), 204);
    let old = quiet.response(Duration::from_secs(5)).await;
    assert_eq!(old.map(|a| a.status), Some(409));
    assert_eq!(head(&h, &location).await.status(), 410);
    let _ = quiet.send(&data[50_000..]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!((h.blob_count(), h.part_count()), (0, 0), "no bytes kept");
    assert!(h.upstream.received_at("/app/upload").is_empty());
}

#[tokio::test]
async fn a_checksummed_patch_taken_over_keeps_nothing_and_is_told_so_not_that_its_checksum_failed()
{
    // A checksum covers the whole body: what arrived of it cannot be checked, so it is not
    // kept; but the client sent nothing wrong, and is told what happened (409, which it
    // retries), not 460 (which it would not).
    let h = Harness::with_routes(TUS_ROUTES).await;
    let data = random_bytes(200_000, 15);
    let location = create(&h, data.len() as u64, "").await;
    let mut quiet = RawConnection::open(h.stitch.as_ref().unwrap().addr).await;
    let head_bytes = format!(
        "PATCH {location} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n\
         Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n\
         Upload-Checksum: sha256 {}\r\nContent-Length: {}\r\n\r\n",
        digest("sha256", &data),
        data.len()
    );
    assert!(quiet.send(head_bytes.as_bytes()).await);
    assert!(quiet.send(&data[..50_000]).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(offset_of(&h, &location).await, 0, "nothing kept");
    let old = quiet.response(Duration::from_secs(5)).await;
    assert_eq!(old.map(|a| a.status), Some(409), "taken over");
    assert_eq!(h.damage(), Vec::<String>::new(), "nothing left in staging");
    let whole = tus(&h, Method::PATCH, &location)
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", "0")
        .header(
            "upload-checksum",
            format!("sha256 {}", digest("sha256", &data)),
        )
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(whole.status(), 204);
    assert_eq!(the_delivery(&h).files[0].sha256, sha256_hex(&data));
}

#[tokio::test]
async fn a_header_repeated_with_the_same_value_counts_once_and_metadata_lines_join() {
    let h = Harness::with_routes(TUS_ROUTES).await;
    let created = tus(&h, Method::POST, "/files")
        .header("upload-length", "5")
        .header("upload-length", "5")
        .header("upload-metadata", format!("filename {}", b64("a.txt")))
        .header("upload-metadata", format!("folder {}", b64("inbox")))
        .header("upload-metadata", format!("folder {}", b64("inbox")))
        .header("upload-metadata", "")
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let location = location_of(&h, &created);
    let progress = head(&h, &location).await;
    assert_eq!(
        header(&progress, "upload-metadata"),
        Some(format!("filename {},folder {}", b64("a.txt"), b64("inbox")).as_str()),
        "one list"
    );
    let done = patch(&h, &location, 0, Bytes::from("hello")).await;
    assert_eq!(done.status(), 204);
    let delivery = the_delivery(&h);
    assert_eq!(delivery.files[0].file_name, "a.txt");
    assert_eq!(delivery.field("folder"), Some("inbox"));
}
