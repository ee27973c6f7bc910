//! The per-volume mapping: volume cluster index → pool cluster, as a copy-on-write radix tree
//! whose nodes are shared between a volume and its snapshots and clones (docs/VOLUMES.md).
//!
//! Invariants:
//! - a snapshot is `Tree::clone`: it shares the root, O(1) whatever the volume size;
//! - a node is copied only when a tree that shares it is changed (`Arc::make_mut`), and the
//!   copy is reported, so the caller can add one reference to every cluster the copy names;
//! - a pool cluster's reference count equals the number of distinct leaf nodes, over all live
//!   trees and the [`Remains`] of released ones, that name it (`count_references` recomputes
//!   it for `pool check` and tests);
//! - releasing a tree reports every cluster whose last leaf reference it held, exactly once.

use std::collections::HashMap;
use std::sync::Arc;

/// Entries per node: one 4 KiB page of 8-byte entries. Four under the `small-tree` feature, for
/// the simulator only (tests/e2e/sim_mutants.sh): its volumes of a few clusters then grow trees
/// of several levels, and resizes cross them.
pub const FANOUT: usize = 1 << FANOUT_BITS;
#[cfg(not(feature = "small-tree"))]
const FANOUT_BITS: u32 = 9;
#[cfg(feature = "small-tree")]
const FANOUT_BITS: u32 = 2;

/// A leaf entry: pool cluster (40 bits) + written bitmap of its 4 KiB pieces (16 bits).
/// 0 means unmapped (pool cluster 0 is never handed out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Entry(pub u64);

impl Entry {
    pub const UNMAPPED: Entry = Entry(0);

    pub fn new(cluster: u64, written: u16) -> Entry {
        assert!(cluster != 0 && cluster < (1 << 40), "cluster {cluster} out of range");
        Entry(cluster | (u64::from(written) << 40))
    }

    pub fn cluster(self) -> Option<u64> {
        let c = self.0 & ((1 << 40) - 1);
        (c != 0).then_some(c)
    }

    pub fn written(self) -> u16 {
        (self.0 >> 40) as u16
    }
}

#[derive(Clone)]
enum Node {
    Leaf(Box<[Entry; FANOUT]>),
    Inner(Box<[Option<Arc<Node>>; FANOUT]>),
}

/// The slot of `vcluster`'s path in a node `level` levels above the leaves (0: the leaf).
#[inline]
fn index_at(vcluster: u64, level: u32) -> usize {
    ((vcluster >> (FANOUT_BITS * level)) as usize) & (FANOUT - 1)
}

fn empty_leaf() -> Node {
    Node::Leaf(Box::new([Entry::UNMAPPED; FANOUT]))
}

fn empty_inner() -> Node {
    Node::Inner(Box::new(std::array::from_fn(|_| None)))
}

/// One volume's mapping.
#[derive(Clone)]
pub struct Tree {
    root: Option<Arc<Node>>,
    /// Levels of inner nodes above the leaves.
    depth: u32,
}

impl Tree {
    /// A tree able to map `clusters` volume clusters.
    pub fn new(clusters: u64) -> Tree {
        let mut depth = 0;
        let mut reach = FANOUT as u64;
        while reach < clusters.max(1) {
            reach = reach.saturating_mul(FANOUT as u64);
            depth += 1;
        }
        Tree { root: None, depth }
    }

    /// Makes the tree able to address `clusters` clusters (volume growth): the old root becomes
    /// the first child of new levels; nothing is copied, sharing is kept.
    pub fn grow(&mut self, clusters: u64) {
        while self.capacity() < clusters {
            if let Some(old) = self.root.take() {
                let mut inner: [Option<Arc<Node>>; FANOUT] = std::array::from_fn(|_| None);
                inner[0] = Some(old);
                self.root = Some(Arc::new(Node::Inner(Box::new(inner))));
            }
            self.depth += 1;
        }
    }

    /// Clusters this tree can address.
    pub fn capacity(&self) -> u64 {
        (FANOUT as u64).saturating_pow(self.depth + 1)
    }

    pub fn get(&self, vcluster: u64) -> Entry {
        assert!(vcluster < self.capacity());
        let mut node = match &self.root {
            Some(n) => n,
            None => return Entry::UNMAPPED,
        };
        let mut level = self.depth;
        loop {
            match &**node {
                Node::Leaf(entries) => return entries[index_at(vcluster, 0)],
                Node::Inner(children) => match &children[index_at(vcluster, level)] {
                    Some(child) => {
                        node = child;
                        level -= 1;
                    }
                    None => return Entry::UNMAPPED,
                },
            }
        }
    }

