//! quinn-proto's connection events turned into [`App`] callbacks: the per-connection part
//! the worker keeps beside quinn's state ([`AppConn`]) and the per-worker part ([`Dispatch`]).
//! The driver loop (`handler.rs`) polls quinn and hands each event here; this file decides
//! which callback it is, lends the app a [`Connection`], and carries out what the callback
//! left to do afterwards (resets a read ran into, a close the app asked for).
//!
//! Statically dispatched: everything is generic over the app, nothing is boxed, and an event
//! costs no allocation (a connection's inbox is made only when the app asks for a `Remote`).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use quinn_proto::{Dir, Event, StreamEvent, VarInt};

use super::api::{Admission, App, CloseReason, Decision, Established, IncomingInfo, NewConnection};
use super::conn::{ConnId, Connection, Extra, StreamId};
use super::remote::{Inbox, ReadyList};
use super::Counters;

/// Where a connection is in the app's eyes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Accepted by `on_incoming`; `on_new_connection` not yet asked.
    Handshake,
    /// The app holds state for it.
    Open,
    /// Refused by `on_new_connection`, or closed (`on_closed` delivered).
    Done,
}

/// The app's side of one connection.
pub(super) struct AppConn<A: App> {
    state: Option<A::Conn>,
    extra: Extra<A::Message>,
    phase: Phase,
}

impl<A: App> AppConn<A> {
    /// The app's timer of this connection.
    pub fn timer(&self) -> Option<Instant> {
        self.extra.timer
    }

    /// The connection's inbox is `inbox`.
    fn owns(&self, inbox: &Arc<Inbox<A::Message>>) -> bool {
        self.extra
            .inbox
            .as_ref()
            .is_some_and(|own| Arc::ptr_eq(own, inbox))
    }
}

/// One worker's app and what it shares with other threads.
pub(super) struct Dispatch<A: App> {
    app: A,
    ready: Arc<ReadyList<A::Message>>,
    worker: usize,
    next_id: u64,
    counters: Arc<Counters>,
    /// No new connections (the server is shutting down).
    closed: bool,
    /// Scratch space of `take_posted` and `finish`, kept for its capacity.
    messages: Vec<A::Message>,
    inboxes: Vec<Arc<Inbox<A::Message>>>,
}

/// Lends the app connection `quinn` of `c` for one callback, then carries out what the
/// callback left (`Dispatch::after`). Skips the callback when the app holds no state for it.
macro_rules! callback {
    ($d:expr, $quinn:expr, $c:expr, $now:expr, |$app:ident, $conn:ident, $state:ident| $body:expr) => {{
        let d = &mut *$d;
        let c = &mut *$c;
        if let Some($state) = c.state.as_mut() {
            let $app = &mut d.app;
            let mut $conn = Connection {
                quinn: &mut *$quinn,
                extra: &mut c.extra,
                now: $now,
                worker: d.worker,
                ready: &d.ready,
            };
            $body;
            d.after($quinn, c, $now);
        }
    }};
}

impl<A: App> Dispatch<A> {
    pub fn new(app: A, worker: usize, counters: Arc<Counters>) -> Dispatch<A> {
        Dispatch {
            app,
            ready: Arc::new(ReadyList::new()),
            worker,
            next_id: 0,
            counters,
            closed: false,
            messages: Vec::new(),
            inboxes: Vec::new(),
        }
    }

    /// The worker's mailbox, for `Remote`s (from the first callback on).
    pub fn set_worker(&self, shared: &Arc<crate::shared::WorkerShared>) {
        self.ready.set_worker(shared);
    }

    /// Messages wait to be handed to the app.
    pub fn posted(&self) -> bool {
        self.ready.pending()
    }

    /// The app's answer to a new peer's Initial (`Refuse` once the server shuts down).
    pub fn admit(&mut self, incoming: &IncomingInfo) -> Admission {
        if self.closed {
            return Admission::Refuse;
        }
        self.app.on_incoming(incoming)
    }

    /// The app's side of a connection just accepted into table slot `slot`.
    /// `resumed`: its ClientHello resumed a session of the cache.
    pub fn new_conn(&mut self, slot: usize, resumed: bool) -> AppConn<A> {
        let id = ConnId(self.next_id);
        self.next_id += 1;
        let mut extra = Extra::new(id, slot);
        extra.resumed = resumed;
        AppConn {
            state: None,
            extra,
            phase: Phase::Handshake,
        }
    }

