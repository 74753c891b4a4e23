//! A real HTTP upstream on loopback that records every request it receives: the application
//! Stitch sits in front of. Multipart bodies are read as the demo application reads them
//! (`stitch::demo::read_form`: streaming, a real parser, each file hashed), so tests can assert
//! on exactly what an application would see.

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

pub use stitch::demo::FormFile as ReceivedFile;

#[derive(Debug, Clone)]
pub struct Received {
    /// When the request's head arrived.
    pub at: std::time::Instant,
    pub method: String,
    pub path: String,
    /// Path and query, as sent.
    pub target: String,
    pub headers: http::HeaderMap,
    /// Text parts of a multipart body, in order.
    pub fields: Vec<(String, String)>,
    pub files: Vec<ReceivedFile>,
    /// Length and sha256 of the raw body.
    pub body_len: u64,
    pub body_sha256: String,
    /// A body that is not multipart, if it is small (a JSON question).
    pub text: Option<String>,
}

impl Received {
    fn of(
        at: std::time::Instant,
        parts: http::request::Parts,
        fields: Vec<(String, String)>,
        files: Vec<ReceivedFile>,
        body_len: u64,
        body_sha256: String,
    ) -> Received {
        Received {
            at,
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            target: parts.uri.to_string(),
            headers: parts.headers,
            fields,
            files,
            body_len,
            body_sha256,
            text: None,
        }
    }

    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Did the whole body arrive (as long as its Content-Length said)?
    pub fn whole(&self) -> bool {
        self.header("content-length")
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n == self.body_len)
    }
}

/// What the upstream answers.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub delay: Duration,
    /// Answer at once, without reading the request body (an early refusal).
    pub early: bool,
    /// Answer 401 to requests whose Authorization header is not this one.
    pub authorization: Option<String>,
}