    /// Sets an entry, copying shared nodes on the way; `on_leaf_copy` sees the entries of each
    /// leaf copied (each of their clusters gains a reference). Returns the previous entry.
    pub fn set(
        &mut self,
        vcluster: u64,
        entry: Entry,
        mut on_leaf_copy: impl FnMut(&[Entry]),
    ) -> Entry {
        assert!(vcluster < self.capacity());
        let mut slot = &mut self.root;
        for level in (0..=self.depth).rev() {
            let i = index_at(vcluster, level);
            let node = slot.get_or_insert_with(|| {
                Arc::new(if level == 0 { empty_leaf() } else { empty_inner() })
            });
            if Arc::strong_count(node) > 1 {
                if let Node::Leaf(entries) = &**node {
                    on_leaf_copy(&entries[..]);
                }
            }
            match Arc::make_mut(node) {
                Node::Leaf(entries) => {
                    assert_eq!(level, 0);
                    return std::mem::replace(&mut entries[i], entry);
                }
                Node::Inner(children) => slot = &mut children[i],
            }
        }
        unreachable!("walked past the leaves")
    }

    /// Whether the leaf holding `vcluster` is shared with another tree (a write must copy it).
    pub fn leaf_shared(&self, vcluster: u64) -> bool {
        let mut node = match &self.root {
            Some(n) => n,
            None => return false,
        };
        let mut shared = Arc::strong_count(node) > 1;
        let mut level = self.depth;
        while let Node::Inner(children) = &**node {
            match &children[index_at(vcluster, level)] {
                Some(child) => {
                    shared |= Arc::strong_count(child) > 1;
                    node = child;
                    level -= 1;
                }
                None => return false,
            }
        }
        shared
    }

    /// Drops this tree; `on_release` sees each entry whose leaf this tree held the last
    /// reference to (each of their clusters loses a reference).
    pub fn release(self, on_release: impl FnMut(Entry)) {
        self.into_remains().release_some(usize::MAX, on_release);
    }

    /// This tree as [`Remains`], to release in steps: the tree's nodes stay held (another
    /// tree sharing one still sees it shared) until a step lets each go.
    pub fn into_remains(self) -> Remains {
        Remains { nodes: self.root.into_iter().collect() }
    }

    /// Cuts away the leaves from volume cluster `start` on (a shrink; `start` is a leaf's
    /// first cluster): the subtrees covering only such clusters are detached whole and
    /// returned as [`Remains`], to release in steps as a retired tree's. Inner nodes on the
    /// way are made this tree's own where shared (a copied inner node adds no leaf: no
    /// reference changes, no leaf copied). Costs the path's nodes, whatever is mapped beyond;
    /// afterwards the tree maps nothing at or after `start`.
    pub fn cut_from(&mut self, start: u64) -> Remains {
        assert!(start.is_multiple_of(FANOUT as u64), "cut at a leaf's first cluster");
        let mut nodes = Vec::new();
        if start == 0 {
            nodes.extend(self.root.take());
            return Remains { nodes };
        }
        let mut slot = &mut self.root;
        let mut base = 0u64;
        // A leaf's first cluster falls in no leaf: the walk ends at level 1 at the latest.
        for level in (1..=self.depth).rev() {
            let span = (FANOUT as u64).pow(level);
            if start >= base + span * FANOUT as u64 {
                break; // beyond this node's reach (beyond the tree's, at the root)
            }
            // Child `i` covers [base + i * span, base + (i + 1) * span): those from `whole` on
            // lie wholly at or after `start`; `straddle` (when below `whole`) holds it inside.
            let straddle = ((start - base) / span) as usize;
            let whole = (start - base).div_ceil(span) as usize;
            let Some(node) = slot.as_mut() else { break };
            let Node::Inner(children) = &**node else { unreachable!("a leaf above level 0") };
            let goes_on = straddle < whole && children[straddle].is_some();
            if !goes_on && children[whole..].iter().all(Option::is_none) {
                break;
            }
            let Node::Inner(children) = Arc::make_mut(node) else { unreachable!() };
            nodes.extend(children[whole..].iter_mut().filter_map(Option::take));
            if !goes_on {
                break;
            }
            base += straddle as u64 * span;
            slot = &mut children[straddle];
        }
        Remains { nodes }
    }

    /// Copies the tree's leaves out, for a checkpoint to encode while the live tree goes on
    /// changing. A leaf several trees share is copied once (`seen`, by node, over all the
    /// trees frozen together) and shared by their frozen copies, so the encoder can tell what
    /// a clone shares with its parent. Costs one copy of each distinct leaf; the live tree's
    /// nodes are not shared with the copy (their reference counts mean "trees sharing").
    pub fn freeze(&self, seen: &mut Freezer) -> FrozenTree {
        fn walk(
            node: &Arc<Node>,
            base: u64,
            level: u32,
            seen: &mut HashMap<usize, FrozenLeaf>,
            out: &mut Vec<(u64, FrozenLeaf)>,
        ) {
            match &**node {
                Node::Leaf(entries) => {
                    let leaf = seen
                        .entry(Arc::as_ptr(node) as usize)
                        .or_insert_with(|| FrozenLeaf(Arc::new(**entries)));
                    out.push((base, leaf.clone()));
                }
                Node::Inner(children) => {
                    let span = (FANOUT as u64).pow(level);
                    for (i, c) in children.iter().enumerate() {
                        if let Some(c) = c {
                            walk(c, base + i as u64 * span, level - 1, seen, out);
                        }
                    }
                }
            }
        }
        let mut leaves = Vec::new();
        if let Some(root) = &self.root {
            walk(root, 0, self.depth, &mut seen.0, &mut leaves);
        }
        FrozenTree { capacity: self.capacity(), leaves }
    }

