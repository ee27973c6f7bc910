//! An NBD connection as a core's task, and its move to the core its volume lives on.
//!
//! Under the `owner` placement a volume's family is served by one core; a connection the
//! listener put elsewhere moves to that core when its handshake ends ([`Conn`] decides and
//! gets ready: nothing in flight, output sent, the core's memory given back), so its requests
//! run where their family's state is, instead of being forwarded there one by one.
//!
//! Invariants: a connection is on exactly one core at a time — it leaves this task (which then
//! reports done, owning nothing) only inside the message that builds it on the new core; if
//! that core's mailbox refuses it, it starts again here and is served here. Its socket, its
//! place under the connection limit and its negotiated session travel with it.

use ballast_engine::{Cx, Msg, Owned, Task};

use crate::conn::Conn;

/// A connection's task: the connection, until it moves away.
pub struct Placed(Option<Box<Conn>>);

impl Placed {
    pub fn new(conn: Conn) -> Placed {
        Placed(Some(Box::new(conn)))
    }

    fn conn(&mut self) -> &mut Conn {
        self.0.as_mut().expect("a connection's task used after it moved")
    }

    /// Sends the connection to `core` if it is ready to go.
    fn maybe_move(&mut self, cx: &mut Cx<'_>) {
        let Some(core) = self.0.as_ref().and_then(|c| c.ready_to_move()) else {
            return;
        };
        let mut conn = self.0.take().expect("checked above");
        if !conn.leave(cx) {
            self.0 = Some(conn);
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

impl Task for Placed {
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
