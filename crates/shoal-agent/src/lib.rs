//! The shoal device agent: logs a device in to a hub, keeps its workspaces' folders in sync
//! with the hub, online or not, and watches them for changes.
//!
//! [`sync_workspace`] is one round; [`run_agent`] is the daemon: it watches folders (a hint,
//! backed by a periodic rescan), listens to the hub's change events on a long-lived
//! connection, and syncs whenever either says so, retrying with backoff while the hub is down.

mod client;
mod daemon;
mod home;
mod status;
mod sync;

use std::path::PathBuf;

pub use client::HubClient;
pub use daemon::{AgentOptions, run_agent};
pub use home::{DeviceConfig, Home, SyncRecord, WorkspaceEntry};
pub use status::{ConflictSummary, RefusedSummary, WorkspaceStatus, status};
pub use sync::{SyncReport, sync_workspace};

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
