//! What a device knows of its contacts' devices (from the hub's presence stream), and the
//! agent's counters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use shoal_protocol::{Availability, PeerPresence, WorkspaceKnowledge};

use crate::home::Counters;

/// Contact devices by id, as the hub last described them.
#[derive(Debug, Default)]
pub struct Contacts {
    devices: HashMap<String, PeerPresence>,
}

impl Contacts {
    /// Contacts from a saved list.
    pub fn from_list(list: Vec<PeerPresence>) -> Contacts {
        Contacts {
            devices: list.into_iter().map(|p| (p.device.clone(), p)).collect(),
        }
    }

    /// Every contact, for saving.
    pub fn list(&self) -> Vec<PeerPresence> {
        let mut list: Vec<PeerPresence> = self.devices.values().cloned().collect();
        list.sort_by(|a, b| a.device.cmp(&b.device));
        list
    }

    /// Takes in what the hub says about a device. A device the hub calls offline keeps its
    /// last addresses and workspaces: it may still be reachable directly (the hub itself may
    /// be the one that is gone).
    pub fn update(&mut self, mut presence: PeerPresence) {
        if presence.status == Availability::Offline
            && let Some(known) = self.devices.get(&presence.device)
        {
            if presence.addresses.is_empty() {
                presence.addresses = known.addresses.clone();
            }
            if presence.workspaces.is_empty() {
                presence.workspaces = known.workspaces.clone();
            }
        }
        self.devices.insert(presence.device.clone(), presence);
    }

    /// The device holding a key the hub vouched for.
    pub fn by_key(&self, key: &str) -> Option<&PeerPresence> {
        self.devices
            .values()
            .find(|p| p.key.as_deref() == Some(key))
    }

    /// A device by id.
    pub fn get(&self, device: &str) -> Option<&PeerPresence> {
        self.devices.get(device)
    }

    /// Whether `device` shares workspace `ws` with this device.
    pub fn shares(&self, device: &str, ws: &str) -> bool {
        self.devices
            .get(device)
            .is_some_and(|p| p.workspaces.iter().any(|w| w.workspace == ws))
    }

    /// Records a device's compact knowledge of a workspace it shares with us.
    pub fn set_compact(&mut self, device: &str, ws: &str, compact: &str) {
        let Some(presence) = self.devices.get_mut(device) else {
            return;
        };
        match presence.workspaces.iter_mut().find(|w| w.workspace == ws) {
            Some(entry) => compact.clone_into(&mut entry.compact),
            None => presence.workspaces.push(WorkspaceKnowledge {
                workspace: ws.to_owned(),
                compact: compact.to_owned(),
            }),
        }
    }

    /// Devices sharing `ws` that can be called directly (a vouched key and an address).
    pub fn reachable(&self, ws: &str) -> Vec<PeerPresence> {
        let mut found: Vec<PeerPresence> = self
            .devices
            .values()
            .filter(|p| p.key.is_some() && !p.addresses.is_empty())
            .filter(|p| p.workspaces.iter().any(|w| w.workspace == ws))
            .cloned()
            .collect();
        found.sort_by(|a, b| a.device.cmp(&b.device));
        found
    }

    /// Devices sharing `ws`.
    pub fn sharing(&self, ws: &str) -> Vec<PeerPresence> {
        let mut found: Vec<PeerPresence> = self
            .devices
            .values()
            .filter(|p| p.workspaces.iter().any(|w| w.workspace == ws))
            .cloned()
            .collect();
        found.sort_by(|a, b| a.device.cmp(&b.device));
        found
    }
}

/// How busy this device is serving peers' pulls. A hub upload gives way to it: the peer is
/// nearer and waiting now, and both compete for the same disk and cores, while the hub only
/// keeps the changes for later.
#[derive(Debug)]
pub(crate) struct Serving {
    started: Instant,
    /// Requests being answered.
    active: AtomicUsize,
    /// Pulls planned and not yet finished (their receiver is writing between requests).
    open: AtomicUsize,
    /// When the last request ended, in ms since `started`, plus one (0: never).
    last_ms: AtomicU64,
}

/// Quiet this long after a request: the next one of the same pull is usually closer.
const QUIET: Duration = Duration::from_millis(200);
/// An open pull counts as busy only while requests keep coming this often; a receiver that
/// vanished mid-pull must not hold the hub upload back.
const PULL_GAP: Duration = Duration::from_secs(3);

impl Default for Serving {
    fn default() -> Self {
        Serving {
            started: Instant::now(),
            active: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        }
    }
}

/// A request being answered; ends when dropped.
pub(crate) struct Answering<'a>(&'a Serving);

