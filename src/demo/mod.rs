//! `stitch demo`: Stitch on its embedded default, in front of a small application that knows
//! nothing about chunks. The application serves a page with Resumable.js and Flow.js and has one
//! ordinary upload endpoint (`POST /upload`, multipart) that answers with what it received.

use crate::config::Config;
use crate::server::{self, StartError};
use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::server::RunArgs;
use pingora::services::listening::Service;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

const PAGE: &str = include_str!("page.html");

/// The client libraries, as npm installs them under `node_modules`.
const LIBRARIES: [(&str, &str); 2] = [
    ("/lib/resumable.js", "resumablejs/resumable.js"),
    ("/lib/flow.js", "@flowjs/flow.js/dist/flow.js"),
];

/// The stand-in for an existing application.
pub struct DemoApp {
    node_modules: PathBuf,
}

impl DemoApp {
    pub fn new(node_modules: &Path) -> DemoApp {
        DemoApp {
            node_modules: node_modules.to_path_buf(),
        }
    }
}

#[async_trait]
impl ServeHttp for DemoApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        if method == Method::POST && path == "/upload" {
            return receive(session).await;
        }
        if method != Method::GET {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                b"GET or POST /upload\n".to_vec(),
            );
        }
        if path == "/" {
            return reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                PAGE.as_bytes().to_vec(),
            );
        }
        match LIBRARIES.iter().find(|(url, _)| *url == path) {
            Some((_, file)) => match tokio::fs::read(self.node_modules.join(file)).await {
                Ok(script) => reply(StatusCode::OK, "text/javascript", script),
                Err(e) => reply(
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    format!("{file}: {e} (run .ci/setup to install the npm packages)\n")
                        .into_bytes(),
                ),
            },
            None => reply(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
        }
    }
}

/// A plain form upload: every text field, and for the file its name, type, size and SHA-256.
async fn receive(session: &mut ServerSession) -> Response<Vec<u8>> {
    let boundary = session
        .req_header()
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| multer::parse_boundary(ct).ok());
    let Some(boundary) = boundary else {
        return reply(
            StatusCode::BAD_REQUEST,
            "text/plain",
            b"expected multipart/form-data\n".to_vec(),
        );
    };
    let stream = crate::proxy::io::body_stream(session);
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut fields = serde_json::Map::new();
    let mut files = Vec::new();
    loop {
        let mut field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    format!("{e}\n").into_bytes(),
                )
            }
        };
        let name = field.name().unwrap_or_default().to_string();
        match field.file_name().map(str::to_string) {
            None => {
                let value = field.text().await.unwrap_or_default();
                fields.insert(name, value.into());
            }
            Some(file_name) => {
                let content_type = field.content_type().map(|m| m.to_string());
                let mut hasher = Sha256::new();
                let mut size = 0u64;
                while let Ok(Some(piece)) = field.chunk().await {
                    hasher.update(&piece);
                    size += piece.len() as u64;
                }
                files.push(serde_json::json!({
                    "field": name,
                    "filename": file_name,
                    "type": content_type,
                    "size": size,
                    "sha256": hex::encode(hasher.finalize()),
                }));
            }
        }
    }
    log::info!("demo app received {} file(s): {files:?}", files.len());
    let body = serde_json::json!({ "fields": fields, "files": files });
    reply(
        StatusCode::OK,
        "application/json",
        body.to_string().into_bytes(),
    )
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .expect("a valid response")
}

/// Runs Stitch and the demo application until interrupted.
pub fn run(config: &Config, node_modules: &Path) -> Result<(), StartError> {
    server::check_can_listen(config.listen)?;
    server::check_can_listen(config.upstream)?;
    let mut server = server::build(config)?.server;
    let mut app = Service::new("demo application".to_string(), DemoApp::new(node_modules));
    app.add_tcp(&config.upstream.to_string());
    server.add_service(app);
    log::info!(
        "demo: open http://{}/ (the application itself listens on {})",
        config.listen,
        config.upstream
    );
    server.run(RunArgs::default());
    Ok(())
}
