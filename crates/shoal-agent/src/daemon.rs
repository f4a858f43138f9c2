//! The agent daemon: keeps every workspace of a device in step with its peers and the hub.
//!
//! Nothing polls. Four things start work: the file watcher (a hint, coalesced over a short
//! delay, backed by a periodic rescan), the hub's presence stream (contacts' presence and the
//! hub's own knowledge per workspace, on one long-lived connection), negotiation messages from
//! peers (directly over TLS, or relayed by the hub), and retries after a failure. Knowledge is
//! compared in its compact form first: equal knowledge costs no sync session.
//!
//! When this device's knowledge of a workspace changes, it tells the devices sharing it
//! (directly when it can reach them, through the hub otherwise) and updates its presence. A
//! device whose knowledge differs from a peer's pulls from that peer; one whose knowledge
//! differs from the hub's syncs with the hub. With the hub down, peers keep pulling from each
//! other; when it returns, its knowledge arrives on the presence stream and whoever holds
//! what it lacks uploads it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::BufRead;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher};
use shoal_core::ContentHash;
use shoal_folder::NoProgress;
use shoal_protocol::{Availability, Negotiation, PeerPresence, PresenceEvent, PresenceUpdate};

use crate::early::Early;
use crate::home::{AgentState, Counters, DeviceConfig, Home, SyncRecord, WorkspaceEntry};
use crate::peers::{AgentCounters, Contacts, Serving};
use crate::sync::{
    SyncOptions, compact_knowledge, pull_from_peer_with, scan_workspace, sync_workspace_scanning,
};
use crate::{AgentError, DeviceIdentity, sync_workspace};
use shoal_client::HubClient;

/// After a local change, how long peers that can pull directly get before the hub upload
/// starts (they hear of it at once and usually ask within milliseconds).
const PEERS_HEAD_START: Duration = Duration::from_millis(300);
/// After pulling a peer's changes, how long at least this device leaves the hub to hear of
/// them from their author before it checks the hub and uploads what it still lacks.
const AUTHOR_UPLOADS_FIRST: Duration = Duration::from_secs(5);
/// The longest a hub sync waits, in all, for peers' pulls to finish: pulls that keep coming
/// must not keep the hub (and so the offline members) from the change.
const HUB_GIVES_WAY_MAX: Duration = Duration::from_secs(20);

/// Settings of the daemon.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Full rescan of every folder this often, whatever the watcher says.
    pub rescan: Duration,
    /// After a file event, act once the folder has been quiet this long (a burst of events,
    /// such as a copy, coalesces into one scan)...
    pub debounce: Duration,
    /// ...or this long, when every file written has been closed since (a file saved, or moved
    /// in whole, is complete: waiting longer only delays it)...
    pub debounce_closed: Duration,
    /// ...or once this much time has passed since the first event, whichever comes first.
    pub debounce_max: Duration,
    /// Where the protocol server for peers listens.
    pub listen: SocketAddr,
    /// Sync with peers directly; when off, everything goes through the hub.
    pub peers: bool,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            rescan: Duration::from_secs(300),
            debounce: Duration::from_millis(50),
            debounce_closed: Duration::from_millis(10),
            debounce_max: Duration::from_secs(1),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            peers: true,
        }
    }
}

