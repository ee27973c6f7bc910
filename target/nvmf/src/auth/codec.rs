//! DH-HMAC-CHAP messages ⇄ bytes: the payloads of Fabrics Authentication Send (host to
//! controller) and Authentication Receive (controller to host), NVMe base spec 2.0 section
//! 8.13.5 (figures "AUTH_Negotiate" through "DH-HMAC-CHAP_Failure"), laid out as the kernel's
//! `struct nvmf_auth_dhchap_*_data` in include/linux/nvme.h. All integers little-endian.
//!
//! ```text
//! common header   0 auth_type (00 common, 90 DH-HMAC-CHAP)  1 auth_id  2..4 reserved  4..6 T_ID
//! Negotiate       6 SC_C  7 NAPD  8.. NAPD descriptors of 64 bytes:
//!                   0 AUTHID (01)  1 reserved  2 HALEN (<= 30)  3 DHLEN (<= 30)
//!                   4..34 hash ids (HALEN used)  34..64 DH group ids (DHLEN used)
//! Challenge       6 HL  7 reserved  8 HASHID  9 DHGID  10..12 DHVLEN  12..16 SEQNUM
//!                   16.. C1 (HL), DH value (DHVLEN)
//! Reply           6 HL  7 reserved  8 CVALID  9 reserved  10..12 DHVLEN  12..16 SEQNUM
//!                   16.. R1 (HL), C2 (HL, zero unless CVALID), DH value (DHVLEN)
//! Success1        6 HL  7 reserved  8 RVALID  9..16 reserved  16.. R2 (HL)
//! Success2        6..16 reserved
//! Failure1/2      6 reason code (01)  7 reason code explanation
//! ```
//!
//! Invariants:
//! - `decode` checks the length of the fixed part before reading it and the total length
//!   against the lengths the message declares; a payload must be exactly one message;
//! - reserved bytes must be zero, HL must be 32, 48 or 64, DHVLEN at most 1024 (ffdhe8192);
//! - decoding borrows from the payload and allocates only the descriptor list (64 payload
//!   bytes per entry); `decode(encode(m)) == m` for every message.

use super::FailureReason;

/// SECP of the AUTH_Send/AUTH_Receive commands for NVMe in-band authentication.
pub const SECP_DHCHAP: u8 = 0xe9;
/// SPSP0 and SPSP1 of those commands.
pub const SPSP0: u8 = 0x01;
pub const SPSP1: u8 = 0x01;

/// `auth_type` of Negotiate and the Failure messages.
pub const AUTH_TYPE_COMMON: u8 = 0x00;
/// `auth_type` of the DH-HMAC-CHAP messages.
pub const AUTH_TYPE_DHCHAP: u8 = 0x01; // include/linux/nvme.h NVME_AUTH_DHCHAP_MESSAGES

/// `auth_id` values.
pub mod auth_id {
    pub const NEGOTIATE: u8 = 0x00;
    pub const CHALLENGE: u8 = 0x01;
    pub const REPLY: u8 = 0x02;
    pub const SUCCESS1: u8 = 0x03;
    pub const SUCCESS2: u8 = 0x04;
    pub const FAILURE2: u8 = 0xf0;
    pub const FAILURE1: u8 = 0xf1;
}

/// The only protocol of a negotiate descriptor ballast knows: DH-HMAC-CHAP.
pub const AUTHID_DHCHAP: u8 = 0x01;
/// The Failure messages' reason code ("authentication failure").
pub const REASON_FAILED: u8 = 0x01;

pub const HEADER_LEN: usize = 8;
pub const DESCRIPTOR_LEN: usize = 64;
/// Hash ids and DH group ids a descriptor can list, each.
pub const IDS_PER_LIST: usize = 30;
pub const CHALLENGE_HEADER_LEN: usize = 16;
pub const SUCCESS2_LEN: usize = 16;
pub const FAILURE_LEN: usize = 8;
/// The largest DH value (ffdhe8192).
pub const DH_VALUE_MAX: usize = 1024;
/// The largest payload ballast decodes: a Negotiate with 255 descriptors.
pub const MESSAGE_MAX: usize = HEADER_LEN + 255 * DESCRIPTOR_LEN;

