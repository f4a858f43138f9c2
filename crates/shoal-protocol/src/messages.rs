//! Request and response bodies, in the order a sync uses them.

use serde::{Deserialize, Serialize};

/// A version vector: one counter per writer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireVector(pub Vec<WireDot>);

/// One writer's seen ticks: all of `1..=upto`, plus `extra`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireSeen {
    /// Writer replica id (hex).
    pub replica: String,
    /// Writer epoch.
    pub epoch: u32,
    /// Every tick up to this one was seen.
    pub upto: u64,
    /// Ticks seen above `upto`, ascending.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra: Vec<u64>,
}

/// Knowledge: what a replica has seen.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireKnowledge(pub Vec<WireSeen>);

/// A write: writer and tick.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireDot {
    /// Writer replica id (hex).
    pub replica: String,
    /// Writer epoch.
    pub epoch: u32,
    /// The writer's tick.
    pub tick: u64,
}

/// The state one version gives an item.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireEntry {
    /// Parent item id (hex; all zeros for the workspace root).
    pub parent: String,
    /// Name within the parent.
    pub name: String,
    /// `file` or `directory`.
    pub kind: String,
    /// True for a deletion.
    pub deleted: bool,
    /// Whole-content BLAKE3 hash (hex), for live files.
    #[serde(default)]
    pub content: Option<String>,
    /// Content size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Executable bit.
    pub executable: bool,
}

/// One version of one item.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireVersion {
    /// Item id (hex).
    pub item: String,
    /// Which write this is.
    pub dot: WireDot,
    /// The item's earlier writes this one supersedes.
    pub context: WireKnowledge,
    /// The resulting state.
    pub entry: WireEntry,
    /// Writer's clock at the write, nanoseconds.
    pub written_at: i64,
    /// Writer's device name.
    pub device: String,
    /// The user of the writer's device (empty: none, as in `shoal mirror`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
}

/// Batch limits one side accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireLimits {
    /// Most versions per batch.
    pub max_items: usize,
    /// Most content bytes per batch.
    pub max_bytes: u64,
}

/// Where content can be fetched or put, and how.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    /// `http` (a hub's chunks: ranged, resumable, or many in one bundle) or `peer` (a
    /// device's chunks of the contents it holds). Others are ignored.
    pub transport: String,
    /// For `http`, a URL path on the same server whose `/{chunk hash}` serves each chunk; for
    /// `peer`, one whose `/{content hash}/{chunk hash}` does.
    pub url: String,
}

/// One chunk of a content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireChunk {
    /// BLAKE3 of the chunk (hex).
    pub hash: String,
    /// Length in bytes.
    pub len: u32,
}

/// How a content is cut into chunks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireContent {
    /// Whole-content hash (hex).
    pub hash: String,
    /// Total size.
    pub size: u64,
    /// Chunks, in order.
    pub chunks: Vec<WireChunk>,
    /// True when the chunk list is left out because the receiver said it holds this content
    /// (`DownloadRequest.held`, `POST …/contents/known`); `chunks` is then empty.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
    /// A content the receiver holds (hex) when the chunk list is sent as an edit of that
    /// content's list: the runs in `copies` come from the base, `chunks` holds the rest in
    /// order. A large file changed in a few places then costs a few entries, not its whole list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// Runs of the base's chunks, in increasing `at` order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copies: Vec<WireCopy>,
}

/// A run of chunks taken from the base content's list (`WireContent.base`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireCopy {
    /// Where the run starts in the rebuilt list.
    pub at: u32,
    /// Where it starts in the base's list.
    pub from: u32,
    /// How many chunks.
    pub count: u32,
}

// ---- download --------------------------------------------------------------------------

/// `POST …/download`: the caller's knowledge; starts an enumeration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadRequest {
    /// What the caller has seen.
    pub knowledge: WireKnowledge,
    /// The caller's batch limits.
    pub limits: WireLimits,
    /// Large contents (hex) whose chunk lists the caller holds: batches name them without
    /// their chunks (`WireContent.held`), so a renamed large file costs no chunk list. At most
    /// `HELD_MAX`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<String>,
}

/// Most contents a `DownloadRequest.held` or a `ContentsKnown` may name.
pub const HELD_MAX: usize = 10_000;

