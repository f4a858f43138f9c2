//! Presence: which devices are connected, where peers can reach them and what they know of
//! each workspace, and the streams that tell each device about its contacts.
//!
//! Held in memory only: after a restart every device reconnects and says it again. A contact
//! is a device whose user shares at least one joined workspace with the receiver's user, and it
//! is shown only the entries for the workspaces the two share.
//!
//! Lock order: the accounts lock (callers pass `&Accounts`), then the presence state.

use std::collections::{BTreeMap, HashMap, HashSet, btree_map};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use shoal_core::ContentHash;
use shoal_protocol::{
    Availability, PeerPresence, PresenceEvent, PresenceUpdate, WorkspaceKnowledge, hex16, hex32,
};
use tokio::sync::mpsc;

use crate::HubError;
use crate::accounts::{Accounts, DeviceCard};

/// Events a stream may hold unread beyond its snapshot. A stream further behind is ended
/// (events would be lost); its device reconnects and gets a fresh snapshot.
const STREAM_BACKLOG: usize = 256;
/// At most this many addresses per device.
pub(crate) const MAX_ADDRESSES: usize = 16;
/// At most this many devices named in one relayed negotiation.
pub(crate) const MAX_RECIPIENTS: usize = 1024;
/// The `from` of negotiation messages about the hub's own replica.
pub(crate) const FROM_HUB: &str = "hub";

/// A checked presence document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Document {
    status: Availability,
    addresses: Vec<String>,
    knowledge: BTreeMap<[u8; 16], String>,
}

impl Document {
    /// Checks an update from a device whose user has joined `joined`: 400 for malformed
    /// addresses or compact knowledge, 404 for a workspace the user is not a member of.
    pub(crate) fn parse(
        update: PresenceUpdate,
        joined: &HashSet<[u8; 16]>,
    ) -> Result<Document, HubError> {
        if update.addresses.len() > MAX_ADDRESSES {
            return Err(HubError::BadRequest(format!(
                "{} addresses; at most {MAX_ADDRESSES}",
                update.addresses.len()
            )));
        }
        let mut addresses = Vec::with_capacity(update.addresses.len());
        for address in &update.addresses {
            let parsed: SocketAddr = address.parse().map_err(|_| {
                HubError::BadRequest(format!(
                    "address {:?} is not host:port with an IP address",
                    shorten(address)
                ))
            })?;
            addresses.push(parsed.to_string());
        }
        let mut knowledge = BTreeMap::new();
        for entry in &update.workspaces {
            // Same answer as for every workspace route: a non-member learns nothing.
            let workspace = hex::<16>(&entry.workspace)
                .filter(|id| joined.contains(id))
                .ok_or(HubError::NotFound)?;
            knowledge.insert(workspace, parse_compact(&entry.compact)?);
        }
        Ok(Document {
            status: update.status,
            addresses,
            knowledge,
        })
    }
}

/// A compact knowledge (64 hex digits), in lower case.
pub(crate) fn parse_compact(text: &str) -> Result<String, HubError> {
    hex::<32>(text).map(|bytes| hex32(&bytes)).ok_or_else(|| {
        HubError::BadRequest(format!(
            "compact: expected 64 hex digits, got {:?}",
            shorten(text)
        ))
    })
}

/// A device or workspace id (32 hex digits).
pub(crate) fn parse_id(field: &str, text: &str) -> Result<[u8; 16], HubError> {
    hex::<16>(text).ok_or_else(|| {
        HubError::BadRequest(format!(
            "{field}: expected 32 hex digits, got {:?}",
            shorten(text)
        ))
    })
}

fn shorten(text: &str) -> String {
    text.chars().take(80).collect()
}

/// Strict hex: exactly `2 * N` digits, nothing else (not even a sign).
fn hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digits = text.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let value = |d: u8| (d as char).to_digit(16).map(|v| v as u8);
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = value(pair[0])? << 4 | value(pair[1])?;
    }
    Some(out)
}

