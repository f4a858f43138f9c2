//! A device's home directory: its hub credentials and the workspaces it holds.
//!
//! Several devices can run on one machine (tests do) by giving each its own home. Files are
//! JSON, written to a temporary name and renamed, so a crash never leaves half a file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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
}
