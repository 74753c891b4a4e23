//! kill -9 at any instant: after a restart, test requests report exactly the parts that were
//! fully published, and the upload completes with the right bytes.

mod common;

use common::*;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Starts the real `stitch` binary on `dir` and waits until it accepts connections.
fn start_binary(
    upstream: std::net::SocketAddr,
    dir: &std::path::Path,
) -> (Child, std::net::SocketAddr) {
    let yaml = config_yaml(upstream, dir, "", ROUTES);
    let listen: std::net::SocketAddr = yaml
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("listen: "))
        .unwrap()
        .parse()
        .unwrap();
    let path = dir.with_extension("yaml");
    std::fs::write(&path, yaml).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_stitch"))
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..500 {
        if std::net::TcpStream::connect(listen).is_ok() {
            return (child, listen);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    panic!("stitch did not start");
}

#[tokio::test]
async fn kill_9_during_uploads_loses_at_most_the_parts_in_flight() {
    let upstream = Upstream::start().await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    let file = ChunkedFile::resumable("crash.bin", random_bytes(64 << 20, 60), 1 << 20);
    let client = reqwest::Client::new();
    // Chunks Stitch answered 200 for: each must still be reported after every crash.
    let acknowledged =
        std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));

    for (round, delay_ms) in [40u64, 90, 150, 220, 300].into_iter().enumerate() {
        let (mut child, addr) = start_binary(upstream.addr, &dir);
        let workers: Vec<_> = (0..3u64)
            .map(|worker| {
                let file = file.clone();
                let client = client.clone();
                let acknowledged = acknowledged.clone();
                tokio::spawn(async move {
                    // Each worker walks the chunks from its own starting point. The last chunk
                    // is kept back so that the upload completes only after the last restart.
                    let parts = file.count() - 1;
                    for step in 0..parts {
                        let n = (step + worker * 16 + round as u64 * 5) % parts + 1;
                        let (start, end) = file.bounds(n);
                        let query = file.query_string(n);
                        let sent = client
                            .post(format!("http://{addr}/upload?{query}"))
                            .body(file.data.slice(start, end))
                            .send()
                            .await;
                        if sent.is_ok_and(|r| r.status() == 200) {
                            acknowledged.lock().unwrap().insert(n);
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        child.kill().unwrap();
        child.wait().unwrap();
        for worker in workers {
            worker.abort();
        }
    }

    let (mut child, addr) = start_binary(upstream.addr, &dir);
    let mut survived = 0;
    for n in 1..=file.count() {
        let query = file.query_string(n);
        let url = format!("http://{addr}/upload?{query}");
        let test = client.get(&url).send().await.unwrap().status();
        if acknowledged.lock().unwrap().contains(&n) {
            assert_eq!(test, 200, "chunk {n} was acknowledged before a crash");
        }
        if test == 200 {
            survived += 1;
            continue;
        }
        assert_eq!(test, 204);
        let (start, end) = file.bounds(n);
        let response = client
            .post(&url)
            .body(file.data.slice(start, end))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "chunk {n}");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(survived > 0, "some parts were published before the kills");
    let received = upstream.received_at("/app/upload");
    assert_eq!(received.len(), 1);
    assert_eq!(
        received[0].files[0].sha256,
        file.sha256(),
        "every reported part was whole"
    );
    assert!(
        std::fs::read_dir(dir.join("tmp")).unwrap().next().is_none(),
        "no staging leftovers"
    );
}

#[tokio::test]
async fn a_second_process_cannot_share_a_storage_directory() {
    let h = Harness::start().await;
    let second = stitch::spawn(&config(h.upstream.addr, h.dir.path(), "", ROUTES));
    let error = second.err().expect("the directory is taken").to_string();
    assert!(error.contains("another Stitch process"), "{error}");
}
