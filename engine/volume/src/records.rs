//! Journal redo records (docs/VOLUMES.md): typed, little-endian, packed into journal-block
//! payloads. Replay applies them in order; each is idempotent given the state it follows.
//! Decoding checks every length first: damaged payloads give an error, never a panic.

/// Longest volume or export name.
pub const NAME_MAX: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Volume `volume`'s cluster `vcluster` now maps to `entry` (a `map::Entry`; 0 = unmapped).
    MapSet {
        volume: u32,
        vcluster: u64,
        entry: u64,
    },
    /// A new thin volume; `parent` 0 for none.
    VolumeCreate {
        id: u32,
        parent: u32,
        size_bytes: u64,
        name: String,
    },
    /// A read-only snapshot `id` of volume `of`, sharing its mapping.
    Snapshot {
        id: u32,
        of: u32,
        name: String,
    },
    /// A writable clone `id` of snapshot `of`.
    Clone {
        id: u32,
        of: u32,
        name: String,
    },
    /// Volume `id` now has the mapping of snapshot `to` (rollback).
    Rollback {
        id: u32,
        to: u32,
    },
    Delete {
        id: u32,
    },
    Resize {
        id: u32,
        size_bytes: u64,
    },
    /// Background reclaim of deleted volume `id` has released everything below `cursor`.
    ReclaimProgress {
        id: u32,
        cursor: u64,
    },
    /// Volume `id` becomes read-only (checkpoints recreating a snapshot whose origin is gone).
    ReadOnly {
        id: u32,
    },
    /// Volume `id` is thick (`bdev_lvol_create` without `thin_provision`): every cluster of it
    /// is mapped (`MapSet` records follow; opening a pool maps what a crash left out), a trim
    /// keeps its clusters, growing maps the new ones. A snapshot of it or a rollback makes it
    /// thin (its clusters are shared then); clones are thin. Older builds do not know this
    /// record and refuse to open a pool holding one.
    Thick {
        id: u32,
    },
    /// Volume `id` names no parent any more (`bdev_lvol_decouple_parent`,
    /// `bdev_lvol_inflate`): it shares no cluster with another volume (its shared ones were
    /// copied first, by writes that logged `MapSet`s), so listings no longer call it a clone.
    /// Older builds do not know this record and refuse to open a pool holding one.
    Decouple {
        id: u32,
    },
    /// Volume `id` is now called `name` (`bdev_lvol_rename`). Checkpoints write the name a
    /// volume has, so this record lives in the journal only. Older builds do not know it and
    /// refuse to open a pool holding one.
    Rename {
        id: u32,
        name: String,
    },
    /// Persistent configuration (exports, hosts): `key` now holds `value`; empty removes it.
    Config {
        key: String,
        value: String,
    },
}

/// Longest configuration value (it must fit one journal block with its key).
pub const CONFIG_VALUE_MAX: usize = 3072;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record truncated at byte {0}")]
    Truncated(usize),
    #[error("unknown record type {kind} at byte {at}")]
    UnknownType { kind: u8, at: usize },
    #[error("name at byte {0} is not UTF-8 or too long")]
    BadName(usize),
}

mod kind {
    pub const MAP_SET: u8 = 1;
    pub const VOLUME_CREATE: u8 = 2;
    pub const SNAPSHOT: u8 = 3;
    pub const CLONE: u8 = 4;
    pub const ROLLBACK: u8 = 5;
    pub const DELETE: u8 = 6;
    pub const RESIZE: u8 = 7;
    pub const RECLAIM_PROGRESS: u8 = 8;
    pub const READ_ONLY: u8 = 9;
    pub const CONFIG: u8 = 10;
    pub const THICK: u8 = 11;
    pub const RENAME: u8 = 12;
    pub const DECOUPLE: u8 = 13;
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    assert!(name.len() <= NAME_MAX, "name longer than {NAME_MAX}");
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
}

/// Bytes a [`Record::MapSet`] takes encoded (every family data record).
pub const MAP_SET_LEN: usize = 1 + 4 + 8 + 8;