/// `POST /v1/workspaces/{ws}/contents/known`: which of these contents (hex) the hub holds the
/// chunk list of; the answer is the same message with those it holds. An uploader leaves the
/// chunk lists of those out of its batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentsKnown {
    /// Content hashes (hex), at most `HELD_MAX`.
    pub contents: Vec<String>,
}

/// A batch of versions the caller lacks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireBatch {
    /// Versions in writer-then-tick order.
    pub versions: Vec<WireVersion>,
    /// Chunk lists of the contents the versions name.
    pub contents: Vec<WireContent>,
    /// Where chunks can be fetched, in order of preference.
    pub locations: Vec<Location>,
    /// What the caller knows after applying the whole batch.
    pub learned: WireKnowledge,
    /// True on the final batch.
    pub last: bool,
    /// On the final batch: tombstones the server has forgotten.
    #[serde(default)]
    pub forgotten: WireVector,
    /// URI of the next batch, if any.
    #[serde(default)]
    pub next: Option<String>,
}

/// The answer to a [`DownloadRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadResponse {
    /// The first batch (possibly empty).
    pub batch: WireBatch,
    /// Where to report per-item results.
    pub result: String,
    /// True when the caller has not seen deletions the server has forgotten: it must run a
    /// recovery compare (`POST …/recovery`) before applying batches.
    pub recovery: bool,
    /// The server's replica tag (compact knowledge, hex).
    pub tag: String,
}

/// Outcome of one item on the receiving side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemResult {
    /// The version.
    pub dot: WireDot,
    /// `applied` or `failed`.
    pub status: String,
    /// For failures: the transport error.
    #[serde(default)]
    pub error: Option<String>,
}

/// `PUT <result URI>`: what the caller now has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadResult {
    /// Per-item results.
    pub items: Vec<ItemResult>,
    /// The caller's knowledge after applying.
    pub knowledge: WireKnowledge,
}

/// `POST …/recovery`: versions the caller holds whose dots the server has seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryRequest {
    /// Candidate (item, dot) pairs.
    pub candidates: Vec<ItemDot>,
}

/// An item and one of its versions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemDot {
    /// Item id (hex).
    pub item: String,
    /// The version.
    pub dot: WireDot,
}

/// The candidates that are dead: deleted on the server, the deletion since forgotten.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryResponse {
    /// Dead versions; the caller drops them.
    pub dead: Vec<ItemDot>,
    /// The server's forgotten tombstones, which the caller adopts.
    pub forgotten: WireVector,
}

// ---- upload ----------------------------------------------------------------------------

/// `GET …/upload`: what the server has, and where to send batch metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadOffer {
    /// The server's knowledge.
    pub knowledge: WireKnowledge,
    /// The server's batch limits.
    pub limits: WireLimits,
    /// URI prefix for batch metadata: `PUT {batches}/{batch id}`.
    pub batches: String,
    /// The server's replica tag.
    pub tag: String,
    /// The tag of the server's refused versions ([`crate::refusals_tag`]): when it differs
    /// from the caller's, the caller fetches `GET …/refusals`.
    #[serde(default)]
    pub refusals: String,
}

/// `PUT {batches}/{id}`: the versions to upload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadBatch {
    /// Versions.
    pub versions: Vec<WireVersion>,
    /// Chunk lists of their contents.
    pub contents: Vec<WireContent>,
    /// What the server learns by applying every version (the caller's knowledge on the last
    /// batch, else the batch's own dots).
    pub learned: WireKnowledge,
    /// True on the final batch.
    pub last: bool,
}

/// Per item: where to put its content, or that none is needed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadPlanItem {
    /// The version.
    pub dot: WireDot,
    /// False when the server already holds every chunk of the content (or there is none).
    pub needed: bool,
    /// Chunks the server lacks.
    #[serde(default)]
    pub missing: Vec<String>,
}

/// The answer to an [`UploadBatch`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadPlan {
    /// Per item.
    pub items: Vec<UploadPlanItem>,
    /// Where to put chunks, in order of preference (`PUT {url}/{chunk hash}` for http).
    pub locations: Vec<Location>,
    /// `PUT` here to commit.
    pub commit: String,
}

/// Per item: whether its content arrived.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferStatus {
    /// The version.
    pub dot: WireDot,
    /// True when every chunk was put.
    pub transferred: bool,
}

/// `PUT <commit URI>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRequest {
    /// Per item.
    pub items: Vec<TransferStatus>,
}

