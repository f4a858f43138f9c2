//! Conflicts a person can see and settle.
//!
//! Every replica holding the same item states lists the same conflicts, in the same order,
//! with the same version numbers (winner first, then by the fixed rank), so a conflict can be
//! settled from any device. A resolution is an ordinary local write whose context covers every
//! version of the conflict: it syncs like any change, and the conflict is gone everywhere.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use shoal_core::{
    ContentHash, Dot, ItemId, ItemKind, ItemState, Knowledge, LayoutNote, Version, layout,
    split_extension,
};

use crate::apply::ContentSource;
use crate::{FolderError, FolderReplica, MaterializeReport, Progress, io_error};

/// What collided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ConflictKind {
    /// Concurrent edits of one file (or of a file and a folder with one identity).
    EditEdit,
    /// An edit concurrent with a deletion (the edit is shown).
    EditDelete,
    /// Concurrent moves or renames of one item with the same content, or moves that made a
    /// cycle.
    Move,
    /// Two items wanted one name in one folder.
    Name,
}

impl ConflictKind {
    /// The kind as people and JSON say it.
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictKind::EditEdit => "edit/edit",
            ConflictKind::EditDelete => "edit/delete",
            ConflictKind::Move => "move",
            ConflictKind::Name => "name",
        }
    }
}

/// One version taking part in a conflict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConflictVersion {
    /// The item this version belongs to (name conflicts involve several items).
    pub item: ItemId,
    /// The version.
    pub version: Version,
    /// Where it is shown in the folder (`None`: a deletion, shown nowhere).
    pub shown_at: Option<String>,
    /// Whether it is the one shown under the contested name.
    pub winner: bool,
}

/// One unresolved conflict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// The contested path (where the winner is shown).
    pub path: String,
    /// What collided.
    pub kind: ConflictKind,
    /// The versions, winner first; their 1-based positions are the numbers `resolve` takes.
    pub versions: Vec<ConflictVersion>,
}

/// How to settle a conflict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Keep version number N (1 is the winner); the others are superseded (for a name
    /// conflict, the other items are deleted).
    Keep(usize),
    /// Keep every live version, each under its own name.
    Both,
    /// Replace with this file's content (a merge the user made).
    Merged(PathBuf),
}

/// What a resolution wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolveReport {
    /// New versions written.
    pub versions: usize,
    /// Disk changes.
    pub materialize: MaterializeReport,
}

fn by_rank(state: &ItemState) -> Vec<Version> {
    let mut versions = state.versions().to_vec();
    versions.sort_by(|a, b| b.rank_cmp(a));
    versions
}

/// "name (device).ext", or with a number when that is taken too.
fn distinct_name(original: &str, device: &str, taken: &dyn Fn(&str) -> bool) -> String {
    let (stem, extension) = split_extension(original);
    let device: String = device
        .chars()
        .filter(|c| !c.is_control() && *c != '/' && *c != '\\')
        .take(40)
        .collect();
    let mut candidate = format!("{stem} ({device}){extension}");
    let mut n = 2;
    while taken(&candidate) {
        candidate = format!("{stem} ({device} {n}){extension}");
        n += 1;
    }
    candidate
}

/// Content from a file the user supplied, checked against its hash as it is copied.
struct MergedFile {
    path: PathBuf,
    hash: ContentHash,
}

impl ContentSource for MergedFile {
    fn copy_to(&self, hash: &ContentHash, dest: &Path) -> bool {
        *hash == self.hash
            && std::fs::read(&self.path).is_ok_and(|bytes| {
                shoal_store::chunk_bytes(&bytes).hash == self.hash
                    && std::fs::write(dest, &bytes).is_ok()
            })
    }
}

/// Tries each source in turn.
struct Sources<'a>(Vec<&'a dyn ContentSource>);

impl ContentSource for Sources<'_> {
    fn copy_to(&self, hash: &ContentHash, dest: &Path) -> bool {
        self.0.iter().any(|source| source.copy_to(hash, dest))
    }
}

