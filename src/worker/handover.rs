//! A worker whose listener was handed over to another process (issue 11). The two processes
//! hold the same socket, so the datagrams queued on it move with it: this worker only has to
//! stop receiving on it, answer what it already received, and keep serving the sessions that
//! have sockets of their own (`connected`, `port-per-client`) until they close. Their peers'
//! datagrams keep reaching those sockets, and so this process's state, while new peers reach
//! the listener and the new process.

use std::io;

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

    /// Stops receiving on the listener for good. Without per-client sockets there is nothing
    /// left to serve afterwards: the worker drains (answers what it holds) and ends.
    pub(super) fn release_listener(&mut self) -> io::Result<()> {
        if self.state != State::Running {
            return Ok(());
        }
        if !matches!(
            self.mode,
            SessionMode::Connected | SessionMode::PortPerClient
        ) {
            // `none` holds nothing; `shared` sessions live on the listener, which the new
            // process now reads: they close here (reason Shutdown) and their peers get new
            // sessions there.
            return self.begin_drain();
        }
        self.state = State::Released;
        if self.io.ledger.recv_armed {
            let generation = self.io.ledger.recv_generation;
            self.io.cancel(UserData::new(OpKind::Recv, generation, 0))?;
        }
        // Sessions served through the listener (over --max-connected, or a per-client socket
        // that could not be opened) will never hear from their peer here again.
        for id in self.router.sessions.ids() {
            let on_listener = self
                .router
                .sessions
                .get(id)
                .is_some_and(|e| e.value.sock.is_none());
            if on_listener {
                self.close_session(id, CloseReason::Shutdown);
            }
        }
        Ok(())
    }

    /// A released worker with no session left and nothing pending asks itself to shut down
    /// (through its own wake-up, so the drain starts from the one place that begins it).
    pub(super) fn end_when_released_and_idle(&mut self) -> io::Result<()> {
        if self.state == State::Released
            && self.router.sessions.len() == 0
            && self.backlog.is_empty()
            && !self.socks.busy()
            && !self
                .shared
                .shutdown
                .load(std::sync::atomic::Ordering::Acquire)
        {
            self.shared.request_shutdown()?;
        }
        Ok(())
    }
}