/// Something that may call for work.
pub(crate) enum Signal {
    /// Files changed in a workspace's folder. The watcher sends one and no other until the
    /// loop takes it (clearing `queued`), so the events of a burst of writes (the agent's own
    /// included) wait as one signal, not thousands.
    Files {
        workspace: String,
        queued: Option<Arc<AtomicBool>>,
        /// Whether the folder's files may still be being written (None: not watched).
        writes: Option<Arc<crate::watch::Writes>>,
    },
    /// The hub's knowledge of a workspace.
    Hub { workspace: String, compact: String },
    /// A peer's knowledge of a workspace (a negotiation message).
    Peer {
        workspace: String,
        device: String,
        compact: String,
    },
    /// A contact device's presence.
    Presence(PeerPresence),
    /// The presence stream (re)connected.
    HubConnected,
    /// The presence stream broke.
    HubLost,
    /// The user changed this device's availability.
    Availability,
    /// Large contents another device began uploading to a workspace.
    Arriving {
        workspace: String,
        contents: Vec<String>,
    },
    /// Large files another device found changed in place and is reading again.
    Changing {
        workspace: String,
        paths: Vec<String>,
    },
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Reads the hub's presence stream, turning its events into signals. Reconnects with backoff.
fn listen_presence(client: HubClient, signals: Sender<Signal>) {
    let mut backoff = Duration::from_millis(250);
    loop {
        match client.presence() {
            Ok(response) => {
                backoff = Duration::from_millis(250);
                if signals.send(Signal::HubConnected).is_err() {
                    return;
                }
                for line in std::io::BufReader::new(response).lines() {
                    let Ok(line) = line else { break };
                    let Some(data) = line.strip_prefix("data:") else {
                        continue;
                    };
                    let Ok(event) = serde_json::from_str::<PresenceEvent>(data.trim()) else {
                        continue;
                    };
                    let signal = match event {
                        PresenceEvent::Peer(presence) => Signal::Presence(presence),
                        PresenceEvent::Negotiate {
                            from,
                            workspace,
                            compact,
                            ..
                        } if from == "hub" => Signal::Hub { workspace, compact },
                        PresenceEvent::Negotiate {
                            workspace,
                            changing,
                            ..
                        } if !changing.is_empty() => Signal::Changing {
                            workspace,
                            paths: changing,
                        },
                        PresenceEvent::Negotiate {
                            from,
                            workspace,
                            compact,
                            ..
                        } => Signal::Peer {
                            workspace,
                            device: from,
                            compact,
                        },
                        PresenceEvent::Arriving {
                            workspace,
                            contents,
                        } => Signal::Arriving {
                            workspace,
                            contents,
                        },
                    };
                    if signals.send(signal).is_err() {
                        return;
                    }
                }
                if signals.send(Signal::HubLost).is_err() {
                    return;
                }
            }
            Err(shoal_client::ClientError::Unauthorized(_)) => {
                tracing::warn!("the hub no longer accepts this device");
                return;
            }
            Err(error) => tracing::debug!(%error, "presence stream unavailable"),
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Files signalled so far in one turn of the loop: which workspaces, and whether any of their
/// folders may still be being written.
#[derive(Default)]
struct FileSignals {
    workspaces: BTreeSet<String>,
    writes: Vec<Arc<crate::watch::Writes>>,
}

impl FileSignals {
    /// Notes a workspace whose files changed and lets its watcher signal again: events from
    /// now on may be after the scan this signal leads to.
    fn take(
        &mut self,
        workspace: String,
        queued: Option<Arc<AtomicBool>>,
        writes: Option<Arc<crate::watch::Writes>>,
    ) {
        if let Some(queued) = queued {
            queued.store(false, Ordering::Release);
        }
        self.workspaces.insert(workspace);
        if let Some(writes) = writes
            && !self.writes.iter().any(|w| Arc::ptr_eq(w, &writes))
        {
            self.writes.push(writes);
        }
    }

    /// How long the folders must be quiet before they are scanned.
    fn quiet_for(&self, options: &AgentOptions) -> Duration {
        if self.writes.iter().any(|w| w.open()) {
            options.debounce
        } else {
            options.debounce_closed
        }
    }
}

/// Watches a workspace's folder: any change (or a lost event, which calls for a rescan) marks
/// it `dirty` and signals the loop.
fn watch(
    workspace: &WorkspaceEntry,
    signals: Sender<Signal>,
    dirty: Arc<AtomicBool>,
) -> Result<crate::watch::FolderWatch, AgentError> {
    let id = workspace.id.clone();
    let queued = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(crate::watch::Writes::default());
    crate::watch::watch_folder(&workspace.path, writes.clone(), move || {
        dirty.store(true, Ordering::Release);
        if !queued.swap(true, Ordering::AcqRel) {
            let _ = signals.send(Signal::Files {
                workspace: id.clone(),
                queued: Some(queued.clone()),
                writes: Some(writes.clone()),
            });
        }
    })
    .map_err(|e| {
        let hint = if e.raw_os_error() == Some(libc::ENOSPC) {
            " (out of inotify watches: raise fs.inotify.max_user_watches)"
        } else {
            ""
        };
        AgentError::Config(format!(
            "cannot watch {}: {e}{hint}",
            workspace.path.display()
        ))
    })
}

/// Watches the home for `shoal presence STATUS`, which rewrites the availability file.
fn watch_availability(
    home: &Home,
    signals: Sender<Signal>,
) -> Result<notify::RecommendedWatcher, AgentError> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let ours = event.paths.iter().any(|p| {
            p.file_name()
                .is_some_and(|n| n == crate::home::PRESENCE_FILE)
        });
        if ours && !event.kind.is_access() {
            let _ = signals.send(Signal::Availability);
        }
    })
    .map_err(|e| AgentError::Config(format!("cannot watch {}: {e}", home.dir().display())))?;
    watcher
        .watch(home.dir(), RecursiveMode::NonRecursive)
        .map_err(|e| AgentError::Config(format!("cannot watch {}: {e}", home.dir().display())))?;
    Ok(watcher)
}

/// The daemon's view of one workspace.
#[derive(Default)]
struct WorkspaceView {
    /// This device's compact knowledge.
    ours: String,
    /// What this device last told its peers.
    announced: String,
    /// The hub's compact knowledge, as last heard.
    hub: Option<String>,
    /// (ours, hub) right after the last successful hub sync: nothing new on either side
    /// since means no session.
    hub_synced: Option<(String, String)>,
    /// A hub sync is due at this time.
    hub_due: Option<Instant>,
    /// Backoff after a failed hub sync.
    hub_backoff: Option<Duration>,
    /// Until then, hub syncs upload only this device's own versions: those just pulled from
    /// a peer are their author's to upload.
    others_until: Option<Instant>,
}

struct Agent {
    home: Home,
    device: DeviceConfig,
    identity: DeviceIdentity,
    hub: HubClient,
    workspaces: Vec<WorkspaceEntry>,
    views: BTreeMap<String, WorkspaceView>,
    contacts: Arc<RwLock<Contacts>>,
    counters: Arc<AgentCounters>,
    /// How busy the protocol server is; hub uploads give way to it.
    serving: Arc<Serving>,
    /// The protocol server's address; `None` when peer-to-peer is off.
    listen: Option<String>,
    hub_connected: bool,
    /// (device, workspace) → the peer's compact knowledge we last pulled at.
    pulled: HashMap<(String, String), String>,
    /// Clients of peers: device → (address, key, client).
    peer_clients: HashMap<String, (String, String, HubClient)>,
    /// Per workspace: whether the watcher saw anything since the last scan began.
    dirty: HashMap<String, Arc<AtomicBool>>,
    /// Contents fetched while another device uploads them.
    early: Arc<Early>,
}

impl Agent {
    fn entry(&self, ws: &str) -> Option<WorkspaceEntry> {
        self.workspaces.iter().find(|w| w.id == ws).cloned()
    }

