//! The controller's DH-HMAC-CHAP state machine for one queue (NVMe base spec 2.0 section
//! 8.13.5; the kernel target's drivers/nvme/target/fabrics-cmd-auth.c is the model for what
//! answers what). The nvmf queue drives it from Fabrics Authentication Send (a payload in,
//! [`Event::Send`]) and Authentication Receive (a payload out, [`Event::Receive`]); it holds
//! no socket and reads no clock, and its random values come from an injected [`Entropy`].
//!
//! ```text
//! WaitNegotiate --Send(Negotiate)--> ChallengePending --Receive--> WaitReply
//! WaitReply --Send(Reply, R1 ok)--> Success1Pending --Receive--> Done        (unidirectional)
//!                                                             \-> WaitSuccess2 --Send(Success2)--> Done
//! any protocol error --> FailurePending --Receive (Failure1)--> Failed
//! Send(Failure2) --> Failed;   Send(Negotiate) in any state starts a new transaction
//! ```
//!
//! Invariants:
//! - [`QueueAuth::is_authenticated`] is true only in `Done`, reached only after the host's R1
//!   matched (compared in constant time) and, for bidirectional authentication, after the
//!   host acknowledged R2 with Success2;
//! - every message after the Negotiate must carry the Negotiate's T_ID;
//! - a protocol error never panics and never completes the command with an error status: as
//!   in nvmet, the Send succeeds and the next Receive returns a Failure1 naming the reason;
//! - the transformed secrets are computed once per [`AuthConfig`] and never leave it;
//! - each transaction uses the keys configured when its Negotiate arrived
//!   ([`QueueAuth::rekey`]: a host re-authenticating after a key rotation proves the new key,
//!   and a revoked key no longer authenticates), as nvmet reloads them at every Negotiate.

use std::sync::Arc;

use super::chap::{self, Digest, Transaction};
use super::codec::{Message, SecureChannel, AUTHID_DHCHAP};
use super::dh::{DhError, DhGroup, DhKeyPair};
use super::secret::DhchapSecret;
use super::{Entropy, FailureReason, HashId};
use crate::secret::SecretBytes;

/// What authenticating one host to one subsystem needs; shared by all its queues.
#[derive(Debug)]
pub struct AuthConfig {
    hostnqn: String,
    subnqn: String,
    /// Kh' = transform(host secret, hostnqn).
    host_key: SecretBytes,
    /// Kc' = transform(controller secret, subnqn), for bidirectional authentication.
    ctrl_key: Option<SecretBytes>,
    hashes: Vec<HashId>,
    dh_groups: Vec<DhGroup>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("no hash function allowed")]
    NoHash,
    #[error("no DH group allowed")]
    NoDhGroup,
}

/// DH groups by default, in order: ffdhe3072 first (128-bit strength; the controller's modular
/// exponentiations take a few milliseconds (on an offload thread), and a slow host must finish
/// its own within the handshake deadline: ffdhe8192 took an emulated guest over 10 s), then
/// the smaller and the larger groups, and no DH (null) last. `with_preferences` changes it.
pub const DEFAULT_DH_GROUPS: [DhGroup; 6] = [
    DhGroup::Ffdhe3072,
    DhGroup::Ffdhe2048,
    DhGroup::Ffdhe4096,
    DhGroup::Ffdhe6144,
    DhGroup::Ffdhe8192,
    DhGroup::Null,
];

impl AuthConfig {
    /// Allows every hash, strongest first (SHA-512 before the rest), and every DH group in
    /// `DEFAULT_DH_GROUPS`' order: the first of these preferences that the host offers is
    /// chosen.
    pub fn new(
        hostnqn: &str,
        subnqn: &str,
        host: &DhchapSecret,
        ctrl: Option<&DhchapSecret>,
    ) -> Self {
        let mut hashes = HashId::ALL.to_vec();
        hashes.reverse();
        let dh_groups = DEFAULT_DH_GROUPS.to_vec();
        AuthConfig {
            hostnqn: hostnqn.to_string(),
            subnqn: subnqn.to_string(),
            host_key: host.transformed(hostnqn),
            ctrl_key: ctrl.map(|secret| secret.transformed(subnqn)),
            hashes,
            dh_groups,
        }
    }

    /// Restricts and orders the hashes and DH groups the controller picks from.
    pub fn with_preferences(
        mut self,
        hashes: &[HashId],
        dh_groups: &[DhGroup],
    ) -> Result<Self, ConfigError> {
        if hashes.is_empty() {
            return Err(ConfigError::NoHash);
        }
        if dh_groups.is_empty() {
            return Err(ConfigError::NoDhGroup);
        }
        self.hashes = hashes.to_vec();
        self.dh_groups = dh_groups.to_vec();
        Ok(self)
    }

