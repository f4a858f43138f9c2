//! A blocking client of the shoal sync protocol: a device talking to its hub or to a peer,
//! or a hub talking to a partner hub. It speaks the routes of `shoal-protocol` and nothing
//! else: no replica, no disk.

mod bulk;

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::blocking::{Client, RequestBuilder, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use shoal_core::{ContentHash, ReplicaId};
use shoal_protocol::{
    CommitRequest, CommitResponse, CreateWorkspace, DeviceKey, DownloadRequest, DownloadResponse,
    DownloadResult, ErrorBody, Invite, LoginRequest, LoginResponse, Negotiation, PresenceUpdate,
    RecoveryRequest, RecoveryResponse, Refusal, UploadBatch, UploadOffer, UploadPlan, WireBatch,
    WorkspaceInfo, WorkspaceRules, headers, hex16, hex32, routes,
};

/// Where the chunks of a bundle answer go as they arrive (`fetch_chunks_into`,
/// `fetch_content_chunks_into`).
pub trait ChunkSink {
    /// The place for the bytes of chunk `hash` (`len` bytes), or `None` when it was not
    /// asked for (which ends the answer as faulty).
    fn place(&mut self, hash: &ContentHash, len: usize) -> Option<&mut [u8]>;
    /// The bytes just read into the place for `hash` are whole and match it.
    fn arrived(&mut self, hash: &ContentHash);
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server could not be reached (or the connection broke).
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The server refused the credentials.
    #[error("the server refused the credentials: {0}")]
    Unauthorized(String),
    /// The server has no such thing (or the caller may not see it).
    #[error("not found: {0}")]
    NotFound(String),
    /// The server reports a conflict (a taken name).
    #[error("{0}")]
    Conflict(String),
    /// The caller's replica is in an older epoch than the server already saw from it.
    #[error("stale epoch: the server saw epoch {known}")]
    StaleEpoch {
        /// The latest epoch the server saw.
        known: u32,
    },
    /// Any other error status.
    #[error("the server answered {status}: {message}")]
    Server {
        /// HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// The server sent something this client cannot use.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The client could not be set up.
    #[error("client: {0}")]
    Config(String),
}

/// Installs ring as the process's default TLS provider, for clients that build their own TLS
/// settings (an `https://` hub). Harmless when one is already installed.
pub fn install_default_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// How long a connection may take to open, to a hub and to a peer (nearby, or not there).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// How often, and how far apart, a busy server (202) is asked again.
const BUSY_RETRIES: usize = 60;
const BUSY_PAUSE: Duration = Duration::from_millis(200);
/// The credentials' header.
const AUTHORIZATION: &str = "authorization";
/// The content type of chunk bundles.
const OCTETS: &str = "application/octet-stream";

/// Talks to one hub as one device.
#[derive(Clone)]
pub struct HubClient {
    base: String,
    token: Option<String>,
    http: Client,
    identity: Option<(ReplicaId, u32)>,
    device: Option<String>,
    workspace: Option<String>,
    correlation: String,
    /// Chunk bundles go over connections of their own where the base allows.
    bulk: Option<Arc<bulk::Bulk>>,
}

impl HubClient {
    /// A client for the hub at `base` (e.g. `http://127.0.0.1:7700`).
    pub fn new(base: &str, token: Option<&str>) -> Result<HubClient, ClientError> {
        install_default_provider();
        let http = Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        let base = base.trim_end_matches('/').to_owned();
        let bulk = bulk::Bulk::for_base(&base, None, CONNECT_TIMEOUT, REQUEST_TIMEOUT);
        Ok(HubClient {
            base,
            token: token.map(str::to_owned),
            http,
            identity: None,
            device: None,
            workspace: None,
            correlation: hex16(&rand::random()),
            bulk: bulk.map(Arc::new),
        })
    }

    /// A client of a peer's protocol server at `address` ("host:port") over TLS with
    /// `tls` (which decides whom to trust and which certificate to show).
    pub fn for_peer(address: &str, tls: rustls::ClientConfig) -> Result<HubClient, ClientError> {
        let http = Client::builder()
            .use_preconfigured_tls(tls.clone())
            .connect_timeout(PEER_CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| ClientError::Config(e.to_string()))?;
        let base = format!("https://{address}");
        let bulk = bulk::Bulk::for_base(
            &base,
            Some(Arc::new(tls)),
            PEER_CONNECT_TIMEOUT,
            REQUEST_TIMEOUT,
        );
        Ok(HubClient {
            base,
            token: None,
            http,
            identity: None,
            device: None,
            workspace: None,
            correlation: hex16(&rand::random()),
            bulk: bulk.map(Arc::new),
        })
    }

    /// The same client, naming this device on every request.
    pub fn for_device(&self, device: &str) -> HubClient {
        HubClient {
            device: Some(device.to_owned()),
            ..self.clone()
        }
    }

    /// The same client, naming a workspace replica and its epoch on sync requests (one sync
    /// session: a fresh correlation id ties its requests together).
    pub fn for_replica(&self, workspace: &str, replica: ReplicaId, epoch: u32) -> HubClient {
        HubClient {
            identity: Some((replica, epoch)),
            workspace: Some(workspace.to_owned()),
            correlation: hex16(&rand::random()),
            ..self.clone()
        }
    }

    /// The hub's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: reqwest::Method, path: &str) -> RequestBuilder {
        let url = if path.starts_with("http") {
            path.to_owned()
        } else {
            format!("{}{}", self.base, path)
        };
        let mut builder = self.http.request(method, url);
        for (name, value) in self.request_headers() {
            builder = match reqwest::header::HeaderValue::from_str(&value) {
                // Kept out of reqwest's debug output, as `bearer_auth` would.
                Ok(mut value) if name == AUTHORIZATION => {
                    value.set_sensitive(true);
                    builder.header(name, value)
                }
                _ => builder.header(name, value),
            };
        }
        builder
    }

    /// The connections of its own for a request to `path` of this client's base (a full URL
    /// may name another server: reqwest takes those).
    fn bulk_for(&self, path: &str) -> Option<&bulk::Bulk> {
        self.bulk.as_deref().filter(|_| !path.starts_with("http"))
    }

    /// The headers every request carries: protocol, correlation, credentials, identity.
    fn request_headers(&self) -> Vec<(&'static str, String)> {
        let mut pairs = vec![
            (
                headers::PROTOCOL,
                shoal_protocol::PROTOCOL_VERSION.to_string(),
            ),
            (headers::CORRELATION, self.correlation.clone()),
        ];
        if let Some(token) = &self.token {
            pairs.push((AUTHORIZATION, format!("Bearer {token}")));
        }
        if let Some((replica, epoch)) = self.identity {
            pairs.push((headers::REPLICA, replica.to_string()));
            pairs.push((headers::EPOCH, epoch.to_string()));
            if let Some(workspace) = &self.workspace {
                pairs.push((headers::PARTNERSHIP, format!("{replica}@{workspace}")));
            }
        }
        if let Some(device) = &self.device {
            pairs.push((headers::DEVICE, device.clone()));
        }
        pairs
    }

    /// Sends, retrying while the hub answers 202 (busy).
    fn send(&self, build: impl Fn() -> RequestBuilder) -> Result<Response, ClientError> {
        for attempt in 0..BUSY_RETRIES {
            let response = build()
                .send()
                .map_err(|e| ClientError::Unreachable(e.to_string()))?;
            if response.status() == StatusCode::ACCEPTED && attempt + 1 < BUSY_RETRIES {
                std::thread::sleep(BUSY_PAUSE);
                continue;
            }
            return check(response);
        }
        Err(ClientError::Unreachable("the hub stayed busy".into()))
    }

    fn json<T: DeserializeOwned>(
        &self,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<T, ClientError> {
        let response = self.send(build)?;
        response
            .json()
            .map_err(|e| ClientError::Protocol(format!("unreadable answer from the hub: {e}")))
    }

    fn with_body<B: Serialize>(builder: RequestBuilder, body: &B) -> RequestBuilder {
        builder.json(body)
    }

    /// `POST /v1/login`.
    pub fn login(
        &self,
        user: &str,
        password: &str,
        device_name: &str,
        device_key: Option<&str>,
    ) -> Result<LoginResponse, ClientError> {
        let body = LoginRequest {
            user: user.into(),
            password: password.into(),
            device_name: device_name.into(),
            device_key: device_key.map(str::to_owned),
        };
        self.json(|| Self::with_body(self.request(reqwest::Method::POST, routes::LOGIN), &body))
    }

    /// Workspaces the user belongs to or is invited to.
    pub fn workspaces(&self) -> Result<Vec<WorkspaceInfo>, ClientError> {
        self.json(|| self.request(reqwest::Method::GET, routes::WORKSPACES))
    }

    /// Creates a workspace.
    pub fn create_workspace(&self, name: &str) -> Result<WorkspaceInfo, ClientError> {
        let body = CreateWorkspace { name: name.into() };
        self.json(|| {
            Self::with_body(
                self.request(reqwest::Method::POST, routes::WORKSPACES),
                &body,
            )
        })
    }

    /// Invites a user.
    pub fn invite(&self, ws: &str, user: &str, role: &str) -> Result<(), ClientError> {
        let body = Invite {
            user: user.into(),
            role: role.into(),
        };
        self.send(|| {
            Self::with_body(
                self.request(reqwest::Method::POST, &routes::invitations(ws)),
                &body,
            )
        })?;
        Ok(())
    }

    /// Accepts an invitation.
    pub fn join(&self, ws: &str) -> Result<WorkspaceInfo, ClientError> {
        self.json(|| self.request(reqwest::Method::POST, &routes::join(ws)))
    }

    /// Starts a download.
    pub fn download(
        &self,
        ws: &str,
        body: &DownloadRequest,
    ) -> Result<DownloadResponse, ClientError> {
        self.json(|| {
            Self::with_body(
                self.request(reqwest::Method::POST, &routes::download(ws)),
                body,
            )
        })
    }

    /// Fetches a later batch.
    pub fn batch(&self, uri: &str) -> Result<WireBatch, ClientError> {
        self.json(|| self.request(reqwest::Method::GET, uri))
    }

    /// Reports download results.
    pub fn download_result(&self, uri: &str, body: &DownloadResult) -> Result<(), ClientError> {
        self.send(|| Self::with_body(self.request(reqwest::Method::PUT, uri), body))?;
        Ok(())
    }

    /// A recovery compare.
    pub fn recovery(
        &self,
        ws: &str,
        body: &RecoveryRequest,
    ) -> Result<RecoveryResponse, ClientError> {
        self.json(|| {
            Self::with_body(
                self.request(reqwest::Method::POST, &routes::recovery(ws)),
                body,
            )
        })
    }

    /// The hub's knowledge before an upload.
    pub fn upload_offer(&self, ws: &str) -> Result<UploadOffer, ClientError> {
        self.json(|| self.request(reqwest::Method::GET, &routes::upload(ws)))
    }

    /// The server's knowledge before an upload, unless its compact knowledge and refusals'
    /// tag are `compact` and `refusals` (then `None`: both sides know the same, nothing to
    /// exchange).
    pub fn upload_offer_unless(
        &self,
        ws: &str,
        compact: &str,
        refusals: &str,
    ) -> Result<Option<UploadOffer>, ClientError> {
        let response = self.send(|| {
            self.request(reqwest::Method::GET, &routes::upload(ws))
                .header(
                    reqwest::header::IF_NONE_MATCH,
                    format!("\"{compact}.{refusals}\""),
                )
        })?;
        if response.status() == StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        response
            .json()
            .map(Some)
            .map_err(|e| ClientError::Protocol(format!("unreadable answer from the hub: {e}")))
    }

    /// Sends upload batch metadata.
    pub fn upload_batch(
        &self,
        ws: &str,
        batch_id: &str,
        body: &UploadBatch,
    ) -> Result<UploadPlan, ClientError> {
        self.json(|| {
            Self::with_body(
                self.request(reqwest::Method::PUT, &routes::upload_batch(ws, batch_id)),
                body,
            )
        })
    }

    /// Commits an upload batch.
    pub fn commit(&self, uri: &str, body: &CommitRequest) -> Result<CommitResponse, ClientError> {
        self.json(|| Self::with_body(self.request(reqwest::Method::PUT, uri), body))
    }

    /// Puts one chunk.
    pub fn put_chunk(
        &self,
        location: &str,
        hash: &ContentHash,
        bytes: Vec<u8>,
    ) -> Result<(), ClientError> {
        let uri = format!("{location}/{}", hex32(&hash.0));
        self.send(|| {
            self.request(reqwest::Method::PUT, &uri)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(bytes.clone())
        })?;
        Ok(())
    }

    /// Puts many chunks in one request (a bundle made with `shoal_protocol::bundle_chunk`) to
    /// the chunk location `location`.
    pub fn put_chunk_bundle(&self, location: &str, bundle: &[u8]) -> Result<(), ClientError> {
        if let Some(bulk) = self.bulk_for(location) {
            let headers = self.request_headers();
            return bulk.post(location, OCTETS, &headers, bundle, &mut |answer| {
                std::io::copy(answer, &mut std::io::sink())
                    .map(drop)
                    .map_err(|e| ClientError::Unreachable(e.to_string()))
            });
        }
        // Shared, so a retry resends the same bytes without copying them again.
        let bundle = bytes::Bytes::copy_from_slice(bundle);
        self.send(|| {
            self.request(reqwest::Method::POST, location)
                .header(reqwest::header::CONTENT_TYPE, OCTETS)
                .body(bundle.clone())
        })?;
        Ok(())
    }

    /// Gets many chunks in one answer from the chunk location `location`: those held, each
    /// read from the answer straight into the place `sink` gives it, as it arrives, and
    /// checked there against its hash.
    pub fn fetch_chunks_into(
        &self,
        location: &str,
        hashes: &[ContentHash],
        sink: &mut dyn ChunkSink,
    ) -> Result<(), ClientError> {
        self.fetch_bundle_into(location, &chunk_fetch(hashes), sink)
    }

    /// Gets many chunks of contents a peer holds in one answer, from its content location
    /// `location`: per content, the chunks wanted. Those held come back, each checked.
    pub fn fetch_content_bundle(
        &self,
        location: &str,
        wanted: &[(ContentHash, Vec<ContentHash>)],
    ) -> Result<Vec<(ContentHash, bytes::Bytes)>, ClientError> {
        self.fetch_bundle(location, &content_fetch(wanted))
    }

    /// Like `fetch_content_bundle`, but each chunk is read from the answer straight into the
    /// place `sink` gives it, as it arrives.
    pub fn fetch_content_chunks_into(
        &self,
        location: &str,
        wanted: &[(ContentHash, Vec<ContentHash>)],
        sink: &mut dyn ChunkSink,
    ) -> Result<(), ClientError> {
        self.fetch_bundle_into(location, &content_fetch(wanted), sink)
    }

    fn fetch_bundle<B: Serialize>(
        &self,
        location: &str,
        body: &B,
    ) -> Result<Vec<(ContentHash, bytes::Bytes)>, ClientError> {
        let path = format!("{location}/fetch");
        let response =
            self.send(|| Self::with_body(self.request(reqwest::Method::POST, &path), body))?;
        let bytes = response
            .bytes()
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        let chunks = shoal_protocol::unbundle_chunks(&bytes)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        // Each chunk is a view of the one answer, not a copy of it.
        Ok(chunks
            .into_iter()
            .map(|(hash, chunk)| (hash, bytes.slice_ref(chunk)))
            .collect())
    }

    /// Reads a bundle answer into `sink` (see `read_frames`), over a connection of its own
    /// where the base allows (see `bulk`).
    fn fetch_bundle_into<B: Serialize>(
        &self,
        location: &str,
        body: &B,
        sink: &mut dyn ChunkSink,
    ) -> Result<(), ClientError> {
        let path = format!("{location}/fetch");
        if let Some(bulk) = self.bulk_for(&path) {
            let body = serde_json::to_vec(body)
                .map_err(|e| ClientError::Config(format!("a request that is not JSON: {e}")))?;
            let headers = self.request_headers();
            return bulk.post(&path, "application/json", &headers, &body, &mut |answer| {
                read_frames(answer, sink)
            });
        }
        let mut response =
            self.send(|| Self::with_body(self.request(reqwest::Method::POST, &path), body))?;
        read_frames(&mut response, sink)
    }

    /// The chunk list of a content the hub holds or is receiving, checked against its name.
    pub fn content_list(
        &self,
        ws: &str,
        hash: &ContentHash,
    ) -> Result<shoal_core::ChunkedContent, ClientError> {
        let wire: shoal_protocol::WireContent = self.json(|| {
            self.request(
                reqwest::Method::GET,
                &routes::content_list(ws, &hex32(&hash.0)),
            )
        })?;
        let content = shoal_core::ChunkedContent::try_from(&wire)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        if content.hash != *hash || !content.is_consistent() {
            return Err(ClientError::Protocol(format!(
                "the hub's chunk list for {hash} does not name it"
            )));
        }
        Ok(content)
    }

    /// Which of `contents` the hub holds the chunk lists of.
    pub fn contents_known(
        &self,
        ws: &str,
        contents: &[ContentHash],
    ) -> Result<std::collections::HashSet<ContentHash>, ClientError> {
        let body = shoal_protocol::ContentsKnown {
            contents: contents.iter().map(|h| hex32(&h.0)).collect(),
        };
        let answer: shoal_protocol::ContentsKnown = self.json(|| {
            Self::with_body(
                self.request(reqwest::Method::POST, &routes::contents_known(ws)),
                &body,
            )
        })?;
        shoal_protocol::parse_held(&answer.contents)
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Gets one chunk, resuming with a ranged request if the transfer breaks off.
    pub fn get_chunk(
        &self,
        location: &str,
        hash: &ContentHash,
        len: usize,
    ) -> Result<Vec<u8>, ClientError> {
        let uri = format!("{location}/{}", hex32(&hash.0));
        let mut bytes = Vec::with_capacity(len);
        let mut last_error = String::new();
        for _ in 0..4 {
            let mut builder = self.request(reqwest::Method::GET, &uri);
            if !bytes.is_empty() {
                builder = builder.header(reqwest::header::RANGE, format!("bytes={}-", bytes.len()));
            }
            let response = match builder
                .send()
                .map_err(|e| ClientError::Unreachable(e.to_string()))
                .and_then(check)
            {
                Ok(response) => response,
                // The server does not hold it (or will not give it): asking again won't help.
                Err(error @ (ClientError::NotFound(_) | ClientError::Unauthorized(_))) => {
                    return Err(error);
                }
                Err(error @ ClientError::Server { status, .. }) if status < 500 => {
                    return Err(error);
                }
                Err(error) => {
                    last_error = error.to_string();
                    continue;
                }
            };
            if response.status() == StatusCode::ACCEPTED {
                // Busy: not chunk bytes. Wait and ask again.
                std::thread::sleep(BUSY_PAUSE);
                continue;
            }
            if !bytes.is_empty() && response.status() != StatusCode::PARTIAL_CONTENT {
                bytes.clear();
            }
            let mut reader = response;
            let mut buffer = [0u8; 64 * 1024];
            loop {
                match reader.read(&mut buffer) {
                    Ok(0) => break,
                    Ok(n) => bytes.extend_from_slice(&buffer[..n]),
                    Err(error) => {
                        last_error = error.to_string();
                        break;
                    }
                }
            }
            if bytes.len() >= len {
                return Ok(bytes);
            }
        }
        Err(ClientError::Unreachable(format!(
            "chunk {hash}: {last_error}"
        )))
    }

    /// A workspace's validation rules.
    pub fn rules(&self, ws: &str) -> Result<WorkspaceRules, ClientError> {
        self.json(|| self.request(reqwest::Method::GET, &routes::rules(ws)))
    }

    /// Replaces a workspace's validation rules (owners only).
    pub fn set_rules(&self, ws: &str, rules: &WorkspaceRules) -> Result<(), ClientError> {
        self.send(|| {
            Self::with_body(
                self.request(reqwest::Method::PUT, &routes::rules(ws)),
                rules,
            )
        })?;
        Ok(())
    }

    /// The refused versions of a workspace, with the reasons.
    pub fn refusals(&self, ws: &str) -> Result<Vec<Refusal>, ClientError> {
        self.json(|| self.request(reqwest::Method::GET, &routes::refusals(ws)))
    }

    /// Lifts the refusal of a version (owners only); `version` is `REPLICA:EPOCH:TICK`.
    pub fn lift_refusal(&self, ws: &str, version: &str) -> Result<(), ClientError> {
        let path = format!("{}/{version}", routes::refusals(ws));
        self.send(|| self.request(reqwest::Method::DELETE, &path))?;
        Ok(())
    }

    /// Registers this device's key fingerprint with the hub.
    pub fn set_device_key(&self, key: &str) -> Result<(), ClientError> {
        let body = DeviceKey {
            key: key.to_owned(),
        };
        self.send(|| {
            Self::with_body(
                self.request(reqwest::Method::PUT, routes::DEVICE_KEY),
                &body,
            )
        })?;
        Ok(())
    }

    /// Publishes this device's presence document.
    pub fn update_presence(&self, body: &PresenceUpdate) -> Result<(), ClientError> {
        self.send(|| Self::with_body(self.request(reqwest::Method::PUT, routes::PRESENCE), body))?;
        Ok(())
    }

    /// Sends a negotiation message: to a peer (`POST …/{ws}/negotiate`) when this client talks
    /// to a peer, or for the hub to relay to `body.to` otherwise.
    pub fn negotiate(&self, body: &Negotiation, relay: bool) -> Result<(), ClientError> {
        let path = if relay {
            routes::NEGOTIATE.to_owned()
        } else {
            routes::peer_negotiate(&body.workspace)
        };
        self.send(|| Self::with_body(self.request(reqwest::Method::POST, &path), body))?;
        Ok(())
    }

    /// Opens the presence stream (read it line by line).
    pub fn presence(&self) -> Result<Response, ClientError> {
        self.stream(routes::PRESENCE)
    }

    /// Opens the change-event stream of a workspace (read it line by line).
    pub fn events(&self, ws: &str) -> Result<Response, ClientError> {
        self.stream(&routes::events(ws))
    }

    fn stream(&self, path: &str) -> Result<Response, ClientError> {
        install_default_provider();
        let client = Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        let mut builder = client.get(format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            builder = builder.bearer_auth(token);
        }
        check(
            builder
                .send()
                .map_err(|e| ClientError::Unreachable(e.to_string()))?,
        )
    }
}

/// The body of a chunk location's fetch.
fn chunk_fetch(hashes: &[ContentHash]) -> shoal_protocol::ChunkFetch {
    shoal_protocol::ChunkFetch {
        chunks: hashes.iter().map(|h| hex32(&h.0)).collect(),
    }
}

/// The body of a peer's content fetch.
fn content_fetch(wanted: &[(ContentHash, Vec<ContentHash>)]) -> shoal_protocol::ContentFetch {
    shoal_protocol::ContentFetch {
        contents: wanted
            .iter()
            .map(|(content, chunks)| shoal_protocol::ContentChunks {
                content: hex32(&content.0),
                chunks: chunks.iter().map(|h| hex32(&h.0)).collect(),
            })
            .collect(),
    }
}

/// Reads a bundle answer frame by frame: each chunk's bytes go once, from the connection's
/// buffer to where `sink` places them, and are checked there. A fault ends the answer; the
/// chunks that arrived before it stay arrived.
fn read_frames(response: &mut dyn Read, sink: &mut dyn ChunkSink) -> Result<(), ClientError> {
    let broken = |e: std::io::Error| ClientError::Unreachable(e.to_string());
    let invalid = |e: shoal_protocol::WireError| ClientError::Protocol(e.to_string());
    let mut header = [0u8; shoal_protocol::FRAME_HEADER];
    loop {
        let got = read_up_to(response, &mut header).map_err(broken)?;
        if got == 0 {
            return Ok(());
        }
        let (hash, len) = shoal_protocol::frame_header(&header[..got]).map_err(invalid)?;
        let Some(place) = sink.place(&hash, len).filter(|p| p.len() == len) else {
            return Err(ClientError::Protocol(format!(
                "the answer holds chunk {hash} ({len} bytes), which was not asked for"
            )));
        };
        response.read_exact(place).map_err(broken)?;
        if ContentHash::of(place) != hash {
            return Err(ClientError::Protocol(format!(
                "chunk {hash} does not match its bytes"
            )));
        }
        sink.arrived(&hash);
    }
}

/// Fills `buffer` from `reader` unless it ends first; how many bytes were read.
fn read_up_to(reader: &mut (impl Read + ?Sized), buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buffer.len() {
        match reader.read(&mut buffer[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn check(response: Response) -> Result<Response, ClientError> {
    let status = response.status();
    if status.is_success() || status == StatusCode::NOT_MODIFIED {
        return Ok(response);
    }
    let known_epoch = response
        .headers()
        .get(headers::EPOCH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok());
    let body = response.bytes().unwrap_or_default();
    Err(error_for(status.as_u16(), known_epoch, &body))
}

/// The error an answer with a failing `status` stands for, its message from its JSON body
/// (`ErrorBody`) where it has one.
pub(crate) fn error_for(status: u16, known_epoch: Option<u32>, body: &[u8]) -> ClientError {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let (StatusCode::CONFLICT, Some(known)) = (status, known_epoch) {
        return ClientError::StaleEpoch { known };
    }
    let message = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(body) => body.error,
        Err(_) => status.canonical_reason().unwrap_or("error").to_owned(),
    };
    match status {
        StatusCode::UNAUTHORIZED => ClientError::Unauthorized(message),
        StatusCode::NOT_FOUND => ClientError::NotFound(message),
        StatusCode::CONFLICT => ClientError::Conflict(message),
        _ => ClientError::Server {
            status: status.as_u16(),
            message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::Write;
    use std::net::TcpListener;

    /// Places every chunk it is told of in a buffer of its own.
    #[derive(Default)]
    struct Places {
        expected: HashMap<ContentHash, Vec<u8>>,
        arrived: Vec<ContentHash>,
    }

    impl ChunkSink for Places {
        fn place(&mut self, hash: &ContentHash, len: usize) -> Option<&mut [u8]> {
            let place = self.expected.get_mut(hash)?;
            place.resize(len, 0);
            Some(place)
        }

        fn arrived(&mut self, hash: &ContentHash) {
            self.arrived.push(*hash);
        }
    }

    /// Serves `status` answers with `body` on 127.0.0.1, each connection answering at most
    /// `per_connection` requests and then closing without saying so; the address, and how
    /// many connections were opened.
    fn serve(
        status: &'static str,
        body: Vec<u8>,
        per_connection: usize,
    ) -> std::io::Result<(String, Arc<std::sync::atomic::AtomicUsize>)> {
        use std::io::BufRead;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let address = listener.local_addr()?;
        let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = opened.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut reader = std::io::BufReader::new(stream);
                for _ in 0..per_connection {
                    let mut length = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        match reader.read_line(&mut line) {
                            Ok(0) | Err(_) => break,
                            Ok(_) if line == "\r\n" => break,
                            Ok(_) => {}
                        }
                        if let Some(value) =
                            line.to_ascii_lowercase().strip_prefix("content-length:")
                        {
                            length = value.trim().parse().unwrap_or(0);
                        }
                    }
                    if line != "\r\n" {
                        break;
                    }
                    let mut request = vec![0u8; length];
                    if reader.read_exact(&mut request).is_err() {
                        break;
                    }
                    let head = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n",
                        body.len()
                    );
                    let stream = reader.get_mut();
                    if stream.write_all(head.as_bytes()).is_err()
                        || stream.write_all(&body).is_err()
                    {
                        break;
                    }
                }
            }
        });
        Ok((format!("http://{address}"), opened))
    }

    fn fetch(body: Vec<u8>, sink: &mut Places) -> Result<(), ClientError> {
        let (base, _) = serve("200 OK", body, 1).map_err(|e| ClientError::Config(e.to_string()))?;
        let client = HubClient::new(&base, None)?;
        let hashes: Vec<ContentHash> = sink.expected.keys().copied().collect();
        client.fetch_chunks_into("/v1/workspaces/w/chunks", &hashes, sink)
    }

    #[test]
    fn chunks_land_in_their_places_and_a_fault_keeps_only_what_came_before()
    -> Result<(), ClientError> {
        let (first, second) = (vec![1u8; 70_000], vec![2u8; 5]);
        let (a, b) = (ContentHash::of(&first), ContentHash::of(&second));
        let wanted = || Places {
            expected: [(a, Vec::new()), (b, Vec::new())].into(),
            arrived: Vec::new(),
        };
        let mut bundle = Vec::new();
        shoal_protocol::bundle_chunk(&mut bundle, &a, &first);
        shoal_protocol::bundle_chunk(&mut bundle, &b, &second);

        let mut whole = wanted();
        fetch(bundle.clone(), &mut whole)?;
        assert_eq!(whole.arrived, vec![a, b]);
        assert_eq!(whole.expected[&a], first);
        assert_eq!(whole.expected[&b], second);

        // The second chunk's bytes changed on the way: refused, the first kept.
        let mut tampered = bundle.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        let mut some = wanted();
        let fault = fetch(tampered, &mut some);
        assert!(matches!(fault, Err(ClientError::Protocol(_))), "{fault:?}");
        assert_eq!(some.arrived, vec![a]);

        // Cut inside the second chunk, or inside its header.
        for cut in [bundle.len() - 2, 36 + first.len() + 10] {
            let mut some = wanted();
            assert!(fetch(bundle[..cut].to_vec(), &mut some).is_err());
            assert_eq!(some.arrived, vec![a]);
        }

        // A chunk that was not asked for ends the answer.
        let mut only_b = Places {
            expected: [(b, Vec::new())].into(),
            arrived: Vec::new(),
        };
        let fault = fetch(bundle, &mut only_b);
        assert!(matches!(fault, Err(ClientError::Protocol(_))), "{fault:?}");
        assert!(only_b.arrived.is_empty());
        Ok(())
    }

    #[test]
    fn bundles_share_a_kept_connection_and_one_closed_meanwhile_is_replaced()
    -> Result<(), Box<dyn std::error::Error>> {
        let chunk = vec![7u8; 20_000];
        let hash = ContentHash::of(&chunk);
        let mut bundle = Vec::new();
        shoal_protocol::bundle_chunk(&mut bundle, &hash, &chunk);
        for (per_connection, connections) in [(usize::MAX, 1), (1, 3)] {
            let (base, opened) = serve("200 OK", bundle.clone(), per_connection)?;
            let client = HubClient::new(&base, Some("token"))?;
            for _ in 0..3 {
                let mut sink = Places {
                    expected: [(hash, Vec::new())].into(),
                    arrived: Vec::new(),
                };
                client.fetch_chunks_into("/v1/workspaces/w/chunks", &[hash], &mut sink)?;
                assert_eq!(sink.arrived, vec![hash]);
                assert_eq!(sink.expected[&hash], chunk);
            }
            assert_eq!(
                opened.load(std::sync::atomic::Ordering::SeqCst),
                connections,
                "{per_connection} answer(s) per connection"
            );
        }
        Ok(())
    }

    #[test]
    fn a_refused_bundle_fetch_says_why() -> Result<(), Box<dyn std::error::Error>> {
        let body = br#"{"error":"no such workspace","request":"r1"}"#.to_vec();
        let (base, _) = serve("404 Not Found", body, usize::MAX)?;
        let client = HubClient::new(&base, None)?;
        let hash = ContentHash::of(b"x");
        let mut sink = Places::default();
        let fault = client.fetch_chunks_into("/v1/workspaces/w/chunks", &[hash], &mut sink);
        assert!(
            matches!(&fault, Err(ClientError::NotFound(m)) if m == "no such workspace"),
            "{fault:?}"
        );
        Ok(())
    }
}