    /// Whether `ws` needs a scan before others' changes are applied; a scan about to start
    /// clears it (events from then on mark it again). Unwatched workspaces always do.
    fn take_dirty(&self, ws: &str) -> bool {
        self.dirty
            .get(ws)
            .is_none_or(|flag| flag.swap(false, Ordering::AcqRel))
    }

    fn refresh(&mut self, ws: &str) {
        let Some(entry) = self.entry(ws) else { return };
        match compact_knowledge(&self.device.device_name, &entry) {
            Ok(compact) => self.views.entry(ws.to_owned()).or_default().ours = compact,
            Err(error) => {
                tracing::warn!(workspace = %entry.name, %error, "cannot read the replica")
            }
        }
    }

    fn ours(&self, ws: &str) -> String {
        self.views
            .get(ws)
            .map(|v| v.ours.clone())
            .unwrap_or_default()
    }

    fn presence(&self) -> PresenceUpdate {
        PresenceUpdate {
            status: self.home.availability().unwrap_or(Availability::Online),
            addresses: self.listen.iter().cloned().collect(),
            workspaces: self
                .views
                .iter()
                .map(|(ws, view)| shoal_protocol::WorkspaceKnowledge {
                    workspace: ws.clone(),
                    compact: view.ours.clone(),
                })
                .collect(),
        }
    }

    fn publish_presence(&mut self) {
        if !self.hub_connected {
            return;
        }
        if let Err(error) = self.hub.update_presence(&self.presence()) {
            tracing::debug!(%error, "cannot update presence");
        }
    }

    fn peer_client(&mut self, peer: &PeerPresence) -> Option<HubClient> {
        let (address, key) = (peer.addresses.first()?.clone(), peer.key.clone()?);
        if let Some((a, k, client)) = self.peer_clients.get(&peer.device)
            && *a == address
            && *k == key
        {
            return Some(client.clone());
        }
        match crate::peer_client(&address, &self.identity, &key) {
            Ok(client) => {
                self.peer_clients
                    .insert(peer.device.clone(), (address, key, client.clone()));
                Some(client)
            }
            Err(error) => {
                tracing::warn!(%error, "cannot make a peer client");
                None
            }
        }
    }

    /// Clients of the online peers that can be called directly and hold what the hub holds
    /// of `ws` (same compact knowledge, so every content the hub sends is theirs too): content
    /// comes from them before the hub. A peer missing a content would cost a request per file.
    fn nearby(&mut self, ws: &str) -> Vec<HubClient> {
        let Some(hub) = self.views.get(ws).and_then(|v| v.hub.clone()) else {
            return Vec::new();
        };
        if self.listen.is_none() {
            return Vec::new();
        }
        let peers = self
            .contacts
            .read()
            .map(|c| c.reachable(ws))
            .unwrap_or_default();
        let me = self.device.device.clone();
        peers
            .iter()
            .filter(|p| p.device != me && p.status != Availability::Offline)
            .filter(|p| {
                p.workspaces
                    .iter()
                    .any(|w| w.workspace == ws && w.compact == hub)
            })
            .filter_map(|p| self.peer_client(p))
            .collect()
    }

    /// Whether an online peer sharing `ws` can pull from this device directly.
    fn peers_can_pull(&self, ws: &str) -> bool {
        self.listen.is_some()
            && self.contacts.read().is_ok_and(|c| {
                c.reachable(ws)
                    .iter()
                    .any(|p| p.device != self.device.device && p.status != Availability::Offline)
            })
    }

