//! The HTTP API: routes, authentication, error mapping and the change-event stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures_util::StreamExt;
use shoal_core::{ContentHash, Knowledge, ReplicaId};
use shoal_protocol::{
    ChangeEvent, CommitRequest, CreateWorkspace, DeviceKey, DownloadRequest, DownloadResult,
    ErrorBody, Invite, LoginRequest, LoginResponse, Negotiation, PresenceUpdate, RecoveryRequest,
    Relayed, UploadBatch, WireContent, WorkspaceInfo, headers, hex16, parse_hash, parse_replica,
    routes,
};
use tokio::sync::broadcast;

use crate::accounts::{Accounts, Device, Membership, Role};
use crate::metrics::{CountingListener, Metrics, bump};
use crate::presence::{self, Presence};
use crate::replica::WorkspaceReplica;
use crate::{HubConfig, HubError};

pub(crate) struct Workspace {
    replica: Mutex<WorkspaceReplica>,
    pub(crate) events: broadcast::Sender<ChangeEvent>,
}

pub(crate) struct Hub {
    data: std::path::PathBuf,
    accounts: Mutex<Accounts>,
    workspaces: Mutex<HashMap<[u8; 16], Arc<Workspace>>>,
    presence: Presence,
    metrics: Arc<Metrics>,
}

type Shared = Arc<Hub>;

#[derive(Clone)]
struct RequestId(String);

/// An error with the request it belongs to.
struct ApiError {
    error: HubError,
    request: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self.error {
            HubError::BadRequest(_) => StatusCode::BAD_REQUEST,
            HubError::Unauthorized => StatusCode::UNAUTHORIZED,
            HubError::Forbidden(_) => StatusCode::FORBIDDEN,
            HubError::NotFound => StatusCode::NOT_FOUND,
            HubError::Conflict(_) | HubError::StaleEpoch { .. } => StatusCode::CONFLICT,
            HubError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            HubError::Busy => StatusCode::ACCEPTED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(request = %self.request, error = %self.error, "request failed");
        }
        let known_epoch = match &self.error {
            HubError::StaleEpoch { known, .. } => Some(*known),
            _ => None,
        };
        let body = ErrorBody {
            error: self.error.to_string(),
            request: self.request,
        };
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::ACCEPTED {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let Some(known) = known_epoch {
            // The caller restarts in a later epoch than any it used before.
            if let Ok(value) = HeaderValue::from_str(&known.to_string()) {
                response.headers_mut().insert(headers::EPOCH, value);
            }
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

fn request_id(parts: &Parts) -> String {
    parts
        .extensions
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default()
}

async fn blocking<T: Send + 'static>(
    request: &str,
    work: impl FnOnce() -> Result<T, HubError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(|error| ApiError {
            error,
            request: request.to_owned(),
        }),
        Err(join) => Err(ApiError {
            error: HubError::Internal(join.to_string()),
            request: request.to_owned(),
        }),
    }
}

/// An authenticated caller, with its sync identity when it sent one.
struct Caller {
    device: Device,
    request: String,
    replica: Option<(ReplicaId, u32)>,
}

impl Caller {
    fn fail(&self, error: HubError) -> ApiError {
        ApiError {
            error,
            request: self.request.clone(),
        }
    }

    fn replica(&self) -> Result<(ReplicaId, u32), ApiError> {
        self.replica.ok_or_else(|| {
            self.fail(HubError::BadRequest(format!(
                "sync requests must name the caller's replica and epoch ({} and {} headers)",
                headers::REPLICA,
                headers::EPOCH
            )))
        })
    }
}

impl FromRequestParts<Shared> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, hub: &Shared) -> Result<Self, ApiError> {
        let request = request_id(parts);
        let fail = |error| ApiError {
            error,
            request: request.clone(),
        };
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned)
            .ok_or_else(|| fail(HubError::Unauthorized))?;
        let replica = match (
            parts.headers.get(headers::REPLICA),
            parts.headers.get(headers::EPOCH),
        ) {
            (Some(replica), Some(epoch)) => {
                let replica = replica.to_str().ok().and_then(|r| parse_replica(r).ok());
                let epoch = epoch.to_str().ok().and_then(|e| e.parse::<u32>().ok());
                match (replica, epoch) {
                    (Some(replica), Some(epoch)) => Some((replica, epoch)),
                    _ => {
                        return Err(fail(HubError::BadRequest(
                            "malformed replica or epoch header".into(),
                        )));
                    }
                }
            }
            _ => None,
        };
        let hub = hub.clone();
        let device = blocking(&request, move || lock(&hub.accounts)?.authenticate(&token)).await?;
        Ok(Caller {
            device,
            request,
            replica,
        })
    }
}

