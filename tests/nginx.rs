//! Behind a TLS terminator: Debian's nginx runs the shipped `conf/nginx.conf` (its listen, ssl_*
//! and Stitch address lines swapped for loopback ones, everything else as shipped) in front of
//! Stitch, and real uploads go through it: Resumable.js chunks over nginx's 1 MiB default limit,
//! a tus upload whose URLs name nginx's address and whose PATCHes are over 1 MiB, a body that
//! reaches Stitch while the client is still sending it, a completing request that waits for a
//! slow application, pass-through with the X-Forwarded-* headers nginx sets. What cannot be run
//! in bounded time (nginx's 60 s defaults) is read from the file against Stitch's defaults, and
//! the file as installed, TLS lines included, passes `nginx -t`. `.ci/setup` unpacks nginx into
//! `target/nginx` when it is not installed.

mod common;

use bytes::Bytes;
use common::*;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MIB: usize = 1 << 20;

/// The Stitch address `conf/nginx.conf` ships with, replaced by the test's.
const PLACEHOLDER_UPSTREAM: &str = "server 127.0.0.1:8080;";

fn shipped_file() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/nginx.conf");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn nginx_binary() -> PathBuf {
    let unpacked = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/nginx/usr/sbin/nginx");
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::iter::once(unpacked)
        .chain(std::env::split_paths(&path).map(|dir| dir.join("nginx")))
        .chain(std::iter::once(PathBuf::from("/usr/sbin/nginx")))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!("nginx is missing: run .ci/setup (it unpacks Debian's nginx into target/nginx)")
        })
}

/// `conf/nginx.conf` for a test: plain HTTP on `listen`, Stitch at `stitch`, no TLS; every
/// other line as shipped.
fn shipped_config(listen: SocketAddr, stitch: SocketAddr) -> String {
    let mut listened = false;
    let mut upstream_set = false;
    let mut out = String::new();
    for line in shipped_file().lines() {
        let directive = line.trim_start();
        if directive.starts_with("listen ") {
            if !listened {
                out.push_str(&format!("    listen {listen};\n"));
                listened = true;
            }
        } else if directive.starts_with("ssl_") {
            continue;
        } else if directive.starts_with(PLACEHOLDER_UPSTREAM) {
            out.push_str(&format!("    server {stitch};\n"));
            upstream_set = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(listened, "conf/nginx.conf has a listen line");
    assert!(
        upstream_set,
        "conf/nginx.conf names Stitch as `{PLACEHOLDER_UPSTREAM}`"
    );
    out
}

/// The main config around the server block in `dir/stitch.conf`: one process in the
/// foreground, everything it writes in `dir`.
fn main_config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
         proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
         uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
         include {d}/stitch.conf;\n}}\n"
    )
}

/// `nginx -p dir -e dir/error.log -c dir/nginx.conf`.
fn nginx_in(dir: &Path) -> Command {
    let binary = nginx_binary();
    let mut command = Command::new(binary);
    command
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdin(Stdio::null());
    command
}

/// nginx running the shipped server block, in a temporary directory that holds everything it
/// writes; one process (`master_process off`), killed by its own PID when dropped.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join("error.log"));
            eprintln!("nginx's error log:\n{}", log.unwrap_or_default());
        }
    }
}

impl Nginx {
    async fn start(stitch: SocketAddr) -> Nginx {
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let addr = free_addr();
            std::fs::write(dir.path().join("stitch.conf"), shipped_config(addr, stitch)).unwrap();
            std::fs::write(dir.path().join("nginx.conf"), main_config(dir.path())).unwrap();
            let mut child = nginx_in(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("{}: {e}", nginx_binary().display()));
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while tokio::time::Instant::now() < deadline {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if TcpStream::connect(addr).await.is_ok()
                    && stitch::server::owns_listener(child.id(), addr)
                {
                    return Nginx { child, addr, dir };
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
            eprintln!("nginx did not start on {addr}: {log}");
        }
        panic!("nginx did not start");
    }
}

/// A TCP relay between nginx and Stitch that counts the bytes nginx sends to Stitch.
struct Tap {
    addr: SocketAddr,
    sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Tap {
    async fn start(to: SocketAddr) -> Tap {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sent = Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                connections.spawn(relay(inbound, to, counter.clone()));
                while connections.try_join_next().is_some() {}
            }
        });
        Tap { addr, sent, task }
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }
}