    fn contacts_sharing(&self, ws: &str) -> Vec<PeerPresence> {
        self.contacts
            .read()
            .map(|c| c.sharing(ws))
            .unwrap_or_default()
    }

    /// What it takes to tell the other devices sharing `ws` something.
    fn teller(&mut self, ws: &str) -> Teller {
        let own = self.device.device.clone();
        let recipients = self
            .contacts_sharing(ws)
            .into_iter()
            .filter(|peer| peer.device != own)
            .map(|peer| Recipient {
                direct: self.peer_client(&peer),
                online: peer.status != Availability::Offline,
                device: peer.device,
            })
            .collect();
        Teller {
            recipients,
            hub: self.hub_connected.then(|| self.hub.clone()),
            counters: self.counters.clone(),
        }
    }

    /// Tells the devices sharing `ws` this device's knowledge, if it changed since last told.
    fn announce(&mut self, ws: &str) {
        let ours = self.ours(ws);
        if self.views.get(ws).is_some_and(|v| v.announced == ours) {
            return;
        }
        if self.listen.is_none() {
            // Hub-only: the hub tells the others once this device uploads.
            self.views.entry(ws.to_owned()).or_default().announced = ours;
            self.publish_presence();
            return;
        }
        let message = Negotiation {
            workspace: ws.to_owned(),
            compact: ours.clone(),
            to: Vec::new(),
            changing: Vec::new(),
        };
        let relayed = self.teller(ws).tell(message);
        tracing::debug!(workspace = %ws, relay = relayed, "announced");
        self.views.entry(ws.to_owned()).or_default().announced = ours;
        self.publish_presence();
    }

    /// After a change of our knowledge: a hub sync soon if the hub does not hold it.
    fn after_change(&mut self, ws: &str, hub_delay: Duration) {
        self.announce(ws);
        let ours = self.ours(ws);
        let view = self.views.entry(ws.to_owned()).or_default();
        if view.hub.as_deref() != Some(ours.as_str()) && view.hub_due.is_none() {
            view.hub_due = Some(Instant::now() + hub_delay);
        }
    }

    fn on_files(&mut self, ws: &str) {
        let Some(entry) = self.entry(ws) else { return };
        let before = self.ours(ws);
        self.take_dirty(ws);
        // Before the scan reads a large changed file again, the others may start copying
        // their version of it, to build the new one in.
        let heads_up = HeadsUp {
            workspace: ws.to_owned(),
            compact: before.clone(),
            teller: Mutex::new(Some(self.teller(ws)).filter(|t| !t.recipients.is_empty())),
            sending: Mutex::new(None),
        };
        let scanned = scan_workspace(&self.device, &entry, &heads_up);
        // Sent before what the scan found is announced, so that it arrives first.
        heads_up.wait();
        if let Err(error) = scanned {
            tracing::warn!(workspace = %entry.name, %error, "scan failed");
            return;
        }
        self.refresh(ws);
        if self.ours(ws) != before {
            // Peers first (the shortest way), then the hub: a peer that can pull directly
            // gets a head start, and the upload gives way while it pulls.
            let delay = if self.peers_can_pull(ws) {
                PEERS_HEAD_START
            } else {
                Duration::ZERO
            };
            self.after_change(ws, delay);
        }
    }

    /// A peer's knowledge of `ws` is `compact`: pull from it if ours differs.
    fn on_peer(&mut self, ws: &str, device: &str, compact: &str) {
        if let Ok(mut contacts) = self.contacts.write() {
            contacts.set_compact(device, ws, compact);
        }
        let key = (device.to_owned(), ws.to_owned());
        if self.entry(ws).is_none()
            || compact == self.ours(ws)
            || self.pulled.get(&key).map(String::as_str) == Some(compact)
        {
            return;
        }
        let peer = self
            .contacts
            .read()
            .ok()
            .and_then(|c| c.get(device).cloned())
            .filter(|_| self.listen.is_some());
        let client = peer.as_ref().and_then(|p| self.peer_client(p));
        let Some((client, entry)) = client.zip(self.entry(ws)) else {
            // Not reachable directly: the hub carries it.
            self.schedule_hub(ws, Duration::ZERO);
            return;
        };
        let before = self.ours(ws);
        let started = Instant::now();
        AgentCounters::bump(&self.counters.peer_pulls, 1);
        let scan_first = self.take_dirty(ws);
        match pull_from_peer_with(
            &self.device,
            &entry,
            &client,
            &NoProgress,
            scan_first,
            Some(&self.early),
        ) {
            Ok(report) => {
                tracing::info!(
                    workspace = %entry.name,
                    peer = %device,
                    downloaded = report.downloaded,
                    conflicts = report.conflicts,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "pulled from a peer"
                );
                self.pulled.insert(key, compact.to_owned());
                self.refresh(ws);
                if self.ours(ws) != before {
                    // The author normally brings the hub up to date (after its peers have
                    // pulled): check a while later, or both would upload the same versions.
                    // Its upload takes about as long as our pull did.
                    let wait = AUTHOR_UPLOADS_FIRST.max(started.elapsed().saturating_mul(2));
                    self.views.entry(ws.to_owned()).or_default().others_until =
                        Some(Instant::now() + wait);
                    self.after_change(ws, wait);
                }
            }
            Err(error) => {
                tracing::info!(workspace = %entry.name, peer = %device, %error, "cannot pull from a peer; using the hub");
                self.schedule_hub(ws, Duration::ZERO);
            }
        }
    }