/// Outcome of one uploaded version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitItem {
    /// The version.
    pub dot: WireDot,
    /// `applied`, `conflict`, `refused` or `failed`.
    pub outcome: String,
    /// Why, for `refused` and `failed`.
    #[serde(default)]
    pub reason: Option<String>,
}

/// The answer to a [`CommitRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitResponse {
    /// Per item.
    pub items: Vec<CommitItem>,
    /// The server's replica tag before the commit.
    pub tag_before: String,
    /// And after.
    pub tag_after: String,
}

// ---- accounts and workspaces --------------------------------------------------------------

/// `POST /v1/login`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginRequest {
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
    /// A name for this device.
    pub device_name: String,
    /// The fingerprint of the device's TLS certificate (BLAKE3 of its DER, hex): the key the
    /// hub vouches for to the device's peers.
    #[serde(default)]
    pub device_key: Option<String>,
}

/// `PUT /v1/device/key`: the calling device's (new) key fingerprint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceKey {
    /// BLAKE3 of the device certificate's DER, hex.
    pub key: String,
}

/// A device's credentials.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginResponse {
    /// Bearer token for every later request.
    pub token: String,
    /// The device id (hex).
    pub device: String,
    /// The user.
    pub user: String,
}

/// `POST /v1/workspaces`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateWorkspace {
    /// Workspace name (unique per owner).
    pub name: String,
}

/// A workspace as one member sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceInfo {
    /// Workspace id (hex).
    pub id: String,
    /// Name.
    pub name: String,
    /// The caller's role: `owner`, `editor` or `reader`.
    pub role: String,
    /// False while the caller is only invited (`POST …/join` accepts).
    pub joined: bool,
    /// The owner's user name.
    pub owner: String,
}

/// `POST …/invitations`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invite {
    /// The user invited.
    pub user: String,
    /// The role offered.
    pub role: String,
}

/// An error body: every 4xx and 5xx carries one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What is wrong, for a person.
    pub error: String,
    /// The request id, for the server's logs.
    pub request: String,
}

/// One event on `GET …/events`: the workspace changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeEvent {
    /// Workspace id (hex).
    pub workspace: String,
    /// The server replica's new tag.
    pub tag: String,
}

/// A device's availability, as its user set it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Availability {
    /// Online and receiving messages.
    Online,
    /// Online, away from the keyboard.
    Away,
    /// Online, busy.
    Busy,
    /// Online but not receiving messages.
    NotReceiving,
    /// Not connected to the hub.
    Offline,
}

/// One workspace's compact knowledge (BLAKE3 of its canonical encoding, hex).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceKnowledge {
    /// Workspace id (hex).
    pub workspace: String,
    /// The compact knowledge.
    pub compact: String,
}

/// `PUT /v1/presence`: the calling device's presence document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceUpdate {
    /// Availability.
    pub status: Availability,
    /// Where peers can reach the device's protocol server ("host:port"), nearest first.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Per workspace the device holds, its compact knowledge.
    #[serde(default)]
    pub workspaces: Vec<WorkspaceKnowledge>,
}

/// One contact device as the hub shows it: only the workspaces both devices share.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerPresence {
    /// Device id (hex).
    pub device: String,
    /// Its device name.
    pub device_name: String,
    /// Its user.
    pub user: String,
    /// The key fingerprint the hub vouches for (absent: the device has no key, so no peer
    /// may trust it).
    pub key: Option<String>,
    /// Availability; `offline` when it has no connection to the hub.
    pub status: Availability,
    /// Where it can be reached directly.
    pub addresses: Vec<String>,
    /// Compact knowledge of the workspaces it shares with the receiver.
    pub workspaces: Vec<WorkspaceKnowledge>,
}

/// A sync-negotiation message: "my knowledge of this workspace is now this". Sent to peers
/// directly (`POST …/{ws}/negotiate` on a peer) or relayed by the hub (`POST /v1/negotiate`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Negotiation {
    /// Workspace id (hex).
    pub workspace: String,
    /// The sender's compact knowledge of it.
    pub compact: String,
    /// Devices to relay to (ids, hex); ignored by a peer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<String>,
    /// Large files the sender found changed in place and is reading again (paths): a
    /// receiver holding them may start the copy that their new version will be built in.
    /// The knowledge is then the sender's current one; the change itself follows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changing: Vec<String>,
}

