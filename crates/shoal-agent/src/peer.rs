//! The agent's protocol server: the download half of the sync protocol, a content endpoint
//! and negotiation messages, served to peers over TLS.
//!
//! Peers only pull: each side downloads what it lacks from the other, so no peer ever writes
//! into another's replica. A caller must present a device key the hub vouched for (checked in
//! the TLS handshake) and share the workspace it asks about; anything else gets nothing.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::serve::{IncomingStream, Listener};
use shoal_core::{Batch, BatchLimits, ChunkRef, ContentHash, Knowledge, SyncOffer, plan_batches};
use shoal_protocol::{
    ContentFetch, DownloadRequest, DownloadResponse, ErrorBody, Location, Negotiation, WireBatch,
    parse_hash, routes, wire_batch,
};
use shoal_store::Store;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::daemon::Signal;
use crate::home::WorkspaceEntry;
use crate::peers::{AgentCounters, Contacts, Serving};
use crate::sync::Stamp;
use crate::{AgentError, DeviceIdentity};

/// The largest download result a peer reads (the hub's request limit).
const RESULT_MAX: usize = 32 << 20;

/// How long an unfinished download session is kept.
const SESSION_TTL: Duration = Duration::from_secs(30 * 60);

/// A download being served. Batches are kept as planned and put in wire form one at a time,
/// when asked for: the wire form of a large plan is several times its size.
struct Session {
    workspace: String,
    /// The planned batches; each is let go once the caller asks for a later one (it has the
    /// earlier one whole by then), so a large pull does not hold its whole plan to its end.
    batches: Arc<Mutex<Vec<Option<Arc<Batch>>>>>,
    held: Arc<HashSet<ContentHash>>,
    created: Instant,
}

/// A content's chunks by hash.
type ChunkIndex = HashMap<ContentHash, ChunkRef>;

/// How many chunk indexes the server keeps, and the fewest chunks a content must have to be
/// kept (a small one is cheaper to decode again).
const CHUNK_INDEXES_KEPT: usize = 4;
const CHUNK_INDEX_MIN: usize = 64;

/// State behind the peer routes.
pub(crate) struct PeerServer {
    workspaces: HashMap<String, WorkspaceEntry>,
    device_name: String,
    contacts: Arc<RwLock<Contacts>>,
    stores: Mutex<HashMap<String, Store>>,
    sessions: Mutex<HashMap<String, Session>>,
    /// The chunk indexes of the large contents served last: a large file is fetched a
    /// bundle at a time, and decoding its list for every bundle cost more than reading it.
    chunk_indexes: Mutex<Vec<(ContentHash, Arc<ChunkIndex>)>>,
    signals: Mutex<Sender<Signal>>,
    counters: Arc<AgentCounters>,
    serving: Arc<Serving>,
}

/// Who is on the other end of a connection: the key it proved it holds.
#[derive(Clone, Debug)]
pub(crate) struct PeerConn {
    key: Option<String>,
}

struct PeerError(StatusCode, String);

impl IntoResponse for PeerError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.1,
            request: String::new(),
        };
        (self.0, axum::Json(body)).into_response()
    }
}

impl From<AgentError> for PeerError {
    fn from(error: AgentError) -> Self {
        PeerError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
    }
}

impl From<shoal_store::StoreError> for PeerError {
    fn from(error: shoal_store::StoreError) -> Self {
        PeerError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
    }
}

impl From<shoal_protocol::WireError> for PeerError {
    fn from(error: shoal_protocol::WireError) -> Self {
        PeerError(StatusCode::BAD_REQUEST, error.to_string())
    }
}

fn not_found() -> PeerError {
    PeerError(StatusCode::NOT_FOUND, "no such workspace".into())
}

type Shared = Arc<PeerServer>;

