//! Chunk bundles over blocking HTTP/1.1 connections of their own.
//!
//! Through reqwest's blocking client every piece of an answer crosses from its one runtime
//! thread to the caller's: two thread wake-ups per read, and the TLS work of all parallel
//! fetches on that one thread. A bundle answer of a megabyte is read here on the caller's
//! thread, straight from the connection (decrypted there, for a peer) into where its chunks
//! go (figures in BENCHMARKS.md, "eighteenth session").

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rustls::pki_types::ServerName;

use crate::{BUSY_PAUSE, BUSY_RETRIES, ClientError};

/// The connection's read buffer: enough for an answer's head and a frame's header. A chunk
/// (16 KiB to 256 KiB) is then read past it, straight from the socket (or the TLS session's
/// plaintext) into its place, instead of being copied once more through the buffer.
const READ_BUFFER: usize = 8 << 10;
/// Idle connections kept per client (a device fetches with a few threads at once).
const IDLE_MAX: usize = 8;
/// The most of an error answer that is read.
const ERROR_BODY_MAX: u64 = 64 << 10;

/// Where bundles are fetched from, and the connections kept to it.
pub(crate) struct Bulk {
    /// "host:port", for connecting and the Host header.
    host: String,
    /// What the base URL has after its host (a hub behind a path prefix).
    prefix: String,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    connect_timeout: Duration,
    io_timeout: Duration,
    idle: Mutex<Vec<BufReader<Stream>>>,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// A status line and the headers this client uses.
struct Head {
    status: u16,
    length: Option<u64>,
    close: bool,
    epoch: Option<u32>,
}

impl Bulk {
    /// For a base URL `http://host:port[/prefix]`, or `https://…` with the TLS settings to
    /// use; None for anything else (those go through reqwest).
    pub(crate) fn for_base(
        base: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
        connect_timeout: Duration,
        io_timeout: Duration,
    ) -> Option<Bulk> {
        let (rest, tls) = match (base.strip_prefix("http://"), base.strip_prefix("https://")) {
            (Some(rest), _) => (rest, None),
            (_, Some(rest)) => (rest, Some(tls?)),
            _ => return None,
        };
        let (host, prefix) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, ""),
        };
        let tls = match tls {
            Some(config) => {
                let name = host.rsplit_once(':').map_or(host, |(name, _)| name);
                let name = name.trim_start_matches('[').trim_end_matches(']');
                Some((config, ServerName::try_from(name.to_owned()).ok()?))
            }
            None => None,
        };
        Some(Bulk {
            host: host.to_owned(),
            prefix: prefix.trim_end_matches('/').to_owned(),
            tls,
            connect_timeout,
            io_timeout,
            idle: Mutex::new(Vec::new()),
        })
    }

    fn connect(&self) -> io::Result<BufReader<Stream>> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        for address in self.host.to_socket_addrs()? {
            match TcpStream::connect_timeout(&address, self.connect_timeout) {
                Ok(tcp) => {
                    tcp.set_nodelay(true)?;
                    tcp.set_read_timeout(Some(self.io_timeout))?;
                    tcp.set_write_timeout(Some(self.io_timeout))?;
                    let stream = match &self.tls {
                        None => Stream::Plain(tcp),
                        Some((config, name)) => {
                            let session =
                                rustls::ClientConnection::new(config.clone(), name.clone())
                                    .map_err(io::Error::other)?;
                            Stream::Tls(Box::new(rustls::StreamOwned::new(session, tcp)))
                        }
                    };
                    return Ok(BufReader::with_capacity(READ_BUFFER, stream));
                }
                Err(error) => last = error,
            }
        }
        Err(last)
    }

    /// POSTs `body` (of `content_type`) to `path` with `headers`, and hands a successful
    /// answer's body to `read`. A kept connection the server has closed meanwhile is replaced
    /// once; a busy server is asked again as the reqwest path does.
    pub(crate) fn post(
        &self,
        path: &str,
        content_type: &str,
        headers: &[(&'static str, String)],
        body: &[u8],
        read: &mut dyn FnMut(&mut dyn Read) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        let request = self.head(path, content_type, headers, body.len());
        let unreachable = |e: io::Error| ClientError::Unreachable(e.to_string());
        let mut busy = 0;
        loop {
            let kept = self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            let reused = kept.is_some();
            let mut conn = match kept {
                Some(conn) => conn,
                None => self.connect().map_err(unreachable)?,
            };
            let head = match send(&mut conn, &request, body) {
                Ok(head) => head,
                // The server closed the kept connection: ask again on a new one.
                Err(_) if reused => continue,
                Err(error) => return Err(unreachable(error)),
            };
            let Some(length) = head.length else {
                return Err(ClientError::Protocol(
                    "an answer without a length".to_owned(),
                ));
            };
            let mut answer = (&mut conn).take(length);
            if head.status == 202 && busy + 1 < BUSY_RETRIES {
                io::copy(&mut answer, &mut io::sink()).map_err(unreachable)?;
                self.keep(conn, &head);
                busy += 1;
                std::thread::sleep(BUSY_PAUSE);
                continue;
            }
            if !(200..300).contains(&head.status) {
                let mut text = Vec::new();
                answer
                    .take(ERROR_BODY_MAX)
                    .read_to_end(&mut text)
                    .map_err(unreachable)?;
                return Err(crate::error_for(head.status, head.epoch, &text));
            }
            let result = read(&mut answer);
            // Kept only when read to its end: otherwise its state is unknown.
            if result.is_ok() && answer.limit() == 0 {
                self.keep(conn, &head);
            }
            return result;
        }
    }

    fn keep(&self, conn: BufReader<Stream>, head: &Head) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if !head.close && idle.len() < IDLE_MAX {
            idle.push(conn);
        }
    }

    fn head(
        &self,
        path: &str,
        content_type: &str,
        headers: &[(&'static str, String)],
        length: usize,
    ) -> Vec<u8> {
        let mut head = format!(
            "POST {}{path} HTTP/1.1\r\nhost: {}\r\ncontent-type: {content_type}\r\n\
             content-length: {length}\r\n",
            self.prefix, self.host,
        );
        for (name, value) in headers {
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        head.into_bytes()
    }
}

/// Writes a request (`head` and `body`) and reads the answer's head.
fn send(conn: &mut BufReader<Stream>, head: &[u8], body: &[u8]) -> io::Result<Head> {
    conn.get_mut().write_all(head)?;
    conn.get_mut().write_all(body)?;
    conn.get_mut().flush()?;
    let mut line = String::new();
    if conn.read_line(&mut line)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an HTTP answer"))?;
    let mut head = Head {
        status,
        length: None,
        close: false,
        epoch: None,
    };
    let mut chunked = false;
    loop {
        line.clear();
        if conn.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end();
        if line.is_empty() {
            if chunked {
                // Not read here: refused for want of a length, and the connection dropped.
                head.length = None;
                head.close = true;
            }
            return Ok(head);
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            head.length = value.parse().ok();
        } else if name.eq_ignore_ascii_case("connection") {
            head.close = value.eq_ignore_ascii_case("close");
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = true;
        } else if name.eq_ignore_ascii_case(shoal_protocol::headers::EPOCH) {
            head.epoch = value.parse().ok();
        }
    }
}