const _: () = assert!(CHALLENGE_HEADER_LEN + 2 * 64 + DH_VALUE_MAX < MESSAGE_MAX);
const _: () = assert!(4 + 2 * IDS_PER_LIST == DESCRIPTOR_LEN);

/// Secure channel concatenation requested in a Negotiate (`NVME_AUTH_SECP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecureChannel {
    None = 0,
    Concat = 1,
    NewTlsPsk = 2,
    ReplaceTlsPsk = 3,
}

/// One protocol descriptor of a Negotiate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub auth_id: u8,
    hash_count: u8,
    dh_count: u8,
    hash_ids: [u8; IDS_PER_LIST],
    dh_ids: [u8; IDS_PER_LIST],
}

impl Descriptor {
    /// A DH-HMAC-CHAP descriptor listing these ids (at most 30 of each, else `None`).
    pub fn dhchap(hash_ids: &[u8], dh_ids: &[u8]) -> Option<Self> {
        if hash_ids.len() > IDS_PER_LIST || dh_ids.len() > IDS_PER_LIST {
            return None;
        }
        let mut descriptor = Descriptor {
            auth_id: AUTHID_DHCHAP,
            hash_count: hash_ids.len() as u8,
            dh_count: dh_ids.len() as u8,
            hash_ids: [0; IDS_PER_LIST],
            dh_ids: [0; IDS_PER_LIST],
        };
        descriptor.hash_ids[..hash_ids.len()].copy_from_slice(hash_ids);
        descriptor.dh_ids[..dh_ids.len()].copy_from_slice(dh_ids);
        Some(descriptor)
    }
    /// Offered hash ids, in the host's order (unknown ids included).
    pub fn hash_ids(&self) -> &[u8] {
        &self.hash_ids[..self.hash_count as usize]
    }
    /// Offered DH group ids, in the host's order (unknown ids included).
    pub fn dh_ids(&self) -> &[u8] {
        &self.dh_ids[..self.dh_count as usize]
    }
}

/// A decoded message; variable parts borrow the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    Negotiate {
        tid: u16,
        sc_c: SecureChannel,
        descriptors: Vec<Descriptor>,
    },
    Challenge {
        tid: u16,
        hash_id: u8,
        dh_group_id: u8,
        seqnum: u32,
        c1: &'a [u8],
        dh_value: &'a [u8],
    },
    Reply {
        tid: u16,
        seqnum: u32,
        r1: &'a [u8],
        c2: Option<&'a [u8]>,
        dh_value: &'a [u8],
    },
    Success1 {
        tid: u16,
        hl: u8,
        r2: Option<&'a [u8]>,
    },
    Success2 {
        tid: u16,
    },
    Failure1 {
        tid: u16,
        reason: FailureReason,
    },
    Failure2 {
        tid: u16,
        reason: FailureReason,
    },
}

/// What is wrong with a payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("{len_bytes} bytes is too short for {message} (needs {needed})")]
    Short { message: &'static str, len_bytes: usize, needed: usize },
    #[error("{message} of {len_bytes} bytes declares {declared}")]
    Length { message: &'static str, len_bytes: usize, declared: usize },
    #[error("payload of {len_bytes} bytes exceeds the {MESSAGE_MAX} byte limit")]
    TooLong { len_bytes: usize },
    #[error("unknown message type {auth_type:#04x}/{auth_id:#04x}")]
    UnknownMessage { auth_type: u8, auth_id: u8 },
    #[error("{message}: reserved byte {offset} is {value:#04x}, not zero")]
    Reserved { message: &'static str, offset: usize, value: u8 },
    #[error("{message}: invalid {field} {value}")]
    Field { message: &'static str, field: &'static str, value: u32 },
}

fn u16_at(p: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([p[at], p[at + 1]])
}

fn u32_at(p: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]])
}

fn reserved(
    p: &[u8],
    message: &'static str,
    range: std::ops::Range<usize>,
) -> Result<(), CodecError> {
    match range.clone().find(|&i| p[i] != 0) {
        Some(offset) => Err(CodecError::Reserved { message, offset, value: p[offset] }),
        None => Ok(()),
    }
}