/// One open presence stream, as the hub hands it to the HTTP layer.
pub(crate) struct Subscription {
    /// Its events, snapshot first.
    pub(crate) events: mpsc::Receiver<PresenceEvent>,
    /// Set when events were dropped because the stream fell behind: it must end.
    pub(crate) overflowed: Arc<AtomicBool>,
    /// The stream's number, for [`Presence::disconnect`] and [`Presence::send_hub_tags`].
    pub(crate) stream: u64,
}

struct Stream {
    sender: mpsc::Sender<PresenceEvent>,
    overflowed: Arc<AtomicBool>,
    /// Workspaces whose hub tag this stream already got live: the snapshot's tag, read
    /// earlier, must not follow and contradict it.
    hub_told: HashSet<[u8; 16]>,
}

impl Stream {
    fn send(&self, event: &PresenceEvent) -> bool {
        match self.sender.try_send(event.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.overflowed.store(true, Ordering::Relaxed);
                false
            }
            // Its HTTP response is gone; `disconnect` removes it shortly.
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// What the hub knows of one device it has seen since it started.
struct Entry {
    card: DeviceCard,
    /// The status of its last update (none yet: online while connected).
    status: Option<Availability>,
    addresses: Vec<String>,
    knowledge: BTreeMap<[u8; 16], String>,
    streams: HashMap<u64, Stream>,
}

impl Entry {
    fn new(card: DeviceCard) -> Entry {
        Entry {
            card,
            status: None,
            addresses: Vec::new(),
            knowledge: BTreeMap::new(),
            streams: HashMap::new(),
        }
    }

    fn connected(&self) -> bool {
        !self.streams.is_empty()
    }

    /// The device as a contact sharing `shared` sees it.
    fn view(&self, device: &[u8; 16], shared: &HashSet<[u8; 16]>) -> PeerPresence {
        let connected = self.connected();
        PeerPresence {
            device: hex16(device),
            device_name: self.card.name.clone(),
            user: self.card.user_name.clone(),
            key: self.card.key.clone(),
            status: match self.status {
                _ if !connected => Availability::Offline,
                Some(status) => status,
                None => Availability::Online,
            },
            addresses: if connected {
                self.addresses.clone()
            } else {
                Vec::new()
            },
            workspaces: self
                .knowledge
                .iter()
                .filter(|(workspace, _)| shared.contains(*workspace))
                .map(|(workspace, compact)| WorkspaceKnowledge {
                    workspace: hex16(workspace),
                    compact: compact.clone(),
                })
                .collect(),
        }
    }

    /// Queues an event on every stream; true if at least one took it.
    fn send(&self, event: &PresenceEvent) -> bool {
        // Every stream gets it: no short cut after the first.
        self.streams
            .values()
            .filter(|stream| stream.send(event))
            .count()
            > 0
    }
}

/// Users' joined workspaces, read once per operation.
struct Joined<'a> {
    accounts: &'a Accounts,
    users: HashMap<i64, HashSet<[u8; 16]>>,
}

impl<'a> Joined<'a> {
    fn new(accounts: &'a Accounts) -> Joined<'a> {
        Joined {
            accounts,
            users: HashMap::new(),
        }
    }

    fn of(&mut self, user: i64) -> Result<&HashSet<[u8; 16]>, HubError> {
        if !self.users.contains_key(&user) {
            let workspaces = self.accounts.joined_workspaces(user)?;
            self.users.insert(user, workspaces);
        }
        self.users
            .get(&user)
            .ok_or_else(|| HubError::Internal("membership cache".into()))
    }

    /// The workspaces two users share.
    fn shared(&mut self, a: i64, b: i64) -> Result<HashSet<[u8; 16]>, HubError> {
        let first = self.of(a)?.clone();
        Ok(self.of(b)?.intersection(&first).copied().collect())
    }
}

#[derive(Default)]
struct State {
    devices: BTreeMap<[u8; 16], Entry>,
    next_stream: u64,
}

impl State {
    /// The device's entry, made from the accounts database on first sight.
    fn entry(&mut self, accounts: &Accounts, device: [u8; 16]) -> Result<&mut Entry, HubError> {
        match self.devices.entry(device) {
            btree_map::Entry::Occupied(known) => Ok(known.into_mut()),
            btree_map::Entry::Vacant(new) => {
                let card = accounts
                    .device_card(&device)?
                    .ok_or(HubError::Unauthorized)?;
                Ok(new.insert(Entry::new(card)))
            }
        }
    }