impl PeerServer {
    pub(crate) fn new(
        workspaces: &[WorkspaceEntry],
        device_name: &str,
        contacts: Arc<RwLock<Contacts>>,
        signals: Sender<Signal>,
        counters: Arc<AgentCounters>,
        serving: Arc<Serving>,
    ) -> PeerServer {
        PeerServer {
            workspaces: workspaces
                .iter()
                .map(|w| (w.id.clone(), w.clone()))
                .collect(),
            device_name: device_name.to_owned(),
            contacts,
            stores: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            chunk_indexes: Mutex::new(Vec::new()),
            signals: Mutex::new(signals),
            counters,
            serving,
        }
    }

    /// The calling device, if its key is vouched for and it shares `ws` with us.
    fn authorize(&self, conn: &PeerConn, ws: &str) -> Result<String, PeerError> {
        let key = conn.key.as_deref().ok_or_else(not_found)?;
        let contacts = self
            .contacts
            .read()
            .map_err(|_| PeerError(StatusCode::INTERNAL_SERVER_ERROR, "poisoned".into()))?;
        let device = contacts.by_key(key).ok_or_else(not_found)?.device.clone();
        if !self.workspaces.contains_key(ws) || !contacts.shares(&device, ws) {
            return Err(not_found());
        }
        Ok(device)
    }

    fn with_store<T>(
        &self,
        ws: &str,
        work: impl FnOnce(&Store) -> Result<T, PeerError>,
    ) -> Result<T, PeerError> {
        let entry = self.workspaces.get(ws).ok_or_else(not_found)?;
        let mut stores = self
            .stores
            .lock()
            .map_err(|_| PeerError(StatusCode::INTERNAL_SERVER_ERROR, "poisoned".into()))?;
        if !stores.contains_key(ws) {
            let path = entry.path.join(shoal_core::STATE_DIR_NAME).join("state.db");
            if !path.exists() {
                return Err(not_found());
            }
            stores.insert(ws.to_owned(), Store::open(&path, &self.device_name)?);
        }
        let store = stores.get(ws).ok_or_else(not_found)?;
        store.reading(work)
    }

