//! The shoal device agent: logs a device in to a hub, keeps its workspaces' folders in sync
//! with the hub, online or not, and watches them for changes.
//!
//! [`sync_workspace`] is one round with the hub; [`pull_from_peer`] one download from a peer.
//! [`run_agent`] is the daemon: it serves the protocol to peers over TLS (device keys vouched
//! for by the hub), watches folders, follows the hub's presence stream, exchanges
//! negotiation messages, and syncs with whoever holds what it lacks.

mod basis;
mod daemon;
mod early;
mod home;
mod peer;
mod peers;
mod sinks;
mod status;
mod sync;
#[cfg(test)]
mod test_bytes;
mod tls;
mod watch;

use std::path::PathBuf;

pub use daemon::{AgentOptions, run_agent};
pub use home::{AgentState, Counters, DeviceConfig, Home, SyncRecord, WorkspaceEntry};
pub use peers::Contacts;
pub use shoal_client::{ClientError, HubClient, install_default_provider};
pub use status::{ConflictSummary, RefusedSummary, WorkspaceStatus, status};
pub use sync::{
    SyncReport, compact_knowledge, open_folder, pull_from_peer, scan_workspace, sync_workspace,
    sync_workspace_with,
};
pub use tls::{DeviceIdentity, fingerprint, peer_client};

/// Why an agent operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// No login in this home yet.
    #[error("this device is not logged in; run `shoal login HUB_URL USER` first")]
    NotLoggedIn,
    /// No workspace by that name here.
    #[error("no workspace named {0:?} on this device; see `shoal workspace list`")]
    UnknownWorkspace(String),
    /// The hub could not be reached.
    #[error("the hub is unreachable: {0}")]
    Unreachable(String),
    /// The hub refused the credentials.
    #[error("the hub refused the credentials: {0}")]
    Unauthorized(String),
    /// The hub has no such thing (or the user may not see it).
    #[error("not found on the hub: {0}")]
    NotFound(String),
    /// The hub reports a conflict (a taken name).
    #[error("{0}")]
    Conflict(String),
    /// This replica synced with the hub in a later epoch than it now has: its state was
    /// restored from an old copy. It must continue in an epoch after `known`.
    #[error(
        "this folder's state is older than what it already synced (epoch {known}); it was restored from a backup"
    )]
    StaleEpoch {
        /// The latest epoch the hub saw.
        known: u32,
    },
    /// Any other error status from the hub.
    #[error("the hub answered {status}: {message}")]
    Hub {
        /// HTTP status.
        status: u16,
        /// The hub's message.
        message: String,
    },
    /// The hub sent something this agent cannot use.
    #[error("protocol: {0}")]
    Protocol(String),
    /// A configuration file is unreadable.
    #[error("configuration: {0}")]
    Config(String),
    /// The folder replica failed.
    #[error(transparent)]
    Folder(#[from] shoal_folder::FolderError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] shoal_store::StoreError),
    /// A file-system error.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

impl From<ClientError> for AgentError {
    fn from(error: ClientError) -> Self {
        match error {
            ClientError::Unreachable(m) => AgentError::Unreachable(m),
            ClientError::Unauthorized(m) => AgentError::Unauthorized(m),
            ClientError::NotFound(m) => AgentError::NotFound(m),
            ClientError::Conflict(m) => AgentError::Conflict(m),
            ClientError::StaleEpoch { known } => AgentError::StaleEpoch { known },
            ClientError::Server { status, message } => AgentError::Hub { status, message },
            ClientError::Protocol(m) => AgentError::Protocol(m),
            ClientError::Config(m) => AgentError::Config(m),
            other => AgentError::Protocol(other.to_string()),
        }
    }
}

impl From<shoal_protocol::WireError> for AgentError {
    fn from(error: shoal_protocol::WireError) -> Self {
        AgentError::Protocol(error.to_string())
    }
}

impl AgentError {
    /// Whether retrying later may help (the hub is down or busy).
    pub fn is_transient(&self) -> bool {
        matches!(self, AgentError::Unreachable(_))
            || matches!(self, AgentError::Hub { status, .. } if *status >= 500)
    }
}
