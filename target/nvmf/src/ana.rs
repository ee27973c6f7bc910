//! Asymmetric Namespace Access (ANA): which paths to a namespace a host should use. Owns one
//! subsystem's ANA states — per listener (a path is a host's controller connected through one
//! of the subsystem's listeners) and ANA group (a namespace's group is its id unless given,
//! as in SPDK) — the ANA log page (log 0Ch) those states make for one listener, and the
//! per-queue view the data path checks. Pure: no I/O, no clock.
//!
//! A host marks each path by the state its controller reports: I/O goes to optimized paths,
//! then non-optimized ones, never to inaccessible ones (Linux's native multipath, ESXi's HPP).
//! The control plane sets states (`nvmf_subsystem_listener_set_ana_state`), as a failover
//! manager does when it moves a volume's preferred path; every controller connected through
//! the listener then gets an ANA change notice and reads the log again.
//!
//! Invariants:
//! - a state is kept per (listener, group); a listener's `all` state applies to every group
//!   without one of its own, and an entry equal to `all` is never stored (what a listener keeps
//!   is bounded by the groups named, at most the subsystem's namespace ids);
//! - `blocked` is true exactly while some stored or default state refuses I/O (inaccessible,
//!   persistent loss, change): while it is false the data path pays one load;
//! - `change_count` moves on with every change of what any listener reports, so a queue's view
//!   taken under an older count is taken again before it decides.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::RwLock;

use crate::nvme::Status;
use crate::subsys::ListenAddr;

/// Path Related Status (SCT 3): the namespace is not reachable through this controller for
/// good (Asymmetric Access Persistent Loss), for now (Inaccessible), or in a change
/// (Transition). Never Do Not Retry: a host retries them on another path.
pub const ANA_PERSISTENT_LOSS: Status = 0x301;
pub const ANA_INACCESSIBLE: Status = 0x302;
pub const ANA_TRANSITION: Status = 0x303;

/// ANA Transition Time (Identify Controller ANATT), seconds: how long a host waits for a
/// path in the change state before it gives up on it (nvmet and SPDK say 10).
pub const ANATT_SECONDS: u8 = 10;
/// ANA Capabilities (Identify Controller ANACAP): reports optimized, non-optimized,
/// inaccessible, persistent loss and change (bits 0-4); a namespace's group id does not change
/// while it is attached (bit 6).
pub const ANACAP: u8 = 0x1f | (1 << 6);
/// The ANA log page's header and one group descriptor (NVMe Base 2.0 figure 216/217).
pub const LOG_HEADER_LEN: usize = 16;
pub const GROUP_DESC_LEN: usize = 32;

/// The ANA log page's size as hosts reckon it: every group (NANAGRPID = `max_nsid`) and every
/// namespace id (MNAN = `max_nsid`) listed. Linux's host reads that much at once; libnvme
/// (nvme-cli) reads it in 4 KiB pieces at increasing offsets, so offsets up to it are valid
/// and what lies past the groups reads zero.
pub const fn log_max_len(max_nsid: u32) -> usize {
    LOG_HEADER_LEN + max_nsid as usize * (GROUP_DESC_LEN + 4)
}

/// An ANA state (the log page's values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AnaState {
    Optimized,
    NonOptimized,
    Inaccessible,
    PersistentLoss,
    Change,
}

impl AnaState {
    /// Every state, in code order.
    pub const ALL: [AnaState; 5] = [
        AnaState::Optimized,
        AnaState::NonOptimized,
        AnaState::Inaccessible,
        AnaState::PersistentLoss,
        AnaState::Change,
    ];

    /// The value in the log page's descriptor.
    pub fn code(self) -> u8 {
        match self {
            AnaState::Optimized => 0x01,
            AnaState::NonOptimized => 0x02,
            AnaState::Inaccessible => 0x03,
            AnaState::PersistentLoss => 0x04,
            AnaState::Change => 0x0f,
        }
    }