    /// Tells every connected contact of `device` its presence, limited to what they share.
    fn announce(&self, joined: &mut Joined<'_>, device: [u8; 16]) -> Result<(), HubError> {
        let Some(entry) = self.devices.get(&device) else {
            return Ok(());
        };
        for (id, other) in &self.devices {
            if *id == device || !other.connected() {
                continue;
            }
            let shared = joined.shared(entry.card.user, other.card.user)?;
            if !shared.is_empty() {
                other.send(&PresenceEvent::Peer(entry.view(&device, &shared)));
            }
        }
        Ok(())
    }
}

/// The hub's presence state.
#[derive(Default)]
pub(crate) struct Presence {
    state: Mutex<State>,
}

impl Presence {
    fn state(&self) -> Result<std::sync::MutexGuard<'_, State>, HubError> {
        self.state
            .lock()
            .map_err(|_| HubError::Internal("a previous request panicked in presence".into()))
    }

    /// Opens a stream for `device`: queues one `Peer` event per contact it has (connected or
    /// seen), and announces the device if it was not connected.
    pub(crate) fn connect(
        &self,
        accounts: &Accounts,
        device: [u8; 16],
    ) -> Result<Subscription, HubError> {
        let mut state = self.state()?;
        let mut joined = Joined::new(accounts);
        let card = accounts
            .device_card(&device)?
            .ok_or(HubError::Unauthorized)?;
        let mut snapshot = Vec::new();
        for (id, other) in &state.devices {
            if *id == device {
                continue;
            }
            let shared = joined.shared(card.user, other.card.user)?;
            if !shared.is_empty() {
                snapshot.push(PresenceEvent::Peer(other.view(id, &shared)));
            }
        }
        // Room for the whole snapshot and the hub's tags, whatever the backlog.
        let workspaces = joined.of(card.user)?.len();
        let (sender, events) = mpsc::channel(snapshot.len() + workspaces + STREAM_BACKLOG);
        for event in snapshot {
            sender
                .try_send(event)
                .map_err(|_| HubError::Internal("presence snapshot did not fit".into()))?;
        }
        let overflowed = Arc::new(AtomicBool::new(false));
        let stream = state.next_stream;
        state.next_stream += 1;
        let entry = state.entry(accounts, device)?;
        entry.card = card;
        let was_connected = entry.connected();
        entry.streams.insert(
            stream,
            Stream {
                sender,
                overflowed: overflowed.clone(),
                hub_told: HashSet::new(),
            },
        );
        if !was_connected {
            state.announce(&mut joined, device)?;
        }
        Ok(Subscription {
            events,
            overflowed,
            stream,
        })
    }

    /// Queues the hub replica's tags on a new stream (read after [`Presence::connect`], so no
    /// change is missed), except where a newer tag was already sent live.
    pub(crate) fn send_hub_tags(
        &self,
        device: [u8; 16],
        stream: u64,
        tags: &[([u8; 16], String)],
    ) -> Result<(), HubError> {
        let state = self.state()?;
        let Some(stream) = state
            .devices
            .get(&device)
            .and_then(|entry| entry.streams.get(&stream))
        else {
            return Ok(());
        };
        for (workspace, tag) in tags {
            if !stream.hub_told.contains(workspace) {
                stream.send(&PresenceEvent::Negotiate {
                    from: FROM_HUB.into(),
                    workspace: hex16(workspace),
                    compact: tag.clone(),
                    changing: Vec::new(),
                });
            }
        }
        Ok(())
    }

    /// Closes a stream; when it was the device's last, the device goes offline and forgets its
    /// addresses, and its contacts are told.
    pub(crate) fn disconnect(
        &self,
        accounts: &Accounts,
        device: [u8; 16],
        stream: u64,
    ) -> Result<(), HubError> {
        let mut state = self.state()?;
        let Some(entry) = state.devices.get_mut(&device) else {
            return Ok(());
        };
        if entry.streams.remove(&stream).is_none() || entry.connected() {
            return Ok(());
        }
        entry.addresses.clear();
        state.announce(&mut Joined::new(accounts), device)
    }