impl Record {
    /// Bytes this record takes when encoded (what [`Record::encode`] appends; counted without
    /// encoding, so a commit can place its records in journal blocks before encoding them).
    pub fn encoded_len(&self) -> usize {
        1 + match self {
            Record::MapSet { .. } => MAP_SET_LEN - 1,
            Record::VolumeCreate { name, .. } => 4 + 4 + 8 + 1 + name.len(),
            Record::Snapshot { name, .. } | Record::Clone { name, .. } => 4 + 4 + 1 + name.len(),
            Record::Rollback { .. } => 4 + 4,
            Record::Rename { name, .. } => 4 + 1 + name.len(),
            Record::Delete { .. }
            | Record::ReadOnly { .. }
            | Record::Thick { .. }
            | Record::Decouple { .. } => 4,
            Record::Resize { .. } | Record::ReclaimProgress { .. } => 4 + 8,
            Record::Config { key, value } => 1 + key.len() + 2 + value.len(),
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Record::MapSet { volume, vcluster, entry } => {
                out.push(kind::MAP_SET);
                out.extend_from_slice(&volume.to_le_bytes());
                out.extend_from_slice(&vcluster.to_le_bytes());
                out.extend_from_slice(&entry.to_le_bytes());
            }
            Record::VolumeCreate { id, parent, size_bytes, name } => {
                out.push(kind::VOLUME_CREATE);
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&parent.to_le_bytes());
                out.extend_from_slice(&size_bytes.to_le_bytes());
                put_name(out, name);
            }
            Record::Snapshot { id, of, name } | Record::Clone { id, of, name } => {
                out.push(if matches!(self, Record::Snapshot { .. }) {
                    kind::SNAPSHOT
                } else {
                    kind::CLONE
                });
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&of.to_le_bytes());
                put_name(out, name);
            }
            Record::Rollback { id, to } => {
                out.push(kind::ROLLBACK);
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&to.to_le_bytes());
            }
            Record::Delete { id } => {
                out.push(kind::DELETE);
                out.extend_from_slice(&id.to_le_bytes());
            }
            Record::Resize { id, size_bytes } => {
                out.push(kind::RESIZE);
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&size_bytes.to_le_bytes());
            }
            Record::ReclaimProgress { id, cursor } => {
                out.push(kind::RECLAIM_PROGRESS);
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&cursor.to_le_bytes());
            }
            Record::ReadOnly { id } => {
                out.push(kind::READ_ONLY);
                out.extend_from_slice(&id.to_le_bytes());
            }
            Record::Thick { id } => {
                out.push(kind::THICK);
                out.extend_from_slice(&id.to_le_bytes());
            }
            Record::Decouple { id } => {
                out.push(kind::DECOUPLE);
                out.extend_from_slice(&id.to_le_bytes());
            }
            Record::Rename { id, name } => {
                out.push(kind::RENAME);
                out.extend_from_slice(&id.to_le_bytes());
                put_name(out, name);
            }
            Record::Config { key, value } => {
                assert!(value.len() <= CONFIG_VALUE_MAX, "config value too long");
                out.push(kind::CONFIG);
                put_name(out, key);
                out.extend_from_slice(&(value.len() as u16).to_le_bytes());
                out.extend_from_slice(value.as_bytes());
            }
        }
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], RecordError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(RecordError::Truncated(self.at))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, RecordError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn long_text(&mut self) -> Result<String, RecordError> {
        let at = self.at;
        let len = u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")) as usize;
        if len > CONFIG_VALUE_MAX {
            return Err(RecordError::BadName(at));
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| RecordError::BadName(at))
    }
    fn name(&mut self) -> Result<String, RecordError> {
        let at = self.at;
        let len = self.u8()? as usize;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| RecordError::BadName(at))
    }
}

