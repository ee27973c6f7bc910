//! NVMe in-band authentication, DH-HMAC-CHAP (NVMe base spec 2.0 section 8.13.5, TP 8006), as
//! the controller (target) side runs it. Pure and sans-I/O: the nvmf queue feeds it the
//! payloads of Fabrics Authentication Send / Receive commands and sends back what it returns.
//!
//! - [`codec`]: the AUTH_Send / AUTH_Receive payloads ⇄ typed messages (byte-exact, fuzzed);
//! - [`secret`]: `DHHC-1:xx:<base64>:` secrets and the kernel's key transform;
//! - [`dh`]: the RFC 7919 FFDHE groups (OpenSSL's constant-time modular exponentiation);
//! - [`chap`]: the HMAC computations (responses, augmented challenges);
//! - [`machine`]: the per-queue state machine;
//! - [`command`]: the AUTH_Send / AUTH_Receive SQEs as the queue checks them;
//! - [`keys`]: the configuration per (host, subsystem).
//!
//! Byte layouts, labels and the order of HMAC inputs follow the Linux kernel, the host ballast
//! must interoperate with: include/linux/nvme.h (`struct nvmf_auth_dhchap_*`),
//! drivers/nvme/common/auth.c and drivers/nvme/target/{auth.c,fabrics-cmd-auth.c}.
//!
//! Invariants (all submodules): no key material in `Debug`, `Display` or errors; anything a
//! peer sends reaches no panic, only a typed error or a DH-HMAC-CHAP_Failure1.

pub mod chap;
pub mod codec;
pub mod command;
pub mod dh;
pub mod fuzzing;
pub mod keys;
pub mod machine;
pub mod secret;

pub use dh::DhGroup;
pub use machine::{AuthConfig, QueueAuth};
pub use secret::DhchapSecret;

/// A DH-HMAC-CHAP hash function (HashID; `NVME_AUTH_HASH_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HashId {
    Sha256 = 1,
    Sha384 = 2,
    Sha512 = 3,
}

impl HashId {
    pub const ALL: [HashId; 3] = [HashId::Sha256, HashId::Sha384, HashId::Sha512];

    pub fn from_id(id: u8) -> Option<Self> {
        match id {
            1 => Some(HashId::Sha256),
            2 => Some(HashId::Sha384),
            3 => Some(HashId::Sha512),
            _ => None,
        }
    }

    /// Output length in bytes (the message's HL).
    pub fn len_bytes(self) -> usize {
        match self {
            HashId::Sha256 => 32,
            HashId::Sha384 => 48,
            HashId::Sha512 => 64,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HashId::Sha256 => "sha256",
            HashId::Sha384 => "sha384",
            HashId::Sha512 => "sha512",
        }
    }
}

/// Why authentication failed, as carried in a Failure1/Failure2 message's reason code
/// explanation (`NVME_AUTH_DHCHAP_FAILURE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    Failed = 0x01,
    NotUsable = 0x02,
    ConcatMismatch = 0x03,
    HashUnusable = 0x04,
    DhGroupUnusable = 0x05,
    IncorrectPayload = 0x06,
    IncorrectMessage = 0x07,
}

impl FailureReason {
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0x01 => FailureReason::Failed,
            0x02 => FailureReason::NotUsable,
            0x03 => FailureReason::ConcatMismatch,
            0x04 => FailureReason::HashUnusable,
            0x05 => FailureReason::DhGroupUnusable,
            0x06 => FailureReason::IncorrectPayload,
            0x07 => FailureReason::IncorrectMessage,
            _ => return None,
        })
    }
}

/// Where the controller's random values come from (C1, sequence numbers, DH private keys):
/// injected, so tests can script them and the state machine stays deterministic.
pub trait Entropy: Send {
    fn fill(&mut self, buf: &mut [u8]);
}

/// OpenSSL's CSPRNG.
#[derive(Debug, Default)]
pub struct OsEntropy;

impl Entropy for OsEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        // RAND_bytes fails only when the CSPRNG cannot be seeded: nothing can go on safely.
        openssl::rand::rand_bytes(buf).unwrap_or_else(|e| panic!("OpenSSL's RNG failed: {e}"));
    }
}