    /// Replaces a device's presence document and tells its contacts.
    pub(crate) fn update(
        &self,
        accounts: &Accounts,
        device: [u8; 16],
        document: Document,
    ) -> Result<(), HubError> {
        let mut state = self.state()?;
        let entry = state.entry(accounts, device)?;
        entry.status = Some(document.status);
        entry.addresses = document.addresses;
        entry.knowledge = document.knowledge;
        state.announce(&mut Joined::new(accounts), device)
    }

    /// Re-reads a device's key after it changed and tells its contacts, so they stop
    /// trusting the old one.
    pub(crate) fn key_changed(
        &self,
        accounts: &Accounts,
        device: [u8; 16],
    ) -> Result<(), HubError> {
        let mut state = self.state()?;
        let Some(entry) = state.devices.get_mut(&device) else {
            return Ok(());
        };
        if let Some(card) = accounts.device_card(&device)? {
            entry.card = card;
        }
        state.announce(&mut Joined::new(accounts), device)
    }

    /// Relays a negotiation message from `from` about `workspace` to the listed devices (all
    /// connected ones but the sender when `to` is empty) that are connected and whose user is
    /// a member. Returns how many devices got it.
    pub(crate) fn relay(
        &self,
        accounts: &Accounts,
        from: [u8; 16],
        workspace: [u8; 16],
        compact: &str,
        to: &[[u8; 16]],
        changing: &[String],
    ) -> Result<usize, HubError> {
        let state = self.state()?;
        let mut joined = Joined::new(accounts);
        let event = PresenceEvent::Negotiate {
            from: hex16(&from),
            workspace: hex16(&workspace),
            compact: compact.to_owned(),
            changing: changing.to_vec(),
        };
        let targets: Vec<[u8; 16]> = if to.is_empty() {
            state
                .devices
                .keys()
                .filter(|id| **id != from)
                .copied()
                .collect()
        } else {
            let unique: HashSet<[u8; 16]> = to.iter().copied().collect();
            unique.into_iter().collect()
        };
        let mut delivered = 0;
        for id in targets {
            let Some(entry) = state.devices.get(&id).filter(|e| e.connected()) else {
                continue;
            };
            if joined.of(entry.card.user)?.contains(&workspace) && entry.send(&event) {
                delivered += 1;
            }
        }
        Ok(delivered)
    }

    /// `uploader` began uploading `contents` to `workspace`: tells the connected devices of
    /// every member but the uploader, which may fetch them as they arrive. Returns how many
    /// devices got it.
    pub(crate) fn contents_arriving(
        &self,
        accounts: &Accounts,
        uploader: [u8; 16],
        workspace: [u8; 16],
        contents: &[ContentHash],
    ) -> Result<usize, HubError> {
        if contents.is_empty() {
            return Ok(0);
        }
        let state = self.state()?;
        let mut joined = Joined::new(accounts);
        let event = PresenceEvent::Arriving {
            workspace: hex16(&workspace),
            contents: contents.iter().map(|h| hex32(&h.0)).collect(),
        };
        let mut delivered = 0;
        for (id, entry) in &state.devices {
            if *id != uploader
                && entry.connected()
                && joined.of(entry.card.user)?.contains(&workspace)
                && entry.send(&event)
            {
                delivered += 1;
            }
        }
        Ok(delivered)
    }

