//! Test harness: Stitch started in-process on a free loopback port, in front of a real recording
//! upstream, and a client that sends exactly what Resumable.js 1.1.0 and Flow.js 2.14.1 send.
#![allow(dead_code)]

pub mod disk;
pub mod process;
pub mod raw;
pub mod relay;
pub mod tus;
pub mod upstream;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use stitch::{Config, Running};
pub use upstream::{Received, Upstream};

pub fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// Resumable and Flow routes, each forwarding to `/app/upload`.
pub const ROUTES: &str = r#"
routes:
  - path: /upload
    protocol: resumable
    forward: { path: /app/upload, field: document }
  - path: /flow
    protocol: flow
    forward: { path: /app/upload, field: document }
"#;

/// A config for a test: `storage` lines go under `storage:` (indented by two spaces).
pub fn config_yaml(upstream: SocketAddr, dir: &Path, storage: &str, yaml_tail: &str) -> String {
    config_yaml_on(free_addr(), upstream, dir, storage, yaml_tail)
}

/// The same, listening on `listen` (port 0: Stitch in this process picks a free one).
pub fn config_yaml_on(
    listen: SocketAddr,
    upstream: SocketAddr,
    dir: &Path,
    storage: &str,
    yaml_tail: &str,
) -> String {
    format!(
        "listen: {listen}\nupstream: {upstream}\nthreads: 2\nshutdown_grace: 0\n\
         storage:\n  dir: {}\n  fsync: true\n{storage}{yaml_tail}",
        dir.display()
    )
}

/// A config for an in-process server on a free port of its choosing.
pub fn config(upstream: SocketAddr, dir: &Path, storage: &str, yaml_tail: &str) -> Config {
    let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
    let yaml = config_yaml_on(any_port, upstream, dir, storage, yaml_tail);
    Config::from_yaml(&yaml, "test").expect("test config is valid")
}

