//! The Fabrics Authentication Send / Receive commands as the queue sees them (NVMe base spec
//! 2.0 section 6.2 and 6.3; the kernel's `struct nvmf_auth_send_command` and
//! drivers/nvme/target/fabrics-cmd-auth.c for the checks): which one, how many bytes, and the
//! status that refuses a malformed one. Pure: an [`Sqe`] and the in-capsule data length in, a
//! typed command or a refusal out.
//!
//! Layout (the fabrics SQE): byte 4 FCTYPE (0x05 Send, 0x06 Receive); CDW10 byte 1 SPSP0,
//! byte 2 SPSP1, byte 3 SECP; CDW11 the transfer length (Send, TL) or allocation length
//! (Receive, AL).
//!
//! Invariants:
//! - only SECP 0xE9 (NVMe in-band authentication) with SPSP0 = SPSP1 = 0x01 (DH-HMAC-CHAP) is
//!   accepted, and a zero length never is (as in nvmet);
//! - the data pointer's length equals TL / AL (`nvmet_check_transfer_len`);
//! - a Send's payload is in the capsule, all of it, and at most [`SEND_LEN_MAX`] bytes: the
//!   largest DH-HMAC-CHAP message (a Reply with two SHA-512 values and an ffdhe8192 public
//!   value) is 1,168 bytes.

use crate::nvme::{self, status, Sqe, Status};

/// FCTYPE of Authentication Send and Authentication Receive.
pub const FCTYPE_AUTH_SEND: u8 = 0x05;
pub const FCTYPE_AUTH_RECEIVE: u8 = 0x06;
/// Security protocol: NVMe in-band authentication (`NVME_AUTH_DHCHAP_PROTOCOL_IDENTIFIER`).
pub const SECP_NVME_AUTH: u8 = 0xe9;
/// SP specific 0 and 1 for DH-HMAC-CHAP.
pub const SPSP_DHCHAP: u8 = 0x01;
/// The largest Send payload accepted (a bound, with room over the largest real message).
pub const SEND_LEN_MAX: u32 = 4096;
/// `NVME_SC_AUTH_REQUIRED`: command specific (SCT 1), 0x91. What every command but the
/// handshake's own gets on a queue that has not authenticated yet.
pub const AUTH_REQUIRED: Status = 0x191;
/// `NVME_CONNECT_AUTHREQ_ATR`: Connect response DW0 bit 17, authentication required.
pub const CONNECT_AUTHREQ_ATR: u32 = 1 << 17;

/// A well-formed authentication command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthCommand {
    /// Authentication Send: the payload is the capsule's `len_bytes` bytes of data.
    Send { len_bytes: u32 },
    /// Authentication Receive: at most `allocation_len` bytes back.
    Receive { allocation_len: u32 },
}

/// Why an authentication command is refused: the status, and (as nvmet's `error_loc`) the
/// SQE byte offset of the field at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("authentication command refused: status {status:#x} (SQE byte {field})")]
pub struct Refused {
    pub status: Status,
    pub field: u32,
}

const FIELD_SPSP0: u32 = 41;
const FIELD_SPSP1: u32 = 42;
const FIELD_SECP: u32 = 43;
const FIELD_TL: u32 = 44;
const FIELD_DPTR: u32 = 24;

fn refuse(status: Status, field: u32) -> Refused {
    Refused { status, field }
}

