//! tus requests at the HTTP level, for the tests that speak the protocol by hand.

use super::Harness;
use bytes::Bytes;
use reqwest::{Method, Response};

pub fn header<'r>(response: &'r Response, name: &str) -> Option<&'r str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The upload URL a creation answered, as a path. Stitch answers with an absolute URL on the
/// host the client used.
pub fn location_of(h: &Harness, response: &Response) -> String {
    let location = header(response, "location").expect("Location");
    let origin = h.url("");
    location
        .strip_prefix(origin.trim_end_matches('/'))
        .unwrap_or_else(|| panic!("{location:?} is not on {origin}"))
        .to_string()
}

/// A tus request with `Tus-Resumable: 1.0.0`.
pub fn tus(h: &Harness, method: Method, path: &str) -> reqwest::RequestBuilder {
    h.client
        .request(method, h.url(path))
        .header("tus-resumable", "1.0.0")
}

/// A PATCH of `body` at `offset`.
pub async fn patch(h: &Harness, location: &str, offset: u64, body: Bytes) -> Response {
    send_bytes_at(tus(h, Method::PATCH, location), offset, body).await
}

/// Sends `request` (a tus PATCH) with `body` as its bytes at `offset`.
async fn send_bytes_at(request: reqwest::RequestBuilder, offset: u64, body: Bytes) -> Response {
    request
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", offset.to_string())
        .body(body)
        .send()
        .await
        .unwrap()
}

/// A tus route at `/files`, delivering to `/app/upload` in the field `document`.
pub const TUS_ROUTE: &str = r#"
routes:
  - path: /files
    protocol: tus
    forward: { path: /app/upload, field: document }
"#;

/// Creates an upload of `length` bytes on `/files`; returns its path.
pub async fn create_upload(h: &Harness, length: usize) -> String {
    let created = tus(h, reqwest::Method::POST, "/files")
        .header("upload-length", length.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201, "creation");
    location_of(h, &created)
}

/// Creates an upload of `length` bytes on `/files` of the Stitch at `addr` (a process of its
/// own); returns its path.
pub async fn create_at(addr: std::net::SocketAddr, length: usize) -> String {
    let created = reqwest::Client::new()
        .post(format!("http://{addr}/files"))
        .header("tus-resumable", "1.0.0")
        .header("upload-length", length.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201, "creation");
    let location = header(&created, "location").expect("Location");
    location[location.find("/files").expect("a URL on /files")..].to_string()
}

/// The head of a PATCH of `length` bytes at `offset` to `path`, for a raw connection that
/// then sends the body as slowly, or as partly, as a test needs.
pub fn patch_head(path: &str, offset: u64, length: usize) -> String {
    format!(
        "PATCH {path} HTTP/1.1\r\nHost: a\r\nTus-Resumable: 1.0.0\r\n\
         Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n\
         Content-Length: {length}\r\n\r\n"
    )
}

/// A PATCH of `body` at `offset` to `path` on the Stitch at `addr` (a process of its own).
pub async fn patch_at(
    addr: std::net::SocketAddr,
    path: &str,
    offset: usize,
    body: Bytes,
) -> Response {
    let request = reqwest::Client::new()
        .patch(format!("http://{addr}{path}"))
        .header("tus-resumable", "1.0.0");
    send_bytes_at(request, offset as u64, body).await
}

/// Asserts that the application got `data` exactly once, byte-exact, at `/app/upload`.
pub fn assert_delivered_once(upstream: &super::Upstream, data: &[u8]) {
    use sha2::Digest;
    let received = upstream.received_at("/app/upload");
    assert_eq!(received.len(), 1, "delivered once");
    assert_eq!(
        received[0].files[0].sha256,
        hex::encode(sha2::Sha256::digest(data)),
        "byte-exact"
    );
}