fn need(p: &[u8], message: &'static str, needed: usize) -> Result<(), CodecError> {
    if p.len() < needed {
        return Err(CodecError::Short { message, len_bytes: p.len(), needed });
    }
    Ok(())
}

fn exact(p: &[u8], message: &'static str, declared: usize) -> Result<(), CodecError> {
    if p.len() != declared {
        return Err(CodecError::Length { message, len_bytes: p.len(), declared });
    }
    Ok(())
}

fn hash_len(message: &'static str, hl: u8) -> Result<usize, CodecError> {
    match hl {
        32 | 48 | 64 => Ok(hl as usize),
        _ => Err(CodecError::Field { message, field: "HL", value: hl.into() }),
    }
}

fn dh_len(message: &'static str, dhvlen: u16) -> Result<usize, CodecError> {
    if dhvlen as usize > DH_VALUE_MAX {
        return Err(CodecError::Field { message, field: "DHVLEN", value: dhvlen.into() });
    }
    Ok(dhvlen as usize)
}

impl<'a> Message<'a> {
    /// Decodes one payload.
    pub fn decode(p: &'a [u8]) -> Result<Self, CodecError> {
        if p.len() > MESSAGE_MAX {
            return Err(CodecError::TooLong { len_bytes: p.len() });
        }
        need(p, "an authentication message", HEADER_LEN)?;
        let (auth_type, id) = (p[0], p[1]);
        let tid = u16_at(p, 4);
        match (auth_type, id) {
            (AUTH_TYPE_COMMON, auth_id::NEGOTIATE) => decode_negotiate(p, tid),
            (AUTH_TYPE_DHCHAP, auth_id::CHALLENGE) => decode_challenge(p, tid),
            (AUTH_TYPE_DHCHAP, auth_id::REPLY) => decode_reply(p, tid),
            (AUTH_TYPE_DHCHAP, auth_id::SUCCESS1) => decode_success1(p, tid),
            (AUTH_TYPE_DHCHAP, auth_id::SUCCESS2) => {
                let m = "Success2";
                exact(p, m, SUCCESS2_LEN)?;
                reserved(p, m, 2..4)?;
                reserved(p, m, 6..16)?;
                Ok(Message::Success2 { tid })
            }
            (AUTH_TYPE_COMMON, auth_id::FAILURE1 | auth_id::FAILURE2) => {
                let m = "Failure";
                exact(p, m, FAILURE_LEN)?;
                reserved(p, m, 2..4)?;
                if p[6] != REASON_FAILED {
                    return Err(CodecError::Field {
                        message: m,
                        field: "reason code",
                        value: p[6].into(),
                    });
                }
                let reason = FailureReason::from_code(p[7]).ok_or(CodecError::Field {
                    message: m,
                    field: "reason code explanation",
                    value: p[7].into(),
                })?;
                Ok(if id == auth_id::FAILURE1 {
                    Message::Failure1 { tid, reason }
                } else {
                    Message::Failure2 { tid, reason }
                })
            }
            _ => Err(CodecError::UnknownMessage { auth_type, auth_id: id }),
        }
    }

    /// The transaction identifier every message carries.
    pub fn tid(&self) -> u16 {
        match *self {
            Message::Negotiate { tid, .. }
            | Message::Challenge { tid, .. }
            | Message::Reply { tid, .. }
            | Message::Success1 { tid, .. }
            | Message::Success2 { tid }
            | Message::Failure1 { tid, .. }
            | Message::Failure2 { tid, .. } => tid,
        }
    }

