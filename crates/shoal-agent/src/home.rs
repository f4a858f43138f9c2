//! A device's home directory: its hub credentials and the workspaces it holds.
//!
//! Several devices can run on one machine (tests do) by giving each its own home. Files are
//! JSON, written to a temporary name and renamed, so a crash never leaves half a file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use shoal_protocol::{Availability, PeerPresence};

/// The file holding the availability the user set.
pub(crate) const PRESENCE_FILE: &str = "presence.json";

use crate::AgentError;

/// The device's login at a hub.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceConfig {
    /// Hub base URL, e.g. `http://127.0.0.1:7700`.
    pub hub: String,
    /// User name.
    pub user: String,
    /// Bearer token.
    pub token: String,
    /// Device id (hex).
    pub device: String,
    /// Device name, written into versions and conflict copies.
    pub device_name: String,
}

/// One workspace this device holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceEntry {
    /// Workspace id (hex).
    pub id: String,
    /// Name.
    pub name: String,
    /// The folder holding its files.
    pub path: PathBuf,
    /// This user's role.
    pub role: String,
    /// The hubs this device syncs the workspace with (base URLs); empty means the hub of
    /// the device's first login. A workspace partnered between hubs can be held on several.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hubs: Vec<String>,
}

impl WorkspaceEntry {
    /// The hubs to sync with, given the device's first login's hub.
    pub fn hubs_or(&self, primary: &str) -> Vec<String> {
        if self.hubs.is_empty() {
            vec![primary.to_owned()]
        } else {
            self.hubs.clone()
        }
    }
}

/// What the last sync of a workspace did (kept so `status` works without a running agent).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRecord {
    /// When the last sync finished (ns since the epoch), successful or not.
    pub at: i64,
    /// When the last successful sync finished.
    pub last_success: Option<i64>,
    /// The error of the last sync, if it failed.
    pub error: Option<String>,
    /// The hub's tag after the last successful sync.
    pub hub_tag: Option<String>,
}

/// A device home.
#[derive(Clone, Debug)]
pub struct Home {
    dir: PathBuf,
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), AgentError> {
    let text = serde_json::to_vec_pretty(value).map_err(|e| AgentError::Config(e.to_string()))?;
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, text).map_err(|e| AgentError::Io(temp.clone(), e))?;
    std::fs::rename(&temp, path).map_err(|e| AgentError::Io(path.to_path_buf(), e))
}

fn read_json<T: for<'a> Deserialize<'a>>(path: &Path) -> Result<Option<T>, AgentError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| AgentError::Config(format!("{}: {e}", path.display()))),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(AgentError::Io(path.to_path_buf(), error)),
    }
}

