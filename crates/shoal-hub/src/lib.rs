//! The shoal hub: accounts, workspaces and members, and the sync service that keeps a replica
//! of every workspace so that devices sync through it, online or not (store-and-forward).
//!
//! [`serve`] runs the HTTP API described in `docs/protocol.md`; [`add_user`] manages accounts.
//! Metadata lives in SQLite under the data directory, content as chunks in pack files beside
//! it.
//! Presence (who is connected, where, knowing what) is kept in memory and streamed to each
//! device's contacts; the hub also relays sync-negotiation messages and counts its work.

mod accounts;
mod api;
mod metrics;
mod partner;
mod presence;
mod replica;
mod rules;

use std::net::SocketAddr;
use std::path::PathBuf;

pub use accounts::Role;
pub use api::serve;

/// How to run a hub.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// The data directory (`hub.db`, `workspaces/`).
    pub data: PathBuf,
    /// Where to listen.
    pub listen: SocketAddr,
}

/// Why a hub operation failed. Each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// 400: the request is malformed; the message says how.
    #[error("{0}")]
    BadRequest(String),
    /// 401: no valid credentials.
    #[error("wrong user name, password or token")]
    Unauthorized,
    /// 403: authenticated, but the role does not allow it.
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such workspace, session or batch (also what non-members get).
    #[error("not found")]
    NotFound,
    /// 409: a name is taken.
    #[error("{0}")]
    Conflict(String),
    /// 409: the caller's replica epoch went backwards; it must start a new epoch and do a
    /// full exchange.
    #[error(
        "stale epoch {got}: this replica already synced in epoch {known}; start a new epoch and sync again"
    )]
    StaleEpoch {
        /// The epoch the hub knows.
        known: u32,
        /// The epoch the caller sent.
        got: u32,
    },
    /// 413: over the limits.
    #[error("{0}")]
    TooLarge(String),
    /// 202: busy with another request on the same workspace; retry.
    #[error("busy; retry shortly")]
    Busy,
    /// 500: the store failed.
    #[error("store: {0}")]
    Store(#[from] shoal_store::StoreError),
    /// 500: the chunk store failed (a mismatching chunk is a 400, see `From`).
    #[error("chunks: {0}")]
    Chunks(shoal_store::ChunkError),
    /// 500: the accounts database failed.
    #[error("accounts: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// 500: a file-system error.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// A partner hub could not be reached or refused a request.
    #[error("partner hub: {0}")]
    Partner(String),
    /// 500: anything else.
    #[error("{0}")]
    Internal(String),
}

impl From<shoal_store::ChunkError> for HubError {
    fn from(error: shoal_store::ChunkError) -> Self {
        match error {
            shoal_store::ChunkError::Mismatch(hash) => {
                HubError::BadRequest(format!("the bytes sent do not hash to {hash}"))
            }
            other => HubError::Chunks(other),
        }
    }
}

impl From<shoal_protocol::WireError> for HubError {
    fn from(error: shoal_protocol::WireError) -> Self {
        HubError::BadRequest(error.to_string())
    }
}

/// Adds a user to the hub at `data` (or resets their password).
pub fn add_user(data: &std::path::Path, name: &str, password: &str) -> Result<(), HubError> {
    accounts::Accounts::open(data)?.add_user(name, password)
}

/// Partners this hub with the hub at `url` for one workspace, so both hold it and converge.
/// This hub logs in there as `user` (a member of the workspace named `workspace`) and holds
/// the workspace here under the same id, owned by the local user `owner` (who can then invite
/// this hub's users). A running hub picks partnerships up when it starts. Returns the
/// workspace id.
pub fn add_partner(
    data: &std::path::Path,
    url: &str,
    user: &str,
    password: &str,
    workspace: &str,
    owner: &str,
) -> Result<String, HubError> {
    let accounts = accounts::Accounts::open(data)?;
    let owner_id = accounts
        .user_id(owner)?
        .ok_or_else(|| HubError::BadRequest(format!("no user {owner:?} on this hub")))?;
    let url = url.trim_end_matches('/');
    let login =
        shoal_client::HubClient::new(url, None)?.login(user, password, "hub-partner", None)?;
    let client = shoal_client::HubClient::new(url, Some(&login.token))?.for_device(&login.device);
    let found: Vec<_> = client
        .workspaces()?
        .into_iter()
        .filter(|w| w.name == workspace && w.joined)
        .collect();
    let remote = match found.as_slice() {
        [one] => one.clone(),
        [] => {
            return Err(HubError::BadRequest(format!(
                "{user} has not joined a workspace named {workspace:?} at {url}"
            )));
        }
        _ => {
            return Err(HubError::BadRequest(format!(
                "{user} has several workspaces named {workspace:?} at {url}"
            )));
        }
    };
    let id = shoal_protocol::parse_item(&remote.id)?.0;
    if accounts.membership(&id, owner_id)?.is_none() {
        accounts.create_workspace_with_id(owner_id, id, &remote.name)?;
    }
    accounts.add_partner(&accounts::Partner {
        workspace: id,
        url: url.to_owned(),
        token: login.token,
        device: login.device,
    })?;
    Ok(remote.id)
}