impl Drop for Answering<'_> {
    fn drop(&mut self) {
        self.0.touch();
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Serving {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.last_ms.fetch_max(self.now_ms() + 1, Ordering::Relaxed);
    }

    pub(crate) fn answering(&self) -> Answering<'_> {
        self.active.fetch_add(1, Ordering::Relaxed);
        Answering(self)
    }

    /// How many pulls are planned and not finished.
    pub(crate) fn set_open_pulls(&self, open: usize) {
        self.open.store(open, Ordering::Relaxed);
        self.touch();
    }

    pub(crate) fn busy(&self) -> bool {
        if self.active.load(Ordering::Relaxed) > 0 {
            return true;
        }
        let last = self.last_ms.load(Ordering::Relaxed);
        if last == 0 {
            return false;
        }
        let since = Duration::from_millis((self.now_ms() + 1).saturating_sub(last));
        since < QUIET || (self.open.load(Ordering::Relaxed) > 0 && since < PULL_GAP)
    }

    /// Waits while peers are being served, until `deadline` at the latest.
    pub(crate) fn give_way(&self, deadline: Instant) {
        while self.busy() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The running agent's counters, shared by its threads.
#[derive(Debug, Default)]
pub(crate) struct AgentCounters {
    pub(crate) hub_sessions: AtomicU64,
    pub(crate) peer_pulls: AtomicU64,
    pub(crate) peer_served: AtomicU64,
    pub(crate) negotiations_sent: AtomicU64,
    pub(crate) negotiations_received: AtomicU64,
    pub(crate) peer_bytes_in: AtomicU64,
    pub(crate) peer_bytes_out: AtomicU64,
    pub(crate) peer_refused: AtomicU64,
}

impl AgentCounters {
    pub(crate) fn bump(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Counters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            hub_sessions: get(&self.hub_sessions),
            peer_pulls: get(&self.peer_pulls),
            peer_served: get(&self.peer_served),
            negotiations_sent: get(&self.negotiations_sent),
            negotiations_received: get(&self.negotiations_received),
            peer_bytes_in: get(&self.peer_bytes_in),
            peer_bytes_out: get(&self.peer_bytes_out),
            peer_refused: get(&self.peer_refused),
            ..Counters::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hub_upload_gives_way_while_a_pull_is_served_and_not_after() {
        let serving = Serving {
            started: Instant::now()
                .checked_sub(Duration::from_secs(10))
                .expect("a clock past ten seconds"),
            ..Serving::default()
        };
        assert!(!serving.busy(), "nothing served yet");
        let deadline = Instant::now() + Duration::from_secs(60);
        std::thread::scope(|scope| {
            let answer = serving.answering();
            let waiter = scope.spawn(|| {
                let started = Instant::now();
                serving.give_way(deadline);
                started.elapsed()
            });
            std::thread::sleep(Duration::from_millis(150));
            assert!(
                !waiter.is_finished(),
                "gave no way while a request was answered"
            );
            drop(answer);
            let waited = waiter.join().expect("waiter");
            assert!(waited >= Duration::from_millis(150));
            assert!(
                waited < Duration::from_secs(30),
                "the quiet after a pull never came"
            );
        });
        // An open pull keeps it busy between requests, until requests stop coming.
        serving.set_open_pulls(1);
        assert!(serving.busy());
        // The last request ten seconds ago: the receiver is gone.
        serving.last_ms.store(1, Ordering::Relaxed);
        assert!(!serving.busy(), "a vanished receiver held the upload back");
        // Never past the deadline, however busy.
        let _answer = serving.answering();
        let started = Instant::now();
        serving.give_way(Instant::now() + Duration::from_millis(100));
        assert!(started.elapsed() < Duration::from_secs(30));
        assert!(serving.busy());
    }

    fn presence(
        device: &str,
        status: Availability,
        addresses: &[&str],
        ws: &[&str],
    ) -> PeerPresence {
        PeerPresence {
            device: device.into(),
            device_name: device.into(),
            user: "u".into(),
            key: Some(format!("key-{device}")),
            status,
            addresses: addresses.iter().map(|a| (*a).to_owned()).collect(),
            workspaces: ws
                .iter()
                .map(|w| WorkspaceKnowledge {
                    workspace: (*w).to_owned(),
                    compact: "c".into(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_device_the_hub_calls_offline_stays_reachable_at_its_last_address() {
        let mut contacts = Contacts::default();
        contacts.update(presence(
            "a",
            Availability::Online,
            &["127.0.0.1:1"],
            &["w"],
        ));
        contacts.update(presence("a", Availability::Offline, &[], &[]));
        let a = contacts.get("a").expect("known");
        assert_eq!(a.status, Availability::Offline);
        assert_eq!(a.addresses, vec!["127.0.0.1:1".to_owned()]);
        assert!(contacts.shares("a", "w"));
        assert_eq!(contacts.reachable("w").len(), 1);
    }

    #[test]
    fn only_vouched_keys_and_shared_workspaces_count() {
        let mut contacts = Contacts::default();
        contacts.update(presence(
            "a",
            Availability::Online,
            &["127.0.0.1:1"],
            &["w"],
        ));
        let mut keyless = presence("b", Availability::Online, &["127.0.0.1:2"], &["w"]);
        keyless.key = None;
        contacts.update(keyless);
        assert_eq!(
            contacts.by_key("key-a").map(|p| p.device.as_str()),
            Some("a")
        );
        assert!(contacts.by_key("key-b").is_none());
        assert!(!contacts.shares("a", "other"));
        // A device without a key cannot be called: it could not prove who it is.
        let reachable: Vec<String> = contacts
            .reachable("w")
            .into_iter()
            .map(|p| p.device)
            .collect();
        assert_eq!(reachable, vec!["a".to_owned()]);
        contacts.set_compact("a", "w", "new");
        assert_eq!(
            contacts.get("a").map(|p| p.workspaces[0].compact.as_str()),
            Some("new")
        );
    }
}
