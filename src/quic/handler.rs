//! One worker's QUIC endpoint as a [`Handler`]: datagrams in, connections driven once per
//! loop turn through the handler timer, transmits out through the send pool.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use quinn_proto::{
    ConnectionHandle, DatagramEvent, EcnCodepoint, Endpoint, EndpointConfig, Event, Incoming,
    Transmit,
};

use super::api::{Admission, App, IncomingInfo};
use super::apps::Builtin;
use super::cid::{CidFormat, WorkerCids};
use super::dispatch::{AppConn, Dispatch};
use super::sessions;
use super::Counters;
use crate::handler::{Datagram, Handler, Reply};
use crate::send_pool::SendOptions;

/// The largest datagram quinn builds here (its MTU discovery stops at 1452; 1500 leaves
/// room): a send slot holds `slot / MAX_SEGMENT` datagrams of a GSO train.
const MAX_SEGMENT: usize = 1500;

/// Datagrams one drive of a connection sends before the next dirty connection's turn
/// (quinn's own driver yields after 20, `MAX_TRANSMIT_DATAGRAMS`): a connection with much to
/// send goes to the back of the queue, so the others are served in between.
const DRIVE_DATAGRAMS: usize = 20;

/// The timer heap is rebuilt from the live entries when it holds more than this many times
/// as many entries as connections (stale ones are skipped lazily until then).
const TIMER_SLACK: usize = 2;

/// Admission limits for new connections on one worker (see [`super::QuicConfig`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// `validate_peers`: every new peer must return a Retry token first.
    pub validate_peers: bool,
    /// Above this many handshakes in flight, a new peer must return a Retry token first.
    pub retry_above: usize,
    /// At this many handshakes in flight, new peers are refused (CONNECTION_REFUSED).
    pub max_handshakes: usize,
}

/// A connection and what the handler keeps beside it.
struct Conn<A: App> {
    conn: quinn_proto::Connection,
    /// The app's side: its state, its timer, its inbox.
    app: AppConn<A>,
    /// The earlier of quinn's `poll_timeout` and the app's timer, after the last drive.
    timeout: Option<Instant>,
    /// The instant of this connection's live entry in the timer heap (`None`: none). The
    /// entry may be earlier than `timeout`: it is then moved when it comes due.
    scheduled: Option<Instant>,
    /// Tells this connection's heap entries from those of an earlier connection in the
    /// same slot.
    key: u64,
    /// Counted in the worker's handshakes in flight.
    handshaking: bool,
    /// In the dirty queue: to be driven at the end of the turn.
    dirty: bool,
    /// The ClientHello resumed a session of the shared cache ([`super::sessions`]).
    resumed: bool,
}

/// How a drive of a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Driven {
    /// Nothing more to send now.
    Done,
    /// It sent its share ([`DRIVE_DATAGRAMS`]) and may have more: back of the queue.
    Capped,
    /// The send pool is full: back of the queue, resumed when a slot is free.
    Blocked,
}

/// One worker's QUIC endpoint running app `A` (see the module docs of [`crate::quic`]); the
/// built-in echo and hq-interop by default.
pub struct QuicHandler<A: App = Builtin> {
    worker: u8,
    endpoint: Endpoint,
    server_config: Arc<quinn_proto::ServerConfig>,
    /// The layout of the CIDs this server issues (which byte names the worker).
    cid_format: CidFormat,
    /// By `ConnectionHandle` (the endpoint's slab index).
    conns: Vec<Option<Conn<A>>>,
    /// The app and the events-to-callbacks layer.
    dispatch: Dispatch<A>,
    /// Connections in `conns`.
    live: usize,
    /// Connections whose handshake has not completed (counted against `admission`).
    handshakes: usize,
    /// Dirty connections in the order they are driven (round robin).
    dirty: VecDeque<ConnectionHandle>,
    /// Connection timeouts, earliest first: (instant, slot, key). An entry whose slot no
    /// longer holds that key, or whose connection is scheduled for another instant, is
    /// stale and skipped when it comes up, so that a turn costs O(log n) per due timer, not
    /// a scan of every connection.
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    /// The key of the next connection.
    next_key: u64,
    /// An instant surely past: `next_timer` answers it while connections wait to be driven.
    epoch: Instant,
    limits: Limits,
    counters: Arc<Counters>,
    /// Set when this process drains after a takeover: new peers are not accepted.
    draining: Arc<AtomicBool>,
    /// Where quinn writes a transmit before it is copied into a send slot.
    buf: Vec<u8>,
    /// Received datagrams are copied here for quinn, which decrypts in place.
    rx: BytesMut,
}

