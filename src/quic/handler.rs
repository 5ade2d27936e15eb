//! One worker's QUIC endpoint as a [`Handler`]: datagrams in, connections driven once per
//! loop turn through the handler timer, transmits out through the send pool.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use quinn_proto::{
    ConnectionHandle, DatagramEvent, EcnCodepoint, Endpoint, EndpointConfig, Event, Incoming,
    Transmit, VarInt,
};

use super::app::Streams;
use super::route::{self, CID_LEN};
use super::Counters;
use crate::handler::{Datagram, Handler, Reply};
use crate::send_pool::SendOptions;

/// The largest datagram quinn builds here (its MTU discovery stops at 1452; 1500 leaves
/// room): a send slot holds `slot / MAX_SEGMENT` datagrams of a GSO train.
const MAX_SEGMENT: usize = 1500;

/// A connection and what the handler keeps beside it.
struct Conn {
    conn: quinn_proto::Connection,
    streams: Streams,
    /// `poll_timeout` after the last drive.
    timeout: Option<Instant>,
    /// In the dirty queue: to be driven at the end of the turn.
    dirty: bool,
}

/// Connection IDs whose first byte is the worker's index (see [`route`]); the other bytes
/// are a keyed PRF (SipHash-1-3 under a random key) of a counter: unlinkable to anyone
/// without the key (RFC 9000 section 5.1), and no system call per ID.
struct WorkerCids {
    worker: u8,
    key: [u8; 16],
    issued: u64,
}

impl WorkerCids {
    fn new(worker: u8) -> WorkerCids {
        let mut key = [0u8; 16];
        if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key).is_err() {
            // Without the system's randomness TLS fails anyway; the clock keeps the IDs from
            // being predictable across restarts meanwhile.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            key = nanos.to_ne_bytes();
        }
        WorkerCids {
            worker,
            key,
            issued: 0,
        }
    }
}

impl quinn_proto::ConnectionIdGenerator for WorkerCids {
    fn generate_cid(&mut self) -> quinn_proto::ConnectionId {
        use std::hash::Hasher;
        let mut hasher = siphasher::sip::SipHasher13::new_with_key(&self.key);
        hasher.write_u64(self.issued);
        self.issued += 1;
        let mut bytes = [0u8; CID_LEN];
        bytes[0] = self.worker;
        bytes[1..].copy_from_slice(&hasher.finish().to_le_bytes()[..CID_LEN - 1]);
        quinn_proto::ConnectionId::new(&bytes)
    }