    /// Calls `f(vcluster, entry)` for each mapped entry with volume cluster in `[start, end)`,
    /// in order; subtrees outside the range or empty are skipped, so the cost follows what is
    /// mapped, not the range size.
    pub fn for_each_in(&self, start: u64, end: u64, mut f: impl FnMut(u64, Entry)) {
        fn walk(
            node: &Node,
            base: u64,
            level: u32,
            range: (u64, u64),
            f: &mut dyn FnMut(u64, Entry),
        ) {
            let span = (FANOUT as u64).pow(level);
            match node {
                Node::Leaf(entries) => {
                    for (i, e) in entries.iter().enumerate() {
                        let vc = base + i as u64;
                        if e.cluster().is_some() && vc >= range.0 && vc < range.1 {
                            f(vc, *e);
                        }
                    }
                }
                Node::Inner(children) => {
                    for (i, c) in children.iter().enumerate() {
                        let child_base = base + i as u64 * span;
                        if child_base >= range.1 || child_base + span <= range.0 {
                            continue;
                        }
                        if let Some(c) = c {
                            walk(c, child_base, level - 1, range, f);
                        }
                    }
                }
            }
        }
        if let Some(root) = &self.root {
            walk(root, 0, self.depth, (start, end), &mut f);
        }
    }

    /// The first volume cluster at or after `start` whose entry is mapped and satisfies
    /// `pred`, walking as [`Self::for_each_in`] does and stopping there: a caller that resumes
    /// after each find walks the tree once in all.
    pub fn first_from(&self, start: u64, mut pred: impl FnMut(u64, Entry) -> bool) -> Option<u64> {
        fn walk(
            node: &Node,
            base: u64,
            level: u32,
            start: u64,
            pred: &mut dyn FnMut(u64, Entry) -> bool,
        ) -> Option<u64> {
            let span = (FANOUT as u64).pow(level);
            match node {
                Node::Leaf(entries) => entries.iter().enumerate().find_map(|(i, e)| {
                    let vc = base + i as u64;
                    (e.cluster().is_some() && vc >= start && pred(vc, *e)).then_some(vc)
                }),
                Node::Inner(children) => children.iter().enumerate().find_map(|(i, c)| {
                    let child_base = base + i as u64 * span;
                    if child_base + span <= start {
                        return None;
                    }
                    c.as_ref().and_then(|c| walk(c, child_base, level - 1, start, pred))
                }),
            }
        }
        walk(self.root.as_ref()?, 0, self.depth, start, &mut pred)
    }

    /// Mapped entries with volume cluster in `[start, end)`, in order ([`Self::for_each_in`]).
    pub fn entries_in(&self, start: u64, end: u64) -> Vec<(u64, Entry)> {
        let mut out = Vec::new();
        self.for_each_in(start, end, |vc, e| out.push((vc, e)));
        out
    }

