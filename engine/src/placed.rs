//! A connection as a core's task, and its move to the core its device lives on.
//!
//! Under the `owner` placement a volume's family is served by one core
//! ([`crate::BlockDev::home_core`]); a connection (an NBD client, an NVMe/TCP I/O queue) the
//! listener put elsewhere moves to that core once it knows its device, before its first
//! request, so its requests run where their family's state is instead of being forwarded
//! there one by one. The connection decides and gets ready ([`Movable`]: nothing in flight,
//! its output sent, what it held of its core given back); this task carries it.
//!
//! Invariants: a connection is on exactly one core at a time — it leaves this task (which then
//! reports done, owning nothing, so no completion can be owed to it) only inside the message
//! that builds it on the new core; if that core's mailbox refuses it, it starts again here and
//! is served here. Its socket, its place under the connection limit and its negotiated state
//! travel with it; `start` on the new core takes it in (counts it, parses what came along).
//!
//! Limit: a move accepted by a core's message queue in the instant that core finishes its
//! shutdown is dropped with the core (the socket closes): only at engine shutdown.

use crate::reactor::{Cx, Msg, Task};
use crate::Owned;

/// A connection that can move to another core.
pub trait Movable: Task + Send + 'static {
    /// The core it is ready to move to now: the move was decided, its output is sent and
    /// nothing of it is in flight.
    fn ready_to_move(&self) -> Option<usize>;
    /// Gives back what it holds of this core before it moves; false when it cannot move after
    /// all (it then stays and is served here: it resumes its work, and its `flush` follows).
    fn leave(&mut self, cx: &mut Cx<'_>) -> bool;
}

/// A connection's task: the connection, until it moves away.
pub struct Placed<T: Movable>(Option<Box<T>>);

impl<T: Movable> Placed<T> {
    pub fn new(conn: T) -> Placed<T> {
        Placed(Some(Box::new(conn)))
    }

    fn conn(&mut self) -> &mut T {
        self.0.as_mut().expect("a connection's task used after it moved")
    }