    fn on_presence(&mut self, presence: PeerPresence) {
        tracing::debug!(device = %presence.device_name, status = ?presence.status, workspaces = presence.workspaces.len(), addresses = presence.addresses.len(), "presence");
        let device = presence.device.clone();
        let online = presence.status != Availability::Offline;
        let shared = presence.workspaces.clone();
        let list = self.contacts.write().ok().map(|mut contacts| {
            contacts.update(presence);
            contacts.list()
        });
        if let Some(list) = list
            && let Err(error) = self.home.save_peers(&list)
        {
            tracing::debug!(%error, "cannot save contacts");
        }
        if online && device != self.device.device {
            for entry in shared {
                self.on_peer(&entry.workspace, &device, &entry.compact);
            }
        }
    }

    fn on_hub(&mut self, ws: &str, compact: &str) {
        if self.entry(ws).is_none() {
            return;
        }
        let ours = self.ours(ws);
        let view = self.views.entry(ws.to_owned()).or_default();
        view.hub = Some(compact.to_owned());
        if compact == ours {
            return;
        }
        // A reachable peer that already holds what the hub holds is nearer: pull from it, and
        // the hub session is then only needed if something is left.
        let nearer = self.contacts.read().ok().and_then(|c| {
            c.reachable(ws)
                .into_iter()
                .filter(|p| p.device != self.device.device && p.status != Availability::Offline)
                .find(|p| {
                    p.workspaces
                        .iter()
                        .any(|w| w.workspace == ws && w.compact == compact)
                })
                .map(|p| p.device)
        });
        if let Some(device) = nearer
            && self.listen.is_some()
        {
            self.on_peer(ws, &device, compact);
        }
        if self.ours(ws) != compact {
            self.schedule_hub(ws, Duration::ZERO);
        }
    }

    /// Another device is uploading large contents to `ws`: fetch them as they reach the hub,
    /// so that the download after the commit finds them here.
    fn on_arriving(&mut self, ws: &str, contents: &[String]) {
        let Some(entry) = self.entry(ws) else { return };
        if !entry.hubs_or(&self.device.hub).contains(&self.device.hub) {
            return;
        }
        let hashes: Vec<ContentHash> = contents
            .iter()
            .filter_map(|h| shoal_protocol::parse_hash(h).ok())
            .collect();
        self.early.start(&self.hub, ws, &entry.path, hashes);
    }

    fn on_changing(&mut self, ws: &str, paths: &[String]) {
        let Some(entry) = self.entry(ws) else { return };
        self.early.bases.start(ws, &entry.path, paths);
    }

    fn schedule_hub(&mut self, ws: &str, delay: Duration) {
        let view = self.views.entry(ws.to_owned()).or_default();
        let at = Instant::now() + delay;
        view.hub_due = Some(view.hub_due.map_or(at, |due| due.min(at)));
    }

