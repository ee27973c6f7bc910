//! The volume layer (issue 4, in progress; see docs/VOLUMES.md): pool format, journal, thin
//! volumes with snapshots and clones. So far: the pure on-media codecs, the copy-on-write mapping
//! tree, and the crash-simulating device the volume core will be tested against.

pub mod alloc;
pub mod dev;
pub mod format;
pub mod journal;
pub mod map;
pub mod meta;
pub mod pool;
pub mod records;
pub mod sim;