async fn relay(inbound: TcpStream, to: SocketAddr, sent: Arc<AtomicU64>) {
    let Ok(outbound) = TcpStream::connect(to).await else {
        return;
    };
    let (mut in_read, mut in_write) = inbound.into_split();
    let (mut out_read, mut out_write) = outbound.into_split();
    let requests = async {
        let mut buffer = vec![0u8; 64 << 10];
        while let Ok(n @ 1..) = in_read.read(&mut buffer).await {
            sent.fetch_add(n as u64, Ordering::SeqCst);
            if out_write.write_all(&buffer[..n]).await.is_err() {
                break;
            }
        }
        let _ = out_write.shutdown().await;
    };
    let answers = async {
        let _ = tokio::io::copy(&mut out_read, &mut in_write).await;
        let _ = in_write.shutdown().await;
    };
    tokio::join!(requests, answers);
}

const ROUTES_BEHIND: &str = r#"
routes:
  - path: /upload
    protocol: resumable
    forward: { path: /app/upload, field: document }
  - path: /files
    protocol: tus
    tus: { behind_proxy: true }
    forward: { path: /app/upload, field: document }
"#;

/// Stitch with the recording upstream behind it, nginx in front of it (through a [`Tap`]); the
/// harness's requests go to nginx, each bounded in time.
async fn behind_nginx() -> (Harness, Nginx, Tap) {
    let mut h = Harness::with_routes(ROUTES_BEHIND).await;
    let tap = Tap::start(h.stitch_addr()).await;
    let nginx = Nginx::start(tap.addr).await;
    h.front = Some(nginx.addr);
    h.client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    (h, nginx, tap)
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn header<'r>(response: &'r reqwest::Response, name: &str) -> Option<&'r str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Polls `done` every 20 ms for up to 10 s.
async fn within_10s(mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

#[tokio::test]
async fn resumable_chunks_over_nginx_s_1_mib_default_go_through_and_the_file_arrives_once() {
    let (h, nginx, _tap) = behind_nginx().await;
    // Three multipart chunks of 2 MiB (nginx's default would answer 413 to each).
    let file = ChunkedFile::resumable("through-nginx.bin", random_bytes(6 * MIB, 140), 2 << 20);
    assert_eq!(file.count(), 3);
    for n in 1..=file.count() {
        assert_eq!(file.test(&h, n).await.status(), 204, "test of chunk {n}");
        let response = file.upload(&h, n).await;
        assert_eq!(response.status(), 200, "chunk {n}");
        if n == file.count() {
            assert_eq!(response.text().await.unwrap(), r#"{"stored":true}"#);
        }
    }
    let delivered = assert_delivered_once(&h, &file);
    // The client's address as nginx saw it, then nginx's as Stitch saw it.
    assert_eq!(
        delivered.header("x-forwarded-for"),
        Some("127.0.0.1, 127.0.0.1")
    );

    // The application's own pages pass through nginx and Stitch, with nginx's headers.
    let page = h.client.get(h.url("/about")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let seen = h.upstream.received_at("/about");
    assert_eq!(seen.len(), 1);
    let nginx_host = nginx.addr.to_string();
    assert_eq!(seen[0].header("host"), Some(nginx_host.as_str()));
    assert_eq!(
        seen[0].header("x-forwarded-host"),
        Some(nginx_host.as_str())
    );
    assert_eq!(seen[0].header("x-forwarded-proto"), Some("http"));
    assert_eq!(
        seen[0].header("x-forwarded-for"),
        Some("127.0.0.1, 127.0.0.1")
    );
}

#[tokio::test]
async fn tus_upload_urls_name_nginx_and_patches_over_1_mib_go_through() {
    let (h, nginx, _tap) = behind_nginx().await;
    let data = random_bytes(5 * MIB + MIB / 2, 142);
    let created = h
        .client
        .post(h.url("/files"))
        .header("tus-resumable", "1.0.0")
        .header("upload-length", data.len().to_string())
        .header("upload-metadata", "filename bmdpbngudHh0") // nginx.txt
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let location = header(&created, "location").unwrap().to_string();
    assert!(
        location.starts_with(&format!("http://{}/files/", nginx.addr)),
        "the upload's URL is nginx's (X-Forwarded-Host): {location}"
    );
    let mut offset = 0;
    for size in [2 * MIB, 2 * MIB, 3 * MIB / 2] {
        let patched = h
            .client
            .patch(&location)
            .header("tus-resumable", "1.0.0")
            .header("content-type", "application/offset+octet-stream")
            .header("upload-offset", offset.to_string())
            .body(data.slice(offset..offset + size))
            .send()
            .await
            .unwrap();
        assert_eq!(patched.status(), 204, "PATCH at {offset}");
        offset += size;
        assert_eq!(
            header(&patched, "upload-offset"),
            Some(offset.to_string().as_str())
        );
        let head = h
            .client
            .head(&location)
            .header("tus-resumable", "1.0.0")
            .send()
            .await
            .unwrap();
        assert_eq!(head.status(), 200);
        assert_eq!(
            header(&head, "upload-offset"),
            Some(offset.to_string().as_str())
        );
    }
    assert_eq!(offset, data.len());

    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), 1, "the application gets the file once");
    assert_eq!(received[0].files.len(), 1);
    let part = &received[0].files[0];
    assert_eq!(part.file_name, "nginx.txt");
    assert_eq!(part.len, data.len() as u64);
    assert_eq!(part.sha256, sha256_hex(&data));
    // The application's answer, read through nginx from the upload's URL.
    let answer = h.client.get(&location).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.text().await.unwrap(), r#"{"stored":true}"#);
    assert_eq!(h.upstream.received_at("/app/upload").len(), 1);
}

#[tokio::test]
async fn a_body_reaches_stitch_while_the_client_is_still_sending_it() {
    let (h, _nginx, tap) = behind_nginx().await;
    let data = random_bytes(4 * MIB, 143);
    let created = h
        .client
        .post(h.url("/files"))
        .header("tus-resumable", "1.0.0")
        .header("upload-length", data.len().to_string())
        .header("upload-metadata", "filename c3RyZWFtZWQuYmlu") // streamed.bin
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let location = header(&created, "location").unwrap().to_string();
    let before = tap.sent();

    // One PATCH of the whole file, without a length (chunked, as a streaming client sends it),
    // of which the client sends the first half and then waits.
    let (body, pieces) = futures::channel::mpsc::unbounded::<Bytes>();
    let patch = h
        .client
        .patch(&location)
        .header("tus-resumable", "1.0.0")
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", "0")
        .body(reqwest::Body::wrap_stream(
            pieces.map(Ok::<_, std::io::Error>),
        ))
        .send();
    let patch = tokio::spawn(patch);
    body.unbounded_send(data.slice(..2 * MIB)).unwrap();
    // nginx passes it on as it arrives (buffered, Stitch would see nothing before the end).
    let streamed = within_10s(|| tap.sent() - before >= MIB as u64).await;
    assert!(
        streamed,
        "Stitch got {} bytes of the first 2 MiB while the client waited",
        tap.sent() - before
    );
    assert!(h.upstream.received_at("/app/upload").is_empty());

    body.unbounded_send(data.slice(2 * MIB..)).unwrap();
    drop(body);
    let patched = patch.await.unwrap().unwrap();
    assert_eq!(patched.status(), 204);
    assert_eq!(
        header(&patched, "upload-offset"),
        Some(data.len().to_string().as_str())
    );
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), 1, "the application gets the file once");
    assert_eq!(received[0].files[0].file_name, "streamed.bin");
    assert_eq!(received[0].files[0].sha256, sha256_hex(&data));
}

