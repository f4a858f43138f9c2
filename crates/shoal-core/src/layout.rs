//! The tree every replica shows: where each current version appears as a path.
//!
//! Items refer to their parent by id, so concurrent renames and moves can produce states no
//! file system can hold: two items with one name in one folder, an item inside a deleted
//! folder, a move cycle. The layout resolves each of these with a pure function of the item
//! states, so every replica that holds the same states shows the same tree, and no version is
//! hidden from the user: conflict losers of files appear as conflict copies beside the winner.

use std::collections::{HashMap, HashSet};

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

/// One path of the tree. It borrows its version from the item states it was laid out from:
/// a large tree is laid out on every sync, and a copy of each version would double it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Placement<'a> {
    /// Slash-separated path relative to the workspace root.
    pub path: String,
    /// The item shown.
    pub item: ItemId,
    /// Winner or conflict copy.
    pub role: Role,
    /// The version whose content appears at the path.
    pub version: &'a Version,
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
pub struct Layout<'a> {
    /// Every path, sorted.
    pub placements: Vec<Placement<'a>>,
    /// Decisions worth reporting, in item order.
    pub notes: Vec<LayoutNote>,
}

/// Where an item hangs, by index into the sorted item list.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Parent {
    Root,
    Item(usize),
    /// The item's own name is refused: it is not shown, nor anything inside it.
    Refused,
}

const UNDECIDED: u8 = 0;
const HIDDEN: u8 = 1;
const SHOWN: u8 = 2;

/// Computes the tree for a set of item states.
///
/// Items are addressed by dense indices after one hash lookup each, so the whole layout is a
/// few passes over arrays: it runs on every sync that changes anything.
pub fn layout<'a>(items: impl IntoIterator<Item = (&'a ItemId, &'a ItemState)>) -> Layout<'a> {
    let mut list: Vec<(ItemId, &'a ItemState)> =
        items.into_iter().map(|(id, s)| (*id, s)).collect();
    list.sort_by_key(|(id, _)| *id);
    list.dedup_by_key(|(id, _)| *id);
    let count = list.len();
    let index_of: HashMap<ItemId, usize> = list
        .iter()
        .enumerate()
        .map(|(index, (id, _))| (*id, index))
        .collect();
    let winner = |index: usize| list[index].1.winner();
    let mut notes = Vec::new();

    // 1. Parents. A parent not held here (not received yet, or a forgotten deletion) puts the
    //    item at the root rather than hiding it: a person still sees it.
    let mut parent: Vec<Parent> = Vec::with_capacity(count);
    for (index, (id, state)) in list.iter().enumerate() {
        let entry = &state.winner().entry;
        if let Err(error) = validate_name(&entry.name) {
            notes.push(LayoutNote::BadName { item: *id, error });
            parent.push(Parent::Refused);
        } else if entry.parent == ItemId::ROOT {
            parent.push(Parent::Root);
        } else if let Some(&up) = index_of.get(&entry.parent).filter(|up| **up != index) {
            parent.push(Parent::Item(up));
        } else {
            if !entry.deleted {
                notes.push(LayoutNote::Orphan { item: *id });
            }
            parent.push(Parent::Root);
        }
    }

    // 2. Visibility: live items, and the deleted folders above them, which come back.
    let mut visibility = vec![UNDECIDED; count];
    for (index, p) in parent.iter().enumerate() {
        if *p == Parent::Refused {
            visibility[index] = HIDDEN;
        }
    }
    let mut resurrected = Vec::new();
    let mut on_chain = vec![usize::MAX; count];
    let mut chain = Vec::new();
    for start in 0..count {
        if winner(start).entry.deleted || visibility[start] != UNDECIDED {
            continue;
        }
        chain.clear();
        let mut current = start;
        let outcome = loop {
            if visibility[current] != UNDECIDED {
                break visibility[current];
            }
            if on_chain[current] == start {
                break SHOWN; // a cycle: shown here, broken below
            }
            on_chain[current] = start;
            chain.push(current);
            match parent[current] {
                Parent::Root => break SHOWN,
                Parent::Refused => break HIDDEN,
                Parent::Item(up) if winner(up).entry.kind == ItemKind::Directory => current = up,
                Parent::Item(_) => break HIDDEN,
            }
        };
        for &index in &chain {
            if outcome == SHOWN && winner(index).entry.deleted {
                resurrected.push(index);
            }
            visibility[index] = outcome;
        }
    }
    resurrected.sort_unstable();
    notes.extend(resurrected.iter().map(|index| LayoutNote::Resurrected {
        item: list[*index].0,
    }));

    // 3. Break move cycles: in each, the item whose winning version ranks highest (the most
    //    recent move) goes to the root.
    let mut settled = vec![false; count];
    let mut path_mark = vec![usize::MAX; count];
    for start in (0..count).filter(|i| visibility[*i] == SHOWN) {
        chain.clear();
        let mut current = start;
        loop {
            if settled[current] {
                break;
            }
            if path_mark[current] == start {
                let position = chain.iter().position(|i| *i == current).unwrap_or(0);
                let chosen = chain[position..]
                    .iter()
                    .copied()
                    .max_by(|a, b| winner(*a).rank_cmp(winner(*b)));
                if let Some(chosen) = chosen {
                    parent[chosen] = Parent::Root;
                    notes.push(LayoutNote::CycleBroken {
                        item: list[chosen].0,
                    });
                }
                break;
            }
            path_mark[current] = start;
            chain.push(current);
            match parent[current] {
                Parent::Item(up) => current = up,
                Parent::Root | Parent::Refused => break,
            }
        }
        for &index in &chain {
            settled[index] = true;
        }
    }

    // 4. Names within each folder (index `count` stands for the root).
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); count + 1];
    for index in (0..count).filter(|i| visibility[*i] == SHOWN) {
        match parent[index] {
            Parent::Item(up) => children[up].push(index),
            Parent::Root => children[count].push(index),
            Parent::Refused => {}
        }
    }
    let mut main_names: Vec<String> = vec![String::new(); count];
    let mut copy_names: HashMap<usize, Vec<String>> = HashMap::new();
    for (folder, members) in children.iter().enumerate() {
        if !members.is_empty() {
            assign_names(
                folder == count,
                members,
                &list,
                &mut main_names,
                &mut copy_names,
                &mut notes,
            );
        }
    }

    // 5. Paths, top-down.
    let mut placements = Vec::with_capacity(count);
    let mut stack: Vec<(usize, String)> = vec![(count, String::new())];
    while let Some((folder, prefix)) = stack.pop() {
        for &child in &children[folder] {
            let join = |name: &str| {
                if prefix.is_empty() {
                    name.to_owned()
                } else {
                    format!("{prefix}/{name}")
                }
            };
            let (id, state) = list[child];
            let path = join(&main_names[child]);
            placements.push(Placement {
                path: path.clone(),
                item: id,
                role: Role::Main,
                version: state.winner(),
            });
            for (loser, name) in
                copy_losers(state).zip(copy_names.get(&child).into_iter().flatten())
            {
                placements.push(Placement {
                    path: join(name),
                    item: id,
                    role: Role::ConflictCopy,
                    version: loser,
                });
            }
            if state.winner().entry.kind == ItemKind::Directory {
                stack.push((child, path));
            }
        }
    }
    // Paths are unique, so an unstable sort gives the same order without a merge buffer.
    placements.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    Layout { placements, notes }
}