/// A JSON body whose rejections become protocol errors (400, or 413 when over the limit).
struct JsonBody<T>(T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;
    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let id = request
            .extensions()
            .get::<RequestId>()
            .map(|r| r.0.clone())
            .unwrap_or_default();
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(JsonBody(value)),
            Err(rejection) => {
                let error = if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    HubError::TooLarge("the request body is over the limit".into())
                } else {
                    match rejection {
                        JsonRejection::JsonDataError(e) => {
                            HubError::BadRequest(format!("invalid request: {}", e.body_text()))
                        }
                        JsonRejection::JsonSyntaxError(e) => {
                            HubError::BadRequest(format!("malformed JSON: {}", e.body_text()))
                        }
                        JsonRejection::MissingJsonContentType(_) => {
                            HubError::BadRequest("send the body as application/json".into())
                        }
                        other => HubError::BadRequest(other.body_text()),
                    }
                };
                Err(ApiError { error, request: id })
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, HubError> {
    mutex
        .lock()
        .map_err(|_| HubError::Internal("a previous request panicked while holding a lock".into()))
}

fn info(membership: &Membership) -> WorkspaceInfo {
    WorkspaceInfo {
        id: hex16(&membership.workspace),
        name: membership.name.clone(),
        role: membership.role.as_str().into(),
        joined: membership.joined,
        owner: membership.owner.clone(),
    }
}

impl Hub {
    pub(crate) fn workspace(&self, id: [u8; 16]) -> Result<Arc<Workspace>, HubError> {
        let mut open = lock(&self.workspaces)?;
        if let Some(workspace) = open.get(&id) {
            return Ok(workspace.clone());
        }
        let hex = hex16(&id);
        let replica = WorkspaceReplica::open(&self.data.join("workspaces").join(&hex), &hex)?;
        let (events, _) = broadcast::channel(64);
        let workspace = Arc::new(Workspace {
            replica: Mutex::new(replica),
            events,
        });
        open.insert(id, workspace.clone());
        Ok(workspace)
    }

    /// The workspace and the caller's role, for joined members only; anyone else gets 404, the
    /// same as for a workspace that does not exist.
    fn member(&self, device: &Device, ws: &str) -> Result<(Arc<Workspace>, Role), HubError> {
        let id: [u8; 16] = shoal_protocol::parse_item(ws)
            .map_err(|_| HubError::NotFound)?
            .0;
        let membership = lock(&self.accounts)?.membership(&id, device.user)?;
        match membership {
            Some(m) if m.joined => Ok((self.workspace(id)?, m.role)),
            _ => Err(HubError::NotFound),
        }
    }

    /// Tells everyone listening that a workspace replica changed: its change-event stream
    /// (devices, partner hubs) and the members' presence streams.
    pub(crate) fn announce_change(&self, workspace: &Workspace, ws: &str, tag: &str) {
        // Nobody listening is fine: the change is stored for whoever comes next.
        let _ = workspace.events.send(ChangeEvent {
            workspace: ws.to_owned(),
            tag: tag.to_owned(),
        });
        self.tell_hub_changed(ws, tag);
    }

    /// Sends the hub replica's new tag to the members' presence streams. The commit is done
    /// whatever happens here, so a failure is only logged.
    fn tell_hub_changed(&self, ws: &str, tag: &str) {
        let told = shoal_protocol::parse_item(ws)
            .map_err(HubError::from)
            .and_then(|id| {
                let accounts = lock(&self.accounts)?;
                self.presence.hub_changed(&accounts, id.0, tag)
            });
        if let Err(error) = told {
            tracing::warn!(workspace = ws, %error, "telling presence streams of a change");
        }
    }

    /// The hub replica's tag of every workspace the user has joined.
    fn tags(&self, user: i64) -> Result<Vec<([u8; 16], String)>, HubError> {
        let joined = lock(&self.accounts)?.joined_workspaces(user)?;
        let mut tags = Vec::with_capacity(joined.len());
        for id in joined {
            let workspace = self.workspace(id)?;
            tags.push((id, with_replica(&workspace, |r| r.tag())?));
        }
        tags.sort();
        Ok(tags)
    }
}

/// Locks a workspace replica, waiting a little; a long wait answers 202 so the caller retries.
pub(crate) fn with_replica<T>(
    workspace: &Workspace,
    work: impl FnOnce(&mut WorkspaceReplica) -> Result<T, HubError>,
) -> Result<T, HubError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match workspace.replica.try_lock() {
            Ok(mut replica) => return work(&mut replica),
            Err(std::sync::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(std::sync::TryLockError::WouldBlock) => return Err(HubError::Busy),
            Err(std::sync::TryLockError::Poisoned(_)) => {
                return Err(HubError::Internal(
                    "a previous request panicked on this workspace".into(),
                ));
            }
        }
    }
}