    fn validate(&self, cid: &quinn_proto::ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        if cid.len() == CID_LEN && route::worker_of(cid) == Some(usize::from(self.worker)) {
            Ok(())
        } else {
            Err(quinn_proto::InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

/// One worker's QUIC endpoint (see the module docs of [`crate::quic`]).
pub struct QuicHandler {
    worker: u8,
    endpoint: Endpoint,
    server_config: Arc<quinn_proto::ServerConfig>,
    /// By `ConnectionHandle` (the endpoint's slab index).
    conns: Vec<Option<Conn>>,
    dirty: VecDeque<ConnectionHandle>,
    /// The earliest connection timeout, as of the last drive.
    earliest: Option<Instant>,
    /// An instant surely past: `next_timer` answers it while connections wait to be driven.
    epoch: Instant,
    root: Option<Arc<Path>>,
    validate_peers: bool,
    counters: Arc<Counters>,
    /// Where quinn writes a transmit before it is copied into a send slot.
    buf: Vec<u8>,
    /// Received datagrams are copied here for quinn, which decrypts in place.
    rx: BytesMut,
}

impl QuicHandler {
    pub(super) fn new(
        worker: u8,
        server_config: Arc<quinn_proto::ServerConfig>,
        reset_key: Arc<ring::hmac::Key>,
        root: Option<Arc<Path>>,
        validate_peers: bool,
        counters: Arc<Counters>,
    ) -> QuicHandler {
        let mut config = EndpointConfig::new(reset_key);
        config.cid_generator(move || Box::new(WorkerCids::new(worker)));
        // Path MTU discovery (up to quinn's 1452 B): `Quic::configure` sets don't-fragment on
        // the sockets, so a probe too large for the path is lost, not fragmented.
        let endpoint = Endpoint::new(Arc::new(config), Some(server_config.clone()), true, None);
        QuicHandler {
            worker,
            endpoint,
            server_config,
            conns: Vec::new(),
            dirty: VecDeque::new(),
            earliest: None,
            epoch: Instant::now(),
            root,
            validate_peers,
            counters,
            buf: Vec::with_capacity(64 * 1024),
            rx: BytesMut::with_capacity(64 * 1024),
        }
    }

    /// Connections this worker holds.
    pub fn connections(&self) -> usize {
        self.conns.iter().filter(|c| c.is_some()).count()
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
            && payload.len() > CID_LEN
            && route::worker_of(&payload[1..]) != Some(usize::from(self.worker));
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

    /// A new peer's Initial: a Retry first when peers must be validated, else a connection.
    fn incoming(&mut self, now: Instant, incoming: Incoming, reply: &mut Reply<'_>) {
        self.buf.clear();
        if self.validate_peers && !incoming.remote_address_validated() {
            if incoming.may_retry() {
                match self.endpoint.retry(incoming, &mut self.buf) {
                    Ok(transmit) => {
                        self.counters.add(|c| &c.retries);
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
        match self.endpoint.accept(
            incoming,
            now,
            &mut self.buf,
            Some(self.server_config.clone()),
        ) {
            Ok((ch, conn)) => {
                self.counters.add(|c| &c.accepted);
                if self.conns.len() <= ch.0 {
                    self.conns.resize_with(ch.0 + 1, || None);
                }
                let slot = &mut self.conns[ch.0];
                let c = slot.insert(Conn {
                    conn,
                    streams: Streams::default(),
                    timeout: None,
                    dirty: false,
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

    /// Runs connection `ch`'s events and polls its transmits while a send slot is free.
    /// Returns `false` when it stopped for want of a slot (the connection stays dirty).
    fn drive(&mut self, ch: ConnectionHandle, now: Instant, reply: &mut Reply<'_>) -> bool {
        let Some(Some(c)) = self.conns.get_mut(ch.0) else {
            return true;
        };
        loop {
            let mut any = false;
            while let Some(event) = c.conn.poll() {
                any = true;
                match event {
                    Event::Stream(event) => {
                        let root = self.root.as_deref();
                        c.streams.on_event(&mut c.conn, event, root, &self.counters)
                    }
                    Event::ConnectionLost { .. } => c.streams.clear(),
                    Event::HandshakeDataReady
                    | Event::Connected
                    | Event::DatagramReceived
                    | Event::DatagramsUnblocked => {}
                }
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
        let max_datagrams = (reply.max_len() / MAX_SEGMENT).clamp(1, 64);
        loop {
            if reply.capacity() == 0 {
                c.timeout = c.conn.poll_timeout();
                return false;
            }
            self.buf.clear();
            match c.conn.poll_transmit(now, max_datagrams, &mut self.buf) {
                Some(transmit) => send(reply, &transmit, &self.buf),
                None => break,
            }
        }
        c.timeout = c.conn.poll_timeout();
        c.dirty = false;
        if c.conn.is_drained() {
            self.conns[ch.0] = None;
            self.counters.add(|c| &c.drained);
        }
        true
    }
}

fn mark_dirty(dirty: &mut VecDeque<ConnectionHandle>, c: &mut Conn, ch: ConnectionHandle) {
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

impl Handler for QuicHandler {
    /// quinn takes a GRO train's datagrams one by one; taking the train whole saves the
    /// engine's per-datagram split and backpressure checks (the handler never answers a
    /// datagram directly but for stateless responses).
    const WHOLE_TRAINS: bool = true;

    fn on_datagram(&mut self, d: &Datagram<'_>, reply: &mut Reply<'_>) {
        let now = Instant::now();
        self.receive(now, d.peer, d.local, d.ecn, d.payload, reply);
    }

    fn on_train(&mut self, train: &Datagram<'_>, segment_size: usize, reply: &mut Reply<'_>) {
        let now = Instant::now();
        for payload in train.payload.chunks(segment_size.max(1)) {
            self.receive(now, train.peer, train.local, train.ecn, payload, reply);
        }
    }

    fn next_timer(&mut self) -> Option<Instant> {
        if self.dirty.is_empty() {
            self.earliest
        } else {
            Some(self.epoch)
        }
    }

    fn on_timer(&mut self, now: Instant, reply: &mut Reply<'_>) {
        if self.earliest.is_some_and(|t| t <= now) {
            for (index, slot) in self.conns.iter_mut().enumerate() {
                if let Some(c) = slot {
                    if c.timeout.is_some_and(|t| t <= now) {
                        c.conn.handle_timeout(now);
                        mark_dirty(&mut self.dirty, c, ConnectionHandle(index));
                    }
                }
            }
        }
        // Each dirty connection once, in turn; one that runs out of slots goes first next
        // time, so a busy connection cannot starve the rest for long.
        for _ in 0..self.dirty.len() {
            let Some(ch) = self.dirty.pop_front() else {
                break;
            };
            if !self.drive(ch, now, reply) {
                self.dirty.push_front(ch);
                self.counters.add(|c| &c.blocked);
                break;
            }
        }
        self.earliest = self.conns.iter().flatten().filter_map(|c| c.timeout).min();
    }

    /// Closes every connection with an application CONNECTION_CLOSE (code 0, "server
    /// shutting down") and sends the close packets, so clients learn at once instead of
    /// waiting out their idle timeout. A connection whose close finds no free send slot is
    /// closed all the same; its client then times out as before.
    fn on_shutdown(&mut self, now: Instant, reply: &mut Reply<'_>) {
        for index in 0..self.conns.len() {
            if let Some(c) = self.conns[index].as_mut() {
                c.conn.close(
                    now,
                    VarInt::from_u32(0),
                    Bytes::from_static(b"server shutting down"),
                );
                self.counters.add(|c| &c.closed_at_shutdown);
                self.drive(ConnectionHandle(index), now, reply);
            }
        }
    }
}