    fn plan_download(
        &self,
        ws: &str,
        request: &DownloadRequest,
    ) -> Result<DownloadResponse, PeerError> {
        let knowledge = Knowledge::try_from(&request.knowledge)?;
        let held = shoal_protocol::parse_held(&request.held)?;
        let session = shoal_protocol::hex16(&rand::random());
        let (batches, tag) = self.with_store(ws, |store| {
            let offer = SyncOffer {
                knowledge: store.knowledge()?,
                forgotten: store.forgotten()?,
            };
            if offer.needs_recovery(&knowledge) {
                // The caller is behind what this device has forgotten: only a full compare
                // can tell what it must drop, and the hub does that.
                return Err(PeerError(
                    StatusCode::CONFLICT,
                    "recovery needed: sync with the hub".into(),
                ));
            }
            let mut missing = store.missing_for(&knowledge)?;
            // A version the hub refused stays with its author; it does not spread.
            let withheld = store.drop_refused(&mut missing)?;
            let limits = BatchLimits::default().negotiate(BatchLimits {
                max_items: request.limits.max_items,
                max_bytes: request.limits.max_bytes,
            });
            let mut planned = plan_batches(missing, &offer, limits);
            if planned.is_empty() {
                return Err(PeerError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "no batch".into(),
                ));
            }
            if withheld {
                // The caller must not learn dots it was not sent.
                for batch in &mut planned {
                    batch.learned = batch.carried();
                    batch.forgotten = Default::default();
                }
            }
            Ok((planned, offer.knowledge.compact().to_string()))
        })?;
        let first = self.wire_batch(ws, &session, &batches[0], 0, batches.len(), &held)?;
        // The first batch is in the response; the caller asks for the later ones.
        let batches: Vec<Option<Arc<Batch>>> = std::iter::once(None)
            .chain(
                batches
                    .into_iter()
                    .skip(1)
                    .map(|batch| Some(Arc::new(batch))),
            )
            .collect();
        let mut sessions = self
            .sessions
            .lock()
            .map_err(|_| PeerError(StatusCode::INTERNAL_SERVER_ERROR, "poisoned".into()))?;
        sessions.retain(|_, s| s.created.elapsed() < SESSION_TTL);
        sessions.insert(
            session.clone(),
            Session {
                workspace: ws.to_owned(),
                batches: Arc::new(Mutex::new(batches)),
                held: Arc::new(held),
                created: Instant::now(),
            },
        );
        self.serving.set_open_pulls(sessions.len());
        AgentCounters::bump(&self.counters.peer_served, 1);
        Ok(DownloadResponse {
            batch: first,
            result: routes::download_result(ws, &session),
            recovery: false,
            tag,
        })
    }

    /// Batch `index` of a session's plan of `count` batches in wire form, with the chunk lists
    /// it needs.
    fn wire_batch(
        &self,
        ws: &str,
        session: &str,
        batch: &Batch,
        index: usize,
        count: usize,
        held: &HashSet<ContentHash>,
    ) -> Result<WireBatch, PeerError> {
        let locations = [Location {
            transport: "peer".into(),
            url: routes::peer_contents(ws),
        }];
        let next = (index + 1 < count).then(|| routes::download_batch(ws, session, index + 1));
        self.with_store(ws, |store| {
            Ok(wire_batch(
                batch,
                |hash| store.content(hash),
                |content| store.held_bases(content, held, shoal_protocol::DELTA_BASES),
                held,
                &locations,
                next,
            )?)
        })
    }

    /// One chunk of a content this device holds in its folder, read from the file and
    /// checked (the file may have changed since it was scanned).
    fn read_chunk(&self, ws: &str, content: &str, chunk: &str) -> Result<Vec<u8>, PeerError> {
        let content = parse_hash(content)?;
        let chunk = parse_hash(chunk)?;
        let entry = self.workspaces.get(ws).ok_or_else(not_found)?;
        let gone = || PeerError(StatusCode::NOT_FOUND, "this device does not hold it".into());
        let (piece, file) = self.with_store(ws, |store| {
            let held = store.content(&content)?.ok_or_else(gone)?;
            let piece = held
                .chunks
                .iter()
                .find(|c| c.hash == chunk)
                .cloned()
                .ok_or_else(gone)?;
            let file = store.local_file_with(&content)?.ok_or_else(gone)?;
            Ok((piece, file))
        })?;
        let mut path = entry.path.clone();
        path.extend(file.path.split('/'));
        let handle = std::fs::File::open(&path).map_err(|_| gone())?;
        let mut bytes = vec![0u8; piece.len as usize];
        std::os::unix::fs::FileExt::read_exact_at(&handle, &mut bytes, piece.offset)
            .map_err(|_| gone())?;
        if ContentHash::of(&bytes) != chunk {
            return Err(gone());
        }
        Ok(bytes)
    }
}

impl PeerServer {
    /// A held content's chunks by hash (a large file's list has thousands of chunks, a
    /// request dozens), kept for the next bundles when the content is large.
    fn chunk_index(
        &self,
        store: &Store,
        content: &ContentHash,
    ) -> Result<Option<Arc<ChunkIndex>>, PeerError> {
        let poisoned = || PeerError(StatusCode::INTERNAL_SERVER_ERROR, "poisoned".into());
        let kept = self.chunk_indexes.lock().map_err(|_| poisoned())?;
        if let Some((_, index)) = kept.iter().find(|(hash, _)| hash == content) {
            return Ok(Some(index.clone()));
        }
        drop(kept);
        let Some(known) = store.content(content)? else {
            return Ok(None);
        };
        let index: Arc<ChunkIndex> = Arc::new(known.chunks.iter().map(|c| (c.hash, *c)).collect());
        if known.chunks.len() >= CHUNK_INDEX_MIN {
            let mut kept = self.chunk_indexes.lock().map_err(|_| poisoned())?;
            if kept.len() >= CHUNK_INDEXES_KEPT {
                kept.remove(0);
            }
            kept.push((*content, index.clone()));
        }
        Ok(Some(index))
    }

