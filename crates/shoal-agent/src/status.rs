//! What `shoal status` reports for each workspace.

use shoal_core::Knowledge;
use shoal_folder::FolderReplica;

use crate::AgentError;
use crate::home::{Home, WorkspaceEntry};
use shoal_client::HubClient;

/// One conflict, for listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConflictSummary {
    /// The winning version's name.
    pub name: String,
    /// How many versions are current.
    pub versions: usize,
}

/// A refused version, for listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedSummary {
    /// The version's name.
    pub name: String,
    /// Why the hub refused it.
    pub reason: String,
}

/// The state of one workspace on this device.
#[derive(Clone, Debug)]
pub struct WorkspaceStatus {
    /// The workspace.
    pub workspace: WorkspaceEntry,
    /// Whether the hub answered just now.
    pub hub_reachable: bool,
    /// Local versions the hub does not have yet (known only when the hub is reachable).
    pub pending_upload: Option<usize>,
    /// Whether the hub has changes this device has not synced (known when reachable).
    pub behind: Option<bool>,
    /// Whether the folder still has to be brought in line with received changes.
    pub disk_pending: bool,
    /// Items with concurrent versions.
    pub conflicts: Vec<ConflictSummary>,
    /// Versions the hub refused.
    pub refused: Vec<RefusedSummary>,
    /// When the last successful sync finished (ns since the epoch).
    pub last_sync: Option<i64>,
    /// The error of the last sync attempt, if it failed.
    pub last_error: Option<String>,
}

impl WorkspaceStatus {
    /// In sync: the hub answered, nothing waits in either direction, no conflict or refusal.
    pub fn in_sync(&self) -> bool {
        self.hub_reachable
            && self.pending_upload == Some(0)
            && self.behind == Some(false)
            && !self.disk_pending
            && self.conflicts.is_empty()
            && self.refused.is_empty()
    }
}

/// The status of the named workspace (or of all).
pub fn status(home: &Home, name: Option<&str>) -> Result<Vec<WorkspaceStatus>, AgentError> {
    let device = home.device()?;
    let base = HubClient::new(&device.hub, Some(&device.token))?;
    let mut out = Vec::new();
    for workspace in home.workspace(name)? {
        let folder = FolderReplica::open(&workspace.path, &device.device_name)?;
        let store = folder.store();
        let identity = store.identity().clone();
        let record = home.sync_record(&workspace.id)?;
        let offer = base
            .for_replica(&workspace.id, identity.replica, identity.epoch)
            .upload_offer(&workspace.id)
            .ok();
        let (pending_upload, behind) = match &offer {
            Some(offer) => {
                let hub = Knowledge::try_from(&offer.knowledge)?;
                let mut missing = store.missing_for(&hub)?;
                store.drop_refused(&mut missing)?;
                let pending = missing.len();
                let behind = !store.knowledge()?.covers_knowledge(&hub);
                (Some(pending), Some(behind))
            }
            None => (None, None),
        };
        let conflicts = store
            .load_items()?
            .values()
            .filter(|state| state.versions().len() > 1)
            .map(|state| ConflictSummary {
                name: state.winner().entry.name.clone(),
                versions: state.versions().len(),
            })
            .collect();
        let refused = store
            .refused()?
            .into_iter()
            .map(|(_, version, reason)| RefusedSummary {
                name: version.entry.name,
                reason,
            })
            .collect();
        out.push(WorkspaceStatus {
            hub_reachable: offer.is_some(),
            pending_upload,
            behind,
            disk_pending: store.needs_materialize()?,
            conflicts,
            refused,
            last_sync: record.last_success,
            last_error: record.error,
            workspace,
        });
    }
    Ok(out)
}
