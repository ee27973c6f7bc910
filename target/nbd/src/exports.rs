//! The table of NBD exports: name → block device, shared by the acceptor (handshake) and the
//! control plane. Read once per handshake, never on the I/O path.

use std::collections::BTreeMap;
use std::sync::Arc;

use ballast_engine::BlockDev;
use parking_lot::RwLock;

use crate::codec;

pub struct Export {
    pub name: String,
    pub description: String,
    pub dev: Arc<dyn BlockDev>,
    pub read_only: bool,
}

impl Export {
    pub fn size_bytes(&self) -> u64 {
        self.dev.size_bytes()
    }

    /// Whether writes are refused: the export says so or its device is read-only (what the
    /// flags advertise and what transmission enforces, from one place).
    pub fn read_only(&self) -> bool {
        self.read_only || self.dev.read_only()
    }

    /// Transmission flags for this export; `structured` decides SEND_DF.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut flags = codec::TF_HAS_FLAGS
            | codec::TF_SEND_FLUSH
            | codec::TF_SEND_FUA
            | codec::TF_CAN_MULTI_CONN
            | codec::TF_SEND_CACHE;
        if self.read_only() {
            flags |= codec::TF_READ_ONLY;
        } else {
            flags |= codec::TF_SEND_TRIM;
            // Offered only where the device can do it: a plain write-zeroes offered must not
            // fail with ENOTSUP (proto.md); without it clients write the zeros themselves.
            if self.dev.zeroes_supported() {
                flags |= codec::TF_SEND_WRITE_ZEROES | codec::TF_SEND_FAST_ZERO;
            }
        }
        if structured {
            flags |= codec::TF_SEND_DF;
        }
        flags
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("export {0:?} already exists")]
    Exists(String),
    #[error("no export named {0:?}")]
    NotFound(String),
    #[error("invalid export name {0:?}: 1-4096 bytes of UTF-8 without NUL")]
    BadName(String),
    #[error("invalid description of export {0:?}: at most 4096 bytes of UTF-8 without NUL")]
    BadDescription(String),
}

#[derive(Default)]
struct Inner {
    map: BTreeMap<String, Arc<Export>>,
    default: Option<String>,
    /// Export name → the TLS identities allowed to use it (an export listed here is
    /// TLS-only). Kept by name, so it outlives the export's removal and re-creation.
    allow: BTreeMap<String, Vec<String>>,
}

/// Whether a client may use an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Granted,
    /// The export is TLS-only and the session is not (yet) encrypted.
    TlsRequired,
    /// Encrypted, but the client's TLS identity is not on the export's allow-list.
    Denied,
}

#[derive(Default)]
pub struct ExportTable {
    inner: RwLock<Inner>,
}

impl ExportTable {
    /// Refuses a name or description the protocol cannot carry: NBD_INFO_DESCRIPTION and
    /// NBD_OPT_LIST carry both, and a longer one breaks libnbd's listing of every export.
    fn check(export: &Export) -> Result<(), ExportError> {
        let name = &export.name;
        if name.is_empty() || name.len() > codec::STRING_MAX || name.contains('\0') {
            return Err(ExportError::BadName(name.clone()));
        }
        if export.description.len() > codec::STRING_MAX || export.description.contains('\0') {
            return Err(ExportError::BadDescription(name.clone()));
        }
        Ok(())
    }

    pub fn add(&self, export: Export) -> Result<(), ExportError> {
        Self::check(&export)?;
        let name = export.name.clone();
        let mut inner = self.inner.write();
        if inner.map.contains_key(&name) {
            return Err(ExportError::Exists(name));
        }
        inner.map.insert(name.clone(), Arc::new(export));
        inner.default.get_or_insert(name);
        Ok(())
    }

    /// Puts `export` in place of the export of its name (a new description, say): it stays
    /// the default if it was; connections already using the old one keep it.
    pub fn replace(&self, export: Export) -> Result<(), ExportError> {
        Self::check(&export)?;
        let mut inner = self.inner.write();
        let Some(slot) = inner.map.get_mut(&export.name) else {
            return Err(ExportError::NotFound(export.name));
        };
        *slot = Arc::new(export);
        Ok(())
    }

    /// Removes an export; connections already using it keep their device until they close.
    pub fn remove(&self, name: &str) -> Result<Arc<Export>, ExportError> {
        let mut inner = self.inner.write();
        let export = inner.map.remove(name).ok_or_else(|| ExportError::NotFound(name.into()))?;
        if inner.default.as_deref() == Some(name) {
            inner.default = inner.map.keys().next().cloned();
        }
        Ok(export)
    }

    pub fn set_default(&self, name: &str) -> Result<(), ExportError> {
        let mut inner = self.inner.write();
        if !inner.map.contains_key(name) {
            return Err(ExportError::NotFound(name.into()));
        }
        inner.default = Some(name.into());
        Ok(())
    }

