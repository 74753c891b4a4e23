//! `stitch demo`: Stitch on its embedded default, in front of a small application that knows
//! nothing about chunks or tus. The application serves a page with Resumable.js, Flow.js and
//! tus-js-client, has one ordinary upload endpoint (`POST /upload`, multipart) that answers with
//! what it received, and lists every file it has received (`GET /received`).

use crate::config::Config;
use crate::http::app_response as reply;
use crate::server::{self, StartError};
use async_trait::async_trait;
use bytes::Bytes;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::services::listening::Service;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const PAGE: &str = include_str!("page.html");

/// The client libraries the page loads: URL, and where npm installs them under `node_modules`.
const LIBRARIES: [(&str, &str); 3] = [
    ("/lib/resumable.js", "resumablejs/resumable.js"),
    ("/lib/flow.js", "@flowjs/flow.js/dist/flow.js"),
    ("/lib/tus.js", "tus-js-client/dist/tus.js"),
];

/// What to run when the libraries are missing.
const INSTALL_HINT: &str = "run `.ci/setup --demo` in the Stitch source tree, or \
     `npm install resumablejs@1.1.0 @flowjs/flow.js@2.14.1 tus-js-client@4.3.1` in a directory \
     and pass `--node-modules DIR/node_modules`";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(
        "the demo page needs Resumable.js, Flow.js and tus-js-client, and they are not in \
         {searched}: {INSTALL_HINT}"
    )]
    Libraries { searched: String },
    #[error(transparent)]
    Start(#[from] StartError),
}

/// Finds a `node_modules` holding every library: the one given, else the source tree's (from
/// the working directory, from the binary's place in `target/`, or where it was built).
pub fn find_libraries(given: Option<&Path>) -> Result<PathBuf, DemoError> {
    let candidates: Vec<PathBuf> = match given {
        Some(dir) => vec![dir.to_path_buf()],
        None => {
            let in_tree = Path::new("tests/browser/node_modules");
            let mut candidates = vec![in_tree.to_path_buf()];
            if let Ok(exe) = std::env::current_exe() {
                // target/<profile>/stitch -> the source tree
                if let Some(tree) = exe.ancestors().nth(3) {
                    candidates.push(tree.join(in_tree));
                }
            }
            candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(in_tree));
            candidates
        }
    };
    candidates
        .iter()
        .find(|dir| LIBRARIES.iter().all(|(_, file)| dir.join(file).is_file()))
        .cloned()
        .ok_or_else(|| DemoError::Libraries {
            searched: candidates
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// A file an application received in a form post.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FormFile {
    pub field: String,
    #[serde(rename = "filename")]
    pub file_name: String,
    #[serde(rename = "type")]
    pub content_type: Option<String>,
    #[serde(rename = "size")]
    pub len: u64,
    pub sha256: String,
}

/// A form post as an application reads it: text fields, and each file's name, type, size and
/// SHA-256 (streamed, never held whole). `error`: the body was malformed or broke off after
/// what was read.
#[derive(Debug, Clone, Default)]
pub struct Form {
    pub fields: Vec<(String, String)>,
    pub files: Vec<FormFile>,
    pub error: Option<String>,
}

/// Reads a `multipart/form-data` body (the stand-in application's, and the tests' recording
/// application's).
pub async fn read_form<'r, S, E>(stream: S, boundary: String) -> Form
where
    S: futures::Stream<Item = Result<Bytes, E>> + Send + 'r,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + 'r,
{
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut form = Form::default();
    loop {
        let mut field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => return form,
            Err(e) => {
                form.error = Some(e.to_string());
                return form;
            }
        };
        let name = field.name().unwrap_or_default().to_string();
        let Some(file_name) = field.file_name().map(str::to_string) else {
            match field.text().await {
                Ok(value) => form.fields.push((name, value)),
                Err(e) => form.error = Some(e.to_string()),
            }
            continue;
        };
        let content_type = field.content_type().map(|m| m.to_string());
        let mut hasher = Sha256::new();
        let mut len = 0u64;
        loop {
            match field.chunk().await {
                Ok(Some(piece)) => {
                    hasher.update(&piece);
                    len += piece.len() as u64;
                }
                Ok(None) => break,
                Err(e) => {
                    form.error = Some(e.to_string());
                    break;
                }
            }
        }
        form.files.push(FormFile {
            field: name,
            file_name,
            content_type,
            len,
            sha256: hex::encode(hasher.finalize()),
        });
    }
}