    /// Where this tree and `other` differ within volume clusters `[start, end)`, in order:
    /// `f(vcluster, mine, theirs)` for each cluster whose entries are not equal (an unmapped
    /// side is [`Entry::UNMAPPED`]); `f` returns false to stop the walk. Subtrees the two trees
    /// share (a snapshot and its origin, before either changed them) are skipped whole, so the
    /// cost follows what changed since they shared it, not the range. Trees of different
    /// depths (one grown since) compare as if the shallower had its root under child 0.
    /// Returns how many leaves it compared entry by entry (the rest it skipped whole).
    pub fn differences_in(
        &self,
        other: &Tree,
        start: u64,
        end: u64,
        mut f: impl FnMut(u64, Entry, Entry) -> bool,
    ) -> usize {
        /// A node of one tree, covering `FANOUT^(level+1)` clusters from the walk's base; a
        /// shallower tree's root seen from above its level is the first child of each level.
        #[derive(Clone, Copy)]
        struct Cover<'a> {
            node: Option<&'a Arc<Node>>,
            level: u32,
        }
        impl<'a> Cover<'a> {
            /// The cover of child `i` of a walk at `level`.
            fn child(self, level: u32, i: usize) -> Cover<'a> {
                let none = Cover { node: None, level: level - 1 };
                match self.node {
                    None => none,
                    Some(_) if self.level < level => {
                        if i == 0 {
                            self
                        } else {
                            none
                        }
                    }
                    Some(n) => match &**n {
                        Node::Inner(children) => {
                            Cover { node: children[i].as_ref(), level: level - 1 }
                        }
                        Node::Leaf(_) => unreachable!("a leaf above level 0"),
                    },
                }
            }
            fn entries(self) -> Option<&'a [Entry; FANOUT]> {
                match &**self.node? {
                    Node::Leaf(e) => Some(e),
                    Node::Inner(_) => unreachable!("an inner node at level 0"),
                }
            }
        }
        type Visit<'f> = dyn FnMut(u64, Entry, Entry) -> bool + 'f;
        fn walk(
            a: Cover,
            b: Cover,
            base: u64,
            level: u32,
            range: (u64, u64),
            f: &mut Visit,
            leaves: &mut usize,
        ) -> bool {
            match (a.node, b.node) {
                (None, None) => return true,
                (Some(x), Some(y)) if a.level == b.level && Arc::ptr_eq(x, y) => return true,
                _ => {}
            }
            if level == 0 {
                *leaves += 1;
                let empty = [Entry::UNMAPPED; FANOUT];
                let (ea, eb) = (a.entries().unwrap_or(&empty), b.entries().unwrap_or(&empty));
                for i in 0..FANOUT {
                    let vc = base + i as u64;
                    if vc < range.0 || vc >= range.1 || ea[i] == eb[i] {
                        continue;
                    }
                    if !f(vc, ea[i], eb[i]) {
                        return false;
                    }
                }
                return true;
            }
            let span = (FANOUT as u64).pow(level);
            for i in 0..FANOUT {
                let child_base = base + i as u64 * span;
                if child_base >= range.1 {
                    break;
                }
                if child_base + span <= range.0 {
                    continue;
                }
                let (ca, cb) = (a.child(level, i), b.child(level, i));
                if !walk(ca, cb, child_base, level - 1, range, f, leaves) {
                    return false;
                }
            }
            true
        }
        let top = self.depth.max(other.depth);
        let end = end.min((FANOUT as u64).saturating_pow(top + 1));
        if start >= end {
            return 0;
        }
        let a = Cover { node: self.root.as_ref(), level: self.depth };
        let b = Cover { node: other.root.as_ref(), level: other.depth };
        let mut leaves = 0;
        walk(a, b, 0, top, (start, end), &mut f, &mut leaves);
        leaves
    }

    /// Mapped entries in volume order: (volume cluster, entry).
    pub fn entries(&self) -> Vec<(u64, Entry)> {
        fn walk(node: &Node, base: u64, level: u32, out: &mut Vec<(u64, Entry)>) {
            match node {
                Node::Leaf(entries) => {
                    for (i, e) in entries.iter().enumerate() {
                        if e.cluster().is_some() {
                            out.push((base + i as u64, *e));
                        }
                    }
                }
                Node::Inner(children) => {
                    let span = (FANOUT as u64).pow(level);
                    for (i, c) in children.iter().enumerate() {
                        if let Some(c) = c {
                            walk(c, base + i as u64 * span, level - 1, out);
                        }
                    }
                }
            }
        }
        let mut out = Vec::new();
        if let Some(root) = &self.root {
            walk(root, 0, self.depth, &mut out);
        }
        out
    }
}

/// Recomputes every cluster's reference count from the live trees and the remains of
/// released ones ([`Remains`]): one per distinct leaf.
pub fn count_references<'a>(
    trees: impl IntoIterator<Item = &'a Tree>,
    remains: impl IntoIterator<Item = &'a Remains>,
) -> HashMap<u64, u32> {
    fn walk(
        node: &Arc<Node>,
        seen: &mut std::collections::HashSet<*const Node>,
        counts: &mut HashMap<u64, u32>,
    ) {
        if !seen.insert(Arc::as_ptr(node)) {
            return;
        }
        match &**node {
            Node::Leaf(entries) => {
                for c in entries.iter().filter_map(|e| e.cluster()) {
                    *counts.entry(c).or_default() += 1;
                }
            }
            Node::Inner(children) => children.iter().flatten().for_each(|c| walk(c, seen, counts)),
        }
    }
    let mut seen = std::collections::HashSet::new();
    let mut counts = HashMap::new();
    let roots = trees.into_iter().filter_map(|t| t.root.as_ref());
    for root in roots.chain(remains.into_iter().flat_map(|r| &r.nodes)) {
        walk(root, &mut seen, &mut counts);
    }
    counts
}