impl FolderReplica {
    /// Every unresolved conflict, sorted by path.
    pub fn conflicts(&self) -> Result<Vec<Conflict>, FolderError> {
        let items = self.store().load_items()?;
        let tree = layout(&items);
        let shown: HashMap<Dot, String> = tree
            .placements
            .iter()
            .map(|p| (p.version.dot, p.path.clone()))
            .collect();
        let path_of = |item: &ItemId| -> Option<String> {
            let winner = items.get(item)?.winner();
            shown.get(&winner.dot).cloned()
        };
        let mut out = Vec::new();
        for (item, state) in &items {
            if state.versions().len() < 2 {
                continue;
            }
            let versions = by_rank(state);
            let winner = &versions[0];
            let kind = if versions.iter().any(|v| v.entry.deleted) {
                ConflictKind::EditDelete
            } else if versions.iter().all(|v| {
                v.entry.content == winner.entry.content && v.entry.kind == winner.entry.kind
            }) {
                ConflictKind::Move
            } else {
                ConflictKind::EditEdit
            };
            let path = path_of(item).unwrap_or_else(|| winner.entry.name.clone());
            out.push(Conflict {
                path,
                kind,
                versions: versions
                    .iter()
                    .enumerate()
                    .map(|(index, v)| ConflictVersion {
                        item: *item,
                        version: v.clone(),
                        shown_at: shown.get(&v.dot).cloned(),
                        winner: index == 0,
                    })
                    .collect(),
            });
        }
        // Name clashes and broken cycles concern single-version items too.
        let mut clashes: BTreeMap<String, Vec<ItemId>> = BTreeMap::new();
        for note in &tree.notes {
            match note {
                LayoutNote::NameClash { item, wanted, .. } => {
                    let Some(state) = items.get(item) else {
                        continue;
                    };
                    let parent = state.winner().entry.parent;
                    let holder = items.iter().find(|(other, s)| {
                        *other != item
                            && !s.winner().entry.deleted
                            && s.winner().entry.parent == parent
                            && s.winner().entry.name == *wanted
                            && path_of(other).is_some_and(|p| p.ends_with(wanted.as_str()))
                    });
                    let Some((holder, _)) = holder else { continue };
                    let Some(path) = path_of(holder) else {
                        continue;
                    };
                    let entry = clashes.entry(path).or_insert_with(|| vec![*holder]);
                    entry.push(*item);
                }
                LayoutNote::CycleBroken { item } => {
                    let Some(state) = items.get(item) else {
                        continue;
                    };
                    if state.versions().len() > 1 {
                        continue; // already listed above
                    }
                    out.push(Conflict {
                        path: path_of(item).unwrap_or_default(),
                        kind: ConflictKind::Move,
                        versions: vec![ConflictVersion {
                            item: *item,
                            version: state.winner().clone(),
                            shown_at: path_of(item),
                            winner: true,
                        }],
                    });
                }
                _ => {}
            }
        }
        for (path, members) in clashes {
            let versions = members
                .iter()
                .enumerate()
                .filter_map(|(index, item)| {
                    let state = items.get(item)?;
                    Some(ConflictVersion {
                        item: *item,
                        version: state.winner().clone(),
                        shown_at: path_of(item),
                        winner: index == 0,
                    })
                })
                .collect();
            out.push(Conflict {
                path,
                kind: ConflictKind::Name,
                versions,
            });
        }
        out.sort_by(|a, b| a.path.cmp(&b.path).then(a.kind.cmp(&b.kind)));
        Ok(out)
    }

