//! NVMe reservation tables kept in the pool (Persist Through Power Loss): the pool is the
//! [`ResvStore`] of every namespace the daemon serves while it serves one.
//!
//! One configuration entry per namespace, `resv:H(nqn):NSID` (H as in `pool_config`: the key
//! stays short whatever the NQN) → base64 of the table's encoded form
//! ([`ballast_nvmf::resv::Reservations::encode`], which names the namespace's NGUID, so a
//! table is never applied to another device put at the same id). Invariants: an entry is
//! written, or removed, durably (one pool commit) before the reservation command that changed
//! it completes; an entry that cannot be read back is ignored by the namespace (which starts
//! empty and says so in the log), never a reason to refuse the pool; entries go with their
//! namespace or subsystem when the control plane forgets those (`persist`), never when a
//! namespace merely stops being served (a volume whose delete is refused keeps them). Reads
//! take the pool state shared: a namespace is added under its subsystem's map lock, and the
//! cores go on meanwhile.

use std::sync::Arc;

use ballast_engine::volume::dev::PoolHandle;
use ballast_nvmf::resv::ResvStore;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

use crate::pool_config;

/// The pool as the store of reservation tables.
pub struct PoolResvStore {
    pool: Arc<PoolHandle>,
}

impl PoolResvStore {
    pub fn new(pool: Arc<PoolHandle>) -> PoolResvStore {
        PoolResvStore { pool }
    }
}

impl ResvStore for PoolResvStore {
    fn load(&self, nqn: &str, nsid: u32) -> Option<Vec<u8>> {
        let text = self
            .pool
            .meta_shared()
            .config()
            .get(&pool_config::reservations_key(nqn, nsid))
            .cloned()?;
        match BASE64.decode(text.as_bytes()) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                tracing::warn!(nqn, nsid, error = %e, "kept NVMe reservations are not base64: ignored");
                None
            }
        }
    }

    fn save(&self, nqn: &str, nsid: u32, table: Option<&[u8]>) -> Result<(), String> {
        let key = pool_config::reservations_key(nqn, nsid);
        if table.is_none() && !self.pool.meta_shared().config().contains_key(&key) {
            return Ok(());
        }
        let value = table.map(|t| BASE64.encode(t)).unwrap_or_default();
        self.pool
            .set_config(&key, &value)
            .map_err(|e| format!("keeping the reservations of namespace {nsid} of {nqn}: {e}"))
    }
}