/// Waits until the upstream has received `count` requests at `path` (the background queue
/// delivers on its own schedule), failing after `within`.
pub async fn wait_for_requests(h: &Harness, path: &str, count: usize, within: std::time::Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let got = h.upstream.received_at(path).len();
        if got >= count {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the upstream got {got} requests at {path} within {within:?}, not {count}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

pub struct Harness {
    pub upstream: Upstream,
    pub stitch: Option<Running>,
    pub dir: tempfile::TempDir,
    pub client: reqwest::Client,
    storage: String,
    yaml_tail: String,
    /// Where Stitch forwards (the recording upstream unless a test puts something else there).
    forward_to: SocketAddr,
    /// The storage directory (in `dir` unless a test puts it elsewhere).
    storage_dir: std::path::PathBuf,
    /// A proxy in front of Stitch that requests go through, if a test put one there.
    pub front: Option<SocketAddr>,
}

impl Harness {
    pub async fn start() -> Harness {
        Harness::with_routes(ROUTES).await
    }

    pub async fn with_routes(yaml_tail: &str) -> Harness {
        Harness::with_storage("", yaml_tail).await
    }

    /// `storage`: extra lines for the `storage:` section, e.g. `"  upload_ttl: 1s\n"`.
    pub async fn with_storage(storage: &str, yaml_tail: &str) -> Harness {
        Harness::custom(storage, yaml_tail, None, None).await
    }

    /// Stitch in front of `forward_to` (default: the recording upstream), storing in
    /// `storage_dir` (default: a new temporary directory).
    pub async fn custom(
        storage: &str,
        yaml_tail: &str,
        forward_to: Option<SocketAddr>,
        storage_dir: Option<&Path>,
    ) -> Harness {
        let upstream = Upstream::start().await;
        let dir = tempfile::tempdir().unwrap();
        let forward_to = forward_to.unwrap_or(upstream.addr);
        let storage_dir = storage_dir.unwrap_or(dir.path()).to_path_buf();
        let config = config(forward_to, &storage_dir, storage, yaml_tail);
        let stitch = stitch::spawn(&config).unwrap();
        Harness {
            upstream,
            stitch: Some(stitch),
            dir,
            client: reqwest::Client::new(),
            storage: storage.to_string(),
            yaml_tail: yaml_tail.to_string(),
            forward_to,
            storage_dir,
            front: None,
        }
    }

    pub fn url(&self, path_and_query: &str) -> String {
        let addr = match self.front {
            Some(front) => front,
            None => self.stitch.as_ref().expect("stitch is running").addr,
        };
        format!("http://{addr}{path_and_query}")
    }

    /// Where Stitch itself listens (not a proxy in front).
    pub fn stitch_addr(&self) -> SocketAddr {
        self.stitch.as_ref().expect("stitch is running").addr
    }

    /// Stops Stitch and starts it again on the same storage directory (a new port).
    pub fn restart(&mut self) {
        if let Some(running) = self.stitch.take() {
            running.stop();
        }
        let config = config(
            self.forward_to,
            &self.storage_dir,
            &self.storage,
            &self.yaml_tail,
        );
        self.stitch = Some(stitch::spawn(&config).unwrap());
    }

    pub fn storage_dir(&self) -> &Path {
        &self.storage_dir
    }

    /// The stored data, as files with their lengths, relative to the storage directory: chunk
    /// bytes (`blobs/`), upload state (`uploads/`) and bytes being staged (in `tmp/`). Lock
    /// files and the activity index are bookkeeping, not data.
    pub fn stored_files(&self) -> Vec<(String, u64)> {
        // A delivered upload's parts are removed just after its answer is given.
        if let Some(stitch) = &self.stitch {
            assert!(
                stitch.wait_settled(std::time::Duration::from_secs(20)),
                "a delivered upload's parts were still being removed after 20 s"
            );
        }
        let mut found = Vec::new();
        walk(&self.storage_dir, &mut found);
        let root = format!("{}/", self.storage_dir.display());
        let mut data: Vec<(String, u64)> = found
            .into_iter()
            .filter_map(|(path, len)| Some((path.strip_prefix(&root)?.to_string(), len)))
            .filter(|(path, _)| {
                path.starts_with("blobs/")
                    || path.starts_with("uploads/")
                    || (path.starts_with("tmp/") && !path.ends_with(".lock"))
            })
            .collect();
        data.sort();
        data
    }

    /// How many distinct chunk contents are stored.
    pub fn blob_count(&self) -> usize {
        self.count_stored("blobs/")
    }

    /// How many parts all uploads have.
    pub fn part_count(&self) -> usize {
        self.stored_files()
            .iter()
            .filter(|(path, _)| path.contains("/parts/"))
            .count()
    }

    /// Files of any upload's state.
    pub fn upload_files(&self) -> usize {
        self.count_stored("uploads/")
    }

    /// Bytes left in staging, and state files written short (what a failed write may leave).
    pub fn damage(&self) -> Vec<String> {
        self.stored_files()
            .into_iter()
            .filter(|(path, len)| {
                let state = path.ends_with("/meta.json") || path.ends_with("/answer");
                path.starts_with("tmp/") || (state && *len == 0)
            })
            .map(|(path, len)| format!("{path} ({len} bytes)"))
            .collect()
    }

    fn count_stored(&self, prefix: &str) -> usize {
        self.stored_files()
            .iter()
            .filter(|(path, _)| path.starts_with(prefix))
            .count()
    }
}

/// Every file under `dir`, at any depth, with its length. (A file or directory removed while
/// it is read is left out: a process may be changing the storage meanwhile.)
pub fn walk(dir: &Path, found: &mut Vec<(String, u64)>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        if meta.is_dir() {
            walk(&entry.path(), found);
        } else {
            found.push((entry.path().display().to_string(), meta.len()));
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    Resumable,
    Flow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    Multipart,
    Octet,
}

/// A file as a client library slices it.
#[derive(Debug, Clone)]
pub struct ChunkedFile {
    pub client: Client,
    pub identifier: String,
    pub name: String,
    pub mime: String,
    pub data: Content,
    pub chunk_size: u64,
    pub force_chunk_size: bool,
    /// The site's custom `query` fields.
    pub extra: Vec<(String, String)>,
    /// The site's custom `headers` (sent with tests and uploads).
    pub headers: Vec<(String, String)>,
    pub route: String,
    pub body: Body,
    pub method: reqwest::Method,
}

/// File contents: real bytes, or a large file that costs no memory to describe: `size` bytes
/// in stripes of `stripe` bytes, each stripe a different byte value (so parts out of order show).
#[derive(Debug, Clone)]
pub enum Content {
    Bytes(Bytes),
    Stripes { size: u64, stripe: u64 },
}

impl Content {
    pub fn len(&self) -> u64 {
        match self {
            Content::Bytes(b) => b.len() as u64,
            Content::Stripes { size, .. } => *size,
        }
    }

    pub fn slice(&self, start: u64, end: u64) -> Bytes {
        match self {
            Content::Bytes(b) => b.slice(start as usize..end as usize),
            Content::Stripes { stripe, .. } => {
                let mut out = Vec::with_capacity((end - start) as usize);
                let mut at = start;
                while at < end {
                    let stripe_end = ((at / stripe) + 1) * stripe;
                    let upto = stripe_end.min(end);
                    out.resize(out.len() + (upto - at) as usize, stripe_byte(at, *stripe));
                    at = upto;
                }
                Bytes::from(out)
            }
        }
    }

    pub fn sha256(&self) -> String {
        let mut hasher = Sha256::new();
        match self {
            Content::Bytes(b) => hasher.update(b),
            Content::Stripes { size, stripe } => {
                let mut at = 0;
                while at < *size {
                    let upto = (at + (1 << 20)).min(*size).min((at / stripe + 1) * stripe);
                    hasher.update(vec![stripe_byte(at, *stripe); (upto - at) as usize]);
                    at = upto;
                }
            }
        }
        hex::encode(hasher.finalize())
    }
}

fn stripe_byte(offset: u64, stripe: u64) -> u8 {
    (offset / stripe % 251) as u8 + 1
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Bytes {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

impl ChunkedFile {
    pub fn resumable(name: &str, data: Bytes, chunk_size: u64) -> ChunkedFile {
        ChunkedFile::new(
            Client::Resumable,
            "/upload",
            name,
            Content::Bytes(data),
            chunk_size,
        )
    }

    pub fn flow(name: &str, data: Bytes, chunk_size: u64) -> ChunkedFile {
        ChunkedFile::new(
            Client::Flow,
            "/flow",
            name,
            Content::Bytes(data),
            chunk_size,
        )
    }

    pub fn new(client: Client, route: &str, name: &str, data: Content, chunk_size: u64) -> Self {
        let clean: String = name
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
            .collect();
        ChunkedFile {
            client,
            identifier: format!("{}-{clean}", data.len()),
            name: name.to_string(),
            mime: "text/plain".to_string(),
            data,
            chunk_size,
            force_chunk_size: false,
            extra: Vec::new(),
            headers: Vec::new(),
            route: route.to_string(),
            body: Body::Multipart,
            method: reqwest::Method::POST,
        }
    }

    /// Chunk count, as both clients compute it.
    pub fn count(&self) -> u64 {
        let size = self.data.len();
        let count = if self.force_chunk_size {
            size.div_ceil(self.chunk_size)
        } else {
            size / self.chunk_size
        };
        count.max(1)
    }

    pub fn bounds(&self, number: u64) -> (u64, u64) {
        let size = self.data.len();
        let start = (number - 1) * self.chunk_size;
        let mut end = size.min(number * self.chunk_size);
        if size - end < self.chunk_size && !self.force_chunk_size {
            end = size;
        }
        (start, end)
    }

    pub fn sha256(&self) -> String {
        self.data.sha256()
    }

    /// The protocol parameters of chunk `number`, in the client's order.
    pub fn params(&self, number: u64) -> Vec<(String, String)> {
        let (start, end) = self.bounds(number);
        let p = match self.client {
            Client::Resumable => "resumable",
            Client::Flow => "flow",
        };
        let mut params = vec![
            (format!("{p}ChunkNumber"), number.to_string()),
            (format!("{p}ChunkSize"), self.chunk_size.to_string()),
            (format!("{p}CurrentChunkSize"), (end - start).to_string()),
            (format!("{p}TotalSize"), self.data.len().to_string()),
        ];
        if self.client == Client::Resumable {
            params.push(("resumableType".into(), self.mime.clone()));
        }
        params.extend([
            (format!("{p}Identifier"), self.identifier.clone()),
            (format!("{p}Filename"), self.name.clone()),
            (format!("{p}RelativePath"), self.name.clone()),
            (format!("{p}TotalChunks"), self.count().to_string()),
        ]);
        params
    }

    /// The URL query of chunk `number`'s protocol parameters.
    pub fn query_string(&self, number: u64) -> String {
        self.query(&self.params(number))
    }

    fn query(&self, pairs: &[(String, String)]) -> String {
        url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish()
    }

    /// The test GET for chunk `number`: custom query first (Resumable) or last (Flow).
    pub async fn test(&self, h: &Harness, number: u64) -> reqwest::Response {
        let mut pairs = self.extra.clone();
        pairs.extend(self.params(number));
        let url = h.url(&format!("{}?{}", self.route, self.query(&pairs)));
        let mut request = h.client.get(url);
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        request.send().await.expect("test request")
    }

    /// Uploads chunk `number` the way the client library would.
    pub async fn upload(&self, h: &Harness, number: u64) -> reqwest::Response {
        self.upload_with(h, number, self.params(number)).await
    }

    /// Uploads chunk `number` with these protocol parameters (to send bad ones).
    pub async fn upload_with(
        &self,
        h: &Harness,
        number: u64,
        params: Vec<(String, String)>,
    ) -> reqwest::Response {
        let (start, end) = self.bounds(number);
        let chunk = self.data.slice(start, end);
        self.send_chunk(h, params, chunk)
            .await
            .expect("upload request")
    }

    pub async fn send_chunk(
        &self,
        h: &Harness,
        params: Vec<(String, String)>,
        chunk: Bytes,
    ) -> reqwest::Result<reqwest::Response> {
        let mut pairs = params;
        pairs.extend(self.extra.clone());
        let request = match self.body {
            Body::Octet => {
                let url = h.url(&format!("{}?{}", self.route, self.query(&pairs)));
                let mut request = h.client.request(self.method.clone(), url);
                if self.client == Client::Resumable {
                    request = request.header("content-type", "application/octet-stream");
                } else if !self.mime.is_empty() {
                    request = request.header("content-type", self.mime.clone());
                }
                request.body(chunk)
            }
            Body::Multipart => {
                let url = match self.client {
                    Client::Resumable => h.url(&format!("{}?{}", self.route, self.query(&pairs))),
                    Client::Flow => h.url(&self.route),
                };
                let part_type = match self.client {
                    Client::Resumable => "application/octet-stream".to_string(),
                    Client::Flow if self.mime.is_empty() => "application/octet-stream".into(),
                    Client::Flow => self.mime.clone(),
                };
                let (boundary, head, tail) =
                    multipart_frame(&pairs, "file", &self.name, &part_type);
                let len = head.len() as u64 + chunk.len() as u64 + tail.len() as u64;
                let pieces: Vec<reqwest::Result<Bytes>> = vec![Ok(head), Ok(chunk), Ok(tail)];
                h.client
                    .request(self.method.clone(), url)
                    .header(
                        "content-type",
                        format!("multipart/form-data; boundary={boundary}"),
                    )
                    .header("content-length", len)
                    .body(reqwest::Body::wrap_stream(futures::stream::iter(pieces)))
            }
        };
        let mut request = request;
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        request.send().await
    }

    /// Sends chunk `number` as a raw body (`method: 'octet'`, parameters in the URL) to a Stitch
    /// at `addr` (one not started by the harness: a real binary).
    pub async fn send_to(
        &self,
        client: &reqwest::Client,
        addr: SocketAddr,
        number: u64,
    ) -> reqwest::Result<reqwest::Response> {
        let (start, end) = self.bounds(number);
        client
            .post(format!(
                "http://{addr}{}?{}",
                self.route,
                self.query_string(number)
            ))
            .body(self.data.slice(start, end))
            .send()
            .await
    }

    /// Tests and uploads every chunk in order, like the client with one connection.
    pub async fn upload_all(&self, h: &Harness) -> reqwest::Response {
        let mut last = None;
        for number in 1..=self.count() {
            let test = self.test(h, number).await;
            assert!(
                test.status() == 204 || test.status() == 200,
                "test of chunk {number}: {}",
                test.status()
            );
            let response = self.upload(h, number).await;
            last = Some(response);
        }
        last.expect("at least one chunk")
    }
}

/// Multipart framing like a browser's FormData: text fields, then the file part.
pub fn multipart_frame(
    fields: &[(String, String)],
    file_field: &str,
    file_name: &str,
    part_type: &str,
) -> (String, Bytes, Bytes) {
    let boundary = "----WebKitFormBoundaryStitchTest7MA4YWxk".to_string();
    let mut head = String::new();
    for (name, value) in fields {
        head.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
        ));
    }
    head.push_str(&format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"{file_field}\"; \
         filename=\"{file_name}\"\r\nContent-Type: {part_type}\r\n\r\n"
    ));
    let tail = format!("\r\n--{boundary}--\r\n");
    (boundary, Bytes::from(head), Bytes::from(tail))
}

impl Harness {
    /// POSTs a browser-style multipart body (`fields`, then a `file` part with `data`) to `path`.
    pub async fn post_form(
        &self,
        path: &str,
        fields: &[(String, String)],
        file_name: &str,
        data: &[u8],
    ) -> reqwest::Response {
        let (boundary, head, tail) = multipart_frame(fields, "file", file_name, "text/plain");
        self.client
            .post(self.url(path))
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body([&head[..], data, &tail[..]].concat())
            .send()
            .await
            .expect("form post")
    }
}

/// Asserts that the upstream received `file` exactly once, whole, as the `document` field.
pub fn assert_delivered_once(h: &Harness, file: &ChunkedFile) -> Received {
    assert_delivered_once_to(&h.upstream, file)
}

/// [`assert_delivered_once`], for an upstream without a harness.
pub fn assert_delivered_once_to(upstream: &Upstream, file: &ChunkedFile) -> Received {
    let received = upstream.received_at("/app/upload");
    assert_eq!(
        received.len(),
        1,
        "the upstream must receive the file exactly once"
    );
    let request = received.into_iter().next().unwrap();
    assert_eq!(request.method, "POST");
    assert_eq!(request.files.len(), 1, "one file part");
    let part = &request.files[0];
    assert_eq!(part.field, "document");
    assert_eq!(part.file_name, file.name);
    assert_eq!(part.len, file.data.len());
    assert_eq!(part.sha256, file.sha256());
    assert_eq!(
        request
            .header("content-length")
            .map(|v| v.parse::<u64>().unwrap()),
        Some(request.body_len),
        "Content-Length is set and exact"
    );
    request
}