    fn hub_sync(&mut self, ws: &str) {
        let Some(entry) = self.entry(ws) else { return };
        let ours = self.ours(ws);
        let view = self.views.entry(ws.to_owned()).or_default();
        view.hub_due = None;
        if let Some(hub) = &view.hub
            && (hub == &ours || view.hub_synced.as_ref() == Some(&(ours.clone(), hub.clone())))
        {
            return;
        }
        let started = Instant::now();
        // Other hubs holding the workspace (partnered hubs) follow the main one, each
        // carrying only the replica's knowledge.
        for hub in entry.hubs_or(&self.device.hub) {
            if hub == self.device.hub {
                continue;
            }
            AgentCounters::bump(&self.counters.hub_sessions, 1);
            let other = self
                .home
                .login_for(&hub)
                .and_then(|login| sync_workspace(&login, &entry, &NoProgress));
            if let Err(error) = other {
                tracing::warn!(workspace = %entry.name, %hub, %error, "sync with another hub failed");
            }
        }
        if !entry.hubs_or(&self.device.hub).contains(&self.device.hub) {
            self.refresh(ws);
            return;
        }
        AgentCounters::bump(&self.counters.hub_sessions, 1);
        let peers = self.nearby(ws);
        let scan_first = self.take_dirty(ws);
        let deadline = Instant::now() + HUB_GIVES_WAY_MAX;
        let serving = self.serving.clone();
        let give_way = move || serving.give_way(deadline);
        // Right after a pull from a peer, what came from it is its author's to upload.
        let others_until = self
            .views
            .get(ws)
            .and_then(|v| v.others_until)
            .filter(|until| *until > Instant::now());
        let options = SyncOptions {
            scan_first,
            give_way: &give_way,
            own_versions_only: others_until.is_some(),
            early: Some(&self.early),
        };
        let result = sync_workspace_scanning(&self.device, &entry, &peers, &NoProgress, &options);
        let mut record = self.home.sync_record(ws).unwrap_or_default();
        record.at = now_ns();
        match result {
            Ok(report) => {
                tracing::info!(
                    workspace = %entry.name,
                    uploaded = report.uploaded,
                    downloaded = report.downloaded,
                    conflicts = report.conflicts,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "synced with the hub"
                );
                record = SyncRecord {
                    at: record.at,
                    last_success: Some(record.at),
                    error: None,
                    hub_tag: Some(report.hub_tag.clone()),
                };
                let before = ours;
                self.refresh(ws);
                let now_ours = self.ours(ws);
                let view = self.views.entry(ws.to_owned()).or_default();
                view.hub = Some(report.hub_tag.clone());
                view.hub_backoff = None;
                match others_until {
                    // Others' versions held back: a full sync once their authors had time.
                    Some(until) => {
                        view.hub_due = Some(view.hub_due.map_or(until, |due| due.min(until)));
                    }
                    None => view.hub_synced = Some((now_ours.clone(), report.hub_tag)),
                }
                if now_ours != before {
                    self.announce(ws);
                }
            }
            Err(error) => {
                let waiting = !self.hub_connected && error.is_transient();
                let view = self.views.entry(ws.to_owned()).or_default();
                let delay = view.hub_backoff.map_or(Duration::from_millis(500), |d| {
                    (d * 2).min(Duration::from_secs(30))
                });
                view.hub_backoff = Some(delay);
                // With the hub gone, its return (the presence stream reconnecting and sending
                // its knowledge) starts the next attempt; no need to knock meanwhile.
                view.hub_due = (!waiting).then(|| Instant::now() + delay);
                tracing::warn!(workspace = %entry.name, %error, retry_in_ms = delay.as_millis() as u64, "sync with the hub failed");
                record.error = Some(error.to_string());
            }
        }
        self.early.sweep();
        if let Err(error) = self.home.save_sync_record(ws, &record) {
            tracing::warn!(%error, "cannot save the sync record");
        }
    }

    fn on_hub_connected(&mut self) {
        self.hub_connected = true;
        if let Err(error) = self.hub.set_device_key(&self.identity.fingerprint()) {
            tracing::warn!(%error, "cannot register this device's key with the hub");
        }
        self.publish_presence();
    }

