//! The receiving half of a connection: one receive buffer that costs nothing while the peer is
//! silent, grows with need and shrinks back, its growth charged to the core's budget.
//!
//! Life of the buffer:
//! - **Silent**: no buffer; a readiness poll is in flight. A connection that never says a word
//!   (or has not yet: NBD clients before their flags, NVMe hosts before ICReq) holds no memory
//!   for input.
//! - **Receiving**: a buffer of `RECV_MIN` bytes (not charged: every connection may have one)
//!   up to `max` bytes; growth beyond `RECV_MIN` is charged to the core's budget first, and
//!   refused growth waits (the task is woken by `Task::on_buffers`) only when the parser
//!   cannot go on without it.
//! - Grows (doubling) when a receive filled all the room it was given (more is likely
//!   waiting) or the parser needs a longer contiguous unit than fits; halves (down to
//!   `RECV_MIN`) when it is empty and the last `SHRINK_AFTER` receives each used under a
//!   quarter of it. So it settles where receives fill between a quarter and all of it: no
//!   copy-and-grow churn under a steady stream, no oversized buffer once the stream thins.
//!
//! Invariants: at most one receive or poll in flight; `charged == capacity - RECV_MIN` of the
//! buffer this owns (0 without one); buffered bytes are never lost by a resize.

use std::os::fd::RawFd;

use ballast_ffi::{IoBuf, Op};

use crate::reactor::Cx;

/// Every receiving connection's buffer to begin with (a 4 KiB write with its NBD header, an
/// NVMe capsule with 8 KiB of in-capsule data fit).
pub const RECV_MIN: usize = 16 * 1024;
/// Receives in a row using under a quarter of the buffer before it halves.
const SHRINK_AFTER: u32 = 16;

/// What `post` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Posted {
    /// A receive or poll is in flight (now or already).
    Yes,
    /// Nothing to do: input is closed, or the buffer is full and the parser has not asked
    /// for more room.
    No,
    /// The buffer must grow before more can be received, and the budget refused: the task
    /// will be woken when memory is released.
    WaitingForMemory,
}

pub struct RecvBuf {
    buf: Option<IoBuf>,
    max: usize,
    /// The peer has spoken (or was polled readable): keep a buffer from now on.
    awake: bool,
    recv_inflight: bool,
    poll_inflight: bool,
    charged: u64,
    /// Contiguous bytes the parser needs to make progress (0: whatever arrives).
    need: usize,
    grow_hint: bool,
    small_streak: u32,
}

impl RecvBuf {
    /// A silent connection's receive side; the buffer may grow to `max` bytes.
    pub fn new(max: usize) -> RecvBuf {
        assert!(max >= RECV_MIN);
        RecvBuf {
            buf: None,
            max,
            awake: false,
            recv_inflight: false,
            poll_inflight: false,
            charged: 0,
            need: 0,
            grow_hint: false,
            small_streak: 0,
        }
    }

    /// Bytes received and not yet consumed (empty while a receive is in flight).
    pub fn buffered(&self) -> usize {
        self.buf.as_ref().map_or(0, IoBuf::len)
    }

    /// Lends the buffer (holding the bytes not yet consumed) to the parser, which consumes
    /// from its front and hands it back with [`RecvBuf::put_back`]. `None` while a receive is
    /// in flight or the connection is silent.
    pub fn take(&mut self) -> Option<IoBuf> {
        self.buf.take()
    }

    /// Returns the buffer lent by [`RecvBuf::take`].
    pub fn put_back(&mut self, buf: IoBuf) {
        assert!(self.buf.is_none() && !self.recv_inflight, "two receive buffers");
        self.buf = Some(buf);
    }

    /// The parser cannot go on until `n` contiguous bytes are buffered.
    pub fn need(&mut self, n: usize) {
        self.need = n.min(self.max);
    }

    /// Memory this buffer holds beyond `RECV_MIN`, charged to the budget.
    pub fn charged(&self) -> u64 {
        self.charged
    }

    pub fn inflight(&self) -> bool {
        self.recv_inflight || self.poll_inflight
    }

    /// Starts a receive (or, while silent, a readiness poll), growing or shrinking the buffer
    /// first. `held` is what the connection holds besides this buffer.
    pub fn post(
        &mut self,
        cx: &mut Cx<'_>,
        fd: RawFd,
        recv_tag: u32,
        poll_tag: u32,
        held: u64,
    ) -> Posted {
        if self.inflight() {
            return Posted::Yes;
        }
        if !self.awake {
            self.poll_inflight = true;
            cx.submit(Op::PollIn { fd }, poll_tag);
            return Posted::Yes;
        }
        let buf = match self.sized(cx, held) {
            Ok(buf) => buf,
            Err(posted) => return posted,
        };
        self.recv_inflight = true;
        cx.submit(Op::Recv { fd, buf, max: usize::MAX }, recv_tag);
        Posted::Yes
    }