/// At most this many paths in one [`Negotiation::changing`].
pub const CHANGING_MAX: usize = 64;

impl Negotiation {
    /// Checks `changing`: at most [`CHANGING_MAX`] relative paths, each of acceptable names.
    pub fn check_changing(&self) -> Result<(), crate::WireError> {
        if self.changing.len() > CHANGING_MAX {
            return Err(crate::WireError::Invalid(format!(
                "{} changing files; at most {CHANGING_MAX}",
                self.changing.len()
            )));
        }
        for path in &self.changing {
            path.split('/')
                .try_for_each(shoal_core::validate_name)
                .map_err(|e| crate::WireError::Invalid(format!("changing: {e}")))?;
        }
        Ok(())
    }
}

/// `POST /v1/negotiate`'s answer: how many devices the hub delivered to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relayed {
    /// Devices the message reached.
    pub delivered: usize,
}

/// One event on the presence stream (`GET /v1/presence`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PresenceEvent {
    /// A contact device's presence (sent for every contact on connect, then on each change).
    Peer(PeerPresence),
    /// A sync-negotiation message. `from` is a device id, or `hub` for the hub's own replica.
    Negotiate {
        /// The sender.
        from: String,
        /// Workspace id (hex).
        workspace: String,
        /// The sender's compact knowledge.
        compact: String,
        /// Large files the sender is reading again ([`Negotiation::changing`]).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        changing: Vec<String>,
    },
    /// Large contents another device has begun uploading to a workspace (hex hashes). A device
    /// may fetch their chunks as they arrive (`GET …/contents/{hash}` gives the chunk list),
    /// so that its download after the commit finds them at hand. Nothing is committed yet: the
    /// upload may still fail or be refused.
    Arriving {
        /// Workspace id (hex).
        workspace: String,
        /// The contents.
        contents: Vec<String>,
    },
}

/// `GET`/`PUT /v1/workspaces/{ws}/rules`: the validation rules an owner set. A change that
/// breaks one is refused by the hub and kept with the reason.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceRules {
    /// Largest file accepted, in bytes (none: no limit).
    #[serde(default)]
    pub max_file_size: Option<u64>,
    /// Name patterns refused (`*` any run, `?` one character, case ignored), e.g. `*.exe`.
    #[serde(default)]
    pub forbidden: Vec<String>,
    /// Most bytes of distinct content the workspace may hold (none: no quota).
    #[serde(default)]
    pub quota_bytes: Option<u64>,
}

/// One refused version, as `GET /v1/workspaces/{ws}/refusals` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The version (with its item id).
    pub version: WireVersion,
    /// Why it was refused.
    pub reason: String,
}

/// `POST /v1/workspaces/{ws}/chunks/fetch`: the chunks wanted in one answer, a chunk bundle
/// (those the server does not hold are left out).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkFetch {
    /// Chunk hashes (hex), at most 16 MiB of chunks in all.
    pub chunks: Vec<String>,
}

/// `POST /v1/workspaces/{ws}/contents/fetch` on a peer: chunks of contents the peer holds in
/// its folder, in one answer (a chunk bundle; what it does not hold is left out). A peer finds
/// chunks through the files holding their contents, so each chunk names its content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentFetch {
    /// The contents asked for, each with the chunks wanted from it.
    pub contents: Vec<ContentChunks>,
}

/// Chunks wanted from one content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentChunks {
    /// The content's hash (hex).
    pub content: String,
    /// Hashes (hex) of the chunks wanted from it.
    pub chunks: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heads_up_names_at_most_64_paths_inside_the_folder() {
        let with = |changing: Vec<String>| Negotiation {
            workspace: "00".repeat(16),
            compact: "11".repeat(32),
            to: Vec::new(),
            changing,
        };
        assert!(
            with(vec!["video/cut.mov".into(), "disk.img".into()])
                .check_changing()
                .is_ok()
        );
        assert!(
            with((0..64).map(|i| format!("f{i}")).collect())
                .check_changing()
                .is_ok()
        );
        for bad in [
            "../etc/passwd",
            "/etc/passwd",
            "a//b",
            "a/./b",
            "",
            "a\u{0}b",
        ] {
            assert!(with(vec![bad.into()]).check_changing().is_err(), "{bad:?}");
        }
        assert!(
            with((0..65).map(|i| format!("f{i}")).collect())
                .check_changing()
                .is_err()
        );
    }
}
