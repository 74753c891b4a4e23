//! Request trailers on HTTP/1 (the fields after a chunked body's last chunk), which Pingora
//! 0.9 reads and throws away. tus's checksum-trailer extension needs them.
//!
//! Every guarded connection's stream is a [`Tapped`] one. It copies what it reads into the
//! connection's [`Tap`] while a request's header is being read (the header's last read can hold
//! the whole body and its trailers), and then only if the request asked for it
//! ([`keep_tail`]), keeping the last [`KEPT`] bytes. Once Pingora has read the body to its end,
//! those bytes end with the trailer section, which [`trailers`] reads from the end: the
//! trailer fields, back to the last chunk (`0`, perhaps with extensions). Pingora has checked
//! the framing and limits the trailer section to 64 KiB, so the last chunk is always among
//! the kept bytes. Requests that do not ask cost a copy of their header's read, nothing more.
//!
//! What is read is not changed: Pingora sees the same bytes as before.

use pingora::protocols::http::ServerSession;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType, ALPN,
};
use pingora::protocols::{SocketDigest, TimingDigest};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How many of the last bytes read are kept: Pingora's limit on a trailer section (64 KiB)
/// and room for the last chunk's line.
const KEPT: usize = (64 << 10) + (8 << 10);

/// What one connection has read lately.
#[derive(Debug)]
pub struct Tap {
    /// The current request's header is in (set by the proxy's first filter, see
    /// `connections::header_arrived`); until then, every read is kept.
    header_arrived: Arc<AtomicBool>,
    /// The request announced trailers that will be read: keep the body's tail.
    keep: AtomicBool,
    bytes: Mutex<Vec<u8>>,
}

impl Tap {
    pub fn new(header_arrived: Arc<AtomicBool>) -> Arc<Tap> {
        Arc::new(Tap {
            header_arrived,
            keep: AtomicBool::new(false),
            bytes: Mutex::new(Vec::new()),
        })
    }

    /// A new request begins on the connection: forget the last one's bytes.
    pub fn restart(&self) {
        self.keep.store(false, Ordering::Relaxed);
        let mut bytes = self.bytes.lock().expect("tap");
        if bytes.capacity() > 4 << 10 {
            // A kept body tail is not held while the connection waits.
            *bytes = Vec::new();
        } else {
            bytes.clear();
        }
    }

    fn recording(&self) -> bool {
        !self.header_arrived.load(Ordering::Relaxed) || self.keep.load(Ordering::Relaxed)
    }

    fn record(&self, read: &[u8]) {
        let mut bytes = self.bytes.lock().expect("tap");
        if read.len() >= KEPT {
            bytes.clear();
            bytes.extend_from_slice(&read[read.len() - KEPT..]);
            return;
        }
        bytes.extend_from_slice(read);
        if bytes.len() > 2 * KEPT {
            let cut = bytes.len() - KEPT;
            bytes.drain(..cut);
        }
    }
}

/// A connection's stream, with what it reads copied to its [`Tap`] when asked.
#[derive(Debug)]
pub struct Tapped {
    inner: Stream,
    tap: Arc<Tap>,
}

impl Tapped {
    pub fn new(inner: Stream, tap: Arc<Tap>) -> Tapped {
        Tapped { inner, tap }
    }
}

/// The connection's tap, if the session runs on a tapped HTTP/1 connection.
fn tap_of(session: &ServerSession) -> Option<&Tap> {
    let stream = session.stream()?;
    Some(&stream.as_any().downcast_ref::<Tapped>()?.tap)
}

/// Asks for the request's trailers to be kept; false if they cannot be (not a tapped HTTP/1
/// connection). Call it before reading the body.
pub fn keep_tail(session: &ServerSession) -> bool {
    match tap_of(session) {
        Some(tap) => {
            tap.keep.store(true, Ordering::Relaxed);
            true
        }
        None => false,
    }
}

/// Why a body's trailers could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrailerError {
    /// [`keep_tail`] was not called, or failed.
    NotKept,
    /// The kept bytes do not end with a trailer section (say, a pipelined request followed).
    Unreadable,
    /// A line of the section is not a field.
    Malformed,
}

/// The trailer fields (name in lower case, value trimmed) of the request whose body has just
/// been read to its end, after [`keep_tail`]. Empty if the body was not chunked or had none.
pub fn trailers(session: &ServerSession) -> Result<Vec<(String, String)>, TrailerError> {
    let tap = tap_of(session).ok_or(TrailerError::NotKept)?;
    if !tap.keep.load(Ordering::Relaxed) {
        return Err(TrailerError::NotKept);
    }
    let bytes = tap.bytes.lock().expect("tap");
    parse_from_end(&bytes)
}

/// Strips one line ending (CRLF or LF) off the end.
fn strip_eol(bytes: &[u8]) -> Option<&[u8]> {
    let bytes = bytes.strip_suffix(b"\n")?;
    Some(bytes.strip_suffix(b"\r").unwrap_or(bytes))
}