    /// Like a receive that completes at once: `source` writes input into the room the buffer
    /// has (grown or shrunk first, as for a receive) and returns how many bytes it wrote. For
    /// input that arrives some other way than a socket receive (decrypted TLS records).
    /// Returns `Yes` after `source` ran (whatever it wrote), otherwise why it did not.
    pub fn fill(
        &mut self,
        cx: &mut Cx<'_>,
        held: u64,
        source: impl FnOnce(&mut [u8]) -> usize,
    ) -> Posted {
        assert!(!self.inflight(), "fill with a receive in flight");
        self.awake = true;
        let mut buf = match self.sized(cx, held) {
            Ok(buf) => buf,
            Err(posted) => return posted,
        };
        let n = source(buf.spare_mut());
        assert!(n <= buf.capacity() - buf.len(), "source wrote past the room");
        buf.set_len(buf.len() + n);
        self.recv_inflight = true;
        self.on_recv(n as i32, buf);
        Posted::Yes
    }

    /// The buffer, grown or shrunk for the next input; `Err` when there is no room for any.
    fn sized(&mut self, cx: &mut Cx<'_>, held: u64) -> Result<IoBuf, Posted> {
        let mut buf = match self.buf.take() {
            Some(b) => b,
            None => cx.buf_with_capacity(RECV_MIN),
        };
        let cap = buf.capacity();
        if buf.is_empty() && cap > RECV_MIN && self.small_streak >= SHRINK_AFTER {
            let smaller = (cap / 2).max(RECV_MIN);
            cx.recycle(buf);
            buf = cx.buf_with_capacity(smaller);
            let keep = (smaller - RECV_MIN) as u64;
            cx.release(self.charged - keep);
            self.charged = keep;
            self.small_streak = 0;
        }
        let full = buf.len() == buf.capacity();
        let want = if self.need > buf.capacity() {
            self.need.next_power_of_two()
        } else if full || self.grow_hint {
            buf.capacity() * 2
        } else {
            0
        }
        .min(self.max);
        if want > buf.capacity() {
            let extra = (want - RECV_MIN) as u64 - self.charged;
            if cx.charge(extra, held + self.charged) {
                self.charged += extra;
                let mut bigger = cx.buf_with_capacity(want);
                bigger.extend_from_slice(buf.as_slice());
                cx.recycle(buf);
                buf = bigger;
            } else if full || self.need > buf.capacity() {
                self.buf = Some(buf);
                return Err(Posted::WaitingForMemory);
            }
        }
        self.grow_hint = false;
        if buf.len() == buf.capacity() {
            // Full of input the parser cannot consume yet (back-pressure): wait.
            self.buf = Some(buf);
            return Err(Posted::No);
        }
        Ok(buf)
    }

    /// The readiness poll completed (readable, hung up, or failed): receive from now on.
    pub fn on_poll(&mut self) {
        assert!(self.poll_inflight, "poll completion without a poll in flight");
        self.poll_inflight = false;
        self.awake = true;
    }

    /// The receive completed with `result`; the buffer comes back holding what arrived.
    pub fn on_recv(&mut self, result: i32, buf: IoBuf) {
        assert!(self.recv_inflight, "receive completion without a receive in flight");
        self.recv_inflight = false;
        if result > 0 {
            let got = result as usize;
            let room = buf.capacity() - (buf.len() - got);
            self.grow_hint = got == room;
            if got < buf.capacity() / 4 {
                self.small_streak = self.small_streak.saturating_add(1);
            } else {
                self.small_streak = 0;
            }
            if buf.len() >= self.need {
                self.need = 0;
            }
        }
        self.buf = Some(buf);
    }

    /// For a connection moving to another core: gives the buffer and its charge back and
    /// returns the bytes received and not yet consumed, leaving a silent receive side; `None`
    /// (nothing changed) when more is buffered than a new core's first buffer holds.
    pub fn detach(&mut self, cx: &mut Cx<'_>) -> Option<Vec<u8>> {
        if self.buffered() > RECV_MIN {
            return None;
        }
        let bytes = self.buf.as_ref().map_or(Vec::new(), |b| b.as_slice().to_vec());
        self.release(cx);
        *self = RecvBuf::new(self.max);
        Some(bytes)
    }

    /// On the core a connection moved to: the bytes [`RecvBuf::detach`] returned become its
    /// buffered input, ahead of anything it receives here.
    pub fn attach(&mut self, cx: &mut Cx<'_>, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let n = bytes.len();
        let posted = self.fill(cx, 0, |room| {
            room[..n].copy_from_slice(bytes);
            n
        });
        assert_eq!(posted, Posted::Yes, "a moved connection's input fits its first buffer");
    }

    /// Gives the buffer and its charge back (the connection is finished).
    pub fn release(&mut self, cx: &mut Cx<'_>) {
        assert!(!self.inflight(), "release with a receive in flight");
        if let Some(buf) = self.buf.take() {
            cx.recycle(buf);
        }
        cx.release(self.charged);
        self.charged = 0;
    }
}