    /// Settles the conflict at `path` (as [`FolderReplica::conflicts`] lists it) and brings the
    /// folder in line. The resolution is a local write: it goes to other replicas with the
    /// next sync.
    pub fn resolve(
        &mut self,
        path: &str,
        how: &Resolution,
        progress: &dyn Progress,
    ) -> Result<ResolveReport, FolderError> {
        let conflicts = self.conflicts()?;
        let conflict = conflicts
            .iter()
            .find(|c| c.path == path)
            .ok_or_else(|| FolderError::NoConflict(path.to_owned()))?
            .clone();
        let items = self.store().load_items()?;
        let taken = |name: &str, parent: &ItemId| {
            items.values().any(|s| {
                let w = &s.winner().entry;
                !w.deleted && w.parent == *parent && w.name == name
            })
        };
        let merged = match how {
            Resolution::Merged(file) => {
                let handle = std::fs::File::open(file).map_err(io_error(file))?;
                let len = handle.metadata().map_err(io_error(file))?.len();
                let content = shoal_store::chunk_reader(handle, len).map_err(io_error(file))?;
                Some((file.clone(), content))
            }
            _ => None,
        };
        if let Resolution::Keep(n) = how
            && (*n == 0 || *n > conflict.versions.len())
        {
            return Err(FolderError::BadResolution(format!(
                "version {n} does not exist; this conflict has {}",
                conflict.versions.len()
            )));
        }

        let now = crate::now_ns();
        let mut tx = self.store_mut().begin()?;
        let writer = tx.identity().writer();
        let mut written = 0;
        // Supersedes every version the conflict lists for `item`.
        let covering = |item: &ItemId, state: &ItemState| -> Knowledge {
            let mut base = Knowledge::new();
            for v in conflict.versions.iter().filter(|v| v.item == *item) {
                base.merge(&v.version.history());
            }
            state.compact_context(base, writer)
        };
        let mut by_item: Vec<ItemId> = conflict.versions.iter().map(|v| v.item).collect();
        by_item.dedup();
        if conflict.kind == ConflictKind::Name {
            // Several items: the one kept takes the name; the others are deleted, or, to
            // keep both, keep the names they are shown under.
            let keep = match how {
                Resolution::Keep(n) => Some(conflict.versions[n - 1].item),
                Resolution::Merged(_) => Some(conflict.versions[0].item),
                Resolution::Both => None,
            };
            for (index, member) in conflict.versions.iter().enumerate() {
                let Some(state) = items.get(&member.item) else {
                    continue;
                };
                let mut entry = member.version.entry.clone();
                match keep {
                    Some(kept) if kept == member.item => {
                        if let Some((_, content)) = &merged {
                            tx.put_content(content)?;
                            entry.content = Some(content.hash);
                            entry.size = content.size;
                        }
                        // The kept item takes the contested name.
                        entry.name = Path::new(&conflict.path)
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or(entry.name);
                    }
                    Some(_) => {
                        entry.deleted = true;
                        entry.content = None;
                    }
                    None if index == 0 => {}
                    None => {
                        // Keep both: a name of its own beside the other, saying whose it is.
                        let parent = entry.parent;
                        entry.name = distinct_name(&entry.name, &member.version.device, &|n| {
                            taken(n, &parent)
                        });
                    }
                }
                tx.write_local(member.item, entry, covering(&member.item, state), now)?;
                written += 1;
            }
        } else {
            let item = conflict.versions[0].item;
            let state = items
                .get(&item)
                .ok_or_else(|| FolderError::NoConflict(path.to_owned()))?;
            let winner = &conflict.versions[0].version;
            let mut entry = match how {
                Resolution::Keep(n) => conflict.versions[n - 1].version.entry.clone(),
                _ => winner.entry.clone(),
            };
            if let Some((_, content)) = &merged {
                tx.put_content(content)?;
                entry.kind = ItemKind::File;
                entry.deleted = false;
                entry.content = Some(content.hash);
                entry.size = content.size;
                entry.mtime_ns = now;
            }
            tx.write_local(item, entry, covering(&item, state), now)?;
            written += 1;
            if *how == Resolution::Both {
                // Every other live version becomes an item of its own beside the winner.
                let mut names: Vec<(ItemId, String)> = Vec::new();
                for loser in conflict.versions.iter().skip(1) {
                    let v = &loser.version;
                    if v.entry.deleted || v.entry.content == winner.entry.content {
                        continue;
                    }
                    let parent = v.entry.parent;
                    let name = distinct_name(&v.entry.name, &v.device, &|n| {
                        taken(n, &parent) || names.iter().any(|(p, m)| *p == parent && m == n)
                    });
                    names.push((parent, name.clone()));
                    let mut copy = v.entry.clone();
                    copy.name = name;
                    // Its content's chunk list is already held: the version came with it.
                    tx.write_local(ItemId(rand::random()), copy, Knowledge::new(), now)?;
                    written += 1;
                }
            }
        }
        tx.set_needs_materialize(true)?;
        tx.commit()?;

        let folder_source = self.content_source()?;
        let merged_source = merged.map(|(path, content)| MergedFile {
            path,
            hash: content.hash,
        });
        let mut sources: Vec<&dyn ContentSource> = vec![&folder_source];
        if let Some(merged) = &merged_source {
            sources.push(merged);
        }
        let materialize = self.materialize(Some(&Sources(sources)), progress)?;
        Ok(ResolveReport {
            versions: written,
            materialize,
        })
    }
}