    /// SPDK's names (`nvmf_subsystem_listener_set_ana_state`, `nvmf_subsystem_get_listeners`).
    pub fn name(self) -> &'static str {
        match self {
            AnaState::Optimized => "optimized",
            AnaState::NonOptimized => "non_optimized",
            AnaState::Inaccessible => "inaccessible",
            AnaState::PersistentLoss => "persistent_loss",
            AnaState::Change => "change",
        }
    }

    /// The state SPDK's name (any case) or nvmet's (`non-optimized`) names.
    pub fn parse(name: &str) -> Option<AnaState> {
        let name = name.to_ascii_lowercase().replace('-', "_");
        AnaState::ALL.into_iter().find(|s| s.name() == name)
    }

    /// What an I/O command through a path in this state gets instead of being done, if any.
    pub fn refusal(self) -> Option<Status> {
        match self {
            AnaState::Optimized | AnaState::NonOptimized => None,
            AnaState::Inaccessible => Some(ANA_INACCESSIBLE),
            AnaState::PersistentLoss => Some(ANA_PERSISTENT_LOSS),
            AnaState::Change => Some(ANA_TRANSITION),
        }
    }
}

/// One listener's states: `all` for every group without its own (never equal to `all`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerStates {
    pub all: AnaState,
    pub groups: BTreeMap<u32, AnaState>,
}

impl ListenerStates {
    /// `all` and `groups` with the entries equal to `all` dropped; `None` where every group is
    /// optimized (what an absent listener means).
    pub fn normal(all: AnaState, mut groups: BTreeMap<u32, AnaState>) -> Option<Self> {
        groups.retain(|_, s| *s != all);
        (all != AnaState::Optimized || !groups.is_empty()).then_some(ListenerStates { all, groups })
    }

    /// `before` (`None`: optimized everywhere) with `group` (every group: `None`) set to
    /// `state`.
    fn after(before: Option<&Self>, group: Option<u32>, state: AnaState) -> Option<Self> {
        match group {
            None => ListenerStates::normal(state, BTreeMap::new()),
            Some(g) => {
                let (all, mut groups) = match before {
                    Some(l) => (l.all, l.groups.clone()),
                    None => (AnaState::Optimized, BTreeMap::new()),
                };
                groups.insert(g, state);
                ListenerStates::normal(all, groups)
            }
        }
    }

    fn state(&self, group: u32) -> AnaState {
        self.groups.get(&group).copied().unwrap_or(self.all)
    }

    fn refuses_any(&self) -> bool {
        self.all.refusal().is_some() || self.groups.values().any(|s| s.refusal().is_some())
    }
}

/// One subsystem's ANA states. Changed by the control plane; read by admin commands and, while
/// `blocked`, by queues refreshing their [`AnaView`].
#[derive(Debug, Default)]
pub struct AnaTable {
    /// Listeners with a state other than optimized somewhere; absent: optimized everywhere.
    listeners: RwLock<BTreeMap<ListenAddr, ListenerStates>>,
    change_count: AtomicU64,
    blocked: AtomicBool,
}

impl AnaTable {
    /// Whether any path refuses I/O now (the data path's one load while none does).
    #[inline]
    pub fn blocked(&self) -> bool {
        self.blocked.load(Ordering::Acquire)
    }

    /// The ANA change count (the log page's header): moves on with every change.
    pub fn change_count(&self) -> u64 {
        self.change_count.load(Ordering::Acquire)
    }

    /// The state of group `group` through listener `via`.
    pub fn state(&self, via: &ListenAddr, group: u32) -> AnaState {
        self.listeners.read().get(via).map_or(AnaState::Optimized, |l| l.state(group))
    }

    /// Sets the state of `group` (every group: `None`) through `via`; whether anything a host
    /// reads changed (a change count moves on only then).
    pub fn set(&self, via: &ListenAddr, group: Option<u32>, state: AnaState) -> bool {
        let mut map = self.listeners.write();
        let before = map.get(via).cloned();
        let after = ListenerStates::after(before.as_ref(), group, state);
        self.put(&mut map, via, before, after)
    }

    /// What listener `via` keeps now, and what [`Self::set`] with these arguments would leave
    /// (nothing is set: the control plane keeps the change before it is made).
    pub fn preview(
        &self,
        via: &ListenAddr,
        group: Option<u32>,
        state: AnaState,
    ) -> (Option<ListenerStates>, Option<ListenerStates>) {
        let before = self.listener(via);
        let after = ListenerStates::after(before.as_ref(), group, state);
        (before, after)
    }

    /// What listener `via` keeps (`None`: optimized for every group).
    pub fn listener(&self, via: &ListenAddr) -> Option<ListenerStates> {
        self.listeners.read().get(via).cloned()
    }