/// The chunked body's last chunk: `0` (any number of zeros), perhaps with extensions.
fn is_last_chunk(line: &[u8]) -> bool {
    let zeros = line.iter().take_while(|&&b| b == b'0').count();
    zeros > 0 && matches!(line.get(zeros), None | Some(b';' | b' ' | b'\t'))
}

fn is_token(name: &[u8]) -> bool {
    !name.is_empty()
        && name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b))
}

/// Reads a trailer section back from the end of `bytes`, which must end with it (the empty
/// line that closes it included).
fn parse_from_end(bytes: &[u8]) -> Result<Vec<(String, String)>, TrailerError> {
    let mut rest = strip_eol(bytes).ok_or(TrailerError::Unreadable)?;
    rest = strip_eol(rest).ok_or(TrailerError::Unreadable)?;
    let mut fields = Vec::new();
    loop {
        let (before, line) = match rest.iter().rposition(|&b| b == b'\n') {
            Some(at) => (&rest[..at + 1], &rest[at + 1..]),
            None => return Err(TrailerError::Unreadable),
        };
        if is_last_chunk(line) {
            fields.reverse();
            return Ok(fields);
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => (&line[..colon], &line[colon + 1..]),
            None => return Err(TrailerError::Unreadable),
        };
        if !is_token(name) {
            return Err(TrailerError::Malformed);
        }
        let value = std::str::from_utf8(value).map_err(|_| TrailerError::Malformed)?;
        fields.push((
            String::from_utf8_lossy(name).to_ascii_lowercase(),
            value.trim_matches([' ', '\t']).to_string(),
        ));
        rest = strip_eol(before).ok_or(TrailerError::Unreadable)?;
    }
}

/// True if the request announces `name` among its trailers (`Trailer: a, b`).
pub fn announced(header: &pingora::http::RequestHeader, name: &str) -> bool {
    header
        .headers
        .get_all("trailer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|field| field.trim().eq_ignore_ascii_case(name))
}

impl AsyncRead for Tapped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && self.tap.recording() {
            self.tap.record(&buf.filled()[before..]);
        }
        polled
    }
}

impl AsyncWrite for Tapped {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait::async_trait]
impl Shutdown for Tapped {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for Tapped {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Tapped {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Tapped {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Tapped {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Tapped {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait::async_trait]
impl Peek for Tapped {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(bytes: &[u8]) -> Result<Vec<(String, String)>, TrailerError> {
        parse_from_end(bytes)
    }

    #[test]
    fn the_section_after_the_last_chunk_is_read_back_from_the_end() {
        let body = b"POST / HTTP/1.1\r\nTrailer: Upload-Checksum\r\n\r\n\
            5\r\nhello\r\n0\r\nUpload-Checksum: sha1 abc=\r\nX-Other:  two \r\n\r\n";
        assert_eq!(
            fields(body).unwrap(),
            vec![
                ("upload-checksum".to_string(), "sha1 abc=".to_string()),
                ("x-other".to_string(), "two".to_string())
            ]
        );
        assert_eq!(fields(b"3\r\nabc\r\n0\r\n\r\n").unwrap(), vec![]);
        assert_eq!(
            fields(b"3\nabc\n000;ext=\"a:b\"\nA: 1\n\n").unwrap(),
            vec![("a".to_string(), "1".to_string())]
        );
    }

    #[test]
    fn body_bytes_that_look_like_fields_are_not_trailers() {
        // The data's last line looks like a field; the last chunk comes after it.
        let body = b"1a\r\nUpload-Checksum: sha1 x\r\n\r\n0\r\n\r\n";
        assert_eq!(fields(body).unwrap(), vec![]);
    }

    #[test]
    fn bytes_that_do_not_end_a_chunked_body_are_refused() {
        assert_eq!(fields(b""), Err(TrailerError::Unreadable));
        assert_eq!(
            fields(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Err(TrailerError::Unreadable)
        );
        assert_eq!(
            fields(b"0\r\nbad name: x\r\n\r\n"),
            Err(TrailerError::Malformed)
        );
        assert_eq!(fields(b"x: 1\r\n\r\n"), Err(TrailerError::Unreadable));
    }

    #[test]
    fn the_tap_keeps_the_last_bytes_only() {
        let tap = Tap::new(Arc::new(AtomicBool::new(true)));
        assert!(!tap.recording());
        tap.keep.store(true, Ordering::Relaxed);
        for i in 0..300u32 {
            tap.record(&[(i % 251) as u8; 1000]);
        }
        let bytes = tap.bytes.lock().unwrap().clone();
        assert!(bytes.len() >= KEPT && bytes.len() <= 2 * KEPT);
        assert_eq!(*bytes.last().unwrap(), (299 % 251) as u8);
        tap.restart();
        assert!(tap.bytes.lock().unwrap().is_empty());
        assert!(!tap.recording());
    }
}
