//! The metadata store: one SQLite database per replica.
//!
//! It holds the replica's identity and counters, its knowledge, every current version of
//! every item, the chunk lists of contents, and (for replicas that live in a folder) the record
//! of what was last seen on disk. Changes go through a [`Transaction`]; a batch of remote
//! changes is applied in exactly one.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use shoal_core::{
    ContentHash, DecodeError, Dot, Entry, Epoch, ItemAccess, ItemId, ItemKind, ItemState,
    Knowledge, ReplicaId, Role, Version, VersionVector, WriterId,
};

use shoal_core::ChunkedContent;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite reported an error.
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored value could not be decoded (corruption or a newer format).
    #[error("stored data is unreadable: {0}")]
    Decode(#[from] DecodeError),
    /// The database was written by a newer shoal.
    #[error("the database has schema version {found}; this shoal understands up to {known}")]
    TooNew {
        /// Version found on disk.
        found: i64,
        /// Newest version this build knows.
        known: i64,
    },
}

type Result<T> = std::result::Result<T, StoreError>;

/// Numbered migrations; the database's `user_version` says how many have run.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE versions (
    w_replica BLOB NOT NULL, w_epoch INTEGER NOT NULL, tick INTEGER NOT NULL,
    item BLOB NOT NULL, body BLOB NOT NULL, deleted INTEGER NOT NULL,
    PRIMARY KEY (w_replica, w_epoch, tick)
) WITHOUT ROWID;
CREATE INDEX versions_by_item ON versions (item);
CREATE INDEX tombstones ON versions (deleted) WHERE deleted = 1;
CREATE TABLE contents (hash BLOB PRIMARY KEY, size INTEGER NOT NULL, chunks BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE local_files (
    path TEXT PRIMARY KEY, item BLOB NOT NULL, role INTEGER NOT NULL, dot BLOB NOT NULL, history BLOB NOT NULL,
    kind INTEGER NOT NULL, content BLOB, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL,
    executable INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX local_files_by_content ON local_files (content);
CREATE TABLE partners (replica BLOB PRIMARY KEY, knowledge BLOB NOT NULL, synced_at INTEGER NOT NULL) WITHOUT ROWID;
"#,
    r#"
-- Versions a hub refused (or, on a device, that the hub refused): kept, never merged.
CREATE TABLE refused (
    w_replica BLOB NOT NULL, w_epoch INTEGER NOT NULL, tick INTEGER NOT NULL,
    item BLOB NOT NULL, body BLOB NOT NULL, reason TEXT NOT NULL, at INTEGER NOT NULL,
    PRIMARY KEY (w_replica, w_epoch, tick)
) WITHOUT ROWID;
-- The epoch each partner replica last synced in: an older one means it was restored.
ALTER TABLE partners ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
"#,
    r#"
-- Contents of a similar size: the bases a changed large file's chunk list is sent against.
CREATE INDEX contents_by_size ON contents (size);
"#,
    r#"
-- Received contents waiting in the staging folder, each under the file name its id gives.
-- A row is written only after its file is flushed, so a listed file is whole.
CREATE TABLE staged (hash BLOB PRIMARY KEY, id INTEGER NOT NULL) WITHOUT ROWID;
"#,
];

/// Who a replica is.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Identity {
    /// The replica id, drawn at random when the store was created.
    pub replica: ReplicaId,
    /// The current epoch.
    pub epoch: Epoch,
    /// The device name written into versions.
    pub device: String,
    /// The user written into versions (empty: none).
    pub user: String,
}

impl Identity {
    /// The writer id of new versions.
    pub fn writer(&self) -> WriterId {
        WriterId {
            replica: self.replica,
            epoch: self.epoch,
        }
    }
}

/// What a folder replica last saw (or wrote) at one path.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct LocalFile {
    /// Slash-separated path relative to the folder root.
    pub path: String,
    /// The item shown there.
    pub item: ItemId,
    /// Winner or conflict copy.
    pub role: Role,
    /// The version whose content is on disk.
    pub dot: Dot,
    /// That version's history: what a local edit of this file follows.
    pub history: Knowledge,
    /// File or directory.
    pub kind: ItemKind,
    /// Content hash, for files.
    pub content: Option<ContentHash>,
    /// Size on disk.
    pub size: u64,
    /// Modification time on disk, nanoseconds.
    pub mtime_ns: i64,
    /// Inode number, to recognise renames.
    pub inode: u64,
    /// Executable bit.
    pub executable: bool,
}

/// What a scan compares with the disk at one path: the fields that show a change. The
/// version and history stay encoded until [`LocalRecords::full`] asks for them, which a scan
/// does only for the paths that changed.
#[derive(Clone, Debug)]
pub struct LocalStat {
    /// Slash-separated path relative to the folder root.
    pub path: String,
    /// The item shown there.
    pub item: ItemId,
    /// Winner or conflict copy.
    pub role: Role,
    /// File or directory.
    pub kind: ItemKind,
    /// Content hash, for files.
    pub content: Option<ContentHash>,
    /// Size on disk.
    pub size: u64,
    /// Modification time on disk, nanoseconds.
    pub mtime_ns: i64,
    /// Inode number, to recognise renames.
    pub inode: u64,
    /// Executable bit.
    pub executable: bool,
    /// Where the encoded dot, then the encoded history, are in [`LocalRecords`]' buffer.
    encoded: (usize, usize, usize),
}