    pub fn bidirectional(&self) -> bool {
        self.ctrl_key.is_some()
    }
}

/// Input: the payload of an AUTH_Send, or an AUTH_Receive's allocation length.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    Send(&'a [u8]),
    Receive { allocation_len: usize },
}

/// Output of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The AUTH_Send completes successfully (protocol errors included: see the invariants).
    Accepted,
    /// The AUTH_Receive returns these bytes.
    Data(Vec<u8>),
    /// The AUTH_Receive's allocation length cannot hold the pending message; nothing changed.
    /// The glue completes the command with Invalid Field.
    AllocationTooSmall { needed: usize },
}

/// The transaction in progress between Negotiate and Reply.
struct Exchange {
    tid: u16,
    sc_c: SecureChannel,
    hash: HashId,
    group: DhGroup,
    c1: Vec<u8>,
    s1: u32,
    dh: Option<DhKeyPair>,
}

/// A public value for a debug line: its length, first 32 and last 8 bytes in hex.
fn public_hex(bytes: &[u8]) -> String {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    if bytes.len() <= 40 {
        return format!("{}:{}", bytes.len(), hex(bytes));
    }
    format!("{}:{}..{}", bytes.len(), hex(&bytes[..32]), hex(&bytes[bytes.len() - 8..]))
}

/// The per-queue states.
enum State {
    /// No transaction: only a Negotiate is accepted.
    WaitNegotiate,
    /// Negotiate accepted; the Challenge waits for the host's AUTH_Receive.
    ChallengePending(Box<Exchange>),
    /// Challenge delivered; waiting for the host's Reply.
    WaitReply(Box<Exchange>),
    /// R1 matched; the Success1 (with R2 when the host asked for it) waits for AUTH_Receive.
    Success1Pending { tid: u16, hash: HashId, group: DhGroup, r2: Option<Digest> },
    /// Success1 with R2 delivered; waiting for the host's Success2 (or Failure2).
    WaitSuccess2 { tid: u16, hash: HashId, group: DhGroup },
    /// Authenticated with this hash and group.
    Done { tid: u16, hash: HashId, group: DhGroup },
    /// A failure waits for AUTH_Receive to carry it as Failure1.
    FailurePending { tid: u16, reason: FailureReason },
    /// Failed, until the host starts over with a Negotiate.
    Failed { tid: u16, reason: FailureReason },
}

/// One queue's authentication.
pub struct QueueAuth {
    config: Arc<AuthConfig>,
    /// The keys configured now (`Some(None)`: none any more), taken at the next Negotiate.
    rekeyed: Option<Option<Arc<AuthConfig>>>,
    entropy: Box<dyn Entropy + Send>,
    state: State,
}

impl std::fmt::Debug for QueueAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueAuth").field("state", &self.state_name()).finish_non_exhaustive()
    }
}

impl QueueAuth {
    pub fn new(config: Arc<AuthConfig>, entropy: Box<dyn Entropy + Send>) -> Self {
        QueueAuth { config, rekeyed: None, entropy, state: State::WaitNegotiate }
    }

    /// The keys configured for this host and subsystem now (`None`: it has none any more):
    /// the next transaction (Negotiate) uses them; one under way keeps its own.
    pub fn rekey(&mut self, config: Option<Arc<AuthConfig>>) {
        self.rekeyed = Some(config);
    }

    /// True once the host proved its secret (and, bidirectionally, acknowledged ours).
    pub fn is_authenticated(&self) -> bool {
        matches!(self.state, State::Done { .. })
    }

    /// The hash and DH group of the finished authentication.
    pub fn negotiated(&self) -> Option<(HashId, DhGroup)> {
        match self.state {
            State::Done { hash, group, .. } => Some((hash, group)),
            _ => None,
        }
    }

    /// The transaction failed and the host was told (Failure1 delivered, or its Failure2).
    pub fn is_failed(&self) -> bool {
        matches!(self.state, State::Failed { .. })
    }

    /// Why the last transaction failed, once it has.
    pub fn failure(&self) -> Option<FailureReason> {
        match self.state {
            State::FailurePending { reason, .. } | State::Failed { reason, .. } => Some(reason),
            _ => None,
        }
    }