    /// Puts `states` in force through `via` whole (a restart restoring what was kept, a change
    /// undone); whether anything a host reads changed.
    pub fn replace(&self, via: &ListenAddr, states: Option<ListenerStates>) -> bool {
        let after = states.and_then(|l| ListenerStates::normal(l.all, l.groups));
        let mut map = self.listeners.write();
        let before = map.get(via).cloned();
        self.put(&mut map, via, before, after)
    }

    fn put(
        &self,
        map: &mut BTreeMap<ListenAddr, ListenerStates>,
        via: &ListenAddr,
        before: Option<ListenerStates>,
        after: Option<ListenerStates>,
    ) -> bool {
        if let Some(l) = &after {
            assert!(l.groups.values().all(|s| *s != l.all), "an entry equal to `all` kept");
        }
        if after == before {
            return false;
        }
        match after {
            Some(l) => map.insert(via.clone(), l),
            None => map.remove(via),
        };
        self.changed(map);
        true
    }

    /// Forgets what `via` reported (a listener added again starts optimized).
    pub fn forget_listener(&self, via: &ListenAddr) {
        let mut map = self.listeners.write();
        if map.remove(via).is_some() {
            self.changed(&map);
        }
    }

    /// The groups' namespaces changed (the log page lists them): the change count moves on,
    /// so a host that reads the log in pieces (libnvme) sees that it did.
    pub fn groups_changed(&self) {
        // No state changes: nothing to agree with under the lock (queues merely take their
        // view again).
        self.change_count.fetch_add(1, Ordering::AcqRel);
    }

    fn changed(&self, map: &BTreeMap<ListenAddr, ListenerStates>) {
        self.blocked.store(map.values().any(ListenerStates::refuses_any), Ordering::Release);
        self.change_count.fetch_add(1, Ordering::AcqRel);
    }

    /// What `via` refuses, as a queue's [`AnaView`] keeps it.
    fn refusals(&self, via: &ListenAddr) -> Refusals {
        let map = self.listeners.read();
        // Read under the lock that changes take: the count and the states agree.
        let count = self.change_count();
        match map.get(via) {
            None => Refusals { count, all: None, groups: Vec::new() },
            Some(l) => Refusals {
                count,
                all: l.all.refusal(),
                groups: l.groups.iter().map(|(g, s)| (*g, s.refusal())).collect(),
            },
        }
    }

    /// The ANA log page (log 0Ch) for a controller connected through `via`: the header, then
    /// one descriptor per group `groups` gives (ascending ids, each with its namespace ids
    /// ascending, as Linux's host walks them), none of them listing namespaces when
    /// `groups_only` (RGO). The change count it carries is read before the groups and the
    /// states: what it lists is at least that new, so a host reading the log in pieces sees
    /// the count move if either changes meanwhile.
    pub fn log_page(
        &self,
        via: &ListenAddr,
        groups: impl FnOnce() -> BTreeMap<u32, Vec<u32>>,
        groups_only: bool,
    ) -> Vec<u8> {
        let count = self.change_count();
        let groups = groups();
        let map = self.listeners.read();
        let states = map.get(via);
        let nsids: usize = if groups_only { 0 } else { groups.values().map(Vec::len).sum() };
        let mut b = Vec::with_capacity(LOG_HEADER_LEN + groups.len() * GROUP_DESC_LEN + nsids * 4);
        b.extend_from_slice(&count.to_le_bytes());
        b.extend_from_slice(&(groups.len().min(usize::from(u16::MAX)) as u16).to_le_bytes());
        b.resize(LOG_HEADER_LEN, 0);
        for (&group, ids) in groups.iter().take(usize::from(u16::MAX)) {
            debug_assert!(group != 0, "group id 0 is reserved");
            debug_assert!(ids.windows(2).all(|w| w[0] < w[1]), "namespace ids ascending");
            let state = states.map_or(AnaState::Optimized, |l| l.state(group));
            let listed: &[u32] = if groups_only { &[] } else { ids };
            b.extend_from_slice(&group.to_le_bytes());
            b.extend_from_slice(&(listed.len() as u32).to_le_bytes());
            b.extend_from_slice(&count.to_le_bytes());
            b.push(state.code());
            b.resize(b.len() + 15, 0);
            for id in listed {
                b.extend_from_slice(&id.to_le_bytes());
            }
        }
        b
    }
}

/// One listener's refusals under one change count: of the groups with a state of their own
/// (ascending ids), and of every other group.
#[derive(Debug)]
struct Refusals {
    count: u64,
    all: Option<Status>,
    groups: Vec<(u32, Option<Status>)>,
}