/// Every path recorded on disk, sorted by path (byte order, as `str` orders), loaded in one
/// pass without decoding what only a changed path needs.
#[derive(Clone, Debug, Default)]
pub struct LocalRecords {
    stats: Vec<LocalStat>,
    encoded: Vec<u8>,
}

impl LocalRecords {
    /// The records, sorted by path.
    pub fn stats(&self) -> &[LocalStat] {
        &self.stats
    }

    /// How many paths are recorded.
    pub fn len(&self) -> usize {
        self.stats.len()
    }

    /// Whether no path is recorded.
    pub fn is_empty(&self) -> bool {
        self.stats.is_empty()
    }

    /// The version whose content is on disk at `stat`'s path.
    pub fn dot(&self, stat: &LocalStat) -> Result<Dot> {
        let (start, middle, _) = stat.encoded;
        dot_from(self.encoded.get(start..middle).unwrap_or_default())
    }

    /// The whole record of `stat` (one of [`Self::stats`]).
    pub fn full(&self, stat: &LocalStat) -> Result<LocalFile> {
        let (_, middle, end) = stat.encoded;
        let history = self.encoded.get(middle..end).unwrap_or_default();
        Ok(LocalFile {
            path: stat.path.clone(),
            item: stat.item,
            role: stat.role,
            dot: self.dot(stat)?,
            history: Knowledge::from_bytes(history)?,
            kind: stat.kind,
            content: stat.content,
            size: stat.size,
            mtime_ns: stat.mtime_ns,
            inode: stat.inode,
            executable: stat.executable,
        })
    }
}

/// One replica's metadata database.
pub struct Store {
    conn: Connection,
    identity: Identity,
}

fn dot_bytes(dot: &Dot) -> Vec<u8> {
    let mut out = shoal_core::Encoder::new();
    out.dot(dot);
    out.into_bytes()
}

fn dot_from(bytes: &[u8]) -> Result<Dot> {
    let mut input = shoal_core::Decoder::new(bytes);
    let dot = input.dot()?;
    input.finish()?;
    Ok(dot)
}

fn item_from(bytes: Vec<u8>) -> Result<ItemId> {
    let array: [u8; 16] = bytes
        .try_into()
        .map_err(|_| DecodeError::Invalid("item id is not 16 bytes"))?;
    Ok(ItemId(array))
}

fn hash_from(bytes: Vec<u8>) -> Result<ContentHash> {
    let array: [u8; 32] = bytes
        .try_into()
        .map_err(|_| DecodeError::Invalid("hash is not 32 bytes"))?;
    Ok(ContentHash(array))
}

fn vector_bytes(vector: &VersionVector) -> Vec<u8> {
    let mut knowledge = Knowledge::new();
    knowledge.add_vector(vector);
    knowledge.to_bytes()
}