/// Losers of a live file that get a conflict copy (deleted losers have nothing to show).
fn copy_losers(state: &ItemState) -> impl Iterator<Item = &Version> {
    let file = state.winner().entry.kind == ItemKind::File;
    state
        .losers()
        .iter()
        .filter(move |v| file && !v.entry.deleted && v.entry.kind == ItemKind::File)
}

fn assign_names(
    at_root: bool,
    members: &[usize],
    list: &[(ItemId, &ItemState)],
    main_names: &mut [String],
    copy_names: &mut HashMap<usize, Vec<String>>,
    notes: &mut Vec<LayoutNote>,
) {
    let mut taken: HashSet<String> = HashSet::with_capacity(members.len());
    if at_root {
        taken.insert(STATE_DIR_NAME.to_owned());
    }
    let mut mains: Vec<usize> = members.to_vec();
    mains.sort_by(|a, b| list[*b].1.winner().rank_cmp(list[*a].1.winner()));
    for &index in &mains {
        let (id, state) = list[index];
        let winner = state.winner();
        let wanted = &winner.entry.name;
        let name = if !taken.contains(wanted) {
            wanted.clone()
        } else {
            let first = conflict_copy_name(wanted, &winner.device, winner.written_at);
            let placed = unique(first, &id.short(), &taken);
            notes.push(LayoutNote::NameClash {
                item: id,
                wanted: wanted.clone(),
                placed: placed.clone(),
            });
            placed
        };
        taken.insert(name.clone());
        main_names[index] = name;
    }
    // Members are in id order already (indices follow the sorted item list).
    let mut ids: Vec<usize> = members.to_vec();
    ids.sort_unstable();
    for index in ids {
        let state = list[index].1;
        let mut names = Vec::new();
        for loser in copy_losers(state) {
            let first = conflict_copy_name(&main_names[index], &loser.device, loser.written_at);
            let tag = format!("{}{}", loser.dot.writer.replica.short(), loser.dot.tick);
            let name = unique(first, &tag, &taken);
            taken.insert(name.clone());
            names.push(name);
        }
        if !names.is_empty() {
            copy_names.insert(index, names);
        }
    }
}

/// `first` if free, else `first` with `tag` and then a counter inserted before the extension.
fn unique(first: String, tag: &str, taken: &HashSet<String>) -> String {
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
