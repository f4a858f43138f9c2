//! The tree every replica shows: where each current version appears as a path.
//!
//! Items refer to their parent by id, so concurrent renames and moves can produce states no
//! file system can hold: two items with one name in one folder, an item inside a deleted
//! folder, a move cycle. The layout resolves each of these with a pure function of the item
//! states, so every replica that holds the same states shows the same tree, and no version is
//! hidden from the user: conflict losers of files appear as conflict copies beside the winner.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::ids::ItemId;
use crate::item::{ItemKind, ItemState, Version};
use crate::name::{NameError, STATE_DIR_NAME, conflict_copy_name, validate_name};

/// Which version of an item a placement shows.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Role {
    /// The winning version, under the item's own name.
    Main,
    /// A losing concurrent version of a file, kept beside the winner under a conflict name.
    ConflictCopy,
}

/// One path of the tree.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Placement {
    /// Slash-separated path relative to the workspace root.
    pub path: String,
    /// The item shown.
    pub item: ItemId,
    /// Winner or conflict copy.
    pub role: Role,
    /// The version whose content appears at the path.
    pub version: Version,
}

/// Something the layout had to decide that a person may want to know about.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum LayoutNote {
    /// Two items wanted one name in one folder; this one was given another name.
    NameClash {
        /// The item that yielded the name.
        item: ItemId,
        /// The name it asked for.
        wanted: String,
        /// The name it got.
        placed: String,
    },
    /// A deleted folder is shown again because something was put inside it concurrently.
    Resurrected {
        /// The folder.
        item: ItemId,
    },
    /// Concurrent moves made a cycle; this item was put at the workspace root to break it.
    CycleBroken {
        /// The item moved to the root.
        item: ItemId,
    },
    /// A version carries a name that cannot be stored; the item is not shown.
    BadName {
        /// The item.
        item: ItemId,
        /// Why the name was refused.
        error: NameError,
    },
    /// The item's parent is not held here (not yet received, or a forgotten deletion); it is
    /// shown at the workspace root.
    Orphan {
        /// The item.
        item: ItemId,
    },
}

/// The whole tree: placements sorted by path, and the notes explaining unusual ones.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Layout {
    /// Every path, sorted.
    pub placements: Vec<Placement>,
    /// Decisions worth reporting, in item order.
    pub notes: Vec<LayoutNote>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Visibility {
    Hidden,
    Shown,
}

/// Computes the tree for a set of item states.
pub fn layout<'a>(items: impl IntoIterator<Item = (&'a ItemId, &'a ItemState)>) -> Layout {
    let items: BTreeMap<ItemId, &ItemState> =
        items.into_iter().map(|(id, state)| (*id, state)).collect();
    let mut notes = Vec::new();

    // 1. Which items are shown, and under which parent.
    let mut visible: HashMap<ItemId, Visibility> = HashMap::new();
    let mut parent_of: HashMap<ItemId, ItemId> = HashMap::new();
    for (id, state) in &items {
        let winner = state.winner();
        if let Err(error) = validate_name(&winner.entry.name) {
            notes.push(LayoutNote::BadName { item: *id, error });
            visible.insert(*id, Visibility::Hidden);
            continue;
        }
        parent_of.insert(*id, winner.entry.parent);
    }
    // A parent not held here (not received yet, or a forgotten deletion) puts the item at the
    // root rather than hiding it: a person still sees it.
    for (id, parent) in parent_of.iter_mut() {
        if *parent != ItemId::ROOT && !items.contains_key(parent) {
            *parent = ItemId::ROOT;
            if !items[id].winner().entry.deleted {
                notes.push(LayoutNote::Orphan { item: *id });
            }
        }
    }
    notes.sort_by_key(note_item);
    let mut resurrected = BTreeSet::new();
    for (id, state) in &items {
        if !state.winner().entry.deleted {
            make_visible(*id, &items, &parent_of, &mut visible, &mut resurrected);
        }
    }
    notes.extend(
        resurrected
            .into_iter()
            .map(|item| LayoutNote::Resurrected { item }),
    );
    let shown: BTreeSet<ItemId> = visible
        .iter()
        .filter(|(_, v)| **v == Visibility::Shown)
        .map(|(id, _)| *id)
        .collect();

    // 2. Break move cycles: the most recently ranked move in each cycle goes to the root.
    for item in break_cycles(&shown, &items, &mut parent_of) {
        notes.push(LayoutNote::CycleBroken { item });
    }

    // 3. Names within each folder.
    let mut children: BTreeMap<ItemId, Vec<ItemId>> = BTreeMap::new();
    for id in &shown {
        children.entry(parent_of[id]).or_default().push(*id);
    }
    let mut placed_names: HashMap<(ItemId, Role, usize), String> = HashMap::new();
    for (parent, members) in &children {
        assign_names(*parent, members, &items, &mut placed_names, &mut notes);
    }

    // 4. Paths, top-down.
    let mut placements = Vec::new();
    let mut stack: Vec<(ItemId, String)> = vec![(ItemId::ROOT, String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        for child in children.get(&dir).into_iter().flatten() {
            let state = items[child];
            let name = &placed_names[&(*child, Role::Main, 0)];
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            placements.push(Placement {
                path: path.clone(),
                item: *child,
                role: Role::Main,
                version: state.winner().clone(),
            });
            for (index, loser) in copy_losers(state).enumerate() {
                let name = &placed_names[&(*child, Role::ConflictCopy, index)];
                placements.push(Placement {
                    path: if prefix.is_empty() {
                        name.clone()
                    } else {
                        format!("{prefix}/{name}")
                    },
                    item: *child,
                    role: Role::ConflictCopy,
                    version: loser.clone(),
                });
            }
            if state.winner().entry.kind == ItemKind::Directory {
                stack.push((*child, path));
            }
        }
    }
    placements.sort_by(|a, b| a.path.cmp(&b.path));
    Layout { placements, notes }
}

