//! What a device knows of its contacts' devices (from the hub's presence stream), and the
//! agent's counters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