/// Checks an Authentication Send or Receive SQE; `in_capsule_len` is the capsule's data.
pub fn parse(sqe: &Sqe, in_capsule_len: usize) -> Result<AuthCommand, Refused> {
    let spsp0 = (sqe.cdw10 >> 8) as u8;
    let spsp1 = (sqe.cdw10 >> 16) as u8;
    let secp = (sqe.cdw10 >> 24) as u8;
    let len = sqe.cdw11;
    if secp != SECP_NVME_AUTH {
        return Err(refuse(status::INVALID_FIELD, FIELD_SECP));
    }
    if spsp0 != SPSP_DHCHAP {
        return Err(refuse(status::INVALID_FIELD, FIELD_SPSP0));
    }
    if spsp1 != SPSP_DHCHAP {
        return Err(refuse(status::INVALID_FIELD, FIELD_SPSP1));
    }
    if len == 0 {
        return Err(refuse(status::INVALID_FIELD, FIELD_TL));
    }
    if sqe.sgl_len != len {
        return Err(refuse(status::SGL_DATA_LENGTH_INVALID, FIELD_DPTR));
    }
    match sqe.fctype {
        FCTYPE_AUTH_SEND => {
            if len > SEND_LEN_MAX {
                return Err(refuse(status::INVALID_FIELD, FIELD_TL));
            }
            // Data through R2T is not taken for these small messages: the host's in-capsule
            // size (IOCCSZ, 8 KiB on the admin queue) always holds them.
            if sqe.sgl_type != nvme::SGL_DATA_BLOCK_OFFSET {
                return Err(refuse(status::SGL_TYPE_INVALID, FIELD_DPTR));
            }
            if in_capsule_len != len as usize || sqe.sgl_addr != 0 {
                return Err(refuse(status::SGL_DATA_LENGTH_INVALID, FIELD_DPTR));
            }
            Ok(AuthCommand::Send { len_bytes: len })
        }
        FCTYPE_AUTH_RECEIVE => {
            if sqe.sgl_type != nvme::SGL_TRANSPORT_DATA_BLOCK {
                return Err(refuse(status::SGL_TYPE_INVALID, FIELD_DPTR));
            }
            Ok(AuthCommand::Receive { allocation_len: len })
        }
        _ => Err(refuse(status::INVALID_OPCODE, 4)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvme::{SqeBuilder, FABRICS_OPCODE};

    /// The SQE bytes the kernel host builds (`nvme_auth_submit`): opcode 0x7f, fctype,
    /// secp/spsp in CDW10, tl/al in CDW11, a keyed SGL data block of tl/al bytes.
    fn kernel_sqe(fctype: u8, len: u32, sgl_type: u8) -> Sqe {
        let mut raw = [0u8; nvme::SQE_LEN];
        raw[0] = FABRICS_OPCODE;
        raw[2..4].copy_from_slice(&7u16.to_le_bytes());
        raw[4] = fctype;
        raw[32..36].copy_from_slice(&len.to_le_bytes());
        raw[39] = sgl_type;
        raw[41] = 0x01; // spsp0
        raw[42] = 0x01; // spsp1
        raw[43] = 0xe9; // secp
        raw[44..48].copy_from_slice(&len.to_le_bytes());
        Sqe::decode(&raw)
    }

    #[test]
    fn the_kernel_hosts_commands_parse() {
        let send = kernel_sqe(FCTYPE_AUTH_SEND, 40, nvme::SGL_DATA_BLOCK_OFFSET);
        assert_eq!(send.cid, 7);
        assert_eq!(parse(&send, 40), Ok(AuthCommand::Send { len_bytes: 40 }));
        let receive = kernel_sqe(FCTYPE_AUTH_RECEIVE, 4096, nvme::SGL_TRANSPORT_DATA_BLOCK);
        assert_eq!(parse(&receive, 0), Ok(AuthCommand::Receive { allocation_len: 4096 }));
        // The builder the initiator uses puts the fields in the same places.
        let built = SqeBuilder {
            opcode: FABRICS_OPCODE,
            fctype: FCTYPE_AUTH_RECEIVE,
            sgl_len: 4096,
            sgl_type: nvme::SGL_TRANSPORT_DATA_BLOCK,
            cdw: [0xe9_01_01_00, 4096, 0, 0, 0, 0],
            ..Default::default()
        };
        let sqe = Sqe::decode(&built.encode());
        assert_eq!(parse(&sqe, 0), Ok(AuthCommand::Receive { allocation_len: 4096 }));
    }

    #[test]
    fn malformed_commands_are_refused_naming_the_field() {
        let ok = kernel_sqe(FCTYPE_AUTH_SEND, 40, nvme::SGL_DATA_BLOCK_OFFSET);
        let cases: [(u32, u32, u32); 4] = [
            (0xea_01_01_00, 40, FIELD_SECP),
            (0xe9_01_02_00, 40, FIELD_SPSP0),
            (0xe9_01_00_00, 40, FIELD_SPSP0),
            (0xe9_00_01_00, 40, FIELD_SPSP1),
        ];
        for (cdw10, tl, field) in cases {
            let sqe = Sqe { cdw10, cdw11: tl, ..ok };
            assert_eq!(parse(&sqe, 40), Err(refuse(status::INVALID_FIELD, field)), "{cdw10:#x}");
        }
        let zero = Sqe { cdw11: 0, sgl_len: 0, ..ok };
        assert_eq!(parse(&zero, 0), Err(refuse(status::INVALID_FIELD, FIELD_TL)));
        let mismatch = Sqe { sgl_len: 41, ..ok };
        assert_eq!(parse(&mismatch, 40).unwrap_err().status, status::SGL_DATA_LENGTH_INVALID);
        assert_eq!(parse(&ok, 39).unwrap_err().status, status::SGL_DATA_LENGTH_INVALID);
        let r2t = Sqe { sgl_type: nvme::SGL_TRANSPORT_DATA_BLOCK, ..ok };
        assert_eq!(parse(&r2t, 0).unwrap_err().status, status::SGL_TYPE_INVALID);
        let huge = Sqe { cdw11: SEND_LEN_MAX + 1, sgl_len: SEND_LEN_MAX + 1, ..ok };
        assert_eq!(parse(&huge, 0), Err(refuse(status::INVALID_FIELD, FIELD_TL)));
        let other = Sqe { fctype: 0x04, ..ok };
        assert_eq!(parse(&other, 40).unwrap_err().status, status::INVALID_OPCODE);
    }
}