type StaticFiles = Arc<Mutex<Vec<(String, &'static str, Bytes)>>>;

/// What is under way: requests whose head arrived, and body bytes read, so far (whole or not).
#[derive(Debug, Default)]
pub struct Arriving {
    pub heads: std::sync::atomic::AtomicUsize,
    pub body_bytes: std::sync::atomic::AtomicU64,
}

pub struct Upstream {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    statics: StaticFiles,
    answer: Arc<Mutex<Answer>>,
    arriving: Arc<Arriving>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        Upstream::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(addr: SocketAddr) -> Upstream {
        let listener = TcpListener::bind(addr).await.expect("bind upstream");
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(Mutex::new(Answer {
            status: 200,
            body: r#"{"stored":true}"#.to_string(),
            delay: Duration::ZERO,
            early: false,
            authorization: None,
        }));
        let statics = StaticFiles::default();
        let arriving = Arc::new(Arriving::default());
        let task = tokio::spawn(serve(
            listener,
            received.clone(),
            answer.clone(),
            statics.clone(),
            arriving.clone(),
        ));
        Upstream {
            addr,
            received,
            statics,
            answer,
            arriving,
            task: Mutex::new(Some(task)),
        }
    }

    /// Stops listening: connections are refused until `resume`.
    pub fn go_down(&self) {
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
    }

    /// Listens again on the same address.
    pub async fn resume(&self) {
        self.go_down();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let listener = TcpListener::bind(self.addr).await.expect("rebind upstream");
        let task = tokio::spawn(serve(
            listener,
            self.received.clone(),
            self.answer.clone(),
            self.statics.clone(),
            self.arriving.clone(),
        ));
        *self.task.lock().unwrap() = Some(task);
    }

    /// Serves `body` on GET `path` (pages and scripts for browser tests).
    pub fn serve_static(&self, path: &str, content_type: &'static str, body: Bytes) {
        self.statics
            .lock()
            .unwrap()
            .push((path.to_string(), content_type, body));
    }

    pub fn answer_with(&self, status: u16, body: &str) {
        let mut answer = self.answer.lock().unwrap();
        answer.status = status;
        answer.body = body.to_string();
    }

    /// Refuse every request with `status` before reading its body.
    pub fn refuse_early(&self, status: u16, body: &str) {
        let mut answer = self.answer.lock().unwrap();
        answer.status = status;
        answer.body = body.to_string();
        answer.early = true;
    }

    /// Answer 401 (after reading the request) unless it carries `Authorization: value`.
    pub fn require_authorization(&self, value: &str) {
        self.answer.lock().unwrap().authorization = Some(value.to_string());
    }

    pub fn delay_answers(&self, delay: Duration) {
        self.answer.lock().unwrap().delay = delay;
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Requests whose head arrived so far, whole or still arriving or broken off.
    pub fn heads(&self) -> usize {
        self.arriving
            .heads
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Request body bytes read so far, over every request.
    pub fn body_bytes(&self) -> u64 {
        self.arriving
            .body_bytes
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Requests to `path` so far.
    pub fn received_at(&self, path: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }
}

/// Accepts connections until aborted; aborting also ends every open connection (the JoinSet is
/// dropped with the task), so a "down" upstream keeps no pooled connection alive.
async fn serve(
    listener: TcpListener,
    received: Arc<Mutex<Vec<Received>>>,
    answer: Arc<Mutex<Answer>>,
    statics: StaticFiles,
    arriving: Arc<Arriving>,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let received = received.clone();
        let answer = answer.clone();
        let statics = statics.clone();
        let arriving = arriving.clone();
        connections.spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let received = received.clone();
                let answer = answer.clone();
                let arriving = arriving.clone();
                let found = statics
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|(path, _, _)| request.method() == "GET" && path == request.uri().path())
                    .map(|(_, content_type, body)| (*content_type, body.clone()));
                async move {
                    match found {
                        Some((content_type, body)) => Ok(Response::builder()
                            .header("content-type", content_type)
                            .body(Full::new(body))
                            .unwrap()),
                        None => handle(request, received, answer, arriving).await,
                    }
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

async fn handle(
    request: Request<Incoming>,
    received: Arc<Mutex<Vec<Received>>>,
    answer: Arc<Mutex<Answer>>,
    arriving: Arc<Arriving>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let arrived = std::time::Instant::now();
    arriving
        .heads
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let (parts, body) = request.into_parts();
    let early = answer.lock().unwrap().clone();
    if early.early {
        let request = Received::of(arrived, parts, Vec::new(), Vec::new(), 0, String::new());
        received.lock().unwrap().push(request);
        let response = Response::builder()
            .status(early.status)
            .header("connection", "close")
            .body(Full::new(Bytes::from(early.body)))
            .unwrap();
        return Ok(response);
    }
    let boundary = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| multer::parse_boundary(ct).ok());
    let raw = Arc::new(Mutex::new((Sha256::new(), 0u64)));
    let mut small = Vec::new();
    let tap = raw.clone();
    let arriving = arriving.clone();
    let stream = body.into_data_stream().map(move |piece| {
        if let Ok(bytes) = &piece {
            let mut raw = tap.lock().unwrap();
            raw.0.update(bytes);
            raw.1 += bytes.len() as u64;
            arriving
                .body_bytes
                .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::SeqCst);
        }
        piece
    });
    let (fields, files) = match boundary {
        Some(boundary) => {
            let form = stitch::demo::read_form(stream, boundary).await;
            (form.fields, form.files)
        }
        None => {
            let mut stream = Box::pin(stream);
            while let Some(piece) = stream.next().await {
                if let Ok(bytes) = piece {
                    if small.len() + bytes.len() <= 64 << 10 {
                        small.extend_from_slice(&bytes);
                    }
                }
            }
            (Vec::new(), Vec::new())
        }
    };
    let (hasher, body_len) = std::mem::take(&mut *raw.lock().unwrap());
    let sha256 = hex::encode(hasher.finalize());
    let mut request = Received::of(arrived, parts, fields, files, body_len, sha256);
    if request.files.is_empty() && body_len as usize == small.len() && body_len > 0 {
        request.text = String::from_utf8(small).ok();
    }
    let authorization = request.header("authorization").map(str::to_string);
    received.lock().unwrap().push(request);
    let answer = answer.lock().unwrap().clone();
    if !answer.delay.is_zero() {
        tokio::time::sleep(answer.delay).await;
    }
    let authorized = answer
        .authorization
        .as_deref()
        .is_none_or(|want| authorization.as_deref() == Some(want));
    if !authorized {
        let response = Response::builder()
            .status(401)
            .header("www-authenticate", "Bearer")
            .body(Full::new(Bytes::from_static(b"who are you?")))
            .unwrap();
        return Ok(response);
    }
    let response = Response::builder()
        .status(answer.status)
        .header("content-type", "application/json")
        .header("x-upstream", "demo-app")
        .body(Full::new(Bytes::from(answer.body)))
        .unwrap();
    Ok(response)
}
