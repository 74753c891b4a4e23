//! An application for benchmarks, in a process of its own (the bench binary started again in
//! this role): it takes multipart uploads and saves each file part to disk, fsynced, before it
//! answers, as an application that keeps its uploads would. Both Stitch's delivery and the
//! direct `curl -F` post it is compared with go to the same one.

use bytes::BytesMut;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Set (to the directory files are saved in) when the process is the application.
const DIR_VAR: &str = "STITCH_BENCH_APP_DIR";
const LISTEN_VAR: &str = "STITCH_BENCH_APP_LISTEN";

/// Bytes gathered before each write to the file.
const WRITE: usize = 1 << 20;

/// The application, ended when dropped.
pub struct App {
    child: Child,
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl App {
    /// Starts the application saving into `dir` (created).
    pub fn start(dir: &Path) -> App {
        std::fs::create_dir_all(dir).expect("the application's directory");
        let addr = crate::common::free_addr();
        let child = Command::new(std::env::current_exe().expect("the bench binary"))
            .env(DIR_VAR, dir)
            .env(LISTEN_VAR, addr.to_string())
            .stdout(Stdio::null())
            .spawn()
            .expect("start the application");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "the application did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        App {
            child,
            addr,
            dir: dir.to_path_buf(),
        }
    }

    /// The files saved so far, oldest first.
    pub fn saved(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .expect("the application's directory")
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        files
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// If this process was started as the application, serves until killed and never returns.
pub async fn serve_if_asked() {
    let Ok(dir) = std::env::var(DIR_VAR) else {
        return;
    };
    let addr: SocketAddr = std::env::var(LISTEN_VAR)
        .expect("the application's address")
        .parse()
        .expect("an address");
    let dir = Arc::new(PathBuf::from(dir));
    let count = Arc::new(AtomicU64::new(0));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("the application's port");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (dir, count) = (dir.clone(), count.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let (dir, count) = (dir.clone(), count.clone());
                async move { Ok::<_, std::convert::Infallible>(save(request, &dir, &count).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Saves every file part of a multipart request; answers 200 with the bytes saved, or 400.
async fn save(
    request: Request<Incoming>,
    dir: &Path,
    count: &AtomicU64,
) -> Response<Full<bytes::Bytes>> {
    let answer = |status: u16, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from(body)))
            .expect("a response")
    };
    let boundary = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| multer::parse_boundary(v).ok());
    let Some(boundary) = boundary else {
        return answer(400, r#"{"error":"not multipart"}"#.into());
    };
    let mut form = multer::Multipart::new(request.into_body().into_data_stream(), boundary);
    let mut saved = 0u64;
    loop {
        let mut field = match form.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => return answer(400, format!(r#"{{"error":"{e}"}}"#)),
        };
        if field.file_name().is_none() {
            while let Ok(Some(_)) = field.chunk().await {}
            continue;
        }
        let path = dir.join(format!(
            "upload-{:06}",
            count.fetch_add(1, Ordering::SeqCst)
        ));
        let mut file = Some(std::fs::File::create(&path).expect("create a file"));
        let mut gathered = BytesMut::new();
        loop {
            let piece = match field.chunk().await {
                Ok(piece) => piece,
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    return answer(400, format!(r#"{{"error":"{e}"}}"#));
                }
            };
            let last = piece.is_none();
            if let Some(piece) = &piece {
                saved += piece.len() as u64;
                gathered.extend_from_slice(piece);
            }
            if gathered.len() >= WRITE || last {
                let bytes = gathered.split().freeze();
                let mut writing = file.take().expect("the file");
                file = Some(
                    tokio::task::spawn_blocking(move || {
                        writing.write_all(&bytes).expect("write the file");
                        if last {
                            writing.sync_all().expect("fsync the file");
                        }
                        writing
                    })
                    .await
                    .expect("the write ran"),
                );
            }
            if last {
                break;
            }
        }
    }
    answer(200, format!(r#"{{"saved":{saved}}}"#))
}
