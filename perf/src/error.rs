//! The initiator's error type: everything that can go wrong talking to a target, from socket
//! failures to protocol violations by the target and NVMe error statuses. Nothing the target
//! sends may panic the initiator; it becomes one of these instead.

use std::io;

/// Errors of the NVMe/TCP initiator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket error other than a timeout or an orderly close.
    #[error("socket error: {0}")]
    Io(io::Error),
    /// No PDU (or not all of one) arrived within the queue's timeout.
    #[error("timed out waiting for the target")]
    Timeout,
    /// The target closed the connection.
    #[error("connection closed by the target")]
    Closed,
    /// The TLS handshake failed (a wrong key, a target without TLS, ...): OpenSSL's reason,
    /// which names no key.
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// The target ended the connection with a C2HTermReq.
    #[error("target terminated the connection (C2HTermReq): FES {fes:#04x}, FEI {fei:#x}")]
    Terminated { fes: u16, fei: u32 },
    /// The target broke the NVMe/TCP protocol (bad header, unknown command id, ...).
    #[error("protocol violation by the target: {0}")]
    Protocol(String),
    /// A header digest did not match.
    #[error("header digest mismatch on a PDU of type {kind:#04x}")]
    HeaderDigest { kind: u8 },
    /// A data digest did not match.
    #[error("data digest mismatch on C2HData for command {cid}")]
    DataDigest { cid: u16 },
    /// An NVMe command completed with an error status ((SCT << 8) | SC).
    #[error("command failed with NVMe status {status:#05x} (dw0 {dw0:#x})")]
    Status { status: u16, dw0: u32 },
    /// Every command slot of the queue is in use.
    #[error("queue full: {0} commands already in flight")]
    QueueFull(usize),
    /// The target asked for something this initiator does not implement.
    #[error("unsupported by this initiator: {0}")]
    Unsupported(String),
    /// The caller asked for something impossible (bad length, unknown command id, ...).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// An earlier error left the connection in an unknown state.
    #[error("queue unusable after an earlier error")]
    Broken,
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::Timeout,
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Error::Closed,
            _ => Error::Io(e),
        }
    }
}

impl Error {
    /// The connection is gone (closed, reset or terminated by the target).
    pub fn is_disconnect(&self) -> bool {
        matches!(self, Error::Closed | Error::Terminated { .. })
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