    /// Appends the encoding to `out`. Panics on a message that violates the layout (a bug of
    /// the caller, never peer input: peers' messages come from `decode`).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        match self {
            Message::Negotiate { tid, sc_c, descriptors } => {
                assert!(descriptors.len() <= 255, "too many descriptors");
                header(out, AUTH_TYPE_COMMON, auth_id::NEGOTIATE, *tid);
                out.extend_from_slice(&[*sc_c as u8, descriptors.len() as u8]);
                for d in descriptors {
                    out.extend_from_slice(&[d.auth_id, 0, d.hash_count, d.dh_count]);
                    out.extend_from_slice(&d.hash_ids);
                    out.extend_from_slice(&d.dh_ids);
                }
            }
            Message::Challenge { tid, hash_id, dh_group_id, seqnum, c1, dh_value } => {
                let hl = encode_hl(c1.len());
                header(out, AUTH_TYPE_DHCHAP, auth_id::CHALLENGE, *tid);
                out.extend_from_slice(&[hl, 0, *hash_id, *dh_group_id]);
                out.extend_from_slice(&encode_dhvlen(dh_value.len()).to_le_bytes());
                out.extend_from_slice(&seqnum.to_le_bytes());
                out.extend_from_slice(c1);
                out.extend_from_slice(dh_value);
            }
            Message::Reply { tid, seqnum, r1, c2, dh_value } => {
                let hl = encode_hl(r1.len());
                header(out, AUTH_TYPE_DHCHAP, auth_id::REPLY, *tid);
                out.extend_from_slice(&[hl, 0, c2.is_some() as u8, 0]);
                out.extend_from_slice(&encode_dhvlen(dh_value.len()).to_le_bytes());
                out.extend_from_slice(&seqnum.to_le_bytes());
                out.extend_from_slice(r1);
                match c2 {
                    Some(c2) => {
                        assert_eq!(c2.len(), r1.len(), "C2 and R1 differ in length");
                        out.extend_from_slice(c2);
                    }
                    None => out.resize(out.len() + r1.len(), 0),
                }
                out.extend_from_slice(dh_value);
            }
            Message::Success1 { tid, hl, r2 } => {
                let hl_bytes = encode_hl(*hl as usize);
                header(out, AUTH_TYPE_DHCHAP, auth_id::SUCCESS1, *tid);
                out.extend_from_slice(&[hl_bytes, 0, r2.is_some() as u8, 0, 0, 0, 0, 0, 0, 0]);
                match r2 {
                    Some(r2) => {
                        assert_eq!(r2.len(), *hl as usize, "R2 is not HL bytes");
                        out.extend_from_slice(r2);
                    }
                    None => out.resize(out.len() + *hl as usize, 0),
                }
            }
            Message::Success2 { tid } => {
                header(out, AUTH_TYPE_DHCHAP, auth_id::SUCCESS2, *tid);
                out.resize(start + SUCCESS2_LEN, 0);
            }
            Message::Failure1 { tid, reason } | Message::Failure2 { tid, reason } => {
                let id = if matches!(self, Message::Failure1 { .. }) {
                    auth_id::FAILURE1
                } else {
                    auth_id::FAILURE2
                };
                header(out, AUTH_TYPE_COMMON, id, *tid);
                out.extend_from_slice(&[REASON_FAILED, *reason as u8]);
            }
        }
        assert!(out.len() - start <= MESSAGE_MAX, "encoded message over the limit");
    }
}

/// Writes bytes 0..6 (type, id, reserved, T_ID); the caller writes from byte 6 on.
fn header(out: &mut Vec<u8>, auth_type: u8, id: u8, tid: u16) {
    out.extend_from_slice(&[auth_type, id, 0, 0]);
    out.extend_from_slice(&tid.to_le_bytes());
}

fn encode_hl(len: usize) -> u8 {
    assert!(matches!(len, 32 | 48 | 64), "HL {len} is not a hash length");
    len as u8
}

fn encode_dhvlen(len: usize) -> u16 {
    assert!(len <= DH_VALUE_MAX, "DH value of {len} bytes");
    len as u16
}