impl Store {
    /// Opens the database at `path`, creating it (with a new random replica id) if needed.
    pub fn open(path: &Path, device: &str) -> Result<Store> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // WAL with synchronous=FULL: a committed batch survives power loss.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        migrate(&mut conn)?;
        let existing: Option<Vec<u8>> = conn
            .query_row("SELECT value FROM meta WHERE key = 'replica'", [], |row| {
                row.get(0)
            })
            .optional()?;
        let replica = match existing {
            Some(bytes) => ReplicaId(
                bytes
                    .try_into()
                    .map_err(|_| DecodeError::Invalid("replica id is not 16 bytes"))?,
            ),
            None => {
                let replica = ReplicaId(rand::random());
                let tx = conn.transaction()?;
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('replica', ?1)",
                    params![replica.0.to_vec()],
                )?;
                // A new replica holds no items, so its empty layout already matches the disk:
                // the first sync that brings nothing need not lay out what its scan recorded.
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('epoch', 0), ('tick', 0), ('dirty', 0)",
                    [],
                )?;
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('knowledge', ?1)",
                    params![Knowledge::new().to_bytes()],
                )?;
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('forgotten', ?1)",
                    params![Knowledge::new().to_bytes()],
                )?;
                tx.commit()?;
                replica
            }
        };
        let epoch: i64 =
            conn.query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |row| {
                row.get(0)
            })?;
        let epoch =
            Epoch::try_from(epoch).map_err(|_| DecodeError::Invalid("epoch out of range"))?;
        Ok(Store {
            conn,
            identity: Identity {
                replica,
                epoch,
                device: device.to_owned(),
                user: String::new(),
            },
        })
    }

    /// Names `user` as the author of the versions this replica writes from now on.
    pub fn set_author(&mut self, user: &str) {
        user.clone_into(&mut self.identity.user);
    }

    /// Bytes of distinct content whose chunk lists are held (each content counted once).
    pub fn content_bytes(&self) -> Result<u64> {
        let total: i64 =
            self.conn
                .query_row("SELECT COALESCE(SUM(size), 0) FROM contents", [], |r| {
                    r.get(0)
                })?;
        Ok(u64::try_from(total).unwrap_or(0))
    }

    /// Who this replica is.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Everything this replica has seen.
    pub fn knowledge(&self) -> Result<Knowledge> {
        read_knowledge(&self.conn)
    }

    /// A number that changes whenever another connection (another process, such as the agent
    /// or a command) commits to this replica: what was read before a transaction began is
    /// still current if it is the same inside it.
    pub fn data_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }

    /// A vector covering every tombstone this replica has forgotten.
    pub fn forgotten(&self) -> Result<VersionVector> {
        let bytes: Vec<u8> =
            self.conn
                .query_row("SELECT value FROM meta WHERE key = 'forgotten'", [], |r| {
                    r.get(0)
                })?;
        Ok(Knowledge::from_bytes(&bytes)?.prefix())
    }

    /// The last tick handed out in the current epoch.
    pub fn tick(&self) -> Result<u64> {
        read_tick(&self.conn)
    }

    /// Whether item states changed since the folder last matched its layout (a batch was
    /// applied, or local changes were recorded), so the disk may need changes.
    pub fn needs_materialize(&self) -> Result<bool> {
        let flag: Option<i64> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'dirty'", [], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(flag.unwrap_or(1) != 0)
    }

    /// The rows a table holds, to size a vector that will hold them all (growing it by
    /// doubling would keep the old and the new buffer at once).
    fn count_rows(&self, table: &str) -> Result<usize> {
        let count: i64 =
            self.conn
                .query_row(&format!("SELECT count(*) FROM {table}"), [], |row| {
                    row.get(0)
                })?;
        Ok(usize::try_from(count).unwrap_or(0))
    }

    /// Every item with its current versions.
    pub fn load_items(&self) -> Result<BTreeMap<ItemId, ItemState>> {
        // In table order, grouped in memory: walking the item index would look up every row's
        // body in the table again.
        let mut statement = self.conn.prepare("SELECT item, body FROM versions")?;
        let mut all: Vec<(ItemId, Version)> = Vec::with_capacity(self.count_rows("versions")?);
        let mut rows = statement.query([])?;
        while let Some(row) = rows.next()? {
            let item = ItemId(
                value(row.get_ref(0)?.as_blob())?
                    .try_into()
                    .map_err(|_| DecodeError::Invalid("item id is not 16 bytes"))?,
            );
            all.push((
                item,
                Version::from_bytes(value(row.get_ref(1)?.as_blob())?)?,
            ));
        }
        // Stable: an item's versions keep the order the table gave them.
        all.sort_by_key(|(item, _)| *item);
        let mut items = Vec::new();
        let mut rest = all.into_iter().peekable();
        while let Some((item, first)) = rest.next() {
            let mut versions = vec![first];
            while let Some((_, version)) = rest.next_if(|(next, _)| *next == item) {
                versions.push(version);
            }
            if let Some(state) = ItemState::from_versions(versions) {
                items.push((item, state));
            }
        }
        // Built from sorted pairs, the map's nodes are full; inserted one by one in order,
        // each would be left about half empty.
        Ok(items.into_iter().collect())
    }

    /// One item's current versions.
    pub fn item(&self, id: &ItemId) -> Result<Option<ItemState>> {
        read_item(&self.conn, id)
    }

    /// Whether this replica's state of `item` holds or supersedes `dot` (for a recovery
    /// compare).
    pub fn has_seen(&self, item: &ItemId, dot: &Dot) -> Result<bool> {
        Ok(self.item(item)?.is_some_and(|state| state.has_seen(dot)))
    }

    /// Every current version a receiver holding `receiver` has not seen. Costs work in
    /// proportion to what is missing: per writer, an index range above the receiver's count.
    pub fn missing_for(&self, receiver: &Knowledge) -> Result<Vec<(ItemId, Version)>> {
        let mut writers = Vec::new();
        {
            let mut statement = self
                .conn
                .prepare("SELECT DISTINCT w_replica, w_epoch FROM versions")?;
            let mut rows = statement.query([])?;
            while let Some(row) = rows.next()? {
                let replica: Vec<u8> = row.get(0)?;
                let epoch: i64 = row.get(1)?;
                let replica = ReplicaId(
                    replica
                        .try_into()
                        .map_err(|_| DecodeError::Invalid("writer id"))?,
                );
                writers.push(WriterId {
                    replica,
                    epoch: epoch as Epoch,
                });
            }
        }
        let prefix = receiver.prefix();
        // Sized first (an upper bound: the receiver may hold some above its prefix), so that a
        // first sync's versions are not held twice while the vector doubles.
        let mut counting = self.conn.prepare_cached(
            "SELECT count(*) FROM versions WHERE w_replica = ?1 AND w_epoch = ?2 AND tick > ?3",
        )?;
        let mut capacity = 0usize;
        for writer in &writers {
            let from = prefix.get(writer) as i64;
            let count: i64 = counting.query_row(
                params![writer.replica.0.to_vec(), writer.epoch, from],
                |row| row.get(0),
            )?;
            capacity += usize::try_from(count).unwrap_or(0);
        }
        let mut statement = self
            .conn
            .prepare_cached("SELECT item, body, tick FROM versions WHERE w_replica = ?1 AND w_epoch = ?2 AND tick > ?3")?;
        let mut missing = Vec::with_capacity(capacity);
        for writer in writers {
            let from = prefix.get(&writer) as i64;
            let mut rows =
                statement.query(params![writer.replica.0.to_vec(), writer.epoch, from])?;
            while let Some(row) = rows.next()? {
                let tick: i64 = row.get(2)?;
                if receiver.contains(&Dot {
                    writer,
                    tick: tick as u64,
                }) {
                    continue;
                }
                let body: Vec<u8> = row.get(1)?;
                missing.push((item_from(row.get(0)?)?, Version::from_bytes(&body)?));
            }
        }
        Ok(missing)
    }

    /// The contents of at least `min_size` bytes whose chunk lists are held, at most `limit`.
    pub fn contents_at_least(&self, min_size: u64, limit: usize) -> Result<Vec<ContentHash>> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT hash FROM contents WHERE size >= ?1 LIMIT ?2")?;
        let rows = statement.query_map(params![min_size as i64, limit as i64], |row| {
            row.get::<_, Vec<u8>>(0)
        })?;
        let mut out = Vec::new();
        for row in rows {
            let bytes = row?;
            let hash: [u8; 32] = bytes
                .try_into()
                .map_err(|_| StoreError::Decode(DecodeError::Invalid("content hash")))?;
            out.push(ContentHash(hash));
        }
        Ok(out)
    }

    /// Up to `limit` of the contents a receiver `held`, other than `content`, nearest in size
    /// to it: the bases a server may send `content`'s chunk list as an edit of.
    pub fn held_bases(
        &self,
        content: &ChunkedContent,
        held: &std::collections::HashSet<ContentHash>,
        limit: usize,
    ) -> Result<Vec<ChunkedContent>> {
        self.nearest_contents(
            content.size,
            |h| held.contains(h) && *h != content.hash,
            limit,
        )
    }

    /// Up to `limit` contents that `accept` takes, between half and twice `size` bytes and
    /// nearest in size to it (ties by hash), with their chunk lists: the likely bases when a
    /// changed large file's list is sent as an edit.
    pub fn nearest_contents(
        &self,
        size: u64,
        accept: impl Fn(&ContentHash) -> bool,
        limit: usize,
    ) -> Result<Vec<ChunkedContent>> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT hash, size FROM contents WHERE size BETWEEN ?1 AND ?2")?;
        let (low, high) = (size / 2, size.saturating_mul(2).min(i64::MAX as u64));
        let rows = statement.query_map(params![low as i64, high as i64], |row| {
            Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, i64>(1)?))
        })?;
        let mut near = Vec::new();
        for row in rows {
            let (bytes, found) = row?;
            let hash = ContentHash(
                bytes
                    .try_into()
                    .map_err(|_| StoreError::Decode(DecodeError::Invalid("content hash")))?,
            );
            if accept(&hash) {
                near.push(((found as u64).abs_diff(size), hash));
            }
        }
        near.sort_unstable_by_key(|&(distance, hash)| (distance, hash.0));
        let mut out = Vec::new();
        for (_, hash) in near.into_iter().take(limit) {
            out.extend(self.content(&hash)?);
        }
        Ok(out)
    }

    /// The chunk list of a content, if known.
    pub fn content(&self, hash: &ContentHash) -> Result<Option<ChunkedContent>> {
        read_content(&self.conn, hash)
    }

    /// What was last recorded on disk, sorted by path (found by binary search: a map would
    /// hold each path twice, and a first sync records one per file).
    pub fn local_files(&self) -> Result<Vec<LocalFile>> {
        // The primary key gives path order, as in `local_records`.
        let mut statement = self.conn.prepare(&format!(
            "SELECT {LOCAL_FILE_COLUMNS} FROM local_files ORDER BY path"
        ))?;
        let mut files = Vec::with_capacity(self.count_rows("local_files")?);
        let mut rows = statement.query([])?;
        while let Some(row) = rows.next()? {
            files.push(local_file_from(row)?);
        }
        Ok(files)
    }

    /// What was last recorded on disk, sorted by path, for a scan to compare.
    pub fn local_records(&self) -> Result<LocalRecords> {
        // The primary key gives path order (SQLite's BINARY collation compares bytes, like
        // `str`), so no sort runs.
        let mut statement = self.conn.prepare(&format!(
            "SELECT {LOCAL_FILE_COLUMNS} FROM local_files ORDER BY path"
        ))?;
        let mut rows = statement.query([])?;
        let mut records = LocalRecords::default();
        while let Some(row) = rows.next()? {
            let start = records.encoded.len();
            records
                .encoded
                .extend_from_slice(value(row.get_ref(3)?.as_blob())?);
            let middle = records.encoded.len();
            records
                .encoded
                .extend_from_slice(value(row.get_ref(4)?.as_blob())?);
            let content = match value(row.get_ref(6)?.as_blob_or_null())? {
                Some(bytes) => Some(ContentHash(
                    bytes
                        .try_into()
                        .map_err(|_| DecodeError::Invalid("hash is not 32 bytes"))?,
                )),
                None => None,
            };
            records.stats.push(LocalStat {
                path: value(row.get_ref(0)?.as_str())?.to_owned(),
                item: ItemId(
                    value(row.get_ref(1)?.as_blob())?
                        .try_into()
                        .map_err(|_| DecodeError::Invalid("item id is not 16 bytes"))?,
                ),
                role: role_from(row.get(2)?),
                kind: kind_from(row.get(5)?),
                content,
                size: row.get::<_, i64>(7)? as u64,
                mtime_ns: row.get(8)?,
                inode: row.get::<_, i64>(9)? as u64,
                executable: row.get::<_, i64>(10)? != 0,
                encoded: (start, middle, records.encoded.len()),
            });
        }
        Ok(records)
    }

    /// The id of the staged file holding the content `hash`, if one is staged.
    pub fn staged(&self, hash: &ContentHash) -> Result<Option<u64>> {
        staged_id(&self.conn, hash)
    }

    /// Every staged content and its file's id.
    pub fn all_staged(&self) -> Result<Vec<(ContentHash, u64)>> {
        let mut statement = self.conn.prepare("SELECT hash, id FROM staged")?;
        let rows = statement.query_map([], |row| {
            Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, i64>(1)?))
        })?;
        let mut staged = Vec::new();
        for row in rows {
            let (hash, id) = row?;
            staged.push((hash_from(hash)?, id as u64));
        }
        Ok(staged)
    }

    /// A recorded file holding the content `hash`, if any.
    pub fn local_file_with(&self, hash: &ContentHash) -> Result<Option<LocalFile>> {
        local_file_with(&self.conn, hash)
    }

    /// The knowledge each partner had when we last synced with it.
    pub fn partners(&self) -> Result<BTreeMap<ReplicaId, Knowledge>> {
        let mut statement = self
            .conn
            .prepare("SELECT replica, knowledge FROM partners")?;
        let mut rows = statement.query([])?;
        let mut partners = BTreeMap::new();
        while let Some(row) = rows.next()? {
            let replica: Vec<u8> = row.get(0)?;
            let knowledge: Vec<u8> = row.get(1)?;
            let replica = ReplicaId(
                replica
                    .try_into()
                    .map_err(|_| DecodeError::Invalid("partner id"))?,
            );
            partners.insert(replica, Knowledge::from_bytes(&knowledge)?);
        }
        Ok(partners)
    }

    /// Versions refused by a hub, with the reason, oldest first.
    pub fn refused(&self) -> Result<Vec<(ItemId, Version, String)>> {
        let mut statement = self
            .conn
            .prepare("SELECT item, body, reason FROM refused ORDER BY at, tick")?;
        let mut rows = statement.query([])?;
        let mut refused = Vec::new();
        while let Some(row) = rows.next()? {
            let body: Vec<u8> = row.get(1)?;
            refused.push((
                item_from(row.get(0)?)?,
                Version::from_bytes(&body)?,
                row.get(2)?,
            ));
        }
        Ok(refused)
    }

    /// Removes the refused versions from `versions`, in place (a first sync's versions are
    /// many); true when any was removed.
    pub fn drop_refused(&self, versions: &mut Vec<(ItemId, Version)>) -> Result<bool> {
        // The refused versions (few, usually none) read once, not a query per version: each
        // query outside a transaction takes and drops the database's read lock, and a first
        // sync serves tens of thousands of versions.
        let refused: std::collections::HashSet<Dot> = self
            .refused()?
            .into_iter()
            .map(|(_, version, _)| version.dot)
            .collect();
        if refused.is_empty() {
            return Ok(false);
        }
        let before = versions.len();
        versions.retain(|(_, version)| !refused.contains(&version.dot));
        Ok(versions.len() < before)
    }

    /// Whether the version `dot` was refused.
    pub fn is_refused(&self, dot: &Dot) -> Result<bool> {
        // Asked once per version served: a cached statement, not one parsed each time.
        let found: Option<i64> = self
            .conn
            .prepare_cached(
                "SELECT 1 FROM refused WHERE w_replica = ?1 AND w_epoch = ?2 AND tick = ?3",
            )?
            .query_row(
                params![
                    dot.writer.replica.0.to_vec(),
                    dot.writer.epoch,
                    dot.tick as i64
                ],
                |row| row.get(0),
            )
            .optional()?;
        Ok(found.is_some())
    }

    /// The epoch a partner replica last synced in.
    pub fn partner_epoch(&self, replica: &ReplicaId) -> Result<Option<Epoch>> {
        let epoch: Option<i64> = self
            .conn
            .query_row(
                "SELECT epoch FROM partners WHERE replica = ?1",
                params![replica.0.to_vec()],
                |row| row.get(0),
            )
            .optional()?;
        Ok(epoch.map(|e| e as Epoch))
    }

    /// Runs `work` in one read transaction: its queries see one state of the replica and take
    /// the database's read lock once, not once each (a peer serving a batch asks thousands).
    pub fn reading<T, E: From<StoreError>>(
        &self,
        work: impl FnOnce(&Store) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        if !self.conn.is_autocommit() {
            return work(self);
        }
        self.conn.execute_batch("BEGIN").map_err(StoreError::from)?;
        // Ended even if `work` panics, so the connection is never left inside it.
        struct End<'c>(&'c Connection);
        impl Drop for End<'_> {
            fn drop(&mut self) {
                if !self.0.is_autocommit() {
                    let _ = self.0.execute_batch("ROLLBACK");
                }
            }
        }
        let _end = End(&self.conn);
        work(self)
    }

    /// Starts a transaction: every change to the replica goes through one.
    pub fn begin(&mut self) -> Result<Transaction<'_>> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Read under the write lock: another process on this replica (the agent, a command)
        // may have written since, and its ticks must not be handed out again.
        let knowledge = read_knowledge(&tx)?;
        let tick = read_tick(&tx)?;
        Ok(Transaction {
            tx,
            identity: &mut self.identity,
            knowledge,
            tick,
            knowledge_dirty: false,
        })
    }
}