/// What one queue knows of its path's states: taken from the [`AnaTable`] under a change
/// count and kept until the count moves on, so a command checks its namespace's group without
/// a lock (while `blocked`) or with one load (while not).
#[derive(Debug, Default)]
pub struct AnaView {
    taken: Option<Refusals>,
}

impl AnaView {
    /// What an I/O command on a namespace of group `group`, through `via`, gets instead of
    /// being done: `None` if the path serves it.
    #[inline]
    pub fn refusal(&mut self, table: &AnaTable, via: &ListenAddr, group: u32) -> Option<Status> {
        if !table.blocked() {
            return None;
        }
        let count = table.change_count();
        if self.taken.as_ref().is_none_or(|t| t.count != count) {
            self.taken = Some(table.refusals(via));
        }
        let t = self.taken.as_ref().expect("just taken");
        // Ascending (taken from a BTreeMap): up to max_nsid groups, searched per I/O.
        t.groups.binary_search_by_key(&group, |(g, _)| *g).map_or(t.all, |i| t.groups[i].1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> ListenAddr {
        ListenAddr { traddr: "127.0.0.1".into(), port }
    }

    #[test]
    fn states_are_per_listener_and_group_and_all_applies_where_none_is_set() {
        let t = AnaTable::default();
        let (a, b) = (addr(4420), addr(4421));
        assert_eq!(t.state(&a, 1), AnaState::Optimized);
        assert!(!t.blocked());
        assert!(t.set(&a, Some(2), AnaState::Inaccessible));
        assert_eq!(t.state(&a, 2), AnaState::Inaccessible);
        assert_eq!(t.state(&a, 1), AnaState::Optimized, "another group");
        assert_eq!(t.state(&b, 2), AnaState::Optimized, "another listener");
        assert!(t.blocked());
        assert!(!t.set(&a, Some(2), AnaState::Inaccessible), "no change");
        assert!(t.set(&a, None, AnaState::NonOptimized), "every group");
        assert_eq!(t.state(&a, 2), AnaState::NonOptimized, "the group's own state replaced");
        assert_eq!(t.state(&a, 7), AnaState::NonOptimized);
        assert!(!t.blocked(), "non-optimized paths serve I/O");
        assert!(t.set(&a, Some(3), AnaState::Change));
        assert!(t.blocked());
        assert!(t.set(&a, Some(3), AnaState::NonOptimized), "back to `all`: entry dropped");
        assert!(!t.blocked());
        assert!(t.set(&a, None, AnaState::Optimized));
        assert!(t.listeners.read().is_empty(), "an all-optimized listener keeps nothing");
        assert!(t.set(&b, None, AnaState::PersistentLoss));
        t.forget_listener(&b);
        assert_eq!(t.state(&b, 1), AnaState::Optimized, "a listener added again starts optimized");
        assert!(!t.blocked());
    }

    /// A listener's states put back whole (restored at start-up, a change undone): kept
    /// normalized, a change told only when there is one.
    #[test]
    fn a_listener_s_states_are_replaced_whole() {
        let t = AnaTable::default();
        let a = addr(4420);
        t.set(&a, Some(3), AnaState::Inaccessible);
        let kept = t.listener(&a);
        assert_eq!(
            kept,
            ListenerStates::normal(AnaState::Optimized, [(3, AnaState::Inaccessible)].into())
        );
        assert!(t.replace(&a, None), "optimized everywhere again");
        assert_eq!((t.listener(&a), t.blocked()), (None, false));
        assert!(t.replace(&a, kept.clone()));
        assert_eq!((t.state(&a, 3), t.blocked()), (AnaState::Inaccessible, true));
        assert!(!t.replace(&a, kept.clone()), "the same: no change");
        // A preview sets nothing.
        let c0 = t.change_count();
        let (before, after) = t.preview(&a, None, AnaState::NonOptimized);
        assert_eq!((before, after.as_ref().map(|l| l.all)), (kept, Some(AnaState::NonOptimized)));
        assert_eq!((t.change_count(), t.state(&a, 3)), (c0, AnaState::Inaccessible));
        // Entries equal to `all` are dropped, as `set` keeps them.
        let raw = ListenerStates {
            all: AnaState::NonOptimized,
            groups: [(1, AnaState::NonOptimized), (2, AnaState::Change)].into(),
        };
        assert!(t.replace(&a, Some(raw)));
        let l = t.listener(&a).unwrap();
        assert_eq!(l.groups, [(2, AnaState::Change)].into());
        assert_eq!(ListenerStates::normal(AnaState::Optimized, BTreeMap::new()), None);
    }

    #[test]
    fn the_change_count_moves_on_with_every_change_and_only_then() {
        let t = AnaTable::default();
        let a = addr(4420);
        let c0 = t.change_count();
        assert!(!t.set(&a, Some(1), AnaState::Optimized));
        assert_eq!(t.change_count(), c0);
        t.set(&a, Some(1), AnaState::Inaccessible);
        assert_eq!(t.change_count(), c0 + 1);
        t.forget_listener(&addr(9));
        assert_eq!(t.change_count(), c0 + 1, "nothing to forget");
        t.forget_listener(&a);
        assert_eq!(t.change_count(), c0 + 2);
    }

    #[test]
    fn names_and_codes_are_specs_and_spdks() {
        let codes: Vec<u8> = AnaState::ALL.iter().map(|s| s.code()).collect();
        assert_eq!(codes, [1, 2, 3, 4, 0x0f]);
        for s in AnaState::ALL {
            assert_eq!(AnaState::parse(s.name()), Some(s));
            assert_eq!(AnaState::parse(&s.name().to_uppercase()), Some(s));
        }
        assert_eq!(AnaState::parse("non-optimized"), Some(AnaState::NonOptimized));
        assert_eq!(AnaState::parse("broken"), None);
        assert_eq!(AnaState::Optimized.refusal(), None);
        assert_eq!(AnaState::NonOptimized.refusal(), None);
        assert_eq!(AnaState::Inaccessible.refusal(), Some(ANA_INACCESSIBLE));
        assert_eq!(AnaState::PersistentLoss.refusal(), Some(ANA_PERSISTENT_LOSS));
        assert_eq!(AnaState::Change.refusal(), Some(ANA_TRANSITION));
        for st in [ANA_INACCESSIBLE, ANA_PERSISTENT_LOSS, ANA_TRANSITION] {
            assert!(crate::nvme::retryable(st), "{st:#x}: a host must retry it on another path");
        }
    }

    #[test]
    fn the_log_page_has_the_specs_layout() {
        let t = AnaTable::default();
        let a = addr(4420);
        t.set(&a, Some(5), AnaState::Inaccessible);
        let groups: BTreeMap<u32, Vec<u32>> = [(1, vec![1, 3]), (5, vec![5])].into();
        let p = t.log_page(&a, || groups.clone(), false);
        assert_eq!(p.len(), 16 + 32 + 2 * 4 + 32 + 4);
        let count = t.change_count();
        assert_eq!(u64::from_le_bytes(p[0..8].try_into().unwrap()), count);
        assert_eq!(u16::from_le_bytes([p[8], p[9]]), 2, "descriptors");
        assert!(p[10..16].iter().all(|&b| b == 0));
        let d = &p[16..];
        assert_eq!(u32::from_le_bytes(d[0..4].try_into().unwrap()), 1, "ANAGRPID");
        assert_eq!(u32::from_le_bytes(d[4..8].try_into().unwrap()), 2, "NNSIDS");
        assert_eq!(u64::from_le_bytes(d[8..16].try_into().unwrap()), count);
        assert_eq!(d[16], 0x01, "optimized");
        assert!(d[17..32].iter().all(|&b| b == 0));
        assert_eq!(u32::from_le_bytes(d[32..36].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(d[36..40].try_into().unwrap()), 3);
        let d = &d[40..];
        assert_eq!(u32::from_le_bytes(d[0..4].try_into().unwrap()), 5);
        assert_eq!(d[16], 0x03, "inaccessible");
        assert_eq!(u32::from_le_bytes(d[32..36].try_into().unwrap()), 5);
        // Another listener: optimized everywhere. Groups only: no namespace ids.
        let p = t.log_page(&addr(4421), || groups.clone(), true);
        assert_eq!(p.len(), 16 + 2 * 32);
        assert_eq!(p[16 + 16], 0x01);
        assert_eq!(p[16 + 32 + 16], 0x01);
        assert_eq!(u32::from_le_bytes(p[16 + 4..16 + 8].try_into().unwrap()), 0);
        assert_eq!(t.log_page(&a, BTreeMap::new, false).len(), 16, "no groups");
    }

    /// A change as the control plane makes them: (listener, group or every group, state), or a
    /// listener forgotten.
    #[derive(Debug, Clone)]
    enum Op {
        Set(u16, Option<u32>, AnaState),
        Forget(u16),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        let state = proptest::sample::select(AnaState::ALL.to_vec());
        prop_oneof![
            (0u16..3, proptest::option::of(1u32..6), state).prop_map(|(l, g, s)| Op::Set(l, g, s)),
            (0u16..3).prop_map(Op::Forget),
        ]
    }

    proptest::proptest! {
        /// After any sequence of changes: nothing equal to a listener's own state is kept,
        /// `blocked` says whether some path refuses, the change count moved exactly with the
        /// changes a host could see, every state is the last one set for it, and a queue's
        /// view (kept across the changes) decides what the table says.
        #[test]
        fn random_changes_keep_the_invariants(ops in proptest::collection::vec(op(), 1..40)) {
            let t = AnaTable::default();
            let mut model: BTreeMap<(u16, u32), AnaState> = BTreeMap::new();
            let mut views: Vec<AnaView> = (0..3).map(|_| AnaView::default()).collect();
            for o in ops {
                let before = t.change_count();
                let seen = |m: &BTreeMap<(u16, u32), AnaState>, l| {
                    (1..6).map(|g| m.get(&(l, g)).copied().unwrap_or(AnaState::Optimized))
                        .collect::<Vec<_>>()
                };
                let (l, old) = match &o {
                    Op::Set(l, _, _) | Op::Forget(l) => (*l, seen(&model, *l)),
                };
                match o {
                    Op::Set(l, g, s) => {
                        t.set(&addr(4420 + l), g, s);
                        for grp in g.map_or(1..6, |g| g..g + 1) {
                            model.insert((l, grp), s);
                        }
                    }
                    Op::Forget(l) => {
                        t.forget_listener(&addr(4420 + l));
                        model.retain(|(m, _), _| *m != l);
                    }
                }
                let moved = t.change_count() - before;
                proptest::prop_assert!(moved <= 1);
                // A change a host could see moves the count; the groups the model tracks are
                // all a host can see here only where no group past them was touched.
                if seen(&model, l) != old {
                    proptest::prop_assert_eq!(moved, 1);
                }
                let map = t.listeners.read();
                for ls in map.values() {
                    proptest::prop_assert!(ls.groups.values().all(|s| *s != ls.all));
                    proptest::prop_assert!(ls.all != AnaState::Optimized || !ls.groups.is_empty());
                }
                let refusing = map.values().any(ListenerStates::refuses_any);
                drop(map);
                proptest::prop_assert_eq!(t.blocked(), refusing);
                for l in 0..3u16 {
                    for g in 1..6 {
                        let want = model.get(&(l, g)).copied().unwrap_or(AnaState::Optimized);
                        proptest::prop_assert_eq!(t.state(&addr(4420 + l), g), want);
                        let view = views[usize::from(l)].refusal(&t, &addr(4420 + l), g);
                        proptest::prop_assert_eq!(view, want.refusal());
                    }
                }
            }
        }
    }

    #[test]
    fn a_view_follows_the_table_and_costs_nothing_while_no_path_refuses() {
        let t = AnaTable::default();
        let (a, b) = (addr(4420), addr(4421));
        let mut v = AnaView::default();
        assert_eq!(v.refusal(&t, &a, 1), None);
        assert!(v.taken.is_none(), "nothing taken while no path refuses");
        t.set(&a, Some(1), AnaState::Inaccessible);
        assert_eq!(v.refusal(&t, &a, 1), Some(ANA_INACCESSIBLE));
        assert_eq!(v.refusal(&t, &a, 2), None);
        let mut w = AnaView::default();
        assert_eq!(w.refusal(&t, &b, 1), None, "the other path serves it");
        t.set(&a, None, AnaState::Change);
        assert_eq!(v.refusal(&t, &a, 2), Some(ANA_TRANSITION), "taken again after a change");
        assert_eq!(v.refusal(&t, &a, 1), Some(ANA_TRANSITION));
        t.set(&a, Some(1), AnaState::Optimized);
        assert_eq!(v.refusal(&t, &a, 1), None);
        assert_eq!(v.refusal(&t, &a, 9), Some(ANA_TRANSITION));
        t.set(&a, None, AnaState::Optimized);
        assert_eq!(v.refusal(&t, &a, 9), None);
    }
}
