//! Behind a TLS terminator: Debian's nginx runs `conf/nginx.conf` (its listen, certificate
//! and Stitch address lines swapped for loopback ones) in front of Stitch, and real uploads go
//! through it: chunks over nginx's 1 MiB default limit, multipart and octet, a tus upload whose
//! URLs name nginx's address, a completing request that waits for the application, and
//! pass-through. `.ci/setup` unpacks nginx into `target/nginx` when it is not installed.

mod common;

use common::*;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// nginx in a directory of its own, killed when dropped.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nginx_binary() -> PathBuf {
    let unpacked = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/nginx/usr/sbin/nginx");
    if unpacked.exists() {
        return unpacked;
    }
    for dir in ["/usr/sbin", "/usr/local/sbin", "/usr/bin"] {
        let installed = Path::new(dir).join("nginx");
        if installed.exists() {
            return installed;
        }
    }
    panic!("nginx is missing: run .ci/setup (it unpacks Debian's nginx into target/nginx)");
}

/// `conf/nginx.conf` for a test: plain HTTP on `listen`, Stitch at `stitch`; everything else
/// as shipped.
fn shipped_config(listen: SocketAddr, stitch: SocketAddr) -> String {
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/nginx.conf"))
            .unwrap();
    let mut listened = false;
    let mut out = String::new();
    for line in shipped.lines() {
        let directive = line.trim_start();
        if directive.starts_with("listen ") {
            if !listened {
                out.push_str(&format!("    listen {listen};\n"));
                listened = true;
            }
        } else if directive.starts_with("ssl_") {
            continue;
        } else if directive.starts_with("server 127.0.0.1:8080;") {
            out.push_str(&format!("    server {stitch};\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(listened, "conf/nginx.conf has a listen line");
    out
}

impl Nginx {
    fn start(stitch: SocketAddr) -> Nginx {
        let binary = nginx_binary();
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let addr = free_addr();
            let d = dir.path().display();
            std::fs::write(dir.path().join("stitch.conf"), shipped_config(addr, stitch)).unwrap();
            let main = format!(
                "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
                 proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
                 uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
                 include {d}/stitch.conf;\n}}\n"
            );
            std::fs::write(dir.path().join("nginx.conf"), main).unwrap();
            let mut child = Command::new(&binary)
                .arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(dir.path().join("nginx.conf"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            for _ in 0..500 {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if std::net::TcpStream::connect(addr).is_ok()
                    && stitch::server::owns_listener(child.id(), addr)
                {
                    return Nginx { child, addr, dir };
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
            eprintln!("nginx did not start: {log}");
        }
        panic!("nginx did not start");
    }
}

const ROUTES_BEHIND: &str = r#"
routes:
  - path: /upload
    protocol: resumable
    forward: { path: /app/upload, field: document }
  - path: /flow
    protocol: flow
    forward: { path: /app/upload, field: document }
  - path: /files
    protocol: tus
    tus: { behind_proxy: true }
    forward: { path: /app/upload, field: document }
"#;

async fn behind_nginx() -> (Harness, Nginx) {
    let mut h = Harness::with_routes(ROUTES_BEHIND).await;
    let nginx = Nginx::start(h.stitch_addr());
    h.front = Some(nginx.addr);
    (h, nginx)
}

#[tokio::test]
async fn chunks_over_nginx_s_default_limit_go_through_and_the_file_arrives_once() {
    let (h, nginx) = behind_nginx().await;
    // Flow.js's multipart chunks of 2 MiB (nginx alone would answer 413 to anything over 1 MiB).
    let file = ChunkedFile::flow("through-nginx.bin", random_bytes(5 << 20, 140), 2 << 20);
    assert_eq!(file.upload_all(&h).await.status(), 200);
    let received = assert_delivered_once(&h, &file);
    assert!(
        received
            .header("x-forwarded-for")
            .is_some_and(|v| v.contains("127.0.0.1")),
        "the application sees the client's address: {:?}",
        received.header("x-forwarded-for")
    );
    // The application's own pages pass through nginx and Stitch.
    let page = h.client.get(h.url("/about")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(h.upstream.received_at("/about").len(), 1);
    drop(nginx);
}

#[tokio::test]
async fn a_completing_chunk_waits_for_a_slow_application_through_nginx() {
    let (h, _nginx) = behind_nginx().await;
    h.upstream.delay_answers(Duration::from_secs(3));
    let file = ChunkedFile::resumable("slow-app.bin", random_bytes(3 << 20, 141), 3 << 19);
    let client = reqwest::Client::new();
    for n in 1..=file.count() {
        let sent = file.send_to(&client, h.front.unwrap(), n).await.unwrap();
        assert_eq!(sent.status(), 200, "chunk {n}");
    }
    assert_delivered_once(&h, &file);
}

#[tokio::test]
async fn tus_upload_urls_name_nginx_and_big_patches_go_through() {
    let (h, nginx) = behind_nginx().await;
    let data = random_bytes(3 << 20, 142);
    let created = h
        .client
        .post(h.url("/files"))
        .header("tus-resumable", "1.0.0")
        .header("upload-length", data.len().to_string())
        .header("upload-metadata", "filename bmdpbngudHh0")
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let location = created.headers()["location"].to_str().unwrap().to_string();
    assert!(
        location.starts_with(&format!("http://{}/files/", nginx.addr)),
        "the upload's URL is nginx's: {location}"
    );
    let patched = h
        .client
        .patch(&location)
        .header("tus-resumable", "1.0.0")
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", "0")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 204);
    assert_eq!(
        patched.headers()["upload-offset"].to_str().unwrap(),
        data.len().to_string()
    );
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].files[0].file_name, "nginx.txt");
    assert_eq!(received[0].files[0].len, data.len() as u64);
    assert!(nginx.dir.path().exists());
}