/// The stand-in for an existing application.
pub struct DemoApp {
    libraries: Vec<(&'static str, Bytes)>,
    /// Every upload so far, newest last: its fields and files.
    received: Mutex<Vec<serde_json::Value>>,
}

impl DemoApp {
    /// Reads the client libraries from `node_modules` (see [`find_libraries`]).
    pub fn new(node_modules: &Path) -> std::io::Result<DemoApp> {
        let libraries = LIBRARIES
            .iter()
            .map(|(url, file)| Ok((*url, Bytes::from(std::fs::read(node_modules.join(file))?))))
            .collect::<std::io::Result<_>>()?;
        Ok(DemoApp {
            libraries,
            received: Mutex::new(Vec::new()),
        })
    }

    /// A plain form upload: every text field, and for each file its name, type, size and
    /// SHA-256, answered as JSON and remembered for `GET /received`.
    async fn receive(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let boundary = session
            .req_header()
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|ct| multer::parse_boundary(ct).ok());
        let Some(boundary) = boundary else {
            return text(StatusCode::BAD_REQUEST, "expected multipart/form-data\n");
        };
        // The stand-in application trusts its clients: no limit on part headers.
        let stream = crate::http::body_stream(session, Default::default(), u64::MAX);
        let form = read_form(stream, boundary).await;
        if let Some(e) = form.error {
            return text(StatusCode::BAD_REQUEST, &format!("{e}\n"));
        }
        for file in &form.files {
            tracing::info!(
                "demo application received {:?}: {} bytes, sha256 {}…, {} field(s)",
                file.file_name,
                file.len,
                &file.sha256[..16],
                form.fields.len()
            );
        }
        let fields: serde_json::Map<String, serde_json::Value> = form
            .fields
            .into_iter()
            .map(|(name, value)| (name, value.into()))
            .collect();
        let body = serde_json::json!({ "fields": fields, "files": form.files });
        self.received.lock().expect("received").push(body.clone());
        json(StatusCode::OK, &body)
    }
}

#[async_trait]
impl ServeHttp for DemoApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        match (method, path.as_str()) {
            (Method::POST, "/upload") => self.receive(session).await,
            (Method::GET, "/") => reply(StatusCode::OK, "text/html; charset=utf-8", PAGE.into()),
            (Method::GET, "/received") => {
                let received = self.received.lock().expect("received").clone();
                json(StatusCode::OK, &serde_json::Value::Array(received))
            }
            (Method::GET, path) => match self.libraries.iter().find(|(url, _)| *url == path) {
                Some((_, script)) => reply(StatusCode::OK, "text/javascript", script.to_vec()),
                None => text(StatusCode::NOT_FOUND, "not found\n"),
            },
            _ => text(StatusCode::METHOD_NOT_ALLOWED, "GET, or POST /upload\n"),
        }
    }
}

fn text(status: StatusCode, message: &str) -> Response<Vec<u8>> {
    reply(
        status,
        "text/plain; charset=utf-8",
        message.as_bytes().to_vec(),
    )
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Vec<u8>> {
    reply(status, "application/json", value.to_string().into_bytes())
}

/// Runs Stitch and the demo application until interrupted.
pub fn run(config: &Config, node_modules: Option<&Path>) -> Result<(), DemoError> {
    let node_modules = find_libraries(node_modules)?;
    let app = DemoApp::new(&node_modules).map_err(|_| DemoError::Libraries {
        searched: node_modules.display().to_string(),
    })?;
    server::check_can_listen(config.listen)?;
    server::check_can_listen(config.upstream)?;
    let mut built = server::build(config)?;
    let mut service = Service::new("demo application".to_string(), app);
    service.add_tcp(&config.upstream.to_string());
    built.server.add_service(service);
    let (listen, upstream) = (config.listen, config.upstream);
    server::run_built(built, config, move || {
        tracing::info!(
            "demo: open http://{listen}/ (Stitch; the application behind it listens on {upstream})"
        )
    });
    Ok(())
}