    /// One quinn event of connection `quinn`.
    pub fn on_event(
        &mut self,
        quinn: &mut quinn_proto::Connection,
        c: &mut AppConn<A>,
        event: Event,
        now: Instant,
    ) {
        match event {
            Event::HandshakeDataReady => self.handshake_data(quinn, c, now),
            Event::Connected => {
                let info = Established {
                    resumed: c.extra.resumed,
                    accepted_0rtt: super::sessions::accepted_0rtt(quinn),
                };
                callback!(self, quinn, c, now, |app, conn, state| app
                    .on_established(&mut conn, state, &info));
            }
            Event::ConnectionLost { reason } => {
                self.finish(quinn, c, now, CloseReason::from_quinn(reason))
            }
            Event::Stream(event) => self.on_stream_event(quinn, c, event, now),
            Event::DatagramReceived => {
                while let Some(datagram) = quinn.datagrams().recv() {
                    callback!(self, quinn, c, now, |app, conn, state| app
                        .on_datagram(&mut conn, state, datagram));
                }
            }
            Event::DatagramsUnblocked => {
                callback!(self, quinn, c, now, |app, conn, state| app
                    .on_datagrams_unblocked(&mut conn, state));
            }
        }
    }

    /// ALPN and SNI are known: the app decides.
    fn handshake_data(
        &mut self,
        quinn: &mut quinn_proto::Connection,
        c: &mut AppConn<A>,
        now: Instant,
    ) {
        if c.phase != Phase::Handshake {
            return;
        }
        if let Some(data) = quinn.crypto_session().handshake_data() {
            if let Ok(data) = data.downcast::<quinn_proto::crypto::rustls::HandshakeData>() {
                c.extra.alpn = data.protocol.map(Vec::into_boxed_slice);
                c.extra.sni = data.server_name.map(String::into_boxed_str);
            }
        }
        let alpn = c.extra.alpn.clone().unwrap_or_default();
        let sni = c.extra.sni.clone();
        let info = NewConnection {
            remote: quinn.remote_address(),
            alpn: &alpn,
            sni: sni.as_deref(),
            worker: self.worker,
        };
        let decision = {
            let mut conn = Connection {
                quinn: &mut *quinn,
                extra: &mut c.extra,
                now,
                worker: self.worker,
                ready: &self.ready,
            };
            self.app.on_new_connection(&mut conn, &info)
        };
        match decision {
            Decision::Accept(state) => {
                c.state = Some(state);
                c.phase = Phase::Open;
                self.after(quinn, c, now);
            }
            Decision::Refuse(code) => {
                let code = VarInt::from_u64(code).unwrap_or(VarInt::MAX);
                quinn.close(now, code, Bytes::new());
                c.phase = Phase::Done;
                self.close_inbox(c);
            }
        }
    }

    fn on_stream_event(
        &mut self,
        quinn: &mut quinn_proto::Connection,
        c: &mut AppConn<A>,
        event: StreamEvent,
        now: Instant,
    ) {
        match event {
            StreamEvent::Opened { dir } => {
                while let Some(id) = quinn.streams().accept(dir) {
                    if dir == Dir::Bi {
                        self.counters.add(|c| &c.streams);
                        if super::sessions::is_early_data(quinn) {
                            self.counters.add(|c| &c.early_streams);
                        }
                    }
                    let id = StreamId(id);
                    if c.state.is_none() {
                        // Refused or closed: nobody reads it.
                        let _ = quinn.recv_stream(id.0).stop(VarInt::from_u32(0));
                        continue;
                    }
                    callback!(self, quinn, c, now, |app, conn, state| app
                        .on_stream_opened(&mut conn, state, id));
                    self.readable(quinn, c, id, now);
                }
            }
            StreamEvent::Readable { id } => self.readable(quinn, c, StreamId(id), now),
            StreamEvent::Writable { id } => {
                callback!(self, quinn, c, now, |app, conn, state| app.on_writable(
                    &mut conn,
                    state,
                    StreamId(id)
                ));
            }
            StreamEvent::Finished { id } => {
                callback!(self, quinn, c, now, |app, conn, state| app.on_finished(
                    &mut conn,
                    state,
                    StreamId(id)
                ));
            }
            StreamEvent::Stopped { id, error_code } => {
                let code = error_code.into_inner();
                callback!(self, quinn, c, now, |app, conn, state| app.on_stopped(
                    &mut conn,
                    state,
                    StreamId(id),
                    code
                ));
            }
            StreamEvent::Available { dir } => {
                let bidi = dir == Dir::Bi;
                callback!(self, quinn, c, now, |app, conn, state| app
                    .on_streams_available(&mut conn, state, bidi));
            }
        }
    }

    /// Stream `id` may be readable: a reset that arrived is `on_reset` (once: quinn frees
    /// the stream's receive state as it reports it), anything else `on_readable`.
    fn readable(
        &mut self,
        quinn: &mut quinn_proto::Connection,
        c: &mut AppConn<A>,
        id: StreamId,
        now: Instant,
    ) {
        if c.state.is_none() {
            return;
        }
        match quinn.recv_stream(id.0).received_reset() {
            Ok(Some(code)) => {
                let code = code.into_inner();
                callback!(self, quinn, c, now, |app, conn, state| app
                    .on_reset(&mut conn, state, id, code));
            }
            Ok(None) => {
                callback!(self, quinn, c, now, |app, conn, state| app
                    .on_readable(&mut conn, state, id));
            }
            // Already read to its end, stopped or reset: nothing more to say.
            Err(_) => {}
        }
    }

