//! Request trailers on HTTP/1 (the fields after a chunked body's last chunk), which Pingora
//! 0.9 reads and throws away. tus's checksum-trailer extension needs them.
//!
//! Every guarded connection's stream is a [`Tapped`] one. It copies what it reads into the
//! connection's [`Tap`] while a request's header is being read (the header's last read can
//! hold the whole body and its trailers). If the request asks for its trailers
//! ([`keep_tail`]), the tap then follows the chunked body's framing through everything read
//! after the header, from the header's end to the empty line that closes the trailer section:
//! chunk data is counted, not copied, and only the trailer section's lines are kept (at most
//! [`MAX_SECTION`]). What is read after that (the start of a pipelined request) is not looked
//! at. Requests that do not ask cost a copy of their header's read, nothing more, and the
//! connection forgets it once the request is answered ([`Tap::restart`]).
//!
//! What is read is not changed: Pingora sees the same bytes as before, and has checked the
//! framing the tap follows.

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

/// The longest trailer section read: Pingora's own limit (64 KiB) and some room.
const MAX_SECTION: usize = (64 << 10) + (8 << 10);

/// The longest chunk-size line (the size and its extensions).
const MAX_SIZE_LINE: usize = 4 << 10;

/// A request header's bytes kept between requests: more capacity than this is given back.
const IDLE_CAPACITY: usize = 4 << 10;

/// What one connection has read lately.
#[derive(Debug)]
pub struct Tap {
    /// The current request's header is in (set by the proxy's first filter, see
    /// `connections::header_arrived`); until then, every read is kept.
    header_arrived: Arc<AtomicBool>,
    /// The request's trailers were asked for and its body has not reached them yet: reads
    /// go through the framing.
    following: AtomicBool,
    reading: Mutex<Reading>,
}

#[derive(Debug, Default)]
struct Reading {
    /// The request as read, until its header is in.
    head: Vec<u8>,
    /// The body's framing, once its trailers are asked for.
    body: Option<Framing>,
}

/// Where a chunked body's reading is. A line is gathered in its state until it ends.
#[derive(Debug)]
enum Framing {
    /// A chunk's size (hex), perhaps with extensions.
    Size(Vec<u8>),
    /// Within a chunk's data, this many bytes before its end.
    Data(u64),
    /// The line ending after a chunk's data.
    DataEnd(Vec<u8>),
    /// The trailer section: the fields so far, the current line, and how long the section
    /// is so far.
    Trailer {
        fields: Vec<(String, String)>,
        line: Vec<u8>,
        length: usize,
    },
    /// The trailer section has ended (or the framing could not be followed).
    Done(Result<Vec<(String, String)>, TrailerError>),
}

impl Tap {
    pub fn new(header_arrived: Arc<AtomicBool>) -> Arc<Tap> {
        Arc::new(Tap {
            header_arrived,
            following: AtomicBool::new(false),
            reading: Mutex::new(Reading::default()),
        })
    }

    /// The connection's request is over (or a new one begins): forget its bytes.
    pub fn restart(&self) {
        self.following.store(false, Ordering::Relaxed);
        let mut reading = self.reading.lock().expect("tap");
        reading.body = None;
        if reading.head.capacity() > IDLE_CAPACITY {
            reading.head = Vec::new();
        } else {
            reading.head.clear();
        }
    }

    fn recording(&self) -> bool {
        !self.header_arrived.load(Ordering::Relaxed) || self.following.load(Ordering::Relaxed)
    }

    fn record(&self, read: &[u8]) {
        let mut reading = self.reading.lock().expect("tap");
        match reading.body.as_mut() {
            None => reading.head.extend_from_slice(read),
            Some(framing) => {
                if !framing.follow(read) {
                    self.following.store(false, Ordering::Relaxed);
                }
            }
        }
    }

    /// Starts following the body's framing from the end of the header read so far.
    fn follow_body(&self) {
        let mut reading = self.reading.lock().expect("tap");
        let head = std::mem::take(&mut reading.head);
        let mut framing = Framing::Size(Vec::new());
        let going = match header_end(&head) {
            Some(end) => framing.follow(&head[end..]),
            None => {
                framing = Framing::Done(Err(TrailerError::Unreadable));
                false
            }
        };
        reading.body = Some(framing);
        self.following.store(going, Ordering::Relaxed);
    }
}

/// Where a request's header ends in `bytes` (just after its empty line), if it does.
fn header_end(bytes: &[u8]) -> Option<usize> {
    // Empty lines before the request line are skipped, as HTTP/1.1 parsers do.
    let start = bytes
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    let mut at = start;
    while let Some(lf) = bytes[at..].iter().position(|&b| b == b'\n') {
        let next = at + lf + 1;
        match bytes.get(next..) {
            Some([b'\n', ..]) => return Some(next + 1),
            Some([b'\r', b'\n', ..]) => return Some(next + 2),
            _ => at = next,
        }
    }
    None
}