fn note_item(note: &LayoutNote) -> ItemId {
    match note {
        LayoutNote::NameClash { item, .. }
        | LayoutNote::Resurrected { item }
        | LayoutNote::CycleBroken { item }
        | LayoutNote::BadName { item, .. }
        | LayoutNote::Orphan { item } => *item,
    }
}

/// Losers of a live file that get a conflict copy (deleted losers have nothing to show).
fn copy_losers(state: &ItemState) -> impl Iterator<Item = &Version> {
    let file = state.winner().entry.kind == ItemKind::File;
    state
        .losers()
        .iter()
        .filter(move |v| file && !v.entry.deleted && v.entry.kind == ItemKind::File)
}

fn make_visible(
    start: ItemId,
    items: &BTreeMap<ItemId, &ItemState>,
    parent_of: &HashMap<ItemId, ItemId>,
    visible: &mut HashMap<ItemId, Visibility>,
    resurrected: &mut BTreeSet<ItemId>,
) {
    // Walk up until a decided ancestor (or the root), then decide the whole chain at once.
    let mut chain = Vec::new();
    let mut current = start;
    let mut seen = BTreeSet::new();
    let outcome = loop {
        if let Some(v) = visible.get(&current) {
            break *v;
        }
        if !seen.insert(current) {
            // A cycle: shown here, broken later.
            break Visibility::Shown;
        }
        let Some(parent) = parent_of.get(&current) else {
            break Visibility::Hidden;
        };
        chain.push(current);
        if *parent == ItemId::ROOT {
            break Visibility::Shown;
        }
        match items.get(parent) {
            Some(state) if state.winner().entry.kind == ItemKind::Directory => current = *parent,
            _ => break Visibility::Hidden,
        }
    };
    for id in chain {
        if outcome == Visibility::Shown && items[&id].winner().entry.deleted {
            resurrected.insert(id);
        }
        visible.insert(id, outcome);
    }
}

fn break_cycles(
    shown: &BTreeSet<ItemId>,
    items: &BTreeMap<ItemId, &ItemState>,
    parent_of: &mut HashMap<ItemId, ItemId>,
) -> Vec<ItemId> {
    let mut broken = Vec::new();
    let mut settled: BTreeSet<ItemId> = BTreeSet::new();
    for start in shown {
        let mut path: Vec<ItemId> = Vec::new();
        let mut on_path: BTreeSet<ItemId> = BTreeSet::new();
        let mut current = *start;
        loop {
            if current == ItemId::ROOT || settled.contains(&current) {
                break;
            }
            if on_path.contains(&current) {
                let position = path.iter().position(|id| *id == current).unwrap_or(0);
                let cycle = &path[position..];
                let Some(chosen) = cycle
                    .iter()
                    .copied()
                    .max_by(|a, b| items[a].winner().rank_cmp(items[b].winner()))
                else {
                    break;
                };
                parent_of.insert(chosen, ItemId::ROOT);
                broken.push(chosen);
                break;
            }
            on_path.insert(current);
            path.push(current);
            current = parent_of[&current];
        }
        settled.extend(path);
    }
    broken
}

fn assign_names(
    parent: ItemId,
    members: &[ItemId],
    items: &BTreeMap<ItemId, &ItemState>,
    placed: &mut HashMap<(ItemId, Role, usize), String>,
    notes: &mut Vec<LayoutNote>,
) {
    let mut taken: BTreeSet<String> = BTreeSet::new();
    if parent == ItemId::ROOT {
        taken.insert(STATE_DIR_NAME.to_owned());
    }
    let mut mains: Vec<ItemId> = members.to_vec();
    mains.sort_by(|a, b| items[b].winner().rank_cmp(items[a].winner()));
    for id in &mains {
        let winner = items[id].winner();
        let wanted = &winner.entry.name;
        let name = if !taken.contains(wanted) {
            wanted.clone()
        } else {
            let first = conflict_copy_name(wanted, &winner.device, winner.written_at);
            let placed = unique(first, &id.short(), &taken);
            notes.push(LayoutNote::NameClash {
                item: *id,
                wanted: wanted.clone(),
                placed: placed.clone(),
            });
            placed
        };
        taken.insert(name.clone());
        placed.insert((*id, Role::Main, 0), name);
    }
    let mut ids: Vec<ItemId> = members.to_vec();
    ids.sort();
    for id in ids {
        let main_name = placed[&(id, Role::Main, 0)].clone();
        for (index, loser) in copy_losers(items[&id]).enumerate() {
            let first = conflict_copy_name(&main_name, &loser.device, loser.written_at);
            let tag = format!("{}{}", loser.dot.writer.replica.short(), loser.dot.tick);
            let name = unique(first, &tag, &taken);
            taken.insert(name.clone());
            placed.insert((id, Role::ConflictCopy, index), name);
        }
    }
}

/// `first` if free, else `first` with `tag` and then a counter inserted before the extension.
fn unique(first: String, tag: &str, taken: &BTreeSet<String>) -> String {
    if !taken.contains(&first) && validate_name(&first).is_ok() {
        return first;
    }
    let (stem, extension) = match first.rfind('.') {
        Some(index) if index > 0 => first.split_at(index),
        _ => (first.as_str(), ""),
    };
    let mut counter = 0u64;
    loop {
        let candidate = if counter == 0 {
            format!("{stem}-{tag}{extension}")
        } else {
            format!("{stem}-{tag}-{counter}{extension}")
        };
        if !taken.contains(&candidate) {
            return candidate;
        }
        counter += 1;
    }
}