/// Decodes every record in a journal-block payload.
pub fn decode_all(payload: &[u8]) -> Result<Vec<Record>, RecordError> {
    let mut c = Cursor { b: payload, at: 0 };
    let mut out = Vec::new();
    while c.at < payload.len() {
        let at = c.at;
        let r = match c.u8()? {
            kind::MAP_SET => {
                Record::MapSet { volume: c.u32()?, vcluster: c.u64()?, entry: c.u64()? }
            }
            kind::VOLUME_CREATE => Record::VolumeCreate {
                id: c.u32()?,
                parent: c.u32()?,
                size_bytes: c.u64()?,
                name: c.name()?,
            },
            kind::SNAPSHOT => Record::Snapshot { id: c.u32()?, of: c.u32()?, name: c.name()? },
            kind::CLONE => Record::Clone { id: c.u32()?, of: c.u32()?, name: c.name()? },
            kind::ROLLBACK => Record::Rollback { id: c.u32()?, to: c.u32()? },
            kind::DELETE => Record::Delete { id: c.u32()? },
            kind::RESIZE => Record::Resize { id: c.u32()?, size_bytes: c.u64()? },
            kind::RECLAIM_PROGRESS => Record::ReclaimProgress { id: c.u32()?, cursor: c.u64()? },
            kind::READ_ONLY => Record::ReadOnly { id: c.u32()? },
            kind::THICK => Record::Thick { id: c.u32()? },
            kind::DECOUPLE => Record::Decouple { id: c.u32()? },
            kind::RENAME => Record::Rename { id: c.u32()?, name: c.name()? },
            kind::CONFIG => Record::Config { key: c.name()?, value: c.long_text()? },
            kind => return Err(RecordError::UnknownType { kind, at }),
        };
        out.push(r);
    }
    Ok(out)
}

/// Places records in payloads of at most `max` bytes each, in order, never splitting one,
/// from their lengths alone ([`Record::encoded_len`]): how many records each payload holds.
/// A run of records of one length is placed in one step per payload it touches, whatever its
/// size ([`Planner::uniform`]).
pub struct Planner {
    max: usize,
    /// Records per payload so far (at least one payload, even for no records).
    counts: Vec<usize>,
    /// Bytes in the last payload.
    bytes: usize,
}

impl Planner {
    pub fn new(max: usize) -> Planner {
        Planner { max, counts: vec![0], bytes: 0 }
    }

    /// Places records of any lengths, one by one.
    pub fn each<'a>(&mut self, records: impl IntoIterator<Item = &'a Record>) {
        for r in records {
            self.uniform(1, r.encoded_len());
        }
    }

    /// Places `n` records of `len` bytes each.
    pub fn uniform(&mut self, mut n: usize, len: usize) {
        assert!(len > 0 && len <= self.max, "record larger than a journal block");
        while n > 0 {
            let fit = (self.max - self.bytes) / len;
            if fit == 0 {
                self.counts.push(0);
                self.bytes = 0;
                continue;
            }
            let take = fit.min(n);
            *self.counts.last_mut().expect("at least one payload") += take;
            self.bytes += take * len;
            n -= take;
        }
    }

    /// Records per payload.
    pub fn finish(self) -> Vec<usize> {
        self.counts
    }
}

