//! What one connection holds of its core's payload-memory budget ([`crate::pool::BufPool`]),
//! and whether it waits for more: the bookkeeping both protocols' connections share.
//!
//! Invariants: `held` is exactly what this holder charged and has not released; `to_send <=
//! held` is the part that is read data queued for the socket, released as the send queue
//! drains (`sent`); a refused charge leaves the holder `waiting` until the core wakes it
//! ([`crate::Task::on_buffers`] → [`Holder::woken`]).

use crate::reactor::Cx;

#[derive(Debug, Default)]
pub struct Holder {
    held: u64,
    to_send: u64,
    waiting: bool,
}

impl Holder {
    /// Charges `bytes` for a connection that also holds `besides` (its receive buffer's
    /// growth). Refused: the holder waits (stop parsing) until woken.
    pub fn charge(&mut self, cx: &mut Cx<'_>, bytes: u64, besides: u64) -> bool {
        if bytes == 0 {
            return true;
        }
        if cx.charge(bytes, self.held + besides) {
            self.held += bytes;
            true
        } else {
            self.waiting = true;
            false
        }
    }

    pub fn release(&mut self, cx: &mut Cx<'_>, bytes: u64) {
        assert!(bytes <= self.held, "release of {bytes} with {} held", self.held);
        self.held -= bytes;
        cx.release(bytes);
    }

    /// `bytes` already held are now read data queued for the socket.
    pub fn to_send(&mut self, bytes: u64) {
        self.to_send += bytes;
        assert!(self.to_send <= self.held, "more queued to send than held");
    }

    /// The send queue still holds `unsent` bytes: what has left (or never will) returns.
    pub fn sent(&mut self, cx: &mut Cx<'_>, unsent: u64) {
        let gone = self.to_send.saturating_sub(unsent);
        if gone > 0 {
            self.to_send -= gone;
            self.release(cx, gone);
        }
    }

    /// The connection is finished: everything returns.
    pub fn release_all(&mut self, cx: &mut Cx<'_>) {
        let held = self.held;
        self.release(cx, held);
        self.to_send = 0;
    }

    pub fn held(&self) -> u64 {
        self.held
    }

    /// A charge (its own or the receive buffer's) was refused: wait to be woken.
    pub fn wait(&mut self) {
        self.waiting = true;
    }

    pub fn waiting(&self) -> bool {
        self.waiting
    }

    /// Memory was released on the core: try again.
    pub fn woken(&mut self) {
        self.waiting = false;
    }
}
