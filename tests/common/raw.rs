//! A raw HTTP/1.1 connection, for what a client library hides: trickled headers, stalled
//! bodies, several requests on one connection, connections held open.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub struct RawConnection {
    stream: BufReader<TcpStream>,
}

/// A response as read off the wire.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawConnection {
    pub async fn open(addr: SocketAddr) -> RawConnection {
        RawConnection {
            stream: BufReader::new(TcpStream::connect(addr).await.unwrap()),
        }
    }

    /// Writes bytes; `false` if the server has closed the connection.
    pub async fn send(&mut self, bytes: &[u8]) -> bool {
        self.stream.get_mut().write_all(bytes).await.is_ok()
    }

    /// Reads one response (Content-Length framed, or until the connection closes); `None` if
    /// the connection closed first or nothing came within `wait`.
    pub async fn response(&mut self, wait: Duration) -> Option<RawResponse> {
        tokio::time::timeout(wait, self.read_response())
            .await
            .ok()
            .flatten()
    }

    async fn read_response(&mut self) -> Option<RawResponse> {
        let mut line = String::new();
        self.stream.read_line(&mut line).await.ok()?;
        let status = line.split_whitespace().nth(1)?.parse().ok()?;
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            self.stream.read_line(&mut line).await.ok()?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':')?;
            headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
        }
        let length = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok());
        // Interim answers (100 Continue) and 204/304 have no body.
        let length = match status {
            100..=199 | 204 | 304 => Some(0),
            _ => length,
        };
        let mut body = Vec::new();
        match length {
            Some(length) => {
                body.resize(length, 0);
                self.stream.read_exact(&mut body).await.ok()?;
            }
            None => {
                self.stream.read_to_end(&mut body).await.ok()?;
            }
        }
        Some(RawResponse {
            status,
            headers,
            body,
        })
    }

    /// Says the request is complete (closes the sending half).
    pub async fn finish_sending(&mut self) {
        let _ = self.stream.get_mut().shutdown().await;
    }

    /// A connection to `addr` that has had `GET path` answered 200, and stays open.
    pub async fn served(addr: SocketAddr, path: &str) -> RawConnection {
        let mut connection = RawConnection::open(addr).await;
        let request = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(connection.send(request.as_bytes()).await);
        let answer = connection.response(Duration::from_secs(10)).await;
        assert_eq!(answer.map(|r| r.status), Some(200));
        connection
    }

    /// Sends `start` of a request header, then one byte at a time (each well within any
    /// per-read timeout) until the server closes the connection, for at most 15 s: how long it
    /// took, or `None` if it never did.
    pub async fn trickle_header_until_cut(&mut self, start: &[u8]) -> Option<Duration> {
        assert!(self.send(start).await);
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(15) {
            if !self.send(b"a").await || self.closed_within(Duration::from_millis(300)).await {
                return Some(started.elapsed());
            }
        }
        None
    }

    /// Waits up to `wait` for the server to close the connection (bytes it sends are skipped).
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        let closed = async {
            let mut sink = [0u8; 4096];
            loop {
                match self.stream.read(&mut sink).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(wait, closed).await.is_ok()
    }
}
