//! The volume layer (issue 4, in progress; see docs/VOLUMES.md): pool format, journal, thin
//! volumes with snapshots and clones. Only the pure on-media codecs exist so far.

pub mod format;