    /// Looks up an export; the empty name means the default export.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        let inner = self.inner.read();
        let key = if name.is_empty() { inner.default.as_deref()? } else { name };
        inner.map.get(key).cloned()
    }

    /// Makes export `name` TLS-only, usable by these identities (PSK user names or client
    /// certificate common names); an empty list lifts the restriction.
    pub fn set_allowed(&self, name: &str, identities: Vec<String>) {
        let mut inner = self.inner.write();
        if identities.is_empty() {
            inner.allow.remove(name);
        } else {
            inner.allow.insert(name.to_string(), identities);
        }
    }

    /// The allow-list of export `name`, if it has one.
    pub fn allowed(&self, name: &str) -> Option<Vec<String>> {
        self.inner.read().allow.get(name).cloned()
    }

    /// Whether a session (TLS or not, with this identity) may use export `name`.
    pub fn access(&self, name: &str, tls: bool, identity: Option<&str>) -> Access {
        match self.inner.read().allow.get(name) {
            None => Access::Granted,
            Some(_) if !tls => Access::TlsRequired,
            Some(ids) if identity.is_some_and(|i| ids.iter().any(|a| a == i)) => Access::Granted,
            Some(_) => Access::Denied,
        }
    }

    pub fn default_name(&self) -> Option<String> {
        self.inner.read().default.clone()
    }

    pub fn list(&self) -> Vec<Arc<Export>> {
        self.inner.read().map.values().cloned().collect()
    }

    /// Every export's device (for flushing at shutdown).
    pub fn devices(&self) -> Vec<Arc<dyn BlockDev>> {
        self.inner.read().map.values().map(|e| e.dev.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_engine::blockdev::{DevInfo, Extent, IoCmd};
    use ballast_engine::ram::RamDev;
    use ballast_engine::reactor::Cx;

    /// A device that cannot write zeroes (an NVMe namespace without Write Zeroes, a file on a
    /// filesystem with neither fallocate mode); otherwise memory.
    struct NoZeroes(RamDev);

    impl BlockDev for NoZeroes {
        fn info(&self) -> &DevInfo {
            self.0.info()
        }
        fn size_bytes(&self) -> u64 {
            self.0.size_bytes()
        }
        fn submit(&self, cx: &mut Cx<'_>, cmd: IoCmd, tag: u32) {
            self.0.submit(cx, cmd, tag)
        }
        fn extents(&self, offset: u64, len: u64, max: usize) -> std::io::Result<Vec<Extent>> {
            self.0.extents(offset, len, max)
        }
        fn flush_blocking(&self) -> std::io::Result<()> {
            self.0.flush_blocking()
        }
        fn zeroes_supported(&self) -> bool {
            false
        }
    }

    /// Write-zeroes (and FAST_ZERO with it) is offered only where the device can do it: a
    /// plain one offered must not fail with ENOTSUP.
    #[test]
    fn write_zeroes_is_offered_only_where_the_device_zeroes() {
        let export = |dev: Arc<dyn BlockDev>| Export {
            name: "e".into(),
            description: String::new(),
            dev,
            read_only: false,
        };
        let zeroes = codec::TF_SEND_WRITE_ZEROES | codec::TF_SEND_FAST_ZERO;
        let can = export(Arc::new(RamDev::new(1 << 20))).transmission_flags(true);
        assert_eq!(can & zeroes, zeroes);
        let cannot = export(Arc::new(NoZeroes(RamDev::new(1 << 20)))).transmission_flags(true);
        assert_eq!(cannot & zeroes, 0);
        assert_ne!(cannot & codec::TF_SEND_TRIM, 0, "trim is still offered");
    }

    /// A replaced export (a renamed volume's snapshot described anew) keeps its place and its
    /// default role; connections holding the old one keep it; an unknown name is refused.
    #[test]
    fn a_replaced_export_keeps_its_name_and_default_role() {
        let export = |name: &str, description: &str| Export {
            name: name.into(),
            description: description.into(),
            dev: Arc::new(RamDev::new(1 << 20)),
            read_only: false,
        };
        let t = ExportTable::default();
        t.add(export("a", "old")).unwrap();
        t.add(export("b", "")).unwrap();
        let held = t.get("a").unwrap();
        t.replace(export("a", "new")).unwrap();
        assert_eq!(t.default_name().as_deref(), Some("a"));
        assert_eq!(t.get("").unwrap().description, "new");
        assert_eq!(held.description, "old");
        assert!(matches!(t.replace(export("c", "")), Err(ExportError::NotFound(_))));
        assert!(matches!(t.replace(export("b", "x\0")), Err(ExportError::BadDescription(_))));
        assert_eq!(t.list().len(), 2);
    }
}