/// Encodes records into the payloads `plan` (from a [`Planner`] with the same `max`) gives
/// them.
pub fn pack_planned<'a>(
    records: impl IntoIterator<Item = &'a Record>,
    plan: &[usize],
    max: usize,
) -> Vec<Vec<u8>> {
    let mut records = records.into_iter();
    let payloads = plan
        .iter()
        .map(|&n| {
            let mut payload = Vec::with_capacity(max);
            for r in records.by_ref().take(n) {
                r.encode(&mut payload);
            }
            assert!(payload.len() <= max, "a plan for other records");
            payload
        })
        .collect();
    assert!(records.next().is_none(), "a plan for other records");
    payloads
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where records go in payloads of at most `max` bytes each, record by record.
    fn plan(records: &[Record], max: usize) -> Vec<usize> {
        let mut p = Planner::new(max);
        p.each(records);
        p.finish()
    }

    /// Packs records into payloads of at most `max` bytes each, as [`plan`] places them.
    fn pack(records: &[Record], max: usize) -> Vec<Vec<u8>> {
        pack_planned(records, &plan(records, max), max)
    }
    use proptest::prelude::*;

    #[test]
    fn golden_map_set() {
        let mut out = Vec::new();
        Record::MapSet { volume: 2, vcluster: 0x10, entry: 0xffff_0000_0000_0007 }.encode(&mut out);
        assert_eq!(out, [1, 2, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(decode_all(&out).unwrap().len(), 1);
        assert_eq!(decode_all(&out[..10]), Err(RecordError::Truncated(5)));
        assert_eq!(decode_all(&[99]), Err(RecordError::UnknownType { kind: 99, at: 0 }));
    }

    fn record() -> impl Strategy<Value = Record> {
        let name = "[a-z0-9._-]{0,40}";
        prop_oneof![
            (any::<u32>(), any::<u64>(), any::<u64>())
                .prop_map(|(volume, vcluster, entry)| Record::MapSet { volume, vcluster, entry }),
            (any::<u32>(), any::<u32>(), any::<u64>(), name).prop_map(
                |(id, parent, size_bytes, name)| Record::VolumeCreate {
                    id,
                    parent,
                    size_bytes,
                    name
                }
            ),
            (any::<u32>(), any::<u32>(), name).prop_map(|(id, of, name)| Record::Snapshot {
                id,
                of,
                name
            }),
            (any::<u32>(), any::<u32>(), name).prop_map(|(id, of, name)| Record::Clone {
                id,
                of,
                name
            }),
            (any::<u32>(), any::<u32>()).prop_map(|(id, to)| Record::Rollback { id, to }),
            any::<u32>().prop_map(|id| Record::Delete { id }),
            (any::<u32>(), any::<u64>())
                .prop_map(|(id, size_bytes)| Record::Resize { id, size_bytes }),
            (any::<u32>(), any::<u64>())
                .prop_map(|(id, cursor)| Record::ReclaimProgress { id, cursor }),
            any::<u32>().prop_map(|id| Record::ReadOnly { id }),
            any::<u32>().prop_map(|id| Record::Thick { id }),
            any::<u32>().prop_map(|id| Record::Decouple { id }),
            (any::<u32>(), name).prop_map(|(id, name)| Record::Rename { id, name }),
            (name, "[ -~]{0,300}").prop_map(|(key, value)| Record::Config { key, value }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        #[test]
        fn pack_and_decode_round_trip(records in proptest::collection::vec(record(), 0..300)) {
            let payloads = pack(&records, super::super::format::JOURNAL_PAYLOAD_MAX);
            let mut back = Vec::new();
            for p in &payloads {
                prop_assert!(p.len() <= super::super::format::JOURNAL_PAYLOAD_MAX);
                back.extend(decode_all(p).unwrap());
            }
            prop_assert_eq!(back, records);
        }

        /// The length a commit plans with is the length it encodes, and a payload ends only
        /// where the next record would not fit (the packing is the one it always was).
        #[test]
        fn plans_count_what_encoding_writes(
            records in proptest::collection::vec(record(), 0..300),
            max in 300usize..4000,
        ) {
            for r in &records {
                let mut one = Vec::new();
                r.encode(&mut one);
                prop_assert_eq!(r.encoded_len(), one.len(), "{:?}", r);
            }
            let records: Vec<Record> =
                records.into_iter().filter(|r| r.encoded_len() <= max).collect();
            let plan = plan(&records, max);
            // Runs of equal lengths placed at once land where record by record does.
            let mut runs = Planner::new(max);
            let mut i = 0;
            while i < records.len() {
                let len = records[i].encoded_len();
                let n = records[i..].iter().take_while(|r| r.encoded_len() == len).count();
                runs.uniform(n, len);
                i += n;
            }
            prop_assert_eq!(&runs.finish(), &plan);
            let payloads = pack_planned(&records, &plan, max);
            prop_assert_eq!(payloads.len(), plan.len());
            let mut at = 0;
            for (i, (&n, p)) in plan.iter().zip(&payloads).enumerate() {
                prop_assert_eq!(decode_all(p).unwrap().len(), n);
                at += n;
                if i + 1 < plan.len() {
                    prop_assert!(p.len() + records[at].encoded_len() > max, "a payload ended early");
                }
            }
        }

        #[test]
        fn damaged_payloads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_all(&bytes);
        }
    }
}
