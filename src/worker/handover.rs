//! A worker whose listener was handed over to another process (issue 11). The two processes
//! hold the same socket, so the datagrams queued on it move with it: this worker only has to
//! stop receiving on it (cancel the multishot receive, never arm it again), answer what that
//! receive already took (every completion up to its final one is in the backlog), and keep
//! serving the sessions that have sockets of their own (`connected`, `port-per-client`) until
//! they close. Their peers' datagrams keep reaching those sockets, and so this process's
//! state, while new peers reach the listener and the new process. With nothing of that kind
//! left (always in `none` and `shared` mode) the worker drains and ends.

use std::io;
use std::sync::atomic::Ordering;

use super::{State, Worker};
use crate::config::SessionMode;
use crate::handler::SessionHandler;
use crate::op::{OpKind, UserData};
use crate::session::CloseReason;

impl<H: SessionHandler> Worker<H> {
    /// Whether the worker still serves: running, or running without its listener.
    pub(super) fn serving(&self) -> bool {
        !matches!(self.state, State::Draining { .. })
    }

    /// Stops receiving on the listener for good. What the receive already took (its
    /// completions up to the final one the cancel brings) is answered before the worker
    /// drains; only sessions with sockets of their own keep it serving after that.
    pub(super) fn release_listener(&mut self) -> io::Result<()> {
        if self.state != State::Running {
            return Ok(());
        }
        self.state = State::Released;
        if self.io.ledger.recv_armed {
            let generation = self.io.ledger.recv_generation;
            self.io.cancel(UserData::new(OpKind::Recv, generation, 0))?;
        }
        // Sessions served through the listener (`shared` mode, and in the other modes those
        // over --max-connected or whose socket could not be opened) will never hear from
        // their peer here again: their datagrams reach the new process, which opens sessions
        // of its own for them.
        for id in self.router.sessions.ids() {
            if !self.has_own_socket(id) {
                self.close_session(id, CloseReason::Shutdown);
            }
        }
        Ok(())
    }

    fn has_own_socket(&self, id: crate::session::SessionId) -> bool {
        self.router
            .sessions
            .get(id)
            .is_some_and(|e| e.value.sock.is_some())
    }

    /// A released worker whose listener receive has ended, with nothing pending and no
    /// session on a socket of its own left, asks itself to shut down (through its own
    /// wake-up, so the drain starts from the one place that begins it). Sessions a datagram
    /// from the backlog opened on the listener after the release are closed by that drain.
    pub(super) fn end_when_released_and_idle(&mut self) -> io::Result<()> {
        if self.state != State::Released
            || self.io.ledger.recv_armed
            || !self.backlog.is_empty()
            || self.socks.busy()
            || self.shared.shutdown.load(Ordering::Acquire)
        {
            return Ok(());
        }
        let own_sockets = matches!(
            self.mode,
            SessionMode::Connected | SessionMode::PortPerClient
        ) && self
            .router
            .sessions
            .ids()
            .into_iter()
            .any(|id| self.has_own_socket(id));
        if !own_sockets {
            self.shared.request_shutdown()?;
        }
        Ok(())
    }
}