/// A tree no volume names any more, released in steps ([`Tree::into_remains`]): the nodes it
/// still holds, each the last step's leftovers. A step pops nodes; a node another tree still
/// shares is let go at once (the other keeps it), one held only here is taken apart: a
/// leaf's entries reported (their clusters each lose a reference), an inner node's children
/// held in its place. Until a node is let go, whoever shares it sees it shared.
///
/// Invariant: together with the live trees, the nodes held here are what the reference
/// counts count ([`count_references`]); releasing them all in any number of steps reports
/// what [`Tree::release`] of the whole tree would have, each entry once.
#[derive(Default)]
pub struct Remains {
    nodes: Vec<Arc<Node>>,
}

impl Remains {
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Releases nodes until about `budget` units of work are spent — one per node popped, per
    /// entry reported and per child kept, so a step overruns `budget` by at most one node's
    /// [`FANOUT`] — reporting to `on_release` each entry whose leaf it held the last
    /// reference to. Returns the units spent (0 only when nothing was left).
    pub fn release_some(&mut self, budget: usize, mut on_release: impl FnMut(Entry)) -> usize {
        let mut spent = 0;
        while spent < budget {
            let Some(node) = self.nodes.pop() else { break };
            spent += 1;
            // Shared: the other holders keep it (a drop, no walk).
            let Ok(node) = Arc::try_unwrap(node) else { continue };
            match node {
                Node::Leaf(entries) => {
                    for e in entries.iter().filter(|e| e.cluster().is_some()) {
                        on_release(*e);
                        spent += 1;
                    }
                }
                Node::Inner(children) => {
                    for c in children.into_iter().flatten() {
                        self.nodes.push(c);
                        spent += 1;
                    }
                }
            }
        }
        spent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// A frozen copy lists what the tree maps, its difference from a parent's copy is the
        /// naive one, and freezing shares no live node (sharing decisions stay the same).
        #[test]
        fn frozen_copies_and_differences(
            sets in proptest::collection::vec((0u64..3000, 1u64..50), 1..200),
            child_sets in proptest::collection::vec((0u64..3000, 0u64..50), 0..100),
        ) {
            let mut parent = Tree::new(3000);
            for &(vc, c) in &sets {
                parent.set(vc, Entry::new(c, 1), |_| {});
            }
            let mut child = parent.clone();
            for &(vc, c) in &child_sets {
                let e = if c == 0 { Entry::UNMAPPED } else { Entry::new(c + 100, 3) };
                child.set(vc, e, |_| {});
            }
            let shared_before: Vec<bool> = (0..3000).map(|vc| child.leaf_shared(vc)).collect();
            let mut seen = Freezer::default();
            let (fp, fc) = (parent.freeze(&mut seen), child.freeze(&mut seen));
            let shared_after: Vec<bool> = (0..3000).map(|vc| child.leaf_shared(vc)).collect();
            prop_assert_eq!(shared_before, shared_after);
            let mut mapped = Vec::new();
            fc.for_each_mapped(|vc, e| mapped.push((vc, e)));
            prop_assert_eq!(&mapped, &child.entries());
            let theirs: HashMap<u64, Entry> = parent.entries().into_iter().collect();
            let mine: HashMap<u64, Entry> = child.entries().into_iter().collect();
            let mut naive: Vec<(u64, Entry)> = mine
                .iter()
                .filter(|(vc, e)| theirs.get(vc) != Some(e))
                .map(|(vc, e)| (*vc, *e))
                .chain(theirs.keys().filter(|vc| !mine.contains_key(vc)).map(|vc| (*vc, Entry::UNMAPPED)))
                .collect();
            naive.sort_by_key(|(vc, _)| *vc);
            let mut diff = Vec::new();
            fc.for_each_difference(&fp, u64::MAX, |vc, e| diff.push((vc, e)));
            diff.sort_by_key(|(vc, _)| *vc);
            prop_assert_eq!(diff, naive);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// Two trees that shared their nodes and then changed apart (one of them possibly
        /// grown deeper meanwhile): the walk reports exactly the clusters of the range whose
        /// entries differ, in order, with both entries; it stops when asked to.
        #[test]
        fn live_differences_are_the_naive_ones(
            sets in proptest::collection::vec((0u64..3000, 1u64..50), 0..150),
            mine in proptest::collection::vec((0u64..3000, 0u64..50), 0..80),
            theirs in proptest::collection::vec((0u64..3000, 0u64..50), 0..80),
            grow in proptest::bool::ANY,
            range in (0u64..3500, 0u64..3500),
            stop_after in 0usize..20,
        ) {
            let mut base = Tree::new(3000);
            for &(vc, c) in &sets {
                base.set(vc, Entry::new(c, 1), |_| {});
            }
            let (mut a, mut b) = (base.clone(), base);
            if grow {
                a.grow(3000 * FANOUT as u64);
            }
            for (t, sets, tag) in [(&mut a, &mine, 100), (&mut b, &theirs, 200)] {
                for &(vc, c) in sets {
                    let e = if c == 0 { Entry::UNMAPPED } else { Entry::new(c + tag, 3) };
                    t.set(vc, e, |_| {});
                }
            }
            let (start, end) = (range.0.min(range.1), range.0.max(range.1));
            let naive: Vec<(u64, Entry, Entry)> = (start..end.min(3000))
                .map(|vc| (vc, a.get(vc), b.get(vc)))
                .filter(|(_, x, y)| x != y)
                .collect();
            let mut walked = Vec::new();
            a.differences_in(&b, start, end, |vc, x, y| { walked.push((vc, x, y)); true });
            prop_assert_eq!(&walked, &naive);
            let mut back = Vec::new();
            b.differences_in(&a, start, end, |vc, y, x| { back.push((vc, x, y)); true });
            prop_assert_eq!(&back, &naive, "the same either way round");
            let mut first = Vec::new();
            a.differences_in(&b, start, end, |vc, x, y| {
                first.push((vc, x, y));
                first.len() <= stop_after
            });
            let want = &naive[..naive.len().min(stop_after + 1)];
            prop_assert_eq!(&first[..], want, "stops when told");
        }
    }

    /// A snapshot of a volume mapped everywhere (FANOUT leaves: 2^18 clusters in 512) that
    /// then changed in one cluster is compared leaf by leaf only where they differ: one leaf,
    /// the shared others skipped whole; a tree grown deeper since shares the same subtrees.
    #[test]
    fn shared_subtrees_are_skipped() {
        let n = (FANOUT * FANOUT) as u64;
        let changed = n / 2 + 3;
        let mut t = Tree::new(n);
        for vc in 0..n {
            t.set(vc, Entry::new(1 + vc, 1), |_| {});
        }
        let snap = t.clone();
        t.set(changed, Entry::new(n + 7, 1), |_| {});
        let mut seen = Vec::new();
        let leaves = t.differences_in(&snap, 0, u64::MAX, |vc, x, y| {
            seen.push((vc, x, y));
            true
        });
        assert_eq!(seen, vec![(changed, Entry::new(n + 7, 1), Entry::new(changed + 1, 1))]);
        assert_eq!(leaves, 1, "only the leaf that differs is compared");
        t.grow(n * FANOUT as u64);
        assert_eq!(t.differences_in(&snap, 0, u64::MAX, |_, _, _| true), 1, "grown: the same");
        let fresh = Tree::new(n);
        assert_eq!(t.differences_in(&fresh, 0, u64::MAX, |_, _, _| true), FANOUT, "nothing shared");
    }

    #[test]
    fn entry_packing() {
        let e = Entry::new(123_456, 0b1010);
        assert_eq!((e.cluster(), e.written()), (Some(123_456), 0b1010));
        assert_eq!(Entry::UNMAPPED.cluster(), None);
    }

    #[test]
    fn snapshot_is_o1_and_copy_on_write() {
        // 10 TiB of 64 KiB clusters: depth 3, and a snapshot is one Arc clone.
        let mut t = Tree::new((10u64 << 40) >> 16);
        assert_eq!(t.depth, 3);
        t.set(5, Entry::new(7, 1), |_| panic!("nothing shared yet"));
        let snap = t.clone();
        assert!(t.leaf_shared(5));
        let mut copied = Vec::new();
        t.set(6, Entry::new(8, 1), |entries| {
            copied.extend(entries.iter().filter_map(|e| e.cluster()))
        });
        assert_eq!(copied, vec![7], "the copied leaf names cluster 7 once more");
        assert!(!t.leaf_shared(5));
        assert_eq!(snap.get(6), Entry::UNMAPPED, "the snapshot never changes");
        assert_eq!(t.get(5), Entry::new(7, 1));
        let counts = count_references([&t, &snap], []);
        assert_eq!((counts[&7], counts[&8]), (2, 1));
    }

    /// Random set/clear/snapshot/release/cut against plain maps, releases whole or as remains
    /// released in steps between the other changes (cuts' too); refcounts maintained through the callbacks
    /// always equal the recount from the trees and remains.
    #[derive(Debug, Clone)]
    enum Op {
        Set { tree: usize, vcluster: u64 },
        Clear { tree: usize, vcluster: u64 },
        Snapshot { tree: usize },
        Release { tree: usize },
        Retire { tree: usize },
        Cut { tree: usize, from: u64 },
        Step { budget: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0usize..4, 0u64..2000).prop_map(|(tree, vcluster)| Op::Set { tree, vcluster }),
            1 => (0usize..4, 0u64..2000).prop_map(|(tree, vcluster)| Op::Clear { tree, vcluster }),
            1 => (0usize..4).prop_map(|tree| Op::Snapshot { tree }),
            1 => (0usize..4).prop_map(|tree| Op::Release { tree }),
            1 => (0usize..4).prop_map(|tree| Op::Retire { tree }),
            1 => (0usize..4, 0..2100 / FANOUT as u64 + 2).prop_map(|(tree, from)| Op::Cut { tree, from }),
            2 => (1usize..700).prop_map(|budget| Op::Step { budget }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Cuts of trees three levels deep (sparse), shared whole or in part with a snapshot:
        /// at any leaf boundary — inside a leaf's parent, at an inner node's boundary, at
        /// and past the tree's reach — the cut tree maps exactly what lay before the cut,
        /// the snapshot all it had; references do not change until the remains are released,
        /// which then gives back exactly the entries only the cut part held.
        #[test]
        fn deep_cuts(
            sets in proptest::collection::vec(0u64..3 * FANOUT as u64 * FANOUT as u64, 1..60),
            after in proptest::collection::vec(0u64..3 * FANOUT as u64 * FANOUT as u64, 0..20),
            cut_leaf in 0u64..3 * FANOUT as u64 + 3,
            inner_boundary in proptest::bool::ANY,
        ) {
            let fan = FANOUT as u64;
            let reach = 3 * fan * fan;
            let mut a = Tree::new(reach);
            let mut cluster = 1u64;
            for &vc in &sets {
                cluster += 1;
                a.set(vc, Entry::new(cluster, 1), |_| {});
            }
            let snap = a.clone();
            for &vc in &after {
                cluster += 1;
                a.set(vc, Entry::new(cluster, 3), |_| {});
            }
            // A leaf boundary: one of the first leaves of each inner node, or any leaf,
            // or at or past the tree's reach.
            let start = if inner_boundary { cut_leaf % 4 * fan * fan } else { cut_leaf * fan };
            let start = if cut_leaf > 3 * fan {
                a.capacity() + (cut_leaf - 3 * fan - 1) * fan
            } else {
                start
            };
            let want: Vec<(u64, Entry)> =
                a.entries().into_iter().filter(|(vc, _)| *vc < start).collect();
            let snap_had = snap.entries();
            let refs = count_references([&a, &snap], []);
            let mut cut = a.cut_from(start);
            prop_assert_eq!(a.entries(), want);
            prop_assert_eq!(snap.entries(), snap_had);
            prop_assert_eq!(&count_references([&a, &snap], [&cut]), &refs);
            let mut released: HashMap<u64, u32> = HashMap::new();
            while cut.release_some(5, |e| *released.entry(e.cluster().unwrap()).or_default() += 1) > 0 {}
            let mut expect = refs.clone();
            for (c, n) in released {
                let r = expect.get_mut(&c).unwrap();
                *r -= n;
                if *r == 0 {
                    expect.remove(&c);
                }
            }
            prop_assert_eq!(count_references([&a, &snap], []), expect);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn model_check(ops in proptest::collection::vec(op(), 1..80)) {
            let mut trees: Vec<Option<Tree>> = vec![Some(Tree::new(2000))];
            let mut models: Vec<Option<HashMap<u64, Entry>>> = vec![Some(HashMap::new())];
            let mut refs: HashMap<u64, u32> = HashMap::new();
            let mut next_cluster = 1u64;
            let mut remains: Vec<Remains> = Vec::new();
            let unref = |refs: &mut HashMap<u64, u32>, e: Entry| {
                let c = e.cluster().unwrap();
                let r = refs.get_mut(&c).unwrap();
                *r -= 1;
                if *r == 0 { refs.remove(&c); }
            };
            for op in ops {
                match op {
                    Op::Set { tree, vcluster } | Op::Clear { tree, vcluster } => {
                        let Some(Some(t)) = trees.get_mut(tree) else { continue };
                        let entry = if matches!(op, Op::Set { .. }) {
                            next_cluster += 1;
                            Entry::new(next_cluster, 0xffff)
                        } else {
                            Entry::UNMAPPED
                        };
                        let old = t.set(vcluster, entry, |copied| {
                            for c in copied.iter().filter_map(|e| e.cluster()) {
                                *refs.entry(c).or_default() += 1;
                            }
                        });
                        if let Some(c) = old.cluster() {
                            let r = refs.get_mut(&c).unwrap();
                            *r -= 1;
                            if *r == 0 { refs.remove(&c); }
                        }
                        if let Some(c) = entry.cluster() {
                            *refs.entry(c).or_default() += 1;
                        }
                        let m = models[tree].as_mut().unwrap();
                        if entry.cluster().is_some() { m.insert(vcluster, entry); } else { m.remove(&vcluster); }
                    }
                    Op::Snapshot { tree } => {
                        let Some(Some(t)) = trees.get(tree) else { continue };
                        let copy = t.clone();
                        trees.push(Some(copy));
                        models.push(models[tree].clone());
                    }
                    Op::Release { tree } => {
                        let Some(slot) = trees.get_mut(tree) else { continue };
                        let Some(t) = slot.take() else { continue };
                        t.release(|e| unref(&mut refs, e));
                        models[tree] = None;
                    }
                    Op::Retire { tree } => {
                        let Some(slot) = trees.get_mut(tree) else { continue };
                        let Some(t) = slot.take() else { continue };
                        let r = t.into_remains();
                        if !r.is_empty() {
                            remains.push(r);
                        }
                        models[tree] = None;
                    }
                    Op::Cut { tree, from } => {
                        let Some(Some(t)) = trees.get_mut(tree) else { continue };
                        let from = from * FANOUT as u64;
                        let r = t.cut_from(from);
                        if !r.is_empty() {
                            remains.push(r);
                        }
                        models[tree].as_mut().unwrap().retain(|vc, _| *vc < from);
                        prop_assert!(t.first_from(from, |_, _| true).is_none());
                    }
                    Op::Step { budget } => {
                        let Some(r) = remains.first_mut() else { continue };
                        let spent = r.release_some(budget, |e| unref(&mut refs, e));
                        prop_assert!(spent > 0 && spent <= budget + FANOUT);
                        remains.retain(|r| !r.is_empty());
                    }
                }
                let live: Vec<&Tree> = trees.iter().flatten().collect();
                prop_assert_eq!(&count_references(live, &remains), &refs);
            }
            for mut r in remains {
                while r.release_some(7, |e| unref(&mut refs, e)) > 0 {}
            }
            let live: Vec<&Tree> = trees.iter().flatten().collect();
            prop_assert_eq!(&count_references(live, []), &refs);
            for (t, m) in trees.iter().zip(&models) {
                if let (Some(t), Some(m)) = (t, m) {
                    let mut want: Vec<(u64, Entry)> = m.iter().map(|(k, v)| (*k, *v)).collect();
                    want.sort_by_key(|x| x.0);
                    prop_assert_eq!(t.entries(), want);
                }
            }
        }
    }
}

/// The leaves copied so far while freezing several trees together (by the live node's
/// address: every tree is borrowed meanwhile, so no address is reused).
#[derive(Default)]
pub struct Freezer(HashMap<usize, FrozenLeaf>);

/// One leaf's entries, copied out by [`Tree::freeze`] (shared by the frozen copies of the trees
/// that shared the live leaf).
#[derive(Clone)]
pub struct FrozenLeaf(Arc<[Entry; FANOUT]>);

/// A tree's leaves at one moment: (first volume cluster of the leaf, entries), in order.
pub struct FrozenTree {
    capacity: u64,
    leaves: Vec<(u64, FrozenLeaf)>,
}

impl FrozenTree {
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Every mapped entry, in order.
    pub fn for_each_mapped(&self, mut f: impl FnMut(u64, Entry)) {
        for (base, leaf) in &self.leaves {
            for (i, e) in leaf.0.iter().enumerate() {
                if e.cluster().is_some() {
                    f(base + i as u64, *e);
                }
            }
        }
    }

    /// Where this tree differs from `parent`: `f(vcluster, entry)` for each entry mapped here
    /// and not the same in the parent, and `f(vcluster, UNMAPPED)` for each entry the parent
    /// maps that this tree does not; below volume cluster `limit` only (the volume's size: a
    /// volume maps nothing beyond it, and what its parent maps there is no difference to
    /// record). Leaves the two share are skipped whole.
    pub fn for_each_difference(
        &self,
        parent: &FrozenTree,
        limit: u64,
        mut f: impl FnMut(u64, Entry),
    ) {
        let limit = limit.min(self.capacity);
        let empty = [Entry::UNMAPPED; FANOUT];
        let (mut a, mut b) = (self.leaves.iter().peekable(), parent.leaves.iter().peekable());
        loop {
            // Both sorted by base: take the lower base from each side (both when equal).
            let (ka, kb) = (a.peek().map(|l| l.0), b.peek().map(|l| l.0));
            let take_a = ka.is_some_and(|x| kb.is_none_or(|y| x <= y));
            let take_b = kb.is_some_and(|y| ka.is_none_or(|x| y <= x));
            let mine = if take_a { a.next() } else { None };
            let theirs = if take_b { b.next() } else { None };
            let Some(base) = mine.or(theirs).map(|l| l.0) else { return };
            if let (Some(m), Some(t)) = (mine, theirs) {
                if Arc::ptr_eq(&m.1 .0, &t.1 .0) {
                    continue; // a leaf the two share: no difference in it
                }
            }
            let mine = mine.map_or(&empty[..], |l| &l.1 .0[..]);
            let theirs = theirs.map_or(&empty[..], |l| &l.1 .0[..]);
            for (i, (m, t)) in mine.iter().zip(theirs).enumerate() {
                let vc = base + i as u64;
                if vc >= limit {
                    break;
                }
                if m.cluster().is_some() {
                    if m != t {
                        f(vc, *m);
                    }
                } else if t.cluster().is_some() {
                    f(vc, Entry::UNMAPPED);
                }
            }
        }
    }
}