/// Moves `bytes`, up to and with the first line ending, onto `line`: true if the line has
/// ended. `bytes` is left with what follows.
fn gather(line: &mut Vec<u8>, bytes: &mut &[u8]) -> bool {
    match bytes.iter().position(|&b| b == b'\n') {
        Some(lf) => {
            line.extend_from_slice(&bytes[..lf + 1]);
            *bytes = &bytes[lf + 1..];
            true
        }
        None => {
            line.extend_from_slice(bytes);
            *bytes = &[];
            false
        }
    }
}

impl Framing {
    /// Reads on through `bytes`; false once the trailer section has ended (or cannot be
    /// read), after which nothing more is looked at.
    fn follow(&mut self, mut bytes: &[u8]) -> bool {
        loop {
            let next = match self {
                Framing::Done(_) => return false,
                _ if bytes.is_empty() => return true,
                Framing::Data(left) => {
                    let skipped = (*left).min(bytes.len() as u64);
                    bytes = &bytes[skipped as usize..];
                    *left -= skipped;
                    if *left > 0 {
                        return true;
                    }
                    Framing::DataEnd(Vec::new())
                }
                Framing::Size(line) => {
                    if !gather(line, &mut bytes) {
                        if line.len() > MAX_SIZE_LINE {
                            *self = Framing::Done(Err(TrailerError::Unreadable));
                        }
                        continue;
                    }
                    match chunk_size(line) {
                        Some(0) => Framing::Trailer {
                            fields: Vec::new(),
                            line: Vec::new(),
                            length: 0,
                        },
                        Some(size) => Framing::Data(size),
                        None => Framing::Done(Err(TrailerError::Unreadable)),
                    }
                }
                Framing::DataEnd(line) => {
                    if !gather(line, &mut bytes) {
                        if line.len() > 2 {
                            *self = Framing::Done(Err(TrailerError::Unreadable));
                        }
                        continue;
                    }
                    match strip_eol(line) {
                        Some([]) => Framing::Size(Vec::new()),
                        _ => Framing::Done(Err(TrailerError::Unreadable)),
                    }
                }
                Framing::Trailer {
                    fields,
                    line,
                    length,
                } => {
                    let before = line.len();
                    let ended = gather(line, &mut bytes);
                    *length += line.len() - before;
                    if *length > MAX_SECTION {
                        Framing::Done(Err(TrailerError::Unreadable))
                    } else if !ended {
                        continue;
                    } else {
                        match trailer_line(line) {
                            Ok(None) => Framing::Done(Ok(std::mem::take(fields))),
                            Ok(Some(field)) => {
                                fields.push(field);
                                line.clear();
                                continue;
                            }
                            Err(error) => Framing::Done(Err(error)),
                        }
                    }
                }
            };
            *self = next;
        }
    }
}

/// Strips one line ending (CRLF or LF) off the end.
fn strip_eol(bytes: &[u8]) -> Option<&[u8]> {
    let bytes = bytes.strip_suffix(b"\n")?;
    Some(bytes.strip_suffix(b"\r").unwrap_or(bytes))
}

/// The size on a chunk-size line (hex, perhaps followed by whitespace and extensions).
fn chunk_size(line: &[u8]) -> Option<u64> {
    let line = strip_eol(line)?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || !matches!(line.get(digits), None | Some(b';' | b' ' | b'\t')) {
        return None;
    }
    let digits = std::str::from_utf8(&line[..digits]).ok()?;
    u64::from_str_radix(digits, 16).ok()
}

fn is_token(name: &[u8]) -> bool {
    !name.is_empty()
        && name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b))
}