    /// Sends the connection to `core` if it is ready to go.
    fn maybe_move(&mut self, cx: &mut Cx<'_>) {
        let Some(core) = self.0.as_ref().and_then(|c| c.ready_to_move()) else {
            return;
        };
        let mut conn = self.0.take().expect("checked above");
        if !conn.leave(cx) {
            // Staying: one more flush posts what its resumed work needs (sends, receives).
            self.0 = Some(conn);
            cx.flush_later(cx.task());
            return;
        }
        let msg = Msg::Spawn(Box::new(move |_: &mut Cx<'_>| Box::new(Placed(Some(conn))) as _));
        match cx.peers()[core].send(msg) {
            Ok(()) => cx.stats().connections_moved += 1,
            Err(Msg::Spawn(build)) => {
                // That core's mailbox is full: the connection starts again here.
                let task = build(cx);
                cx.spawn_local(task);
            }
            Err(_) => unreachable!("a refused message comes back as it was sent"),
        }
    }
}

impl<T: Movable> Task for Placed<T> {
    fn start(&mut self, cx: &mut Cx<'_>) {
        self.conn().start(cx);
    }

    fn on_completion(&mut self, cx: &mut Cx<'_>, tag: u32, result: i32, owned: Owned) {
        self.conn().on_completion(cx, tag, result, owned);
    }

    fn flush(&mut self, cx: &mut Cx<'_>) {
        self.conn().flush(cx);
        self.maybe_move(cx);
    }

    fn on_shutdown(&mut self, cx: &mut Cx<'_>) {
        if let Some(conn) = self.0.as_mut() {
            conn.on_shutdown(cx);
        }
    }

    fn on_buffers(&mut self, cx: &mut Cx<'_>) {
        if let Some(conn) = self.0.as_mut() {
            conn.on_buffers(cx);
        }
    }

    fn is_done(&self) -> bool {
        self.0.as_ref().is_none_or(|c| c.is_done())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use parking_lot::Mutex;

    use super::*;
    use crate::reactor::{Engine, EngineConfig};

    type Log = Arc<Mutex<Vec<String>>>;

    /// A connection stand-in: on core 0 it has a timer in flight when it decides to move to
    /// `to`; it may leave only once the timer is back; on the core it ends on it is done.
    struct Hop {
        log: Log,
        to: usize,
        allow_leave: bool,
        timer: bool,
        moving: bool,
        stayed: bool,
        done: bool,
    }

    impl Task for Hop {
        fn start(&mut self, cx: &mut Cx<'_>) {
            self.log.lock().push(format!("start on {}", cx.core()));
            if cx.core() == self.to {
                self.done = true;
                return;
            }
            self.timer = true;
            self.moving = true;
            cx.timer(1, Duration::from_millis(20));
        }
        fn on_completion(&mut self, cx: &mut Cx<'_>, _tag: u32, _result: i32, _owned: Owned) {
            self.timer = false;
            self.log.lock().push(format!("timer back on {}", cx.core()));
        }
        fn flush(&mut self, _cx: &mut Cx<'_>) {
            if self.stayed {
                self.stayed = false;
                self.done = true;
                self.log.lock().push("flushed after staying".into());
            }
        }
        fn on_shutdown(&mut self, _cx: &mut Cx<'_>) {}
        fn is_done(&self) -> bool {
            self.done
        }
    }

    impl Movable for Hop {
        fn ready_to_move(&self) -> Option<usize> {
            (self.moving && !self.timer).then_some(self.to)
        }
        fn leave(&mut self, cx: &mut Cx<'_>) -> bool {
            self.moving = false;
            if !self.allow_leave {
                self.log.lock().push("stayed".into());
                self.stayed = true;
                return false;
            }
            self.log.lock().push(format!("left {}", cx.core()));
            true
        }
    }

    fn run(allow_leave: bool) -> Vec<String> {
        let allowed = ballast_ffi::sys::allowed_cpus();
        let mut config = EngineConfig::one_core_for_tests();
        config.cpus = vec![allowed[0], allowed[allowed.len() - 1]];
        let engine = Engine::start(config).expect("an engine");
        let log: Log = Arc::default();
        let hop = Hop {
            log: Arc::clone(&log),
            to: 1,
            allow_leave,
            timer: false,
            moving: false,
            stayed: false,
            done: false,
        };
        let spawn = move |_: &mut Cx<'_>| Box::new(Placed::new(hop)) as Box<dyn Task>;
        assert!(engine.handles()[0].send_blocking(Msg::Spawn(Box::new(spawn))));
        let started = Instant::now();
        let last = if allow_leave { "start on 1" } else { "flushed after staying" };
        while !log.lock().iter().any(|e| e == last) {
            assert!(started.elapsed() < Duration::from_secs(10), "the task got to `{last}`");
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut stats = Vec::new();
        for h in engine.handles().iter() {
            let (tx, rx) = crossbeam_channel::bounded(1);
            assert!(h.send_blocking(Msg::Stats(tx)));
            stats.push(rx.recv_timeout(Duration::from_secs(5)).expect("stats").connections_moved);
        }
        engine.shutdown();
        let mut log = log.lock().clone();
        log.push(format!("moved {stats:?}"));
        log
    }

    /// A connection moves only once nothing of it is in flight, and starts again on the core
    /// it moved to; the core it left counts the move.
    #[test]
    fn a_connection_moves_once_quiet_and_starts_on_its_new_core() {
        assert_eq!(
            run(true),
            ["start on 0", "timer back on 0", "left 0", "start on 1", "moved [1, 0]"]
        );
    }

    /// A connection that cannot leave after all stays and is served where it is: it is
    /// flushed again at once (to post what its resumed work needs), with no event of its own.
    #[test]
    fn a_connection_that_cannot_leave_stays() {
        assert_eq!(
            run(false),
            ["start on 0", "timer back on 0", "stayed", "flushed after staying", "moved [0, 0]"]
        );
    }
}