    pub fn state_name(&self) -> &'static str {
        match self.state {
            State::WaitNegotiate => "WaitNegotiate",
            State::ChallengePending(_) => "ChallengePending",
            State::WaitReply(_) => "WaitReply",
            State::Success1Pending { .. } => "Success1Pending",
            State::WaitSuccess2 { .. } => "WaitSuccess2",
            State::Done { .. } => "Done",
            State::FailurePending { .. } => "FailurePending",
            State::Failed { .. } => "Failed",
        }
    }

    /// The one entry point.
    pub fn on_event(&mut self, event: Event<'_>) -> Action {
        match event {
            Event::Send(payload) => {
                self.on_send(payload);
                Action::Accepted
            }
            Event::Receive { allocation_len } => self.on_receive(allocation_len),
        }
    }

    fn current_tid(&self) -> u16 {
        match &self.state {
            State::WaitNegotiate => 0,
            State::ChallengePending(ex) | State::WaitReply(ex) => ex.tid,
            State::Success1Pending { tid, .. }
            | State::WaitSuccess2 { tid, .. }
            | State::Done { tid, .. }
            | State::FailurePending { tid, .. }
            | State::Failed { tid, .. } => *tid,
        }
    }

    fn fail(&mut self, tid: u16, reason: FailureReason) {
        self.state = State::FailurePending { tid, reason };
    }

    fn on_send(&mut self, payload: &[u8]) {
        let tid = self.current_tid();
        let message = match Message::decode(payload) {
            Ok(message) => message,
            Err(_) => return self.fail(tid, FailureReason::IncorrectPayload),
        };
        if let Message::Negotiate { tid, sc_c, descriptors } = &message {
            let config = match self.rekeyed.take() {
                Some(Some(config)) => Some(config),
                Some(None) => None,
                None => Some(self.config.clone()),
            };
            let Some(config) = config else {
                // Its keys were removed: nothing to authenticate with.
                self.state = State::FailurePending { tid: *tid, reason: FailureReason::Failed };
                return;
            };
            self.config = config;
            self.state = match self.negotiate(*tid, *sc_c, descriptors) {
                Ok(exchange) => State::ChallengePending(Box::new(exchange)),
                Err(reason) => State::FailurePending { tid: *tid, reason },
            };
            return;
        }
        if let Message::Failure2 { reason, .. } = message {
            self.state = State::Failed { tid, reason };
            return;
        }
        if matches!(self.state, State::WaitNegotiate) {
            return self.fail(tid, FailureReason::IncorrectMessage);
        }
        if matches!(self.state, State::Failed { .. }) {
            return; // Only a Negotiate leaves Failed.
        }
        if message.tid() != tid {
            return self.fail(tid, FailureReason::IncorrectPayload);
        }
        let state = std::mem::replace(&mut self.state, State::WaitNegotiate);
        self.state = match (state, message) {
            (State::WaitReply(exchange), Message::Reply { seqnum, r1, c2, dh_value, .. }) => {
                match self.verify_reply(&exchange, seqnum, r1, c2, dh_value) {
                    Ok(r2) => State::Success1Pending {
                        tid,
                        hash: exchange.hash,
                        group: exchange.group,
                        r2,
                    },
                    Err(reason) => {
                        // Public values only — each crossed the wire in clear — so that a
                        // refused response can be compared with the host's own debug output.
                        let ctrl_dh = exchange.dh.as_ref().map(DhKeyPair::public_value);
                        tracing::debug!(
                            tid,
                            s1 = exchange.s1,
                            c1 = %public_hex(&exchange.c1),
                            ctrl_dh = %public_hex(ctrl_dh.as_deref().unwrap_or_default()),
                            host_dh = %public_hex(dh_value),
                            r1 = %public_hex(r1),
                            ?reason,
                            "DH-HMAC-CHAP: reply refused; the exchange's public values"
                        );
                        State::FailurePending { tid, reason }
                    }
                }
            }
            (State::WaitSuccess2 { hash, group, .. }, Message::Success2 { .. }) => {
                State::Done { tid, hash, group }
            }
            // A host that sends Success2 after unidirectional authentication: harmless.
            (done @ State::Done { .. }, Message::Success2 { .. }) => done,
            _ => State::FailurePending { tid, reason: FailureReason::IncorrectMessage },
        };
    }

    fn negotiate(
        &mut self,
        tid: u16,
        sc_c: SecureChannel,
        descriptors: &[super::codec::Descriptor],
    ) -> Result<Exchange, FailureReason> {
        if sc_c != SecureChannel::None {
            return Err(FailureReason::ConcatMismatch);
        }
        let offer = descriptors
            .iter()
            .find(|d| d.auth_id == AUTHID_DHCHAP)
            .ok_or(FailureReason::IncorrectPayload)?;
        let hash = *self
            .config
            .hashes
            .iter()
            .find(|h| offer.hash_ids().contains(&(**h as u8)))
            .ok_or(FailureReason::HashUnusable)?;
        let group = *self
            .config
            .dh_groups
            .iter()
            .find(|g| offer.dh_ids().contains(&(**g as u8)))
            .ok_or(FailureReason::DhGroupUnusable)?;
        // Draw order (the tests script it): C1, S1, then the DH private exponent.
        let mut c1 = vec![0u8; hash.len_bytes()];
        self.entropy.fill(&mut c1);
        let mut s1 = [0u8; 4];
        self.entropy.fill(&mut s1);
        let s1 = u32::from_le_bytes(s1).max(1);
        let dh = match group {
            DhGroup::Null => None,
            group => Some(
                DhKeyPair::generate(group, &mut *self.entropy)
                    .map_err(|_| FailureReason::DhGroupUnusable)?,
            ),
        };
        Ok(Exchange { tid, sc_c, hash, group, c1, s1, dh })
    }

    /// Checks R1 and, when the host sent C2, computes R2.
    fn verify_reply(
        &self,
        exchange: &Exchange,
        s2: u32,
        r1: &[u8],
        c2: Option<&[u8]>,
        dh_value: &[u8],
    ) -> Result<Option<Digest>, FailureReason> {
        let hash = exchange.hash;
        if r1.len() != hash.len_bytes() {
            return Err(FailureReason::IncorrectPayload);
        }
        let shared = match &exchange.dh {
            None if dh_value.is_empty() => None,
            None => return Err(FailureReason::IncorrectPayload),
            Some(dh) => match dh.shared_secret(dh_value) {
                Ok(shared) => Some(shared),
                Err(DhError::PublicLength { .. }) => return Err(FailureReason::IncorrectPayload),
                Err(_) => return Err(FailureReason::DhGroupUnusable),
            },
        };
        let config = &self.config;
        let t = Transaction {
            hash,
            tid: exchange.tid,
            hostnqn: &config.hostnqn,
            subnqn: &config.subnqn,
        };
        let expected = match &shared {
            None => chap::host_response(
                &t,
                &config.host_key,
                &exchange.c1,
                exchange.s1,
                exchange.sc_c as u8,
            ),
            Some(shared) => {
                let c1 = chap::augmented_challenge(hash, shared, &exchange.c1);
                chap::host_response(
                    &t,
                    &config.host_key,
                    c1.as_ref(),
                    exchange.s1,
                    exchange.sc_c as u8,
                )
            }
        };
        if !expected.ct_eq(r1) {
            return Err(FailureReason::Failed);
        }
        let Some(c2) = c2 else { return Ok(None) };
        let ctrl_key = config.ctrl_key.as_ref().ok_or(FailureReason::Failed)?;
        // A host that echoes our own challenge would have us compute its answer (reflection).
        if openssl::memcmp::eq(c2, &exchange.c1) {
            return Err(FailureReason::Failed);
        }
        let r2 = match &shared {
            None => chap::controller_response(&t, ctrl_key, c2, s2),
            Some(shared) => {
                let c2 = chap::augmented_challenge(hash, shared, c2);
                chap::controller_response(&t, ctrl_key, c2.as_ref(), s2)
            }
        };
        Ok(Some(r2))
    }

    fn on_receive(&mut self, allocation_len: usize) -> Action {
        let mut out = Vec::new();
        let next = match &self.state {
            State::ChallengePending(exchange) => {
                let dh_value =
                    exchange.dh.as_ref().map(DhKeyPair::public_value).unwrap_or_default();
                Message::Challenge {
                    tid: exchange.tid,
                    hash_id: exchange.hash as u8,
                    dh_group_id: exchange.group as u8,
                    seqnum: exchange.s1,
                    c1: &exchange.c1,
                    dh_value: &dh_value,
                }
                .encode(&mut out);
                None
            }
            State::Success1Pending { tid, hash, group, r2 } => {
                let r2 = r2.as_ref().map(|r2| r2.as_ref());
                Message::Success1 { tid: *tid, hl: hash.len_bytes() as u8, r2 }.encode(&mut out);
                Some(match r2 {
                    Some(_) => State::WaitSuccess2 { tid: *tid, hash: *hash, group: *group },
                    None => State::Done { tid: *tid, hash: *hash, group: *group },
                })
            }
            State::FailurePending { tid, reason } | State::Failed { tid, reason } => {
                Message::Failure1 { tid: *tid, reason: *reason }.encode(&mut out);
                Some(State::Failed { tid: *tid, reason: *reason })
            }
            // Nothing to send: the host is out of step.
            State::WaitNegotiate
            | State::WaitReply(_)
            | State::WaitSuccess2 { .. }
            | State::Done { .. } => {
                let (tid, reason) = (self.current_tid(), FailureReason::IncorrectMessage);
                Message::Failure1 { tid, reason }.encode(&mut out);
                Some(State::Failed { tid, reason })
            }
        };
        if out.len() > allocation_len {
            return Action::AllocationTooSmall { needed: out.len() };
        }
        self.state = match next {
            Some(state) => state,
            None => match std::mem::replace(&mut self.state, State::WaitNegotiate) {
                State::ChallengePending(exchange) => State::WaitReply(exchange),
                other => other,
            },
        };
        Action::Data(out)
    }
}

#[cfg(test)]
mod tests;