    /// Many chunks of contents this device holds, read from their files and checked, in one
    /// bundle of at most `CHUNK_BUNDLE_MAX` bytes; chunks not held (or changed since the scan)
    /// are left out.
    fn read_bundle(&self, ws: &str, request: &ContentFetch) -> Result<Vec<u8>, PeerError> {
        let limit = shoal_protocol::CHUNK_BUNDLE_MAX / 1024;
        if request
            .contents
            .iter()
            .map(|c| c.chunks.len())
            .sum::<usize>()
            > limit
        {
            return Err(PeerError(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("at most {limit} chunks per fetch"),
            ));
        }
        let mut wanted = Vec::with_capacity(request.contents.len());
        for entry in &request.contents {
            let chunks = entry
                .chunks
                .iter()
                .map(|c| parse_hash(c))
                .collect::<Result<Vec<_>, _>>()?;
            wanted.push((parse_hash(&entry.content)?, chunks));
        }
        let root = self.workspaces.get(ws).ok_or_else(not_found)?.path.clone();
        let held = self.with_store(ws, |store| {
            let mut held = Vec::with_capacity(wanted.len());
            for (content, chunks) in &wanted {
                let Some(file) = store.local_file_with(content)? else {
                    continue;
                };
                let Some(by_hash) = self.chunk_index(store, content)? else {
                    continue;
                };
                let pieces: Vec<ChunkRef> = chunks
                    .iter()
                    .filter_map(|c| by_hash.get(c).copied())
                    .collect();
                held.push((file.path.clone(), Stamp::recorded(&file), pieces));
            }
            Ok(held)
        })?;
        // Sized up front: growing by doubling would hold twice the bundle at the end.
        let wanted_bytes: usize = held
            .iter()
            .flat_map(|(_, _, pieces)| pieces.iter().map(|p| shoal_protocol::frame_len(p.len)))
            .sum();
        let mut bundle = Vec::with_capacity(wanted_bytes.min(shoal_protocol::CHUNK_BUNDLE_MAX));
        for (path, stamp, pieces) in held {
            // What still fits; the rest is asked for again.
            let mut room = shoal_protocol::CHUNK_BUNDLE_MAX - bundle.len();
            let fits = pieces
                .iter()
                .take_while(|piece| {
                    let frame = shoal_protocol::frame_len(piece.len);
                    let fits = frame <= room;
                    room = room.saturating_sub(frame);
                    fits
                })
                .count();
            let mut full = root.clone();
            full.extend(path.split('/'));
            if let Ok(handle) = std::fs::File::open(&full) {
                // A file changed since the scan is left out: the caller checks every chunk
                // anyway and asks elsewhere for what is missing.
                crate::sync::bundle_pieces(&mut bundle, &handle, stamp, &pieces[..fits]);
            }
            if fits < pieces.len() {
                break;
            }
        }
        Ok(bundle)
    }
}