impl<A: App> QuicHandler<A> {
    // One caller (`Quic::handler_with`), which hands over what the `Quic` shares.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        worker: u8,
        app: A,
        server_config: Arc<quinn_proto::ServerConfig>,
        endpoint_config: &EndpointConfig,
        cid_format: CidFormat,
        limits: Limits,
        counters: Arc<Counters>,
        draining: Arc<AtomicBool>,
    ) -> QuicHandler<A> {
        let mut config = endpoint_config.clone();
        let format = cid_format.clone();
        config.cid_generator(move || Box::new(WorkerCids::new(worker, format.clone())));
        // Path MTU discovery (up to quinn's 1452 B): `Quic::configure` sets don't-fragment on
        // the sockets, so a probe too large for the path is lost, not fragmented.
        let endpoint = Endpoint::new(Arc::new(config), Some(server_config.clone()), true, None);
        QuicHandler {
            worker,
            endpoint,
            server_config,
            cid_format,
            conns: Vec::new(),
            dispatch: Dispatch::new(app, usize::from(worker), counters.clone()),
            live: 0,
            handshakes: 0,
            dirty: VecDeque::new(),
            timers: BinaryHeap::new(),
            next_key: 0,
            epoch: Instant::now(),
            limits,
            counters,
            draining,
            buf: Vec::with_capacity(64 * 1024),
            rx: BytesMut::with_capacity(64 * 1024),
        }
    }

    /// Connections this worker holds.
    pub fn connections(&self) -> usize {
        self.live
    }

    /// Connections this worker holds whose handshake has not completed.
    pub fn handshakes_in_flight(&self) -> usize {
        self.handshakes
    }

    /// One UDP datagram into the endpoint.
    fn receive(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        local: Option<IpAddr>,
        ecn: u8,
        payload: &[u8],
        reply: &mut Reply<'_>,
    ) {
        let short_header = payload.first().is_some_and(|b| b & 0x80 == 0);
        // Names another worker and then finds no connection here: misrouted. (A peer's
        // stateless reset also looks like a short header with a random CID, but the endpoint
        // recognises it by its token; that is no routing failure.)
        let names_other = short_header
            && payload.len() > self.cid_format.len()
            && !self
                .cid_format
                .issued_by(&payload[1..=self.cid_format.len()], self.worker);
        self.rx.clear();
        self.rx.extend_from_slice(payload);
        let data = self.rx.split();
        self.buf.clear();
        let ecn = EcnCodepoint::from_bits(ecn);
        match self
            .endpoint
            .handle(now, peer, local, ecn, data, &mut self.buf)
        {
            None => {
                self.counters.add(|c| &c.ignored);
                if names_other {
                    self.counters.add(|c| &c.misrouted);
                }
            }
            Some(DatagramEvent::ConnectionEvent(ch, event)) => {
                if let Some(Some(c)) = self.conns.get_mut(ch.0) {
                    c.conn.handle_event(event);
                    mark_dirty(&mut self.dirty, c, ch);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => self.incoming(now, incoming, reply),
            Some(DatagramEvent::Response(transmit)) => {
                if short_header {
                    self.counters.add(|c| &c.stateless_resets);
                }
                if names_other {
                    self.counters.add(|c| &c.misrouted);
                }
                send(reply, &transmit, &self.buf);
            }
        }
    }

    /// A new peer's Initial: refused at the cap on handshakes in flight; a Retry first when
    /// peers must be validated, or when the handshakes in flight are above the threshold
    /// (state only for a peer that proves its address, as msquic does under its retry
    /// memory limit); else what the app says.
    fn incoming(&mut self, now: Instant, incoming: Incoming, reply: &mut Reply<'_>) {
        self.buf.clear();
        let limits = self.limits;
        if self.draining.load(Ordering::Relaxed) {
            // No answer: a refusal would end the attempt, while the client's retransmission
            // goes to the process that took over (the reuseport program sends Initials to
            // the current generation).
            self.counters.add(|c| &c.refused_draining);
            self.endpoint.ignore(incoming);
            return;
        }
        if self.handshakes >= limits.max_handshakes {
            self.counters.add(|c| &c.refused);
            self.counters.add(|c| &c.refused_busy);
            let transmit = self.endpoint.refuse(incoming, &mut self.buf);
            send(reply, &transmit, &self.buf);
            return;
        }
        let busy = self.handshakes >= limits.retry_above;
        let forced = (limits.validate_peers || busy) && !incoming.remote_address_validated();
        let admission = if forced {
            Admission::Retry
        } else {
            self.dispatch.admit(&IncomingInfo {
                remote: incoming.remote_address(),
                local_ip: incoming.local_ip(),
                validated: incoming.remote_address_validated(),
                worker: usize::from(self.worker),
            })
        };
        // A peer that already returned a Retry token cannot be asked again (RFC 9000
        // section 17.2.5.2): when only the app asked, it is accepted.
        let admission = match admission {
            Admission::Retry if !incoming.may_retry() && !forced => Admission::Accept,
            other => other,
        };
        if admission != Admission::Accept {
            if admission == Admission::Retry && incoming.may_retry() {
                match self.endpoint.retry(incoming, &mut self.buf) {
                    Ok(transmit) => {
                        self.counters.add(|c| &c.retries);
                        if busy && !limits.validate_peers {
                            self.counters.add(|c| &c.retries_busy);
                        }
                        send(reply, &transmit, &self.buf);
                    }
                    Err(e) => {
                        self.counters.add(|c| &c.refused);
                        self.endpoint.ignore(e.into_incoming());
                    }
                }
            } else {
                self.counters.add(|c| &c.refused);
                let transmit = self.endpoint.refuse(incoming, &mut self.buf);
                send(reply, &transmit, &self.buf);
            }
            return;
        }
        // rustls reads the ClientHello inside `accept`, on this thread: a session taken from
        // the cache meanwhile is this connection's.
        sessions::clear_resumed();
        let accepted = self.endpoint.accept(
            incoming,
            now,
            &mut self.buf,
            Some(self.server_config.clone()),
        );
        let resumed = sessions::take_resumed();
        match accepted {
            Ok((ch, conn)) => {
                self.counters.add(|c| &c.accepted);
                if self.conns.len() <= ch.0 {
                    self.conns.resize_with(ch.0 + 1, || None);
                }
                let app = self.dispatch.new_conn(ch.0, resumed);
                self.live += 1;
                self.handshakes += 1;
                let key = self.next_key;
                self.next_key += 1;
                let slot = &mut self.conns[ch.0];
                let c = slot.insert(Conn {
                    conn,
                    app,
                    timeout: None,
                    scheduled: None,
                    key,
                    handshaking: true,
                    dirty: false,
                    resumed,
                });
                mark_dirty(&mut self.dirty, c, ch);
            }
            Err(e) => {
                self.counters.add(|c| &c.refused);
                if let Some(transmit) = e.response {
                    send(reply, &transmit, &self.buf);
                }
            }
        }
    }

    /// Runs connection `ch`'s events and polls its transmits while the send pool takes
    /// them, up to [`DRIVE_DATAGRAMS`] datagrams.
    fn drive(&mut self, ch: ConnectionHandle, now: Instant, reply: &mut Reply<'_>) -> Driven {
        let Some(Some(c)) = self.conns.get_mut(ch.0) else {
            return Driven::Done;
        };
        loop {
            let mut any = false;
            while let Some(event) = c.conn.poll() {
                any = true;
                if let Event::Connected = event {
                    if c.resumed {
                        self.counters.add(|c| &c.resumed);
                    }
                    if sessions::accepted_0rtt(&c.conn) {
                        self.counters.add(|c| &c.early_data_accepted);
                    }
                }
                self.dispatch.on_event(&mut c.conn, &mut c.app, event, now);
            }
            while let Some(event) = c.conn.poll_endpoint_events() {
                any = true;
                if let Some(event) = self.endpoint.handle_event(ch, event) {
                    c.conn.handle_event(event);
                }
            }
            if !any {
                break;
            }
        }
        let mut sent = 0;
        let driven = loop {
            if sent >= DRIVE_DATAGRAMS {
                break Driven::Capped;
            }
            // Never more datagrams than can leave now: quinn counts what `poll_transmit`
            // returns as sent, so a train the pool then refused (a slot per datagram without
            // GSO, and too few free) would be a false loss to its congestion control.
            let max_datagrams =
                reply.train_room(c.conn.remote_address(), c.conn.local_ip(), MAX_SEGMENT);
            if max_datagrams == 0 {
                break Driven::Blocked;
            }
            self.buf.clear();
            match c.conn.poll_transmit(now, max_datagrams, &mut self.buf) {
                Some(transmit) => {
                    sent += transmit
                        .segment_size
                        .map_or(1, |s| transmit.size.div_ceil(s.max(1)));
                    send(reply, &transmit, &self.buf);
                }
                None => break Driven::Done,
            }
        };
        c.timeout = earlier(c.conn.poll_timeout(), c.app.timer());
        if c.handshaking && !c.conn.is_handshaking() {
            c.handshaking = false;
            self.handshakes -= 1;
        }
        if driven == Driven::Done {
            c.dirty = false;
            if c.conn.is_drained() {
                if c.handshaking {
                    self.handshakes -= 1;
                }
                self.dispatch.drained(&mut c.conn, &mut c.app, now);
                self.conns[ch.0] = None;
                self.live -= 1;
                self.counters.add(|c| &c.drained);
                return Driven::Done;
            }
        }
        self.schedule(ch.0);
        driven
    }

    /// Keeps connection `index`'s timer entry at or before its timeout: an earlier timeout
    /// gets a new entry (the old one goes stale); a later one keeps the entry, which is moved
    /// when it comes due (a timeout moves later on most packets, earlier rarely).
    fn schedule(&mut self, index: usize) {
        let Some(Some(c)) = self.conns.get_mut(index) else {
            return;
        };
        let Some(timeout) = c.timeout else {
            return;
        };
        if c.scheduled.is_some_and(|t| t <= timeout) {
            return;
        }
        c.scheduled = Some(timeout);
        self.timers.push(Reverse((timeout, index, c.key)));
        if self.timers.len() > TIMER_SLACK * self.live + 64 {
            // Stale entries outnumber the live ones: rebuild from the connections, O(n)
            // once per n pushes.
            self.timers = self
                .conns
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    let c = c.as_ref()?;
                    Some(Reverse((c.scheduled?, i, c.key)))
                })
                .collect();
        }
    }

    /// The heap's first entry, stale ones dropped.
    fn first_timer(&mut self) -> Option<Instant> {
        while let Some(&Reverse((t, index, key))) = self.timers.peek() {
            match self.conns.get(index) {
                Some(Some(c)) if c.key == key && c.scheduled == Some(t) => return Some(t),
                _ => {
                    self.timers.pop();
                }
            }
        }
        None
    }

    /// Runs the timeouts that are due at `now` and marks their connections dirty; an entry
    /// that came before its connection's (later) timeout is moved to it.
    fn run_timers(&mut self, now: Instant) {
        while let Some(t) = self.first_timer() {
            if t > now {
                break;
            }
            let Some(Reverse((_, index, _))) = self.timers.pop() else {
                break;
            };
            let Some(Some(c)) = self.conns.get_mut(index) else {
                continue;
            };
            c.scheduled = None;
            if c.timeout.is_some_and(|due| due <= now) {
                c.conn.handle_timeout(now);
                self.dispatch.on_timeout(&mut c.conn, &mut c.app, now);
                mark_dirty(&mut self.dirty, c, ConnectionHandle(index));
            } else {
                self.schedule(index);
            }
        }
    }

    /// Hands the messages other threads posted to their connections' apps.
    fn deliver_posted(&mut self, now: Instant) {
        let inboxes = self.dispatch.take_posted();
        for inbox in &inboxes {
            if let Some(Some(c)) = self.conns.get_mut(inbox.slot) {
                if self.dispatch.deliver(&mut c.conn, &mut c.app, inbox, now) {
                    mark_dirty(&mut self.dirty, c, ConnectionHandle(inbox.slot));
                }
            }
        }
        self.dispatch.return_posted(inboxes);
    }
}