/// Runs the hub until the process is stopped.
pub async fn serve(config: HubConfig) -> Result<(), HubError> {
    let accounts = Accounts::open(&config.data)?;
    let metrics = Arc::new(Metrics::default());
    let hub = Arc::new(Hub {
        data: config.data.clone(),
        accounts: Mutex::new(accounts),
        workspaces: Mutex::new(HashMap::new()),
        presence: Presence::default(),
        metrics: metrics.clone(),
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| HubError::Io(config.data.clone(), e))?;
    let address = listener
        .local_addr()
        .map_err(|e| HubError::Io(config.data.clone(), e))?;
    tracing::info!(%address, data = %config.data.display(), "hub listening");
    let partners = lock(&hub.accounts)?.partners()?;
    for partner in partners {
        tracing::info!(partner = %partner.url, workspace = %hex16(&partner.workspace), "partnership");
        let hub = hub.clone();
        std::thread::spawn(move || crate::partner::run(hub, partner));
    }
    // A line tests and scripts can wait for.
    println!("shoal hub listening on http://{address}");
    axum::serve(CountingListener::new(listener, metrics), router(hub))
        .await
        .map_err(|e| HubError::Io(config.data, e))
}

fn router(hub: Shared) -> Router {
    let chunk_limit = shoal_store::CHUNK_MAX + 4096;
    Router::new()
        .route("/v1/login", post(login))
        .route(routes::DEVICE_KEY, put(set_device_key))
        .route(routes::PRESENCE, get(presence_stream).put(put_presence))
        .route(routes::NEGOTIATE, post(negotiate))
        .route(routes::METRICS, get(metrics))
        .route(
            "/v1/workspaces",
            get(list_workspaces).post(create_workspace),
        )
        .route("/v1/workspaces/{ws}/invitations", post(invite))
        .route("/v1/workspaces/{ws}/join", post(join))
        .route("/v1/workspaces/{ws}/rules", get(get_rules).put(put_rules))
        .route("/v1/workspaces/{ws}/refusals", get(list_refusals))
        .route(
            "/v1/workspaces/{ws}/refusals/{version}",
            axum::routing::delete(lift_refusal),
        )
        .route("/v1/workspaces/{ws}/download", post(download))
        .route(
            "/v1/workspaces/{ws}/download/{session}/batches/{index}",
            get(download_batch),
        )
        .route(
            "/v1/workspaces/{ws}/download/{session}/result",
            put(download_result),
        )
        .route("/v1/workspaces/{ws}/recovery", post(recovery))
        .route("/v1/workspaces/{ws}/upload", get(upload_offer))
        .route(
            "/v1/workspaces/{ws}/upload/batches/{batch}",
            put(upload_batch),
        )
        .route(
            "/v1/workspaces/{ws}/upload/batches/{batch}/commit",
            put(commit),
        )
        .route("/v1/workspaces/{ws}/chunks", post(put_chunk_bundle))
        .route("/v1/workspaces/{ws}/chunks/fetch", post(fetch_chunk_bundle))
        .route("/v1/workspaces/{ws}/contents/known", post(contents_known))
        .route("/v1/workspaces/{ws}/contents/{hash}", get(get_content_list))
        .route(
            "/v1/workspaces/{ws}/chunks/{hash}",
            get(get_chunk)
                .head(head_chunk)
                .put(put_chunk)
                .layer(DefaultBodyLimit::max(chunk_limit)),
        )
        .route("/v1/workspaces/{ws}/events", get(events))
        .layer(DefaultBodyLimit::max(32 << 20))
        .layer(middleware::from_fn_with_state(hub.clone(), add_request_id))
        .with_state(hub)
}

async fn add_request_id(State(hub): State<Shared>, mut request: Request, next: Next) -> Response {
    bump(&hub.metrics.requests);
    let id = hex16(&rand::random());
    request.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(headers::REQUEST_ID, value);
    }
    response
}

async fn login(
    State(hub): State<Shared>,
    axum::Extension(RequestId(request)): axum::Extension<RequestId>,
    JsonBody(body): JsonBody<LoginRequest>,
) -> Result<Json<LoginResponse>, ApiError> {
    let user = body.user.clone();
    let (device, token) = blocking(&request, move || {
        lock(&hub.accounts)?.login(
            &body.user,
            &body.password,
            &body.device_name,
            body.device_key.as_deref(),
        )
    })
    .await?;
    Ok(Json(LoginResponse {
        token,
        device: hex16(&device),
        user,
    }))
}

async fn list_workspaces(
    State(hub): State<Shared>,
    caller: Caller,
) -> Result<Json<Vec<WorkspaceInfo>>, ApiError> {
    let user = caller.device.user;
    let list = blocking(&caller.request, move || {
        lock(&hub.accounts)?.memberships(user)
    })
    .await?;
    Ok(Json(list.iter().map(info).collect()))
}

async fn create_workspace(
    State(hub): State<Shared>,
    caller: Caller,
    JsonBody(body): JsonBody<CreateWorkspace>,
) -> Result<(StatusCode, Json<WorkspaceInfo>), ApiError> {
    let user = caller.device.user;
    let created = blocking(&caller.request, move || {
        let membership = lock(&hub.accounts)?.create_workspace(user, &body.name)?;
        hub.workspace(membership.workspace)?;
        Ok(membership)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(info(&created))))
}

