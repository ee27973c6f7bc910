//! The sending half of a connection: bytes and buffers queued between sends, one `sendmsg`
//! in flight at a time, short sends finished in order. Shared by every protocol.
//!
//! Invariants:
//! - at most one send is in flight; what is queued while it flies leaves together in the next
//!   one (reply coalescing);
//! - bytes leave in the order they were queued: after a short send the unsent rest goes first;
//! - `unsent` counts every byte queued and not yet acknowledged by a completed send, so a
//!   protocol can stop reading from a peer that does not read (back-pressure);
//! - after a failed send the queue is broken: everything queued is dropped, nothing is sent.

use std::os::fd::RawFd;

use ballast_ffi::region::Lent;
use ballast_ffi::{IoBuf, Op, Owned, SendBatch};

use crate::reactor::Cx;

#[derive(Default)]
pub struct SendQueue {
    /// Queued, not yet handed to the kernel.
    out: SendBatch,
    /// An empty batch to swap in when a send starts.
    spare: Option<SendBatch>,
    inflight: bool,
    unsent: u64,
    broken: bool,
}

impl SendQueue {
    pub fn push_bytes(&mut self, bytes: &[u8]) {
        if self.broken {
            return;
        }
        self.unsent += bytes.len() as u64;
        self.out.push_bytes(bytes);
    }

    pub fn push_buf(&mut self, cx: &mut Cx<'_>, buf: IoBuf) {
        if self.broken {
            cx.recycle(buf);
            return;
        }
        self.unsent += buf.len() as u64;
        self.out.push_buf(buf);
    }

    /// Queues a lent range ([`crate::blockdev::BlockDev::lend`]). Only for a queue whose
    /// bytes go straight to the socket: [`SendQueue::drain`] cannot read one.
    pub fn push_lent(&mut self, lent: Lent) {
        if self.broken {
            return;
        }
        self.unsent += lent.len() as u64;
        self.out.push_lent(lent);
    }

    /// Whether bytes are queued that no send carries yet.
    pub fn queued(&self) -> bool {
        !self.out.is_empty()
    }

    /// Hands every queued byte (not the send in flight) to `f`, in order, and forgets it: for
    /// a layer that transforms what leaves (TLS encrypts it into a queue of its own).
    pub fn drain(&mut self, cx: &mut Cx<'_>, f: impl FnMut(&[u8])) {
        self.out.for_each_segment(f);
        self.unsent -= self.out.remaining() as u64;
        self.out.clear(|b| cx.recycle(b));
    }

    /// Bytes queued or in flight.
    pub fn unsent(&self) -> u64 {
        self.unsent
    }

    /// Whether a send is in flight (the connection must wait for it before finishing).
    pub fn inflight(&self) -> bool {
        self.inflight
    }

    pub fn broken(&self) -> bool {
        self.broken
    }

    /// Nothing left to send (or nothing that ever will be: the socket failed).
    pub fn drained(&self) -> bool {
        self.broken || (self.out.is_empty() && !self.inflight)
    }

    /// Starts a send of everything queued, unless one is in flight.
    pub fn start(&mut self, cx: &mut Cx<'_>, fd: RawFd, tag: u32) {
        if self.inflight || self.broken || self.out.is_empty() {
            return;
        }
        let next = self.spare.take().unwrap_or_default();
        let batch = std::mem::replace(&mut self.out, next);
        self.inflight = true;
        cx.submit(Op::Send { fd, batch }, tag);
    }

    /// Handles the send's completion; returns the errno if the socket failed.
    pub fn on_complete(&mut self, cx: &mut Cx<'_>, result: i32, owned: Owned) -> Result<(), i32> {
        assert!(self.inflight, "send completion with no send in flight");
        self.inflight = false;
        let Owned::Batch(mut batch) = owned else { panic!("send completion without its batch") };
        if result < 0 {
            self.broken = true;
            self.unsent = 0;
            self.out.clear(|b| cx.recycle(b));
            batch.clear(|b| cx.recycle(b));
            self.spare = Some(batch);
            return Err(-result);
        }
        assert!(result as u64 <= self.unsent, "sent more than was queued");
        self.unsent -= result as u64;
        batch.advance(result as usize);
        if batch.is_empty() {
            batch.clear(|b| cx.recycle(b));
            self.spare = Some(batch);
        } else {
            // A short send: the rest goes before anything queued since.
            let mut later = std::mem::replace(&mut self.out, batch);
            self.out.append(&mut later);
            later.clear(|_| {});
            self.spare = Some(later);
        }
        Ok(())
    }
}