/// One line of a trailer section: a field (name in lower case, value trimmed), or `None`
/// for the empty line that ends the section.
fn trailer_line(line: &[u8]) -> Result<Option<(String, String)>, TrailerError> {
    let line = strip_eol(line).ok_or(TrailerError::Unreadable)?;
    if line.is_empty() {
        return Ok(None);
    }
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or(TrailerError::Malformed)?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    if !is_token(name) {
        return Err(TrailerError::Malformed);
    }
    let value = std::str::from_utf8(value).map_err(|_| TrailerError::Malformed)?;
    Ok(Some((
        String::from_utf8_lossy(name).to_ascii_lowercase(),
        value.trim_matches([' ', '\t']).to_string(),
    )))
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

/// Asks for the request's trailers to be read; false if they cannot be (not a tapped HTTP/1
/// connection). Call it once the header is in and before reading the (chunked) body.
pub fn keep_tail(session: &ServerSession) -> bool {
    match tap_of(session) {
        Some(tap) => {
            tap.follow_body();
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
    /// The body read is not a chunked body that has ended.
    Unreadable,
    /// A line of the section is not a field.
    Malformed,
}

/// The trailer fields (name in lower case, value trimmed) of the request whose chunked body
/// has just been read to its end, after [`keep_tail`].
pub fn trailers(session: &ServerSession) -> Result<Vec<(String, String)>, TrailerError> {
    let tap = tap_of(session).ok_or(TrailerError::NotKept)?;
    let reading = tap.reading.lock().expect("tap");
    match &reading.body {
        None => Err(TrailerError::NotKept),
        Some(Framing::Done(read)) => read.clone(),
        Some(_) => Err(TrailerError::Unreadable),
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

    /// The trailers of `request` (a header and a chunked body, perhaps more after it) read
    /// `step` bytes at a time, with the header arrived after the first read.
    fn read(request: &[u8], step: usize) -> Result<Vec<(String, String)>, TrailerError> {
        let arrived = Arc::new(AtomicBool::new(false));
        let tap = Tap::new(arrived.clone());
        let end = header_end(request).expect("a header");
        let first = request.len().min(end.max(step));
        tap.record(&request[..first]);
        arrived.store(true, Ordering::Relaxed);
        tap.follow_body();
        for piece in request[first..].chunks(step) {
            if tap.recording() {
                tap.record(piece);
            }
        }
        let reading = tap.reading.lock().unwrap();
        match &reading.body {
            Some(Framing::Done(read)) => read.clone(),
            _ => Err(TrailerError::Unreadable),
        }
    }

    const HEAD: &[u8] = b"PATCH /f/1 HTTP/1.1\r\nTrailer: Upload-Checksum\r\n\r\n";

    fn request(body: &[u8]) -> Vec<u8> {
        [HEAD, body].concat()
    }

    #[test]
    fn the_section_after_the_last_chunk_is_read_at_any_read_size() {
        let body =
            request(b"5\r\nhello\r\n0\r\nUpload-Checksum: sha1 abc=\r\nX-Other:  two \r\n\r\n");
        for step in [1, 2, 3, 7, 64, 4096] {
            assert_eq!(
                read(&body, step).unwrap(),
                vec![
                    ("upload-checksum".to_string(), "sha1 abc=".to_string()),
                    ("x-other".to_string(), "two".to_string())
                ],
                "read {step} bytes at a time"
            );
        }
        assert_eq!(read(&request(b"3\r\nabc\r\n0\r\n\r\n"), 5).unwrap(), vec![]);
        assert_eq!(
            read(&request(b"3\nabc\n000;ext=\"a:b\"\nA: 1\n\n"), 2).unwrap(),
            vec![("a".to_string(), "1".to_string())]
        );
    }

    #[test]
    fn body_bytes_that_look_like_fields_or_last_chunks_are_data() {
        let body = request(b"1e\r\n0\r\nUpload-Checksum: sha1 x\r\n\r\n\r\n0\r\n\r\n");
        assert_eq!(read(&body, 4).unwrap(), vec![]);
    }

    #[test]
    fn what_follows_the_section_is_not_looked_at() {
        // A pipelined request right behind the body, in the same read or the next ones.
        let mut body = request(b"2\r\nok\r\n0\r\nUpload-Checksum: md5 AA==\r\n\r\n");
        body.extend_from_slice(b"HEAD /f/1 HTTP/1.1\r\nHost: a\r\n\r\n5\r\n0\r\nX: y\r\n\r\n");
        for step in [1, 9, 4096] {
            assert_eq!(
                read(&body, step).unwrap(),
                vec![("upload-checksum".to_string(), "md5 AA==".to_string())]
            );
        }
    }

    #[test]
    fn bytes_that_are_not_a_chunked_body_are_refused() {
        assert_eq!(read(&request(b""), 4), Err(TrailerError::Unreadable));
        assert_eq!(read(&request(b"zz\r\n"), 4), Err(TrailerError::Unreadable));
        assert_eq!(
            read(&request(b"2\r\nabc\r\n0\r\n\r\n"), 4),
            Err(TrailerError::Unreadable)
        );
        assert_eq!(
            read(&request(b"0\r\nbad name: x\r\n\r\n"), 4),
            Err(TrailerError::Malformed)
        );
        assert_eq!(
            read(&request(b"0\r\nno colon\r\n\r\n"), 4),
            Err(TrailerError::Malformed)
        );
        // A body that has not ended.
        assert_eq!(
            read(&request(b"5\r\nhel"), 4),
            Err(TrailerError::Unreadable)
        );
        let long = [b"0\r\nX: ".as_slice(), &[b'a'; MAX_SECTION], b"\r\n\r\n"].concat();
        assert_eq!(read(&request(&long), 4096), Err(TrailerError::Unreadable));
    }

    #[test]
    fn the_header_ends_at_its_first_empty_line() {
        assert_eq!(header_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest"), Some(24));
        assert_eq!(header_end(b"\r\nGET / HTTP/1.1\nA: b\n\nrest"), Some(23));
        assert_eq!(header_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }

    #[test]
    fn the_tap_keeps_a_header_read_only_until_the_request_is_over() {
        let arrived = Arc::new(AtomicBool::new(false));
        let tap = Tap::new(arrived.clone());
        assert!(tap.recording());
        tap.record(&[b'x'; 64 << 10]);
        arrived.store(true, Ordering::Relaxed);
        assert!(!tap.recording());
        tap.restart();
        let reading = tap.reading.lock().unwrap();
        assert!(reading.head.capacity() <= IDLE_CAPACITY && reading.body.is_none());
    }
}