#[tokio::test]
async fn a_completing_chunk_waits_for_a_slow_application_through_nginx() {
    let (h, nginx, _tap) = behind_nginx().await;
    h.upstream.answer_with(201, r#"{"id":"slow"}"#);
    h.upstream.delay_answers(Duration::from_secs(3));
    // Two raw (octet) chunks of 1.5 MiB.
    let file = ChunkedFile::resumable("slow-app.bin", random_bytes(3 * MIB, 141), 3 << 19);
    for n in 1..=file.count() {
        let sent = file.send_to(&h.client, nginx.addr, n).await.unwrap();
        if n < file.count() {
            assert_eq!(sent.status(), 200, "chunk {n}");
        } else {
            // The last one waited for the application's answer, and relays it.
            assert_eq!(sent.status(), 201, "chunk {n}");
            assert_eq!(sent.text().await.unwrap(), r#"{"id":"slow"}"#);
        }
    }
    assert_delivered_once(&h, &file);
}

/// The shipped file's directives: (enclosing blocks, name, arguments), comments dropped.
fn directives(conf: &str) -> Vec<(Vec<String>, String, Vec<String>)> {
    let text: String = conf
        .lines()
        .map(|line| line.split('#').next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut blocks: Vec<String> = Vec::new();
    let mut found = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    for c in text.chars() {
        if c.is_whitespace() || c == ';' || c == '{' || c == '}' {
            if !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
        } else {
            word.push(c);
        }
        match c {
            ';' if !words.is_empty() => {
                let name = words.remove(0);
                found.push((blocks.clone(), name, std::mem::take(&mut words)));
            }
            '{' => blocks.push(std::mem::take(&mut words).join(" ")),
            '}' => {
                blocks.pop();
            }
            _ => {}
        }
    }
    found
}

/// One value of an nginx time setting (`600s`, `10m`, `90`: seconds by default).
fn nginx_time(value: &str) -> Duration {
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: u64 = number.parse().unwrap_or_else(|_| panic!("time {value}"));
    match unit {
        "ms" => Duration::from_millis(number),
        "" | "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number * 60),
        "h" => Duration::from_secs(number * 3600),
        _ => panic!("time unit of {value}"),
    }
}

/// What a test in bounded time cannot wait for (a 60 s default against Stitch's 300 s): the
/// shipped timeouts, read from the file nginx runs above, against Stitch's defaults.
#[test]
fn the_shipped_timeouts_outlast_stitch_s_own() {
    let found = directives(&shipped_file());
    let setting = |block: &str, name: &str| -> Duration {
        let values: Vec<&Vec<String>> = found
            .iter()
            .filter(|(blocks, n, _)| n == name && blocks.iter().any(|b| b.starts_with(block)))
            .map(|(_, _, args)| args)
            .collect();
        assert_eq!(
            values.len(),
            1,
            "one `{name}` in `{block}` in conf/nginx.conf"
        );
        nginx_time(&values[0][0])
    };
    let dir = tempfile::tempdir().unwrap();
    let stitch = config(free_addr(), dir.path(), "", ROUTES_BEHIND);
    let forward_timeout = stitch.routes[0].forward.timeout;
    let limits = &stitch.connections;

    // The completing request waits for the application's answer (and longer: the file is
    // sent first); with nginx's 60 s, nginx answers 504 first.
    assert!(setting("location", "proxy_read_timeout") > forward_timeout);
    // A body streams at the client's pace: the client's limit applies, not the send timeout.
    assert!(setting("location", "proxy_send_timeout") >= setting("server", "client_body_timeout"));
    // Stitch answers a stalled body (408) before nginx cuts it.
    assert!(setting("server", "client_body_timeout") > limits.body_timeout);
    // nginx closes an idle connection to Stitch before Stitch does.
    assert!(setting("upstream", "keepalive_timeout") < limits.idle_timeout);
}

/// The file as a user installs it, TLS lines included (with a certificate made for the test),
/// passes `nginx -t`.
#[test]
fn the_shipped_file_with_its_tls_lines_passes_nginx_s_own_check() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=uploads.example.com", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdin(Stdio::null())
        .output()
        .expect("openssl (run .ci/setup)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let mut certificates = 0;
    let mut out = String::new();
    for line in shipped_file().lines() {
        let directive = line.trim_start();
        if directive.starts_with("ssl_certificate_key ") {
            out.push_str(&format!("    ssl_certificate_key {};\n", key.display()));
            certificates += 1;
        } else if directive.starts_with("ssl_certificate ") {
            out.push_str(&format!("    ssl_certificate {};\n", cert.display()));
            certificates += 1;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert_eq!(
        certificates, 2,
        "conf/nginx.conf names a certificate and its key"
    );
    std::fs::write(dir.path().join("stitch.conf"), out).unwrap();
    std::fs::write(dir.path().join("nginx.conf"), main_config(dir.path())).unwrap();
    let checked = nginx_in(dir.path()).arg("-t").output().unwrap();
    assert!(
        checked.status.success(),
        "nginx -t: {}",
        String::from_utf8_lossy(&checked.stderr)
    );
}