/// Runs a request's work off the async threads, counted as serving a peer meanwhile.
async fn blocking<T: Send + 'static>(
    serving: Arc<Serving>,
    work: impl FnOnce() -> Result<T, PeerError> + Send + 'static,
) -> Result<T, PeerError> {
    let _answering = serving.answering();
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| PeerError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

async fn download(
    State(server): State<Shared>,
    ConnectInfo(conn): ConnectInfo<PeerConn>,
    Path(ws): Path<String>,
    axum::Json(request): axum::Json<DownloadRequest>,
) -> Result<axum::Json<DownloadResponse>, PeerError> {
    server.authorize(&conn, &ws)?;
    blocking(server.serving.clone(), move || {
        server.plan_download(&ws, &request)
    })
    .await
    .map(axum::Json)
}

async fn download_batch(
    State(server): State<Shared>,
    ConnectInfo(conn): ConnectInfo<PeerConn>,
    Path((ws, session, index)): Path<(String, String, usize)>,
) -> Result<axum::Json<WireBatch>, PeerError> {
    server.authorize(&conn, &ws)?;
    let poisoned = || PeerError(StatusCode::INTERNAL_SERVER_ERROR, "poisoned".into());
    let no_batch = || PeerError(StatusCode::NOT_FOUND, "no such batch".into());
    let (batches, held) = server
        .sessions
        .lock()
        .map_err(|_| poisoned())?
        .get(&session)
        .filter(|s| s.workspace == ws)
        .map(|s| (s.batches.clone(), s.held.clone()))
        .ok_or_else(no_batch)?;
    let (batch, count) = {
        let mut batches = batches.lock().map_err(|_| poisoned())?;
        batches
            .iter_mut()
            .take(index)
            .for_each(|served| *served = None);
        // Asked again (a retry), it is still there.
        let batch = batches.get(index).cloned().flatten();
        (batch.ok_or_else(no_batch)?, batches.len())
    };
    blocking(server.serving.clone(), move || {
        server.wire_batch(&ws, &session, &batch, index, count, &held)
    })
    .await
    .map(axum::Json)
}

async fn download_result(
    State(server): State<Shared>,
    ConnectInfo(conn): ConnectInfo<PeerConn>,
    Path((ws, session)): Path<(String, String)>,
    body: axum::body::Body,
) -> Result<StatusCode, PeerError> {
    server.authorize(&conn, &ws)?;
    // Read to its end though a peer keeps nothing of it: a body left unread made the server
    // drop the connection while the caller was still sending, and the pull fail at its very
    // end. Not parsed or held either: a large pull's result lists every item.
    let mut body = std::pin::pin!(body);
    while let Some(frame) =
        std::future::poll_fn(|cx| axum::body::HttpBody::poll_frame(body.as_mut(), cx)).await
    {
        frame.map_err(|e| PeerError(StatusCode::BAD_REQUEST, format!("result: {e}")))?;
    }
    let mut sessions = server
        .sessions
        .lock()
        .map_err(|_| PeerError(StatusCode::INTERNAL_SERVER_ERROR, "poisoned".into()))?;
    match sessions.get(&session) {
        Some(s) if s.workspace == ws => {
            sessions.remove(&session);
            server.serving.set_open_pulls(sessions.len());
            Ok(StatusCode::OK)
        }
        _ => Err(PeerError(StatusCode::NOT_FOUND, "no such session".into())),
    }
}

async fn get_content_chunk(
    State(server): State<Shared>,
    ConnectInfo(conn): ConnectInfo<PeerConn>,
    Path((ws, content, chunk)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, PeerError> {
    server.authorize(&conn, &ws)?;
    let bytes = blocking(server.serving.clone(), move || {
        server.read_chunk(&ws, &content, &chunk)
    })
    .await?;
    // A resumed transfer asks for the rest: "bytes=N-".
    let start = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.strip_suffix('-'))
        .and_then(|v| v.parse::<usize>().ok());
    Ok(match start {
        Some(start) if start < bytes.len() => (
            StatusCode::PARTIAL_CONTENT,
            [(
                header::CONTENT_RANGE,
                format!("bytes {start}-{}/{}", bytes.len() - 1, bytes.len()),
            )],
            bytes[start..].to_vec(),
        )
            .into_response(),
        _ => bytes.into_response(),
    })
}

async fn fetch_contents(
    State(server): State<Shared>,
    ConnectInfo(conn): ConnectInfo<PeerConn>,
    Path(ws): Path<String>,
    axum::Json(request): axum::Json<ContentFetch>,
) -> Result<Response, PeerError> {
    server.authorize(&conn, &ws)?;
    let bundle = blocking(server.serving.clone(), move || {
        server.read_bundle(&ws, &request)
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bundle).into_response())
}

async fn negotiate(
    State(server): State<Shared>,
    ConnectInfo(conn): ConnectInfo<PeerConn>,
    Path(ws): Path<String>,
    axum::Json(message): axum::Json<Negotiation>,
) -> Result<StatusCode, PeerError> {
    let device = server.authorize(&conn, &ws)?;
    if message.workspace != ws || shoal_protocol::parse_hash(&message.compact).is_err() {
        return Err(PeerError(
            StatusCode::BAD_REQUEST,
            "the message must name this workspace and a 64-hex compact knowledge".into(),
        ));
    }
    message
        .check_changing()
        .map_err(|e| PeerError(StatusCode::BAD_REQUEST, e.to_string()))?;
    AgentCounters::bump(&server.counters.negotiations_received, 1);
    let signal = if message.changing.is_empty() {
        Signal::Peer {
            workspace: ws,
            device,
            compact: message.compact,
        }
    } else {
        Signal::Changing {
            workspace: ws,
            paths: message.changing,
        }
    };
    if let Ok(signals) = server.signals.lock() {
        let _ = signals.send(signal);
    }
    Ok(StatusCode::NO_CONTENT)
}

fn router(server: Shared) -> Router {
    Router::new()
        .route("/v1/workspaces/{ws}/download", post(download))
        .route(
            "/v1/workspaces/{ws}/download/{session}/batches/{index}",
            get(download_batch),
        )
        .route(
            "/v1/workspaces/{ws}/download/{session}/result",
            // A result lists every item of the download: tens of thousands in a large one.
            put(download_result).layer(DefaultBodyLimit::max(RESULT_MAX)),
        )
        .route(
            "/v1/workspaces/{ws}/contents/{content}/{chunk}",
            get(get_content_chunk),
        )
        .route("/v1/workspaces/{ws}/contents/fetch", post(fetch_contents))
        .route("/v1/workspaces/{ws}/negotiate", post(negotiate))
        .with_state(server)
}

/// A TCP stream that counts the bytes crossing it.
struct Counted {
    inner: TcpStream,
    counters: Arc<AgentCounters>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        AgentCounters::bump(&self.counters.peer_bytes_in, read as u64);
        result
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &result {
            AgentCounters::bump(&self.counters.peer_bytes_out, *n as u64);
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

type PeerStream = tokio_rustls::server::TlsStream<Counted>;

/// Connections whose TLS handshake succeeded, handed over by the accept task so a slow
/// handshake never holds up the others.
struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(PeerStream, PeerConn)>,
}

impl Listener for TlsListener {
    type Io = PeerStream;
    type Addr = PeerConn;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(ready) => ready,
            // The accept task is gone: nothing will ever come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(PeerConn { key: None })
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for PeerConn {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// Starts the protocol server on `listen` in its own thread; returns the bound address.
pub(crate) fn start(
    server: PeerServer,
    identity: &DeviceIdentity,
    listen: SocketAddr,
) -> Result<SocketAddr, AgentError> {
    let config = identity.server_config(server.contacts.clone())?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let std_listener = std::net::TcpListener::bind(listen)
        .map_err(|e| AgentError::Config(format!("cannot listen on {listen}: {e}")))?;
    let bound = std_listener
        .local_addr()
        .map_err(|e| AgentError::Config(format!("cannot listen on {listen}: {e}")))?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| AgentError::Config(format!("cannot listen on {listen}: {e}")))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| AgentError::Config(format!("cannot start the peer server: {e}")))?;
    let server = Arc::new(server);
    std::thread::spawn(move || {
        runtime.block_on(async move {
            let tcp = match tokio::net::TcpListener::from_std(std_listener) {
                Ok(tcp) => tcp,
                Err(error) => {
                    tracing::error!(%error, "peer server cannot listen");
                    return;
                }
            };
            let (ready_tx, ready) = tokio::sync::mpsc::channel(64);
            let counters = server.counters.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = tcp.accept().await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let (acceptor, ready_tx, counters) =
                        (acceptor.clone(), ready_tx.clone(), counters.clone());
                    tokio::spawn(async move {
                        let counted = Counted {
                            inner: stream,
                            counters: counters.clone(),
                        };
                        let handshake =
                            tokio::time::timeout(Duration::from_secs(10), acceptor.accept(counted))
                                .await;
                        match handshake {
                            Ok(Ok(tls)) => {
                                let key = crate::tls::peer_key(tls.get_ref().1.peer_certificates());
                                let _ = ready_tx.send((tls, PeerConn { key })).await;
                            }
                            _ => AgentCounters::bump(&counters.peer_refused, 1),
                        }
                    });
                }
            });
            let service = router(server).into_make_service_with_connect_info::<PeerConn>();
            if let Err(error) = axum::serve(TlsListener { ready }, service).await {
                tracing::error!(%error, "peer server stopped");
            }
        });
    });
    Ok(bound)
}