impl Home {
    /// Opens (creating) a home directory.
    pub fn open(dir: &Path) -> Result<Home, AgentError> {
        std::fs::create_dir_all(dir).map_err(|e| AgentError::Io(dir.to_path_buf(), e))?;
        Ok(Home {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The login, or an error telling the user to log in.
    pub fn device(&self) -> Result<DeviceConfig, AgentError> {
        read_json(&self.dir.join("device.json"))?.ok_or(AgentError::NotLoggedIn)
    }

    /// Saves the login.
    pub fn save_device(&self, device: &DeviceConfig) -> Result<(), AgentError> {
        write_json(&self.dir.join("device.json"), device)
    }

    /// Every login of this device: the first one, then logins at other hubs.
    pub fn logins(&self) -> Result<Vec<DeviceConfig>, AgentError> {
        let mut all = vec![self.device()?];
        let others: Vec<DeviceConfig> = read_json(&self.dir.join("hubs.json"))?.unwrap_or_default();
        all.extend(others);
        Ok(all)
    }

    /// The login at `hub`.
    pub fn login_for(&self, hub: &str) -> Result<DeviceConfig, AgentError> {
        let hub = hub.trim_end_matches('/');
        self.logins()?
            .into_iter()
            .find(|l| l.hub == hub)
            .ok_or_else(|| {
                AgentError::Config(format!(
                    "this device is not logged in to {hub}; run `shoal login {hub} USER`"
                ))
            })
    }

    /// Saves a login: the first one (or a new login at the same hub) becomes the device's
    /// main login; a login at another hub is kept beside it.
    pub fn save_login(&self, login: &DeviceConfig) -> Result<(), AgentError> {
        match self.device() {
            Ok(primary) if primary.hub != login.hub => {
                let path = self.dir.join("hubs.json");
                let mut others: Vec<DeviceConfig> = read_json(&path)?.unwrap_or_default();
                others.retain(|o| o.hub != login.hub);
                others.push(login.clone());
                write_json(&path, &others)
            }
            _ => self.save_device(login),
        }
    }

    /// Workspaces held here.
    pub fn workspaces(&self) -> Result<Vec<WorkspaceEntry>, AgentError> {
        Ok(read_json(&self.dir.join("workspaces.json"))?.unwrap_or_default())
    }

    /// Adds or replaces a workspace.
    pub fn put_workspace(&self, entry: WorkspaceEntry) -> Result<(), AgentError> {
        let mut all = self.workspaces()?;
        all.retain(|w| w.id != entry.id);
        all.push(entry);
        all.sort_by(|a, b| a.name.cmp(&b.name));
        write_json(&self.dir.join("workspaces.json"), &all)
    }

    /// The workspace called `name` (or the only one, when `name` is `None`).
    pub fn workspace(&self, name: Option<&str>) -> Result<Vec<WorkspaceEntry>, AgentError> {
        let all = self.workspaces()?;
        match name {
            None => Ok(all),
            Some(name) => {
                let found: Vec<_> = all
                    .into_iter()
                    .filter(|w| w.name == name || w.id == name)
                    .collect();
                if found.is_empty() {
                    Err(AgentError::UnknownWorkspace(name.to_owned()))
                } else {
                    Ok(found)
                }
            }
        }
    }

    /// The record of a workspace's last sync.
    pub fn sync_record(&self, workspace: &str) -> Result<SyncRecord, AgentError> {
        Ok(read_json(&self.dir.join(format!("sync-{workspace}.json")))?.unwrap_or_default())
    }

    /// Saves the record of a workspace's last sync.
    pub fn save_sync_record(&self, workspace: &str, record: &SyncRecord) -> Result<(), AgentError> {
        write_json(&self.dir.join(format!("sync-{workspace}.json")), record)
    }

    /// This device's TLS identity, made on first use.
    pub fn identity(&self) -> Result<crate::DeviceIdentity, AgentError> {
        crate::DeviceIdentity::load_or_create(&self.dir)
    }

    /// The contacts' presence as last heard from the hub (so peers stay reachable while the
    /// hub is down, even across a restart).
    pub fn peers(&self) -> Result<Vec<PeerPresence>, AgentError> {
        Ok(read_json(&self.dir.join("peers.json"))?.unwrap_or_default())
    }

    /// Saves the contacts' presence.
    pub fn save_peers(&self, peers: &[PeerPresence]) -> Result<(), AgentError> {
        write_json(&self.dir.join("peers.json"), &peers)
    }

    /// The availability this device shows its contacts (online unless set).
    pub fn availability(&self) -> Result<Availability, AgentError> {
        Ok(read_json(&self.dir.join(PRESENCE_FILE))?.unwrap_or(Availability::Online))
    }

    /// Sets the availability this device shows; a running agent publishes it at once.
    pub fn save_availability(&self, status: Availability) -> Result<(), AgentError> {
        write_json(&self.dir.join(PRESENCE_FILE), &status)
    }

    /// What the running agent publishes about itself (its address and counters).
    pub fn agent_state(&self) -> Result<Option<AgentState>, AgentError> {
        read_json(&self.dir.join("agent.json"))
    }

    /// Saves what the running agent publishes about itself.
    pub fn save_agent_state(&self, state: &AgentState) -> Result<(), AgentError> {
        write_json(&self.dir.join("agent.json"), state)
    }
}

/// What a running agent publishes in its home: where peers reach it and what it has done.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    /// The address its protocol server listens on.
    pub listen: String,
    /// Its device key.
    pub key: String,
    /// Counters since it started.
    pub counters: Counters,
}

/// Counters of a running agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Sync sessions with the hub this agent started.
    pub hub_sessions: u64,
    /// Downloads from peers this agent started.
    pub peer_pulls: u64,
    /// Downloads peers started on this agent's server.
    pub peer_served: u64,
    /// Negotiation messages sent (directly or through the hub).
    pub negotiations_sent: u64,
    /// Negotiation messages received (directly or through the hub).
    pub negotiations_received: u64,
    /// Bytes read on peer connections (both directions' TLS records, as on the wire).
    pub peer_bytes_in: u64,
    /// Bytes written on peer connections.
    pub peer_bytes_out: u64,
    /// TLS handshakes refused (a key the hub did not vouch for).
    pub peer_refused: u64,
    /// Contents fetched whole while another device was still uploading them.
    #[serde(default)]
    pub early_fetched: u64,
    /// Of those, the ones a download took instead of fetching them again.
    #[serde(default)]
    pub early_claimed: u64,
    /// Large files copied when another device said it was changing them.
    #[serde(default)]
    pub bases_copied: u64,
    /// Of those, the ones a download built the new version in.
    #[serde(default)]
    pub bases_used: u64,
}
