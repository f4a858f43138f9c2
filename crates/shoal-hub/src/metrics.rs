//! Counters of the hub's work, and a listener that counts every byte on its connections.

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// The hub's counters, since it started.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    /// HTTP requests received.
    pub(crate) requests: AtomicU64,
    /// Download sessions started.
    pub(crate) download_sessions: AtomicU64,
    /// Upload batches planned.
    pub(crate) upload_batches: AtomicU64,
    /// Upload batches committed.
    pub(crate) upload_commits: AtomicU64,
    /// Chunks served.
    pub(crate) chunk_gets: AtomicU64,
    /// Chunks received.
    pub(crate) chunk_puts: AtomicU64,
    /// Presence streams open now.
    pub(crate) presence_streams: AtomicU64,
    /// Negotiation messages delivered to devices by relay.
    pub(crate) negotiations_relayed: AtomicU64,
    /// Bytes read from connections, headers included.
    pub(crate) bytes_in: AtomicU64,
    /// Bytes written to connections, headers included.
    pub(crate) bytes_out: AtomicU64,
}

/// Adds one to a counter.
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    /// The counters as `name value` lines.
    pub(crate) fn render(&self) -> String {
        let counters = [
            ("requests", &self.requests),
            ("download_sessions", &self.download_sessions),
            ("upload_batches", &self.upload_batches),
            ("upload_commits", &self.upload_commits),
            ("chunk_gets", &self.chunk_gets),
            ("chunk_puts", &self.chunk_puts),
            ("presence_streams", &self.presence_streams),
            ("negotiations_relayed", &self.negotiations_relayed),
            ("bytes_in", &self.bytes_in),
            ("bytes_out", &self.bytes_out),
        ];
        let mut out = String::new();
        for (name, counter) in counters {
            let _ = writeln!(out, "{name} {}", counter.load(Ordering::Relaxed));
        }
        out
    }
}

/// A TCP listener whose connections count their bytes into [`Metrics`].
pub(crate) struct CountingListener {
    inner: TcpListener,
    metrics: Arc<Metrics>,
}

impl CountingListener {
    pub(crate) fn new(inner: TcpListener, metrics: Arc<Metrics>) -> CountingListener {
        CountingListener { inner, metrics }
    }
}

impl axum::serve::Listener for CountingListener {
    type Io = CountingStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (CountingStream, SocketAddr) {
        // axum's own accept logs and retries failed accepts.
        let (stream, address) = axum::serve::Listener::accept(&mut self.inner).await;
        let stream = CountingStream {
            inner: stream,
            metrics: self.metrics.clone(),
        };
        (stream, address)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A TCP connection that counts what passes through it.
pub(crate) struct CountingStream {
    inner: TcpStream,
    metrics: Arc<Metrics>,
}

impl CountingStream {
    fn count_out(&self, written: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = written {
            self.metrics
                .bytes_out
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
    }
}

impl AsyncRead for CountingStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        this.metrics
            .bytes_in
            .fetch_add(read as u64, Ordering::Relaxed);
        result
    }
}

impl AsyncWrite for CountingStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.count_out(&result);
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.count_out(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn connections_count_their_bytes() -> Result<(), Box<dyn std::error::Error>> {
        let metrics = Arc::new(Metrics::default());
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let mut listener = CountingListener::new(listener, metrics.clone());
        let client = tokio::spawn(async move {
            let mut socket = TcpStream::connect(address).await?;
            socket.write_all(b"hello").await?;
            let mut answer = [0u8; 3];
            socket.read_exact(&mut answer).await?;
            Ok::<_, io::Error>(answer)
        });
        let (mut server, _) = axum::serve::Listener::accept(&mut listener).await;
        let mut greeting = [0u8; 5];
        server.read_exact(&mut greeting).await?;
        server.write_all(b"hey").await?;
        assert_eq!(&client.await??, b"hey");
        assert_eq!(metrics.bytes_in.load(Ordering::Relaxed), 5);
        assert_eq!(metrics.bytes_out.load(Ordering::Relaxed), 3);
        assert!(metrics.render().contains("bytes_in 5\nbytes_out 3\n"));
        Ok(())
    }
}