fn read_knowledge(conn: &Connection) -> Result<Knowledge> {
    let bytes: Vec<u8> =
        conn.query_row("SELECT value FROM meta WHERE key = 'knowledge'", [], |r| {
            r.get(0)
        })?;
    Ok(Knowledge::from_bytes(&bytes)?)
}

fn read_tick(conn: &Connection) -> Result<u64> {
    let tick: i64 = conn.query_row("SELECT value FROM meta WHERE key = 'tick'", [], |r| {
        r.get(0)
    })?;
    Ok(tick.unsigned_abs())
}

const LOCAL_FILE_COLUMNS: &str =
    "path, item, role, dot, history, kind, content, size, mtime_ns, inode, executable";

/// A borrowed column's value, or the error SQLite would give for a wrong type.
fn value<T>(result: rusqlite::types::FromSqlResult<T>) -> Result<T> {
    result.map_err(|error| StoreError::Sqlite(error.into()))
}

fn role_from(value: i64) -> Role {
    if value == 0 {
        Role::Main
    } else {
        Role::ConflictCopy
    }
}

fn kind_from(value: i64) -> ItemKind {
    if value == 0 {
        ItemKind::Directory
    } else {
        ItemKind::File
    }
}

fn local_file_from(row: &rusqlite::Row<'_>) -> Result<LocalFile> {
    let dot: Vec<u8> = row.get(3)?;
    let history: Vec<u8> = row.get(4)?;
    let content: Option<Vec<u8>> = row.get(6)?;
    Ok(LocalFile {
        path: row.get(0)?,
        item: item_from(row.get(1)?)?,
        role: role_from(row.get(2)?),
        dot: dot_from(&dot)?,
        history: Knowledge::from_bytes(&history)?,
        kind: kind_from(row.get(5)?),
        content: content.map(hash_from).transpose()?,
        size: row.get::<_, i64>(7)? as u64,
        mtime_ns: row.get(8)?,
        inode: row.get::<_, i64>(9)? as u64,
        executable: row.get::<_, i64>(10)? != 0,
    })
}