fn decode_negotiate(p: &[u8], tid: u16) -> Result<Message<'_>, CodecError> {
    let m = "Negotiate";
    reserved(p, m, 2..4)?;
    let sc_c = match p[6] {
        0 => SecureChannel::None,
        1 => SecureChannel::Concat,
        2 => SecureChannel::NewTlsPsk,
        3 => SecureChannel::ReplaceTlsPsk,
        value => return Err(CodecError::Field { message: m, field: "SC_C", value: value.into() }),
    };
    let napd = p[7] as usize;
    if napd == 0 {
        return Err(CodecError::Field { message: m, field: "NAPD", value: 0 });
    }
    exact(p, m, HEADER_LEN + napd * DESCRIPTOR_LEN)?;
    let mut descriptors = Vec::with_capacity(napd);
    for (index, raw) in p[HEADER_LEN..].chunks_exact(DESCRIPTOR_LEN).enumerate() {
        let offset = HEADER_LEN + index * DESCRIPTOR_LEN;
        if raw[1] != 0 {
            return Err(CodecError::Reserved { message: m, offset: offset + 1, value: raw[1] });
        }
        let (hash_count, dh_count) = (raw[2], raw[3]);
        if hash_count as usize > IDS_PER_LIST {
            return Err(CodecError::Field { message: m, field: "HALEN", value: hash_count.into() });
        }
        if dh_count as usize > IDS_PER_LIST {
            return Err(CodecError::Field { message: m, field: "DHLEN", value: dh_count.into() });
        }
        let mut descriptor = Descriptor {
            auth_id: raw[0],
            hash_count,
            dh_count,
            hash_ids: [0; IDS_PER_LIST],
            dh_ids: [0; IDS_PER_LIST],
        };
        descriptor.hash_ids.copy_from_slice(&raw[4..4 + IDS_PER_LIST]);
        descriptor.dh_ids.copy_from_slice(&raw[4 + IDS_PER_LIST..]);
        // Unused list entries are reserved.
        reserved(p, m, offset + 4 + hash_count as usize..offset + 4 + IDS_PER_LIST)?;
        reserved(p, m, offset + 4 + IDS_PER_LIST + dh_count as usize..offset + DESCRIPTOR_LEN)?;
        descriptors.push(descriptor);
    }
    Ok(Message::Negotiate { tid, sc_c, descriptors })
}

fn decode_challenge(p: &[u8], tid: u16) -> Result<Message<'_>, CodecError> {
    let m = "Challenge";
    need(p, m, CHALLENGE_HEADER_LEN)?;
    reserved(p, m, 2..4)?;
    reserved(p, m, 7..8)?;
    let hl = hash_len(m, p[6])?;
    let dhvlen = dh_len(m, u16_at(p, 10))?;
    exact(p, m, CHALLENGE_HEADER_LEN + hl + dhvlen)?;
    let (c1, dh_value) = p[CHALLENGE_HEADER_LEN..].split_at(hl);
    Ok(Message::Challenge {
        tid,
        hash_id: p[8],
        dh_group_id: p[9],
        seqnum: u32_at(p, 12),
        c1,
        dh_value,
    })
}

fn decode_reply(p: &[u8], tid: u16) -> Result<Message<'_>, CodecError> {
    let m = "Reply";
    need(p, m, CHALLENGE_HEADER_LEN)?;
    reserved(p, m, 2..4)?;
    reserved(p, m, 7..8)?;
    reserved(p, m, 9..10)?;
    let hl = hash_len(m, p[6])?;
    let cvalid = match p[8] {
        0 => false,
        1 => true,
        value => {
            return Err(CodecError::Field { message: m, field: "CVALID", value: value.into() })
        }
    };
    let dhvlen = dh_len(m, u16_at(p, 10))?;
    exact(p, m, CHALLENGE_HEADER_LEN + 2 * hl + dhvlen)?;
    let (r1, rest) = p[CHALLENGE_HEADER_LEN..].split_at(hl);
    let (c2, dh_value) = rest.split_at(hl);
    Ok(Message::Reply { tid, seqnum: u32_at(p, 12), r1, c2: cvalid.then_some(c2), dh_value })
}

fn decode_success1(p: &[u8], tid: u16) -> Result<Message<'_>, CodecError> {
    let m = "Success1";
    need(p, m, CHALLENGE_HEADER_LEN)?;
    reserved(p, m, 2..4)?;
    reserved(p, m, 7..8)?;
    reserved(p, m, 9..16)?;
    let hl = hash_len(m, p[6])?;
    let rvalid = match p[8] {
        0 => false,
        1 => true,
        value => {
            return Err(CodecError::Field { message: m, field: "RVALID", value: value.into() })
        }
    };
    exact(p, m, CHALLENGE_HEADER_LEN + hl)?;
    let r2 = &p[CHALLENGE_HEADER_LEN..];
    Ok(Message::Success1 { tid, hl: hl as u8, r2: rvalid.then_some(r2) })
}

#[cfg(test)]
pub(crate) mod tests;