async fn invite(
    State(hub): State<Shared>,
    caller: Caller,
    Path(ws): Path<String>,
    JsonBody(body): JsonBody<Invite>,
) -> Result<StatusCode, ApiError> {
    let role = Role::parse(&body.role).ok_or_else(|| {
        caller.fail(HubError::BadRequest(format!(
            "unknown role {:?}: owner, editor or reader",
            body.role
        )))
    })?;
    let user = caller.device.user;
    blocking(&caller.request, move || {
        let id = shoal_protocol::parse_item(&ws)
            .map_err(|_| HubError::NotFound)?
            .0;
        lock(&hub.accounts)?.invite(&id, user, &body.user, role)
    })
    .await?;
    Ok(StatusCode::CREATED)
}

async fn join(
    State(hub): State<Shared>,
    caller: Caller,
    Path(ws): Path<String>,
) -> Result<Json<WorkspaceInfo>, ApiError> {
    let user = caller.device.user;
    let joined = blocking(&caller.request, move || {
        let id = shoal_protocol::parse_item(&ws)
            .map_err(|_| HubError::NotFound)?
            .0;
        lock(&hub.accounts)?.join(&id, user)
    })
    .await?;
    Ok(Json(info(&joined)))
}

async fn download(
    State(hub): State<Shared>,
    caller: Caller,
    Path(ws): Path<String>,
    JsonBody(body): JsonBody<DownloadRequest>,
) -> Result<Json<shoal_protocol::DownloadResponse>, ApiError> {
    let (replica, epoch) = caller.replica()?;
    let metrics = hub.metrics.clone();
    let device = caller.device.clone();
    let response = blocking(&caller.request, move || {
        let (workspace, _) = hub.member(&device, &ws)?;
        let knowledge = Knowledge::try_from(&body.knowledge)?;
        let held = shoal_protocol::parse_held(&body.held)?;
        with_replica(&workspace, |r| {
            r.check_epoch(&replica, epoch)?;
            r.download(&knowledge, &held, body.limits)
        })
    })
    .await?;
    bump(&metrics.download_sessions);
    Ok(Json(response))
}

async fn download_batch(
    State(hub): State<Shared>,
    caller: Caller,
    Path((ws, session, index)): Path<(String, String, usize)>,
) -> Result<Json<shoal_protocol::WireBatch>, ApiError> {
    let device = caller.device.clone();
    let batch = blocking(&caller.request, move || {
        let (workspace, _) = hub.member(&device, &ws)?;
        with_replica(&workspace, |r| r.download_batch(&session, index))
    })
    .await?;
    Ok(Json(batch))
}