fn staged_id(conn: &Connection, hash: &ContentHash) -> Result<Option<u64>> {
    Ok(conn
        .prepare_cached("SELECT id FROM staged WHERE hash = ?1")?
        .query_row(params![hash.0.to_vec()], |row| row.get::<_, i64>(0))
        .optional()?
        .map(|id| id as u64))
}

fn local_file_with(conn: &Connection, hash: &ContentHash) -> Result<Option<LocalFile>> {
    let mut statement = conn.prepare_cached(&format!(
        "SELECT {LOCAL_FILE_COLUMNS} FROM local_files WHERE content = ?1 LIMIT 1"
    ))?;
    let mut rows = statement.query(params![hash.0.to_vec()])?;
    match rows.next()? {
        Some(row) => Ok(Some(local_file_from(row)?)),
        None => Ok(None),
    }
}

/// A read-only view of a replica's recorded files and chunk lists by content, usable from many
/// threads: how another replica finds where to read a chunk of content from, and how a
/// download finds a content's chunks without holding every list it received.
pub struct ContentIndex {
    conn: std::sync::Mutex<Connection>,
}

impl ContentIndex {
    /// Opens the index of the store at `path` (its own connection, read-only).
    pub fn open(path: &Path) -> Result<ContentIndex> {
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        Ok(ContentIndex {
            conn: std::sync::Mutex::new(conn),
        })
    }

