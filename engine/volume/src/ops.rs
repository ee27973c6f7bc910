//! Control operations as data: what the control plane asks of a pool (create, snapshot,
//! clone, rollback, resize, delete, rename, configuration, growing the pool), which volume's
//! writes must drain first, and how each applies to the pool state. A control operation runs
//! as a [`crate::request`] (`Cmd::Control`) — freeze, park until drained, apply, thaw, commit
//! — on a core in the daemon and in the simulator alike, so both run one implementation of it.
//!
//! Invariant: an operation that changes what a volume's writes see (snapshot, rollback, resize,
//! delete, making it read-only) names that volume in [`ControlOp::quiesce`]; it is applied
//! only with the volume frozen and no write of it in flight.

use crate::meta::{PoolError, PoolMeta};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlOp {
    /// A new volume; a thick one takes all its clusters now.
    Create {
        name: String,
        size_bytes: u64,
        thick: bool,
    },
    /// A read-only snapshot of `of`.
    Snapshot {
        of: u32,
        name: String,
    },
    /// A writable clone of snapshot `of`.
    Clone {
        of: u32,
        name: String,
    },
    /// Volume `id` takes snapshot `to`'s content.
    Rollback {
        id: u32,
        to: u32,
    },
    Resize {
        id: u32,
        size_bytes: u64,
        force: bool,
    },
    Delete {
        id: u32,
    },
    /// Volume `id` becomes read-only for good (SPDK's `bdev_lvol_set_read_only`): it takes no
    /// more writes and, like a snapshot, may be cloned. Already read-only: nothing changes.
    SetReadOnly {
        id: u32,
    },
    /// Volume `id` is called `name` from now on, with configuration entries that go with the
    /// name: `before` journaled ahead of the rename, `after` behind it (`PoolMeta::rename`).
    /// What the volume's writes see does not change: nothing drains.
    Rename {
        id: u32,
        name: String,
        before: Vec<(String, String)>,
        after: Vec<(String, String)>,
    },
    /// Configuration entries (an empty value removes its key), all admitted or none.
    SetConfigs(Vec<(String, String)>),
    /// The pool's device now has `total_bytes`: its data area grows into them. Done with a
    /// checkpoint of its own (the superblock names the new size before any new cluster is
    /// handed out); a device no larger changes nothing, a smaller one is refused.
    Grow {
        total_bytes: u64,
    },
}

impl ControlOp {
    /// The volume whose writes must drain (it is frozen meanwhile) before the operation
    /// applies.
    pub fn quiesce(&self) -> Option<u32> {
        match *self {
            ControlOp::Snapshot { of, .. } => Some(of),
            ControlOp::Rollback { id, .. }
            | ControlOp::Resize { id, .. }
            | ControlOp::Delete { id }
            | ControlOp::SetReadOnly { id } => Some(id),
            ControlOp::Create { .. }
            | ControlOp::Clone { .. }
            | ControlOp::Rename { .. }
            | ControlOp::SetConfigs(_)
            | ControlOp::Grow { .. } => None,
        }
    }

    /// Whether its commit, now that it applied, must be a checkpoint: a growth not yet named
    /// by a durable superblock lives in the next one (a device no larger needs none).
    pub fn needs_checkpoint(&self, meta: &PoolMeta) -> bool {
        matches!(self, ControlOp::Grow { .. }) && meta.growth_pending()
    }

    /// Applies the operation (its records join the pending ones): the new volume's id for a
    /// create, snapshot or clone, else 0. A refusal changes nothing.
    pub fn apply(&self, meta: &mut PoolMeta) -> Result<u32, PoolError> {
        match self {
            ControlOp::Create { name, size_bytes, thick } => meta.create(name, *size_bytes, *thick),
            ControlOp::Snapshot { of, name } => meta.snapshot(*of, name),
            ControlOp::Clone { of, name } => meta.clone_volume(*of, name),
            ControlOp::Rollback { id, to } => meta.rollback(*id, *to).map(|()| 0),
            ControlOp::Resize { id, size_bytes, force } => {
                meta.resize(*id, *size_bytes, *force).map(|()| 0)
            }
            ControlOp::Delete { id } => meta.delete(*id).map(|()| 0),
            ControlOp::SetReadOnly { id } => meta.set_read_only(*id).map(|()| 0),
            ControlOp::Rename { id, name, before, after } => {
                meta.rename(*id, name, before, after).map(|()| 0)
            }
            ControlOp::SetConfigs(entries) => meta.set_configs(entries).map(|()| 0),
            ControlOp::Grow { total_bytes } => meta.grow(*total_bytes).map(|_| 0),
        }
    }
}