async fn download_result(
    State(hub): State<Shared>,
    caller: Caller,
    Path((ws, session)): Path<(String, String)>,
    JsonBody(body): JsonBody<DownloadResult>,
) -> Result<StatusCode, ApiError> {
    let (replica, epoch) = caller.replica()?;
    let device = caller.device.clone();
    blocking(&caller.request, move || {
        let (workspace, _) = hub.member(&device, &ws)?;
        let knowledge = Knowledge::try_from(&body.knowledge)?;
        with_replica(&workspace, |r| {
            r.download_result(&session, replica, epoch, &knowledge)
        })
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn recovery(
    State(hub): State<Shared>,
    caller: Caller,
    Path(ws): Path<String>,
    JsonBody(body): JsonBody<RecoveryRequest>,
) -> Result<Json<shoal_protocol::RecoveryResponse>, ApiError> {
    let (replica, epoch) = caller.replica()?;
    let device = caller.device.clone();
    let response = blocking(&caller.request, move || {
        let (workspace, _) = hub.member(&device, &ws)?;
        with_replica(&workspace, |r| {
            r.check_epoch(&replica, epoch)?;
            r.recovery(&body.candidates)
        })
    })
    .await?;
    Ok(Json(response))
}

async fn upload_offer(
    State(hub): State<Shared>,
    caller: Caller,
    Path(ws): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (replica, epoch) = caller.replica()?;
    let device = caller.device.clone();
    let offer = blocking(&caller.request, move || {
        let (workspace, _) = hub.member(&device, &ws)?;
        let id = shoal_protocol::parse_item(&ws)?.0;
        lock(&hub.accounts)?.register_replica(&id, &replica, &device.id)?;
        with_replica(&workspace, |r| {
            r.check_epoch(&replica, epoch)?;
            r.upload_offer()
        })
    })
    .await?;
    // The tag is the compact knowledge (and the refusals' tag): a caller holding the same has
    // nothing to exchange, and learns it in a few hundred bytes whatever the workspace's size.
    let etag = format!("\"{}.{}\"", offer.tag, offer.refusals);
    let unchanged = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    if unchanged {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    Ok(([(header::ETAG, etag)], Json(offer)).into_response())
}

async fn list_refusals(
    State(hub): State<Shared>,
    caller: Caller,
    Path(ws): Path<String>,
) -> Result<Json<Vec<shoal_protocol::Refusal>>, ApiError> {
    let device = caller.device.clone();
    let refusals = blocking(&caller.request, move || {
        let (workspace, _) = hub.member(&device, &ws)?;
        with_replica(&workspace, |r| r.refusals())
    })
    .await?;
    Ok(Json(refusals))
}

async fn lift_refusal(
    State(hub): State<Shared>,
    caller: Caller,
    Path((ws, version)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let dot = shoal_protocol::parse_dot_path(&version).map_err(|e| caller.fail(e.into()))?;
    let device = caller.device.clone();
    let lifted = blocking(&caller.request, move || {
        let (workspace, role) = hub.member(&device, &ws)?;
        if role != Role::Owner {
            return Err(HubError::Forbidden(
                "only an owner can lift a refusal".into(),
            ));
        }
        // Devices learn of it through the refusals' tag in their next round's offer.
        with_replica(&workspace, |r| r.lift(&dot))
    })
    .await?;
    if lifted {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(caller.fail(HubError::NotFound))
    }
}

async fn upload_batch(
    State(hub): State<Shared>,
    caller: Caller,
    Path((ws, batch)): Path<(String, String)>,
    JsonBody(body): JsonBody<UploadBatch>,
) -> Result<Json<shoal_protocol::UploadPlan>, ApiError> {
    let (replica, epoch) = caller.replica()?;
    let metrics = hub.metrics.clone();
    let device = caller.device.clone();
    let plan = blocking(&caller.request, move || {
        let (workspace, role) = hub.member(&device, &ws)?;
        let id = shoal_protocol::parse_item(&ws)?.0;
        let (rules, authors) = {
            let accounts = lock(&hub.accounts)?;
            (accounts.rules(&id)?, accounts.author_roles(&id)?)
        };
        let (plan, arriving) = with_replica(&workspace, |r| {
            r.check_epoch(&replica, epoch)?;
            let plan = r.upload_batch(&batch, &body, role)?;
            Ok((plan, r.arriving(&batch, &rules, &authors)))
        })?;
        if !arriving.is_empty() {
            // The plan stands whatever happens here: the others then fetch after the commit.
            let told = lock(&hub.accounts).and_then(|accounts| {
                hub.presence
                    .contents_arriving(&accounts, device.id, id, &arriving)
            });
            if let Err(error) = told {
                tracing::warn!(workspace = ws, %error, "telling devices of arriving contents");
            }
        }
        Ok(plan)
    })
    .await?;
    bump(&metrics.upload_batches);
    Ok(Json(plan))
}

async fn get_rules(
    State(hub): State<Shared>,
    caller: Caller,
    Path(ws): Path<String>,
) -> Result<Json<shoal_protocol::WorkspaceRules>, ApiError> {
    let device = caller.device.clone();
    let rules = blocking(&caller.request, move || {
        hub.member(&device, &ws)?;
        let id = shoal_protocol::parse_item(&ws)?.0;
        Ok(lock(&hub.accounts)?.rules(&id)?.to_wire())
    })
    .await?;
    Ok(Json(rules))
}

async fn put_rules(
    State(hub): State<Shared>,
    caller: Caller,
    Path(ws): Path<String>,
    JsonBody(body): JsonBody<shoal_protocol::WorkspaceRules>,
) -> Result<StatusCode, ApiError> {
    let rules = crate::rules::Rules::from_wire(&body).map_err(|e| caller.fail(e))?;
    let device = caller.device.clone();
    blocking(&caller.request, move || {
        hub.member(&device, &ws)?;
        let id = shoal_protocol::parse_item(&ws)?.0;
        lock(&hub.accounts)?.set_rules(&id, device.user, &rules)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn commit(
    State(hub): State<Shared>,
    caller: Caller,
    Path((ws, batch)): Path<(String, String)>,
    JsonBody(body): JsonBody<CommitRequest>,
) -> Result<Json<shoal_protocol::CommitResponse>, ApiError> {
    let (replica, epoch) = caller.replica()?;
    let metrics = hub.metrics.clone();
    let device = caller.device.clone();
    let response = blocking(&caller.request, move || {
        let (workspace, _) = hub.member(&device, &ws)?;
        let id = shoal_protocol::parse_item(&ws)?.0;
        let (rules, authors) = {
            let accounts = lock(&hub.accounts)?;
            (accounts.rules(&id)?, accounts.author_roles(&id)?)
        };
        let (response, changed) = with_replica(&workspace, |r| {
            r.check_epoch(&replica, epoch)?;
            r.commit(&batch, &body, &rules, &authors)
        })?;
        if changed {
            hub.announce_change(&workspace, &ws, &response.tag_after);
        }
        Ok(response)
    })
    .await?;
    bump(&metrics.upload_commits);
    Ok(Json(response))
}

fn chunk_hash(caller: &Caller, hash: &str) -> Result<ContentHash, ApiError> {
    parse_hash(hash).map_err(|e| caller.fail(e.into()))
}

/// Parses `bytes=START-END` (END optional) against a length.
fn byte_range(headers: &HeaderMap, len: usize) -> Option<Result<(usize, usize), ()>> {
    let value = headers.get(header::RANGE)?.to_str().ok()?;
    let spec = value.strip_prefix("bytes=")?;
    let (start, end) = spec.split_once('-')?;
    let start: usize = match start.parse() {
        Ok(start) => start,
        Err(_) => return Some(Err(())),
    };
    let end: usize = if end.is_empty() {
        len.saturating_sub(1)
    } else {
        end.parse().unwrap_or(usize::MAX)
    };
    if start >= len || end < start {
        return Some(Err(()));
    }
    Some(Ok((start, end.min(len - 1))))
}

async fn get_chunk(
    State(hub): State<Shared>,
    caller: Caller,
    Path((ws, hash)): Path<(String, String)>,
    request_headers: HeaderMap,
) -> Result<Response, ApiError> {
    let hash = chunk_hash(&caller, &hash)?;
    let metrics = hub.metrics.clone();
    let device = caller.device.clone();
    let bytes = blocking(&caller.request, move || {
        let (workspace, _) = hub.member(&device, &ws)?;
        let chunks = with_replica(&workspace, |r| Ok(r.chunk_store()))?;
        chunks.get(&hash)?.ok_or(HubError::NotFound)
    })
    .await?;
    bump(&metrics.chunk_gets);
    // Ranged reads let a client resume a chunk it half received.
    match byte_range(&request_headers, bytes.len()) {
        None => Ok((StatusCode::OK, [(header::ACCEPT_RANGES, "bytes")], bytes).into_response()),
        Some(Ok((start, end))) => {
            let range = format!("bytes {start}-{end}/{}", bytes.len());
            Ok((
                StatusCode::PARTIAL_CONTENT,
                [(header::CONTENT_RANGE, range)],
                bytes[start..=end].to_vec(),
            )
                .into_response())
        }
        Some(Err(())) => Ok((
            StatusCode::RANGE_NOT_SATISFIABLE,
            [(header::CONTENT_RANGE, format!("bytes */{}", bytes.len()))],
        )
            .into_response()),
    }
}

async fn head_chunk(
    State(hub): State<Shared>,
    caller: Caller,
    Path((ws, hash)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let hash = chunk_hash(&caller, &hash)?;
    let device = caller.device.clone();
    let held = blocking(&caller.request, move || {
        let (workspace, _) = hub.member(&device, &ws)?;
        with_replica(&workspace, |r| Ok(r.has_chunk(&hash)))
    })
    .await?;
    Ok(if held {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    })
}

/// Many chunks in one request (`shoal_protocol::bundle_chunk` framing): per-request costs
/// dominate when chunks are small or many. Checked whole before anything is stored.
async fn put_chunk_bundle(
    State(hub): State<Shared>,
    caller: Caller,
    Path(ws): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    if body.len() > shoal_protocol::CHUNK_BUNDLE_MAX + (shoal_protocol::CHUNK_BUNDLE_MAX >> 8) {
        return Err(caller.fail(HubError::TooLarge(format!(
            "a chunk bundle is at most {} bytes",
            shoal_protocol::CHUNK_BUNDLE_MAX
        ))));
    }
    let metrics = hub.metrics.clone();
    let device = caller.device.clone();
    let (stored, count) = blocking(&caller.request, move || {
        let (workspace, role) = hub.member(&device, &ws)?;
        if role == Role::Reader {
            return Err(HubError::Forbidden("readers cannot upload content".into()));
        }
        let chunks = shoal_protocol::unbundle_chunks(&body)?;
        let store = with_replica(&workspace, |r| Ok(r.chunk_store()))?;
        let stored = store.put_many_checked(&chunks)?;
        Ok((stored, chunks.len()))
    })
    .await?;
    metrics
        .chunk_puts
        .fetch_add(count as u64, std::sync::atomic::Ordering::Relaxed);
    Ok(Json(
        serde_json::json!({ "chunks": count, "stored": stored }),
    ))
}

/// Which of the named contents the hub holds the chunk lists of: an uploader then leaves those
/// lists out of its batch (a renamed large file costs no chunk list).
async fn contents_known(
    State(hub): State<Shared>,
    caller: Caller,
    Path(ws): Path<String>,
    JsonBody(body): JsonBody<shoal_protocol::ContentsKnown>,
) -> Result<Json<shoal_protocol::ContentsKnown>, ApiError> {
    let asked = shoal_protocol::parse_held(&body.contents).map_err(|e| caller.fail(e.into()))?;
    let device = caller.device.clone();
    let known = blocking(&caller.request, move || {
        let (workspace, _) = hub.member(&device, &ws)?;
        with_replica(&workspace, |r| {
            let mut known = Vec::new();
            for hash in &asked {
                if r.has_content(hash)? {
                    known.push(shoal_protocol::hex32(&hash.0));
                }
            }
            Ok(known)
        })
    })
    .await?;
    Ok(Json(shoal_protocol::ContentsKnown { contents: known }))
}

/// The chunk list of a content the hub holds, or that an upload in progress brings: a device
/// told the content is arriving fetches its chunks as they come.
async fn get_content_list(
    State(hub): State<Shared>,
    caller: Caller,
    Path((ws, hash)): Path<(String, String)>,
) -> Result<Json<WireContent>, ApiError> {
    let hash = chunk_hash(&caller, &hash)?;
    let device = caller.device.clone();
    let content = blocking(&caller.request, move || {
        let (workspace, _) = hub.member(&device, &ws)?;
        with_replica(&workspace, |r| r.content_list(&hash))?.ok_or(HubError::NotFound)
    })
    .await?;
    Ok(Json(WireContent::from(&content)))
}

/// Many chunks in one answer, as a bundle: a device fetching thousands of small files asks
/// for them a few megabytes at a time instead of one request each.
async fn fetch_chunk_bundle(
    State(hub): State<Shared>,
    caller: Caller,
    Path(ws): Path<String>,
    JsonBody(body): JsonBody<shoal_protocol::ChunkFetch>,
) -> Result<Response, ApiError> {
    let mut wanted = Vec::with_capacity(body.chunks.len());
    for hash in &body.chunks {
        wanted.push(chunk_hash(&caller, hash)?);
    }
    if wanted.len() > shoal_protocol::CHUNK_BUNDLE_MAX / 1024 {
        return Err(caller.fail(HubError::TooLarge(format!(
            "at most {} chunks per fetch",
            shoal_protocol::CHUNK_BUNDLE_MAX / 1024
        ))));
    }
    let metrics = hub.metrics.clone();
    let device = caller.device.clone();
    let (bundle, count) = blocking(&caller.request, move || {
        let (workspace, _) = hub.member(&device, &ws)?;
        let store = with_replica(&workspace, |r| Ok(r.chunk_store()))?;
        // Room for the largest answer up front (pages are touched only as they are written):
        // growing by doubling would copy the bundle and hold it twice.
        let mut bundle = Vec::with_capacity(shoal_protocol::CHUNK_BUNDLE_MAX);
        let mut count = 0u64;
        let located = store.locate_many(&wanted)?;
        for (hash, located) in wanted.iter().zip(located) {
            let Some(located) = located else {
                continue;
            };
            let len = u32::try_from(located.len()).unwrap_or(u32::MAX);
            if bundle.len() + shoal_protocol::frame_len(len) > shoal_protocol::CHUNK_BUNDLE_MAX {
                break;
            }
            // Unchecked: the receiver checks every chunk as it arrives and asks again, chunk
            // by chunk (a checked read), for any that fails. Read straight into the bundle: a
            // download of 512 MiB is then not copied once more.
            let at = shoal_protocol::bundle_frame(&mut bundle, hash, len);
            store.read_located_into(&located, &mut bundle[at..])?;
            count += 1;
        }
        Ok((bundle, count))
    })
    .await?;
    metrics
        .chunk_gets
        .fetch_add(count, std::sync::atomic::Ordering::Relaxed);
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bundle).into_response())
}

async fn put_chunk(
    State(hub): State<Shared>,
    caller: Caller,
    Path((ws, hash)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    let hash = chunk_hash(&caller, &hash)?;
    let metrics = hub.metrics.clone();
    let device = caller.device.clone();
    let stored = blocking(&caller.request, move || {
        let (workspace, role) = hub.member(&device, &ws)?;
        if role == Role::Reader {
            return Err(HubError::Forbidden("readers cannot upload content".into()));
        }
        // Chunks need no replica lock, so uploads run in parallel with each other and
        // with a commit.
        let chunks = with_replica(&workspace, |r| Ok(r.chunk_store()))?;
        if body.len() > shoal_store::CHUNK_MAX {
            return Err(HubError::TooLarge(format!(
                "a chunk is at most {} bytes",
                shoal_store::CHUNK_MAX
            )));
        }
        Ok(chunks.put(&hash, &body)?)
    })
    .await?;
    bump(&metrics.chunk_puts);
    Ok(if stored {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    })
}

async fn events(
    State(hub): State<Shared>,
    caller: Caller,
    Path(ws): Path<String>,
) -> Result<Sse<impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>>>, ApiError>
{
    let device = caller.device.clone();
    let ws_id = ws.clone();
    let (receiver, current) = blocking(&caller.request, move || {
        let (workspace, _) = hub.member(&device, &ws)?;
        let receiver = workspace.events.subscribe();
        let tag = with_replica(&workspace, |r| r.tag())?;
        Ok((receiver, tag))
    })
    .await?;
    // The first event is the current tag, so a device that was away knows at once whether it
    // must sync; then one event per change.
    let first = ChangeEvent {
        workspace: ws_id,
        tag: current,
    };
    let stream = futures_util::stream::iter([first])
        .chain(
            tokio_stream::wrappers::BroadcastStream::new(receiver)
                .filter_map(|e| async move { e.ok() }),
        )
        .map(|event| {
            Ok(Event::default()
                .event("change")
                .data(serde_json::to_string(&event).unwrap_or_default()))
        });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

async fn set_device_key(
    State(hub): State<Shared>,
    caller: Caller,
    JsonBody(body): JsonBody<DeviceKey>,
) -> Result<StatusCode, ApiError> {
    let device = caller.device.id;
    blocking(&caller.request, move || {
        let accounts = lock(&hub.accounts)?;
        accounts.set_device_key(&device, &body.key)?;
        hub.presence.key_changed(&accounts, device)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn put_presence(
    State(hub): State<Shared>,
    caller: Caller,
    JsonBody(body): JsonBody<PresenceUpdate>,
) -> Result<StatusCode, ApiError> {
    let device = caller.device.clone();
    blocking(&caller.request, move || {
        let accounts = lock(&hub.accounts)?;
        let joined = accounts.joined_workspaces(device.user)?;
        let document = presence::Document::parse(body, &joined)?;
        hub.presence.update(&accounts, device.id, document)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Closes a presence stream when its response is dropped (the device hung up).
struct StreamGuard {
    hub: Shared,
    device: [u8; 16],
    stream: u64,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.hub
            .metrics
            .presence_streams
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let (hub, device, stream) = (self.hub.clone(), self.device, self.stream);
        let close = move || {
            let closed = lock(&hub.accounts)
                .and_then(|accounts| hub.presence.disconnect(&accounts, device, stream));
            if let Err(error) = closed {
                tracing::warn!(%error, "closing a presence stream");
            }
        };
        // Closing reads the accounts database: off the async threads when there are some.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(close)),
            Err(_) => close(),
        }
    }
}

async fn presence_stream(
    State(hub): State<Shared>,
    caller: Caller,
) -> Result<Sse<impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>>>, ApiError>
{
    let device = caller.device.clone();
    let (subscription, guard) = blocking(&caller.request, move || {
        let subscription = {
            let accounts = lock(&hub.accounts)?;
            hub.presence.connect(&accounts, device.id)?
        };
        hub.metrics
            .presence_streams
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // From here on, an error or a hang-up closes the stream again.
        let guard = StreamGuard {
            hub: hub.clone(),
            device: device.id,
            stream: subscription.stream,
        };
        // Read after connecting, so a change committed meanwhile is sent live, not missed.
        let tags = hub.tags(device.user)?;
        hub.presence
            .send_hub_tags(device.id, subscription.stream, &tags)?;
        Ok((subscription, guard))
    })
    .await?;
    let presence::Subscription {
        events, overflowed, ..
    } = subscription;
    let stream = futures_util::stream::unfold(
        (events, overflowed, guard),
        |(mut events, overflowed, guard)| async move {
            // A stream that lost events ends: its device reconnects to a fresh snapshot.
            if overflowed.load(std::sync::atomic::Ordering::Relaxed) {
                return None;
            }
            let event = events.recv().await?;
            let data = match serde_json::to_string(&event) {
                Ok(data) => Event::default().data(data),
                Err(error) => Event::default().comment(format!("unencodable event: {error}")),
            };
            Some((Ok(data), (events, overflowed, guard)))
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

async fn negotiate(
    State(hub): State<Shared>,
    caller: Caller,
    JsonBody(body): JsonBody<Negotiation>,
) -> Result<Json<Relayed>, ApiError> {
    let device = caller.device.clone();
    let metrics = hub.metrics.clone();
    let delivered = blocking(&caller.request, move || {
        let accounts = lock(&hub.accounts)?;
        // Membership first: a non-member learns nothing, not even what is wrong with its body.
        let workspace = shoal_protocol::parse_item(&body.workspace)
            .map_err(|_| HubError::NotFound)?
            .0;
        if !accounts
            .membership(&workspace, device.user)?
            .is_some_and(|m| m.joined)
        {
            return Err(HubError::NotFound);
        }
        let compact = presence::parse_compact(&body.compact)?;
        body.check_changing()
            .map_err(|e| HubError::BadRequest(e.to_string()))?;
        if body.to.len() > presence::MAX_RECIPIENTS {
            return Err(HubError::TooLarge(format!(
                "{} recipients; at most {}",
                body.to.len(),
                presence::MAX_RECIPIENTS
            )));
        }
        let to = body
            .to
            .iter()
            .map(|id| presence::parse_id("to", id))
            .collect::<Result<Vec<_>, _>>()?;
        hub.presence.relay(
            &accounts,
            device.id,
            workspace,
            &compact,
            &to,
            &body.changing,
        )
    })
    .await?;
    metrics
        .negotiations_relayed
        .fetch_add(delivered as u64, std::sync::atomic::Ordering::Relaxed);
    Ok(Json(Relayed { delivered }))
}

async fn metrics(State(hub): State<Shared>, _caller: Caller) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        hub.metrics.render(),
    )
        .into_response()
}
