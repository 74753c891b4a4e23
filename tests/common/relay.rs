//! A TCP relay between Stitch and the upstream that passes requests whole and cuts answers
//! short: the upstream's answer stops after a given number of bytes and the connection closes.

use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct CuttingRelay {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl CuttingRelay {
    /// Relays to `upstream`, closing each connection once `answer_bytes` bytes of the answer
    /// have been passed back.
    pub async fn start(upstream: SocketAddr, answer_bytes: usize) -> CuttingRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, upstream, answer_bytes));
            }
        });
        CuttingRelay { addr, task }
    }
}

impl Drop for CuttingRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(client: TcpStream, upstream: SocketAddr, answer_bytes: usize) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let requests = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
    });
    let mut passed = 0;
    let mut buffer = vec![0u8; 4096];
    while passed < answer_bytes {
        let read = match server_read.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n.min(answer_bytes - passed),
        };
        if client_write.write_all(&buffer[..read]).await.is_err() {
            break;
        }
        passed += read;
    }
    requests.abort();
    let _ = client_write.shutdown().await;
}

/// A TCP relay that passes what the client sends at about `bytes_per_second` (a slow line) and
/// answers at full speed. Each connection is relayed to `upstream` as it comes: a process that
/// restarts on the same address is found again.
pub struct SlowLine {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl SlowLine {
    pub async fn start(upstream: SocketAddr, bytes_per_second: usize) -> SlowLine {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(slow_relay(client, upstream, bytes_per_second));
            }
        });
        SlowLine { addr, task }
    }
}

impl Drop for SlowLine {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn slow_relay(client: TcpStream, upstream: SocketAddr, bytes_per_second: usize) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let answers = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    });
    // 16 KiB at a time, each after the pause that keeps to the rate.
    let mut buffer = vec![0u8; 16 << 10];
    let pause = std::time::Duration::from_secs_f64(buffer.len() as f64 / bytes_per_second as f64);
    loop {
        let read = match client_read.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if server_write.write_all(&buffer[..read]).await.is_err() {
            break;
        }
        tokio::time::sleep(pause).await;
    }
    let _ = server_write.shutdown().await;
    let _ = answers.await;
}