    /// A recorded file holding the content `hash`, if any.
    pub fn file_with(&self, hash: &ContentHash) -> Result<Option<LocalFile>> {
        local_file_with(&self.connection(), hash)
    }

    /// The recorded file at `path` (slash-separated, relative to the root), if any.
    pub fn file_at(&self, path: &str) -> Result<Option<LocalFile>> {
        let conn = self.connection();
        let mut statement = conn.prepare_cached(&format!(
            "SELECT {LOCAL_FILE_COLUMNS} FROM local_files WHERE path = ?1"
        ))?;
        let mut rows = statement.query(params![path])?;
        match rows.next()? {
            Some(row) => Ok(Some(local_file_from(row)?)),
            None => Ok(None),
        }
    }

    /// The chunk list of the content `hash`, if the store knows it.
    pub fn content(&self, hash: &ContentHash) -> Result<Option<ChunkedContent>> {
        read_content(&self.connection(), hash)
    }

    /// Whether the content `hash` has a listed staged copy.
    pub fn is_staged(&self, hash: &ContentHash) -> Result<bool> {
        Ok(staged_id(&self.connection(), hash)?.is_some())
    }

    /// The connection; one read at a time (a read that panicked left nothing half done).
    fn connection(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let current: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if current > known {
        return Err(StoreError::TooNew {
            found: current,
            known,
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", index as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

fn read_content(conn: &Connection, hash: &ContentHash) -> Result<Option<ChunkedContent>> {
    let chunks: Option<Vec<u8>> = conn
        .prepare_cached("SELECT chunks FROM contents WHERE hash = ?1")?
        .query_row(params![hash.0.to_vec()], |row| row.get(0))
        .optional()?;
    match chunks {
        None => Ok(None),
        Some(bytes) => ChunkedContent::decode_chunks(*hash, &bytes)
            .map(Some)
            .ok_or(StoreError::Decode(DecodeError::Invalid("chunk list"))),
    }
}

fn read_item(conn: &Connection, id: &ItemId) -> Result<Option<ItemState>> {
    let mut statement = conn.prepare_cached("SELECT body FROM versions WHERE item = ?1")?;
    let bodies = statement.query_map(params![id.0.to_vec()], |row| row.get::<_, Vec<u8>>(0))?;
    let mut versions = Vec::new();
    for body in bodies {
        versions.push(Version::from_bytes(&body?)?);
    }
    Ok(ItemState::from_versions(versions))
}

/// Changes to one replica, applied all together by [`Transaction::commit`] or not at all.
pub struct Transaction<'a> {
    tx: rusqlite::Transaction<'a>,
    identity: &'a mut Identity,
    knowledge: Knowledge,
    tick: u64,
    knowledge_dirty: bool,
}

impl Transaction<'_> {
    /// Who this replica is.
    pub fn identity(&self) -> &Identity {
        self.identity
    }

    /// The knowledge as changed so far in this transaction.
    pub fn knowledge(&self) -> &Knowledge {
        &self.knowledge
    }

    /// Changes the knowledge (applying a batch teaches it).
    pub fn knowledge_mut(&mut self) -> &mut Knowledge {
        self.knowledge_dirty = true;
        &mut self.knowledge
    }

    /// The last tick handed out.
    pub fn tick(&self) -> u64 {
        self.tick
    }

    /// As [`Store::data_version`], seen from inside this transaction.
    pub fn data_version(&self) -> Result<i64> {
        Ok(self.tx.query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }

    /// Starts a new epoch: after a restore, new writes must not reuse dots handed out before.
    pub fn new_epoch(&mut self) -> Result<()> {
        self.identity.epoch += 1;
        self.tick = 0;
        self.tx.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'epoch'",
            params![self.identity.epoch],
        )?;
        Ok(())
    }

    /// Records a local write of `item` following `context`; returns the new version.
    pub fn write_local(
        &mut self,
        item: ItemId,
        entry: Entry,
        context: Knowledge,
        now: i64,
    ) -> Result<Version> {
        let version = self.next_version(entry, context, now);
        let state = match read_item(&self.tx, &item)? {
            Some(mut state) => {
                state.merge(version.clone());
                state
            }
            None => ItemState::new(version.clone()),
        };
        self.put_state(item, &state)?;
        Ok(version)
    }

    /// Records the first version of an item made here under a new random id: nothing can be
    /// stored under it yet, so there is nothing to read or replace.
    pub fn write_new(&mut self, item: ItemId, entry: Entry, now: i64) -> Result<Version> {
        let version = self.next_version(entry, Knowledge::new(), now);
        self.insert_versions(item, std::slice::from_ref(&version))?;
        Ok(version)
    }

    fn next_version(&mut self, entry: Entry, context: Knowledge, now: i64) -> Version {
        self.tick += 1;
        let dot = Dot {
            writer: self.identity.writer(),
            tick: self.tick,
        };
        self.knowledge_mut().add(dot);
        Version {
            dot,
            context,
            entry,
            written_at: now,
            device: self.identity.device.clone(),
            user: self.identity.user.clone(),
        }
    }

    fn put_state(&mut self, item: ItemId, state: &ItemState) -> Result<()> {
        self.tx
            .prepare_cached("DELETE FROM versions WHERE item = ?1")?
            .execute(params![item.0.to_vec()])?;
        self.insert_versions(item, state.versions())
    }

    fn insert_versions(&mut self, item: ItemId, versions: &[Version]) -> Result<()> {
        let mut insert = self
            .tx
            .prepare_cached("INSERT INTO versions (w_replica, w_epoch, tick, item, body, deleted) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?;
        for version in versions {
            insert.execute(params![
                version.dot.writer.replica.0.to_vec(),
                version.dot.writer.epoch,
                version.dot.tick as i64,
                item.0.to_vec(),
                version.to_bytes(),
                i64::from(version.entry.deleted),
            ])?;
        }
        Ok(())
    }

    /// Removes one item entirely (a recovery compare found it dead, or a tombstone is forgotten).
    pub fn remove_versions(&mut self, item: &ItemId, dead: &[Dot]) -> Result<()> {
        if let Some(state) = read_item(&self.tx, item)? {
            match state.without(|v| dead.contains(&v.dot)) {
                Some(kept) => self.put_state(*item, &kept)?,
                None => {
                    self.tx.execute(
                        "DELETE FROM versions WHERE item = ?1",
                        params![item.0.to_vec()],
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Forgets every tombstone inside `watermark`; returns how many.
    pub fn forget(&mut self, watermark: &VersionVector) -> Result<usize> {
        let mut tombstones = Vec::new();
        {
            let mut statement = self
                .tx
                .prepare("SELECT item, body FROM versions WHERE deleted = 1")?;
            let mut rows = statement.query([])?;
            while let Some(row) = rows.next()? {
                let body: Vec<u8> = row.get(1)?;
                let version = Version::from_bytes(&body)?;
                if version.is_forgettable(watermark) {
                    tombstones.push((item_from(row.get(0)?)?, version.dot));
                }
            }
        }
        if tombstones.is_empty() {
            return Ok(0);
        }
        let bytes: Vec<u8> =
            self.tx
                .query_row("SELECT value FROM meta WHERE key = 'forgotten'", [], |r| {
                    r.get(0)
                })?;
        let mut forgotten = Knowledge::from_bytes(&bytes)?.prefix();
        for (item, dot) in &tombstones {
            self.remove_versions(item, &[*dot])?;
            forgotten.add(*dot);
        }
        self.tx.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'forgotten'",
            params![vector_bytes(&forgotten)],
        )?;
        Ok(tombstones.len())
    }

    /// Records tombstones forgotten elsewhere whose deletions this replica now knows of.
    pub fn add_forgotten(&mut self, forgotten: &VersionVector) -> Result<()> {
        if forgotten.is_empty() {
            return Ok(());
        }
        let bytes: Vec<u8> =
            self.tx
                .query_row("SELECT value FROM meta WHERE key = 'forgotten'", [], |r| {
                    r.get(0)
                })?;
        let mut known = Knowledge::from_bytes(&bytes)?.prefix();
        known.merge(forgotten);
        self.tx.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'forgotten'",
            params![vector_bytes(&known)],
        )?;
        Ok(())
    }

    /// Marks whether the disk may lag behind the item states (see [`Store::needs_materialize`]).
    pub fn set_needs_materialize(&mut self, dirty: bool) -> Result<()> {
        self.tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('dirty', ?1)",
            params![i64::from(dirty)],
        )?;
        Ok(())
    }

    /// Records the chunk list of a content.
    pub fn put_content(&mut self, content: &ChunkedContent) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT OR IGNORE INTO contents (hash, size, chunks) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![
                content.hash.0.to_vec(),
                content.size as i64,
                content.encode_chunks()
            ])?;
        Ok(())
    }

    /// Records what is on disk at one path.
    pub fn put_local_file(&mut self, file: &LocalFile) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT OR REPLACE INTO local_files
                 (path, item, role, dot, history, kind, content, size, mtime_ns, inode, executable)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?
            .execute(params![
                file.path,
                file.item.0.to_vec(),
                i64::from(file.role == Role::ConflictCopy),
                dot_bytes(&file.dot),
                file.history.to_bytes(),
                i64::from(file.kind == ItemKind::File),
                file.content.map(|c| c.0.to_vec()),
                file.size as i64,
                file.mtime_ns,
                file.inode as i64,
                i64::from(file.executable),
            ])?;
        Ok(())
    }

    /// Forgets the record of one path.
    pub fn remove_local_file(&mut self, path: &str) -> Result<()> {
        self.tx
            .prepare_cached("DELETE FROM local_files WHERE path = ?1")?
            .execute(params![path])?;
        Ok(())
    }

    /// Lists a staged file, already flushed, as holding the content `hash`.
    pub fn put_staged(&mut self, hash: &ContentHash, id: u64) -> Result<()> {
        self.tx
            .prepare_cached("INSERT OR REPLACE INTO staged (hash, id) VALUES (?1, ?2)")?
            .execute(params![hash.0.to_vec(), id as i64])?;
        Ok(())
    }

    /// Stops listing the staged file of `hash` (moved into place, or no longer wanted).
    pub fn remove_staged(&mut self, hash: &ContentHash) -> Result<()> {
        self.tx
            .prepare_cached("DELETE FROM staged WHERE hash = ?1")?
            .execute(params![hash.0.to_vec()])?;
        Ok(())
    }

    /// Forgets tombstones behind the watermark: what this replica and every partner it has
    /// synced with have all seen. Returns how many were forgotten.
    pub fn forget_behind_watermark(&mut self) -> Result<usize> {
        let mut watermark = self.knowledge.prefix();
        let mut statement = self.tx.prepare("SELECT knowledge FROM partners")?;
        let partners: Vec<Vec<u8>> = statement
            .query_map([], |row| row.get(0))?
            .collect::<std::result::Result<_, _>>()?;
        drop(statement);
        for bytes in partners {
            watermark = watermark.meet(&Knowledge::from_bytes(&bytes)?.prefix());
        }
        self.forget(&watermark)
    }

    /// Remembers a partner's knowledge after a sync (for the forgetting watermark).
    pub fn set_partner(
        &mut self,
        replica: ReplicaId,
        knowledge: &Knowledge,
        now: i64,
    ) -> Result<()> {
        self.tx.execute(
            "INSERT INTO partners (replica, knowledge, synced_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (replica) DO UPDATE SET knowledge = excluded.knowledge, synced_at = excluded.synced_at",
            params![replica.0.to_vec(), knowledge.to_bytes(), now],
        )?;
        Ok(())
    }

    /// Records the epoch a partner replica syncs in (never lowered).
    pub fn set_partner_epoch(&mut self, replica: ReplicaId, epoch: Epoch) -> Result<()> {
        self.tx.execute(
            "INSERT INTO partners (replica, knowledge, synced_at, epoch) VALUES (?1, ?2, 0, ?3)
             ON CONFLICT (replica) DO UPDATE SET epoch = max(epoch, excluded.epoch)",
            params![replica.0.to_vec(), Knowledge::new().to_bytes(), epoch],
        )?;
        Ok(())
    }

    /// Forgets that a version was refused (an owner lifted the refusal): it is offered again.
    pub fn remove_refused(&mut self, dot: &Dot) -> Result<()> {
        self.tx.execute(
            "DELETE FROM refused WHERE w_replica = ?1 AND w_epoch = ?2 AND tick = ?3",
            params![
                dot.writer.replica.0.to_vec(),
                dot.writer.epoch,
                dot.tick as i64
            ],
        )?;
        Ok(())
    }

    /// Keeps a refused version with the reason; it is never merged.
    pub fn put_refused(
        &mut self,
        item: ItemId,
        version: &Version,
        reason: &str,
        now: i64,
    ) -> Result<()> {
        self.tx.execute(
            "INSERT OR IGNORE INTO refused (w_replica, w_epoch, tick, item, body, reason, at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                version.dot.writer.replica.0.to_vec(),
                version.dot.writer.epoch,
                version.dot.tick as i64,
                item.0.to_vec(),
                version.to_bytes(),
                reason,
                now
            ],
        )?;
        Ok(())
    }

    /// Makes every change durable at once.
    pub fn commit(self) -> Result<()> {
        let Transaction {
            tx,
            knowledge,
            tick,
            knowledge_dirty,
            ..
        } = self;
        if knowledge_dirty {
            tx.execute(
                "UPDATE meta SET value = ?1 WHERE key = 'knowledge'",
                params![knowledge.to_bytes()],
            )?;
        }
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'tick'",
            params![tick as i64],
        )?;
        tx.commit()?;
        Ok(())
    }
}

impl ItemAccess for Transaction<'_> {
    type Error = StoreError;
    fn get(&mut self, id: &ItemId) -> Result<Option<ItemState>> {
        read_item(&self.tx, id)
    }
    fn put(&mut self, id: ItemId, state: &ItemState) -> Result<()> {
        self.put_state(id, state)
    }
}