    /// The hub's replica of `workspace` has a new tag: tells every connected device of every
    /// member.
    pub(crate) fn hub_changed(
        &self,
        accounts: &Accounts,
        workspace: [u8; 16],
        tag: &str,
    ) -> Result<(), HubError> {
        let mut state = self.state()?;
        let mut joined = Joined::new(accounts);
        let event = PresenceEvent::Negotiate {
            from: FROM_HUB.into(),
            workspace: hex16(&workspace),
            compact: tag.to_owned(),
            changing: Vec::new(),
        };
        for entry in state.devices.values_mut() {
            if entry.connected() && joined.of(entry.card.user)?.contains(&workspace) {
                for stream in entry.streams.values_mut() {
                    stream.hub_told.insert(workspace);
                    stream.send(&event);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(workspaces: Vec<(String, String)>, addresses: &[&str]) -> PresenceUpdate {
        PresenceUpdate {
            status: Availability::Busy,
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            workspaces: workspaces
                .into_iter()
                .map(|(workspace, compact)| WorkspaceKnowledge { workspace, compact })
                .collect(),
        }
    }

    #[test]
    fn hex_is_strict() {
        assert_eq!(hex::<2>("0aFf"), Some([0x0a, 0xff]));
        assert_eq!(hex::<2>("+aff"), None);
        assert_eq!(hex::<2>("0af"), None);
        assert_eq!(hex::<2>("0afé"), None);
        assert!(parse_compact(&"AB".repeat(32)).is_ok_and(|c| c == "ab".repeat(32)));
    }

    #[test]
    fn documents_are_checked() {
        let member = [1u8; 16];
        let joined: HashSet<[u8; 16]> = [member].into();
        let ws = hex16(&member);
        let good = "0".repeat(64);
        let document = Document::parse(
            update(
                vec![(ws.clone(), good.clone())],
                &["127.0.0.1:7000", "[::1]:80"],
            ),
            &joined,
        );
        assert!(
            document.is_ok_and(|d| d.addresses == ["127.0.0.1:7000", "[::1]:80"]
                && d.knowledge.get(&member) == Some(&good))
        );
        let bad_address = Document::parse(update(vec![], &["example.com:80"]), &joined);
        assert!(matches!(bad_address, Err(HubError::BadRequest(_))));
        let many: Vec<String> = (0..17).map(|i| format!("10.0.0.1:{i}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let too_many = Document::parse(update(vec![], &refs), &joined);
        assert!(matches!(too_many, Err(HubError::BadRequest(_))));
        let bad_compact = Document::parse(update(vec![(ws, "12".into())], &[]), &joined);
        assert!(matches!(bad_compact, Err(HubError::BadRequest(_))));
        let stranger = Document::parse(update(vec![(hex16(&[2; 16]), good)], &[]), &joined);
        assert!(matches!(stranger, Err(HubError::NotFound)));
    }

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    struct TwoUsers {
        accounts: Accounts,
        ann: [u8; 16],
        bob: [u8; 16],
        shared: [u8; 16],
        own: [u8; 16],
    }

    /// ann owns `shared` (bob joined) and `own`; each has one device.
    fn two_users(dir: &std::path::Path) -> Result<TwoUsers, HubError> {
        let accounts = Accounts::open(dir)?;
        accounts.add_user("ann", "ann-pw")?;
        accounts.add_user("bob", "bob-pw")?;
        let (ann, _) = accounts.login("ann", "ann-pw", "ann-pc", Some(&"aa".repeat(32)))?;
        let (bob, _) = accounts.login("bob", "bob-pw", "bob-pc", None)?;
        let user = |device| -> Result<i64, HubError> {
            Ok(accounts
                .device_card(&device)?
                .ok_or(HubError::NotFound)?
                .user)
        };
        let (ann_user, bob_user) = (user(ann)?, user(bob)?);
        let shared = accounts.create_workspace(ann_user, "shared")?.workspace;
        let own = accounts.create_workspace(ann_user, "own")?.workspace;
        accounts.invite(&shared, ann_user, "bob", crate::Role::Editor)?;
        accounts.join(&shared, bob_user)?;
        Ok(TwoUsers {
            accounts,
            ann,
            bob,
            shared,
            own,
        })
    }

    fn drain(subscription: &mut Subscription) -> Vec<PresenceEvent> {
        std::iter::from_fn(|| subscription.events.try_recv().ok()).collect()
    }

    #[test]
    fn contacts_see_only_what_they_share() -> TestResult {
        let dir = tempfile::tempdir()?;
        let TwoUsers {
            accounts,
            ann,
            bob,
            shared,
            own,
        } = two_users(dir.path())?;
        let presence = Presence::default();
        let mut bobs = presence.connect(&accounts, bob)?;
        assert!(drain(&mut bobs).is_empty());
        let mut anns = presence.connect(&accounts, ann)?;
        let update = PresenceUpdate {
            status: Availability::Away,
            addresses: vec!["127.0.0.1:9".into()],
            workspaces: [(shared, "11"), (own, "22")]
                .iter()
                .map(|(ws, c)| WorkspaceKnowledge {
                    workspace: hex16(ws),
                    compact: c.repeat(32),
                })
                .collect(),
        };
        let ann_user = accounts.device_card(&ann)?.ok_or("no ann")?.user;
        let joined = accounts.joined_workspaces(ann_user)?;
        presence.update(&accounts, ann, Document::parse(update, &joined)?)?;
        let PresenceEvent::Peer(seen) = drain(&mut bobs).pop().ok_or("no event")? else {
            return Err("not a peer event".into());
        };
        assert_eq!(seen.status, Availability::Away);
        assert_eq!(seen.key, Some("aa".repeat(32)));
        assert_eq!(seen.addresses, ["127.0.0.1:9"]);
        assert_eq!(
            seen.workspaces,
            [WorkspaceKnowledge {
                workspace: hex16(&shared),
                compact: "11".repeat(32)
            }]
        );
        // ann's snapshot had bob, online.
        let first = drain(&mut anns);
        assert!(matches!(&first[..], [PresenceEvent::Peer(p)] if p.status == Availability::Online));

        // Relays reach members only; the hub's tags reach every member's devices.
        let changing = ["videos/big.mov".to_owned()];
        assert_eq!(
            presence.relay(&accounts, ann, own, &"33".repeat(32), &[bob], &changing)?,
            0
        );
        assert_eq!(
            presence.relay(&accounts, ann, shared, &"33".repeat(32), &[], &changing)?,
            1
        );
        // The heads-up about files being read again travels with the knowledge.
        let relayed = drain(&mut bobs);
        assert!(matches!(
            &relayed[..],
            [PresenceEvent::Negotiate { changing: c, .. }] if c[..] == changing
        ));
        presence.hub_changed(&accounts, own, &"44".repeat(32))?;
        assert!(
            drain(&mut bobs).is_empty(),
            "bob is no member of ann's own workspace"
        );
        assert_eq!(drain(&mut anns).len(), 1);
        // A tag read before a live one is not sent after it.
        presence.send_hub_tags(ann, anns.stream, &[(own, "55".repeat(32))])?;
        assert!(drain(&mut anns).is_empty());

        presence.disconnect(&accounts, ann, anns.stream)?;
        let PresenceEvent::Peer(gone) = drain(&mut bobs).pop().ok_or("no event")? else {
            return Err("not a peer event".into());
        };
        assert_eq!(gone.status, Availability::Offline);
        assert!(gone.addresses.is_empty());
        Ok(())
    }

    #[test]
    fn arriving_contents_reach_the_other_members_devices_and_not_the_uploader() -> TestResult {
        let dir = tempfile::tempdir()?;
        let users = two_users(dir.path())?;
        let (accounts, ann, bob) = (&users.accounts, users.ann, users.bob);
        let (shared, own) = (users.shared, users.own);
        let presence = Presence::default();
        // Each stream starts with its snapshot, which is not what is tested here.
        let mut bobs = presence.connect(accounts, bob)?;
        let mut anns = presence.connect(accounts, ann)?;
        drain(&mut bobs);
        drain(&mut anns);
        let content = ContentHash([9; 32]);
        assert_eq!(
            presence.contents_arriving(accounts, ann, shared, &[content])?,
            1
        );
        assert!(drain(&mut anns).is_empty(), "the uploader was told");
        assert_eq!(
            drain(&mut bobs),
            [PresenceEvent::Arriving {
                workspace: hex16(&shared),
                contents: vec![hex32(&content.0)],
            }]
        );
        // bob is no member of ann's own workspace; nothing at all is not sent.
        assert_eq!(
            presence.contents_arriving(accounts, ann, own, &[content])?,
            0
        );
        assert_eq!(presence.contents_arriving(accounts, bob, shared, &[])?, 0);
        assert!(drain(&mut bobs).is_empty() && drain(&mut anns).is_empty());
        Ok(())
    }
}