    fn save_state(&self, last: &mut Option<AgentState>) {
        let state = AgentState {
            listen: self.listen.clone().unwrap_or_default(),
            key: self.identity.fingerprint(),
            counters: Counters {
                early_fetched: self.early.fetched.load(Ordering::Relaxed),
                early_claimed: self.early.claimed.load(Ordering::Relaxed),
                bases_copied: self.early.bases.copied.load(Ordering::Relaxed),
                bases_used: self.early.bases.used.load(Ordering::Relaxed),
                ..self.counters.snapshot()
            },
        };
        if last.as_ref() != Some(&state) {
            if let Err(error) = self.home.save_agent_state(&state) {
                tracing::debug!(%error, "cannot save the agent state");
            }
            *last = Some(state);
        }
    }
}

/// Runs until the process is stopped.
pub fn run_agent(home: &Home, options: &AgentOptions) -> Result<(), AgentError> {
    let device = home.device()?;
    let workspaces = home.workspaces()?;
    let identity = home.identity()?;
    let (signals, inbox) = mpsc::channel::<Signal>();
    let hub = HubClient::new(&device.hub, Some(&device.token))?.for_device(&device.device);
    let contacts = Arc::new(RwLock::new(Contacts::from_list(home.peers()?)));
    let counters = Arc::new(AgentCounters::default());
    let serving = Arc::new(Serving::default());

    let server = crate::peer::PeerServer::new(
        &workspaces,
        &device.device_name,
        contacts.clone(),
        signals.clone(),
        counters.clone(),
        serving.clone(),
    );
    let bound = if options.peers {
        Some(crate::peer::start(server, &identity, options.listen)?)
    } else {
        None
    };

    let mut _folder_watches = Vec::new();
    let mut dirty = HashMap::new();
    for workspace in &workspaces {
        crate::early::clear(&workspace.path);
        // Unscanned at start: changes made while the agent was not running.
        let flag = Arc::new(AtomicBool::new(true));
        _folder_watches.push(watch(workspace, signals.clone(), flag.clone())?);
        dirty.insert(workspace.id.clone(), flag);
    }
    let _home_watch = watch_availability(home, signals.clone())?;
    {
        let (client, sender) = (hub.clone(), signals.clone());
        std::thread::spawn(move || listen_presence(client, sender));
    }

    let mut agent = Agent {
        home: home.clone(),
        device: device.clone(),
        identity,
        hub,
        workspaces: workspaces.clone(),
        views: BTreeMap::new(),
        contacts,
        counters,
        serving,
        listen: bound.map(|b| b.to_string()),
        hub_connected: false,
        pulled: HashMap::new(),
        peer_clients: HashMap::new(),
        dirty,
        early: Arc::default(),
    };
    for workspace in &workspaces {
        agent.refresh(&workspace.id);
        // Changes made while the agent was not running.
        let _ = signals.send(Signal::Files {
            workspace: workspace.id.clone(),
            queued: None,
            writes: None,
        });
    }
    let mut last_state = None;
    agent.save_state(&mut last_state);
    let serving = bound.map_or_else(
        || "not serving peers".to_owned(),
        |b| format!("serving peers on {b}"),
    );
    tracing::info!(workspaces = workspaces.len(), hub = %device.hub, %serving, "agent running");
    println!(
        "shoal agent running with {} workspace(s), {serving}",
        workspaces.len()
    );

    let mut next_rescan = Instant::now() + options.rescan;
    loop {
        let next_hub = agent.views.values().filter_map(|v| v.hub_due).min();
        let tick = Instant::now() + Duration::from_secs(1);
        let wake = [Some(next_rescan), next_hub, Some(tick)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(tick);
        let mut signalled = FileSignals::default();
        let mut other = Vec::new();
        match inbox.recv_timeout(wake.saturating_duration_since(Instant::now())) {
            Ok(Signal::Files {
                workspace,
                queued,
                writes,
            }) => {
                signalled.take(workspace, queued, writes);
                // Coalesce a burst of file events until the folder is quiet; keep other
                // signals for after.
                let cap = Instant::now() + options.debounce_max;
                let mut quiet_until = Instant::now() + signalled.quiet_for(options);
                while let Ok(signal) = inbox.recv_timeout(
                    quiet_until
                        .min(cap)
                        .saturating_duration_since(Instant::now()),
                ) {
                    match signal {
                        Signal::Files {
                            workspace,
                            queued,
                            writes,
                        } => {
                            signalled.take(workspace, queued, writes);
                            quiet_until = Instant::now() + signalled.quiet_for(options);
                        }
                        signal => other.push(signal),
                    }
                }
            }
            Ok(signal) => other.push(signal),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
        // Whatever else is waiting is handled in this same turn, and only the latest knowledge
        // each side reported counts: a long round queues an event per commit it made, and
        // acting on each stale one would start a round of its own.
        while let Ok(signal) = inbox.try_recv() {
            match signal {
                Signal::Files {
                    workspace,
                    queued,
                    writes,
                } => signalled.take(workspace, queued, writes),
                signal => other.push(signal),
            }
        }
        let mut files = signalled.workspaces;
        let other = latest_knowledge_only(other);
        let now = Instant::now();
        if now >= next_rescan {
            files.extend(workspaces.iter().map(|w| w.id.clone()));
            next_rescan = now + options.rescan;
        }
        // What others said first (it arrived first, or during the debounce), so a change is
        // announced to the contacts as they are now.
        for signal in other {
            match signal {
                Signal::Files { workspace, .. } => agent.on_files(&workspace),
                Signal::Hub { workspace, compact } => agent.on_hub(&workspace, &compact),
                Signal::Peer {
                    workspace,
                    device,
                    compact,
                } => agent.on_peer(&workspace, &device, &compact),
                Signal::Presence(presence) => agent.on_presence(presence),
                Signal::HubConnected => agent.on_hub_connected(),
                Signal::HubLost => agent.hub_connected = false,
                Signal::Availability => agent.publish_presence(),
                Signal::Arriving {
                    workspace,
                    contents,
                } => agent.on_arriving(&workspace, &contents),
                Signal::Changing { workspace, paths } => agent.on_changing(&workspace, &paths),
            }
        }
        for ws in files {
            agent.on_files(&ws);
        }
        let due: Vec<String> = agent
            .views
            .iter()
            .filter(|(_, v)| v.hub_due.is_some_and(|at| at <= Instant::now()))
            .map(|(ws, _)| ws.clone())
            .collect();
        for ws in due {
            agent.hub_sync(&ws);
        }
        agent.early.bases.sweep();
        agent.save_state(&mut last_state);
    }
}

/// Another device sharing a workspace, as this one can reach it.
struct Recipient {
    device: String,
    online: bool,
    /// A client calling it directly, when it can be.
    direct: Option<HubClient>,
}

/// Tells the other devices sharing a workspace: directly where it can, through the hub to the
/// others online.
struct Teller {
    recipients: Vec<Recipient>,
    hub: Option<HubClient>,
    counters: Arc<AgentCounters>,
}

impl Teller {
    /// Sends `message`; returns how many devices it asked the hub to relay it to.
    fn tell(&self, message: Negotiation) -> usize {
        let mut relay = Vec::new();
        for recipient in &self.recipients {
            let direct = recipient
                .direct
                .as_ref()
                .map(|client| client.negotiate(&message, false));
            match direct {
                Some(Ok(())) => AgentCounters::bump(&self.counters.negotiations_sent, 1),
                _ if recipient.online => relay.push(recipient.device.clone()),
                _ => {}
            }
        }
        let count = relay.len();
        if let Some(hub) = self.hub.as_ref().filter(|_| !relay.is_empty()) {
            let relayed = Negotiation {
                to: relay,
                ..message
            };
            match hub.negotiate(&relayed, true) {
                Ok(()) => AgentCounters::bump(&self.counters.negotiations_sent, 1),
                Err(error) => tracing::warn!(%error, "cannot relay a negotiation"),
            }
        }
        count
    }
}

/// Watches a scan for large files changed in place, and tells the other devices of them
/// (`Negotiation::changing`) while the scan reads them, once per scan.
struct HeadsUp {
    workspace: String,
    /// This device's knowledge before the scan: the heads-up carries no change yet.
    compact: String,
    teller: Mutex<Option<Teller>>,
    /// The thread sending it: a peer that does not answer holds it, not the scan.
    sending: Mutex<Option<std::thread::JoinHandle<usize>>>,
}

impl HeadsUp {
    /// Waits until the heads-up, if any, is sent.
    fn wait(&self) {
        let sending = self
            .sending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(sending) = sending {
            let _ = sending.join();
        }
    }
}

impl shoal_folder::Progress for HeadsUp {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}

    fn rereading(&self, files: &[(&str, u64)]) {
        let changing: Vec<String> = files
            .iter()
            .filter(|(_, size)| *size >= crate::basis::BASIS_MIN)
            .map(|(path, _)| (*path).to_owned())
            .take(shoal_protocol::CHANGING_MAX)
            .collect();
        let teller = self
            .teller
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let Some(teller) = teller.filter(|_| !changing.is_empty() && !self.compact.is_empty())
        else {
            return;
        };
        tracing::debug!(workspace = %self.workspace, files = changing.len(), "telling of files changing");
        let message = Negotiation {
            workspace: self.workspace.clone(),
            compact: self.compact.clone(),
            to: Vec::new(),
            changing,
        };
        let spawned = std::thread::Builder::new()
            .name("heads-up".into())
            .spawn(move || teller.tell(message));
        match spawned {
            Ok(handle) => {
                *self
                    .sending
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(handle);
            }
            Err(error) => tracing::debug!(%error, "cannot send a heads-up"),
        }
    }
}

/// Drops every hub or peer knowledge report that a later one from the same side, about the
/// same workspace, supersedes; the order of what is left is kept.
fn latest_knowledge_only(signals: Vec<Signal>) -> Vec<Signal> {
    let key = |signal: &Signal| match signal {
        Signal::Hub { workspace, .. } => Some((workspace.clone(), None)),
        Signal::Peer {
            workspace, device, ..
        } => Some((workspace.clone(), Some(device.clone()))),
        _ => None,
    };
    let mut seen = HashSet::new();
    let mut kept: Vec<Signal> = signals
        .into_iter()
        .rev()
        .filter(|signal| key(signal).is_none_or(|k| seen.insert(k)))
        .collect();
    kept.reverse();
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(ws: &str, compact: &str) -> Signal {
        Signal::Hub {
            workspace: ws.into(),
            compact: compact.into(),
        }
    }

    fn peer(ws: &str, device: &str, compact: &str) -> Signal {
        Signal::Peer {
            workspace: ws.into(),
            device: device.into(),
            compact: compact.into(),
        }
    }

    fn describe(signals: &[Signal]) -> Vec<String> {
        signals
            .iter()
            .map(|s| match s {
                Signal::Hub { workspace, compact } => format!("hub {workspace} {compact}"),
                Signal::Peer {
                    workspace,
                    device,
                    compact,
                } => format!("peer {workspace} {device} {compact}"),
                Signal::HubConnected => "connected".into(),
                _ => "other".into(),
            })
            .collect()
    }

    #[test]
    fn only_the_latest_knowledge_of_each_side_is_acted_on() {
        let signals = vec![
            hub("w", "1"),
            peer("w", "phone", "a"),
            hub("w", "2"),
            hub("x", "9"),
            Signal::HubConnected,
            peer("w", "laptop", "b"),
            hub("w", "3"),
            peer("w", "phone", "c"),
        ];
        assert_eq!(
            describe(&latest_knowledge_only(signals)),
            [
                "hub x 9",
                "connected",
                "peer w laptop b",
                "hub w 3",
                "peer w phone c"
            ]
        );
    }
}