    /// After a callback: the resets its reads ran into, then the close it asked for.
    fn after(&mut self, quinn: &mut quinn_proto::Connection, c: &mut AppConn<A>, now: Instant) {
        while let Some((id, code)) = c.extra.resets.pop() {
            let Some(state) = c.state.as_mut() else {
                break;
            };
            let mut conn = Connection {
                quinn: &mut *quinn,
                extra: &mut c.extra,
                now,
                worker: self.worker,
                ready: &self.ready,
            };
            self.app.on_reset(&mut conn, state, id, code);
        }
        if let Some(code) = c.extra.closed_by_app.take() {
            self.finish(quinn, c, now, CloseReason::Local { code });
        }
    }

    /// The connection closed: messages still in its inbox go to the app (the connection
    /// closed), then its state comes back in `on_closed`. Once per connection.
    pub fn finish(
        &mut self,
        quinn: &mut quinn_proto::Connection,
        c: &mut AppConn<A>,
        now: Instant,
        reason: CloseReason,
    ) {
        c.phase = Phase::Done;
        c.extra.closed_by_app = None;
        let mut messages = std::mem::take(&mut self.messages);
        if let Some(inbox) = c.extra.inbox.as_ref() {
            inbox.close(&mut messages);
        }
        let Some(mut state) = c.state.take() else {
            // Never admitted: nothing was posted (no `Remote` exists without state).
            messages.clear();
            self.messages = messages;
            return;
        };
        for message in messages.drain(..) {
            let mut conn = Connection {
                quinn: &mut *quinn,
                extra: &mut c.extra,
                now,
                worker: self.worker,
                ready: &self.ready,
            };
            self.app.on_message(&mut conn, &mut state, message);
        }
        self.messages = messages;
        c.extra.resets.clear();
        c.extra.ended.clear();
        c.extra.timer = None;
        self.app.on_closed(state, &reason);
    }

    fn close_inbox(&mut self, c: &mut AppConn<A>) {
        if let Some(inbox) = c.extra.inbox.as_ref() {
            inbox.close(&mut self.messages);
            self.messages.clear();
        }
    }

    /// The app's timer of `c`, if it has come.
    pub fn on_timeout(
        &mut self,
        quinn: &mut quinn_proto::Connection,
        c: &mut AppConn<A>,
        now: Instant,
    ) {
        if c.extra.timer.is_some_and(|t| t <= now) {
            c.extra.timer = None;
            callback!(self, quinn, c, now, |app, conn, state| app
                .on_timer(&mut conn, state, now));
        }
    }

    /// The inboxes with posted messages (see `deliver`).
    pub fn take_posted(&mut self) -> Vec<Arc<Inbox<A::Message>>> {
        let mut inboxes = std::mem::take(&mut self.inboxes);
        self.ready.take(&mut inboxes);
        inboxes
    }

    /// Gives back the vector `take_posted` lent (emptied), for its capacity.
    pub fn return_posted(&mut self, mut inboxes: Vec<Arc<Inbox<A::Message>>>) {
        inboxes.clear();
        self.inboxes = inboxes;
    }

    /// Hands the messages of `inbox` to connection `c`'s app, if `c` is its connection.
    /// Returns whether it was.
    pub fn deliver(
        &mut self,
        quinn: &mut quinn_proto::Connection,
        c: &mut AppConn<A>,
        inbox: &Arc<Inbox<A::Message>>,
        now: Instant,
    ) -> bool {
        if !c.owns(inbox) {
            return false;
        }
        let mut messages = std::mem::take(&mut self.messages);
        inbox.take(&mut messages);
        for message in messages.drain(..) {
            callback!(self, quinn, c, now, |app, conn, state| app
                .on_message(&mut conn, state, message));
        }
        self.messages = messages;
        true
    }

    /// The server shuts down: no more connections; `c` closes with code 0.
    pub fn shutdown(
        &mut self,
        quinn: &mut quinn_proto::Connection,
        c: &mut AppConn<A>,
        now: Instant,
    ) {
        self.closed = true;
        quinn.close(
            now,
            VarInt::from_u32(0),
            Bytes::from_static(b"server shutting down"),
        );
        if c.phase != Phase::Done {
            self.finish(quinn, c, now, CloseReason::Shutdown);
        }
    }

    /// quinn freed connection `c` (drained): the app's state goes back if it still had it.
    pub fn drained(
        &mut self,
        quinn: &mut quinn_proto::Connection,
        c: &mut AppConn<A>,
        now: Instant,
    ) {
        if c.phase != Phase::Done {
            self.finish(quinn, c, now, CloseReason::Other("drained".into()));
        }
    }

    /// The handler is dropped without a shutdown (the worker failed): `Remote`s refuse
    /// from now on. Messages still queued are dropped with the app.
    pub fn abandon(&mut self, c: &mut AppConn<A>) {
        self.close_inbox(c);
    }
}