impl<A: App> Drop for QuicHandler<A> {
    /// A handler dropped without `on_shutdown` (the worker failed): its connections'
    /// `Remote`s refuse posts from now on instead of queueing for nobody.
    fn drop(&mut self) {
        for c in self.conns.iter_mut().flatten() {
            self.dispatch.abandon(&mut c.app);
        }
    }
}

/// The earlier of two optional instants.
fn earlier(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

fn mark_dirty<A: App>(
    dirty: &mut VecDeque<ConnectionHandle>,
    c: &mut Conn<A>,
    ch: ConnectionHandle,
) {
    if !c.dirty {
        c.dirty = true;
        dirty.push_back(ch);
    }
}

/// Queues a transmit quinn wrote into `buf`; a failure (no slot, too long) is counted by the
/// engine and is a lost packet to QUIC, which recovers.
fn send(reply: &mut Reply<'_>, transmit: &Transmit, buf: &[u8]) {
    let options = SendOptions {
        segment_size: transmit.segment_size,
        source: transmit.src_ip,
        ecn: transmit.ecn.map_or(0, |e| e as u8),
    };
    let bytes = &buf[..transmit.size.min(buf.len())];
    let _ = reply.send_to_with(transmit.destination, options, |out| {
        if out.len() >= bytes.len() {
            out[..bytes.len()].copy_from_slice(bytes);
        }
        bytes.len()
    });
}

impl<A: App> Handler for QuicHandler<A> {
    /// quinn takes a GRO train's datagrams one by one; taking the train whole saves the
    /// engine's per-datagram split and backpressure checks (the handler never answers a
    /// datagram directly but for stateless responses).
    const WHOLE_TRAINS: bool = true;

    fn on_datagram(&mut self, d: &Datagram<'_>, reply: &mut Reply<'_>) {
        if let Some(shared) = reply.worker() {
            self.dispatch.set_worker(shared);
        }
        let now = Instant::now();
        self.receive(now, d.peer, d.local, d.ecn, d.payload, reply);
    }

    fn on_train(&mut self, train: &Datagram<'_>, segment_size: usize, reply: &mut Reply<'_>) {
        if let Some(shared) = reply.worker() {
            self.dispatch.set_worker(shared);
        }
        let now = Instant::now();
        for payload in train.payload.chunks(segment_size.max(1)) {
            self.receive(now, train.peer, train.local, train.ecn, payload, reply);
        }
    }

    fn next_timer(&mut self) -> Option<Instant> {
        if self.dirty.is_empty() && !self.dispatch.posted() {
            self.first_timer()
        } else {
            Some(self.epoch)
        }
    }

    fn on_timer(&mut self, now: Instant, reply: &mut Reply<'_>) {
        if self.dispatch.posted() {
            self.deliver_posted(now);
        }
        self.run_timers(now);
        // Round robin: each dirty connection sends its share in turn; one with more to send,
        // or one that found the pool full, goes to the back, so the others go before it
        // (this turn while slots last, else first in the next).
        while let Some(ch) = self.dirty.pop_front() {
            match self.drive(ch, now, reply) {
                Driven::Done => {}
                Driven::Capped => self.dirty.push_back(ch),
                Driven::Blocked => {
                    self.dirty.push_back(ch);
                    self.counters.add(|c| &c.blocked);
                    break;
                }
            }
        }
    }

    /// Closes every connection with an application CONNECTION_CLOSE (code 0, "server
    /// shutting down") and sends the close packets, so clients learn at once instead of
    /// waiting out their idle timeout. A connection whose close finds no free send slot is
    /// closed all the same; its client then times out as before.
    fn on_shutdown(&mut self, now: Instant, reply: &mut Reply<'_>) {
        for index in 0..self.conns.len() {
            if let Some(c) = self.conns[index].as_mut() {
                self.dispatch.shutdown(&mut c.conn, &mut c.app, now);
                self.counters.add(|c| &c.closed_at_shutdown);
                self.drive(ConnectionHandle(index), now, reply);
            }
        }
    }
}

#[cfg(test)]
#[path = "handler_tests.rs"]
mod tests;
