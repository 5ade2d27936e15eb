//! The connection handle lent to [`super::App`] callbacks: a thin wrapper over
//! `quinn_proto::Connection` whose streams read into a caller's buffer or hand out quinn's
//! own `Bytes` (no copy), write with backpressure, and report a reset or a stop as an event
//! of the app's, not a panic or a silent drop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn_proto::{Dir, FinishError, ReadError, ReadableError, SendDatagramError, Side, VarInt};

use super::remote::{Inbox, ReadyList, Remote};

/// A stream of a connection (RFC 9000 section 2.1: the low two bits say who opened it and
/// whether it is bidirectional).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub(super) quinn_proto::StreamId);

impl StreamId {
    /// The stream ID as sent on the wire.
    pub fn value(self) -> u64 {
        VarInt::from(self.0).into_inner()
    }

    /// Bidirectional (else unidirectional).
    pub fn is_bidi(self) -> bool {
        self.0.dir() == Dir::Bi
    }

    /// Opened by the client (else by this server).
    pub fn is_client_initiated(self) -> bool {
        self.0.initiator() == Side::Client
    }

    /// Its index among the streams of its kind (0 for the first one opened).
    pub fn index(self) -> u64 {
        self.0.index()
    }

    /// Whether the server can read it: bidirectional, or opened by the client.
    fn readable(self) -> bool {
        self.is_bidi() || self.is_client_initiated()
    }

    /// Whether the server can write it: bidirectional, or opened by the server.
    fn writable(self) -> bool {
        self.is_bidi() || !self.is_client_initiated()
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.value())
    }
}

/// A connection's identity on its worker, unique for the worker's lifetime (a key for the
/// app's own tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub(super) u64);

impl ConnId {
    /// The number (a counter per worker, from 0).
    pub fn value(self) -> u64 {
        self.0
    }
}

/// What a read found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recv<T> {
    /// Data, in order.
    Data(T),
    /// Nothing now: [`super::App::on_readable`] comes when more has arrived.
    Blocked,
    /// The peer finished the stream and every byte has been read.
    Finished,
}

/// Why a stream operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamError {
    /// The peer reset the stream with this code (reading; [`super::App::on_reset`] follows).
    Reset(u64),
    /// The peer stopped the stream with this code (writing).
    Stopped(u64),
    /// The stream is not open in that direction: unknown, already finished, reset, stopped,
    /// or the wrong direction for this side.
    Closed,
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamError::Reset(code) => write!(f, "the peer reset the stream (code {code})"),
            StreamError::Stopped(code) => write!(f, "the peer stopped the stream (code {code})"),
            StreamError::Closed => f.write_str("the stream is closed"),
        }
    }
}

impl std::error::Error for StreamError {}

/// Why an unreliable datagram was not queued.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DatagramError {
    /// The send buffer is full: the datagram comes back;
    /// [`super::App::on_datagrams_unblocked`] says when to try again.
    Blocked(Bytes),
    /// Longer than the peer accepts ([`Connection::max_datagram_size`]).
    TooLarge,
    /// The peer does not take datagrams, or this server has them off
    /// ([`super::TransportConfig::datagram_receive_buffer`] `None`).
    Unsupported,
    /// The connection is closed.
    ConnectionLost,
}

impl std::fmt::Display for DatagramError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DatagramError::Blocked(_) => "the datagram send buffer is full",
            DatagramError::TooLarge => "the datagram is larger than the peer accepts",
            DatagramError::Unsupported => "datagrams are not supported on this connection",
            DatagramError::ConnectionLost => "the connection is closed",
        })
    }
}

impl std::error::Error for DatagramError {}

/// What [`Connection::write_chunks`] took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Written {
    /// Bytes taken.
    pub bytes: usize,
    /// Chunks taken whole from the front; a chunk taken in part was advanced in place.
    pub chunks: usize,
}

/// A connection's path and recovery figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnStats {
    /// Smoothed round-trip time.
    pub rtt: Duration,
    /// The congestion window, in bytes.
    pub cwnd: u64,
    /// Packets sent.
    pub sent_packets: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    /// Bytes of packets declared lost.
    pub lost_bytes: u64,
    /// Congestion events (window reductions).
    pub congestion_events: u64,
    /// The path MTU in use (UDP payload bytes).
    pub mtu: u16,
}

/// What the worker keeps per connection beside quinn's state and the app's.
pub(super) struct Extra<M> {
    pub id: ConnId,
    /// The app's own timer ([`Connection::set_timer`]).
    pub timer: Option<Instant>,
    /// Resets a read ran into, reported as `on_reset` after the callback.
    pub resets: Vec<(StreamId, u64)>,
    /// Streams whose end a read reached after data: the next read says `Finished`.
    pub ended: Vec<StreamId>,
    /// The app closed the connection with this code; `on_closed` is still to come.
    pub closed_by_app: Option<u64>,
    /// Created by the first [`Connection::remote`].
    pub inbox: Option<Arc<Inbox<M>>>,
    /// The slot of the connection in its worker's table (for the inbox).
    pub slot: usize,
    pub alpn: Option<Box<[u8]>>,
    pub sni: Option<Box<str>>,
    /// The ClientHello resumed a session of the server's cache.
    pub resumed: bool,
}

impl<M> Extra<M> {
    pub fn new(id: ConnId, slot: usize) -> Extra<M> {
        Extra {
            id,
            timer: None,
            resets: Vec::new(),
            ended: Vec::new(),
            closed_by_app: None,
            inbox: None,
            slot,
            alpn: None,
            sni: None,
            resumed: false,
        }
    }
}

/// One connection, lent to an [`super::App`] callback. `M` is the app's
/// [`super::App::Message`].
pub struct Connection<'a, M: Send + 'static = ()> {
    pub(super) quinn: &'a mut quinn_proto::Connection,
    pub(super) extra: &'a mut Extra<M>,
    pub(super) now: Instant,
    pub(super) worker: usize,
    pub(super) ready: &'a Arc<ReadyList<M>>,
}

impl<M: Send + 'static> Connection<'_, M> {
    /// The connection's identity on its worker.
    pub fn id(&self) -> ConnId {
        self.extra.id
    }

    /// Index of the worker that owns the connection.
    pub fn worker(&self) -> usize {
        self.worker
    }

    /// The instant the worker is handling (read once per turn).
    pub fn now(&self) -> Instant {
        self.now
    }

    /// The peer's address (it changes when the peer migrates).
    pub fn remote_address(&self) -> SocketAddr {
        self.quinn.remote_address()
    }

    /// The negotiated application protocol (empty before the handshake data is ready).
    pub fn alpn(&self) -> &[u8] {
        self.extra.alpn.as_deref().unwrap_or_default()
    }

    /// The server name the client asked for (TLS SNI).
    pub fn sni(&self) -> Option<&str> {
        self.extra.sni.as_deref()
    }

    /// The server accepted the client's 0-RTT data (the client resumed a session with early
    /// data and the server took it).
    pub fn accepted_0rtt(&self) -> bool {
        super::sessions::accepted_0rtt(self.quinn)
    }

    /// The client resumed a session (a ticket of this server's session cache, or of the
    /// process it took over).
    pub fn resumed(&self) -> bool {
        self.extra.resumed
    }

    /// Data read now arrived as 0-RTT early data: replayable (RFC 9001 section 9.2), so
    /// answer only what is safe to repeat. True from the first Initial until the handshake
    /// completes, on a connection that accepted 0-RTT.
    pub fn is_early_data(&self) -> bool {
        super::sessions::is_early_data(self.quinn)
    }

    /// The connection is closed (by either side, or lost): streams take nothing more.
    pub fn is_closed(&self) -> bool {
        self.quinn.is_closed()
    }

    /// Opens a bidirectional stream of this server's; `None` while the peer's stream limit
    /// is reached ([`super::App::on_streams_available`] says when to try again).
    pub fn open_bi(&mut self) -> Option<StreamId> {
        self.quinn.streams().open(Dir::Bi).map(StreamId)
    }

    /// Opens a unidirectional stream of this server's (see [`Connection::open_bi`]).
    pub fn open_uni(&mut self) -> Option<StreamId> {
        self.quinn.streams().open(Dir::Uni).map(StreamId)
    }

    /// Reads from stream `id` into `buf`, as much as is there and fits. A read that reaches
    /// the end after data returns the data; the next read returns `Finished`. Read until
    /// `Blocked` or `Finished`: [`super::App::on_readable`] comes again only for data that
    /// arrives after that.
    pub fn read(&mut self, id: StreamId, buf: &mut [u8]) -> Result<Recv<usize>, StreamError> {
        if let Some(end) = self.take_ended(id) {
            return Ok(end);
        }
        if !id.readable() {
            return Err(StreamError::Closed);
        }
        let mut stream = self.quinn.recv_stream(id.0);
        let mut chunks = stream.read(true).map_err(readable_error)?;
        let mut filled = 0;
        let result = loop {
            if filled == buf.len() {
                break Ok(Recv::Data(filled));
            }
            match chunks.next(buf.len() - filled) {
                Ok(Some(chunk)) => {
                    let len = chunk.bytes.len();
                    buf[filled..filled + len].copy_from_slice(&chunk.bytes);
                    filled += len;
                }
                Ok(None) if filled > 0 => {
                    self.extra.ended.push(id);
                    break Ok(Recv::Data(filled));
                }
                Ok(None) => break Ok(Recv::Finished),
                Err(ReadError::Blocked) if filled > 0 => break Ok(Recv::Data(filled)),
                Err(ReadError::Blocked) => break Ok(Recv::Blocked),
                Err(ReadError::Reset(code)) => {
                    // A reset stream has no buffered data left (quinn discards it), so
                    // nothing was copied in this call.
                    self.extra.resets.push((id, code.into_inner()));
                    break Err(StreamError::Reset(code.into_inner()));
                }
            }
        };
        // The flow-control credit this read frees is sent with the connection's next
        // transmit, which the worker polls after every callback anyway.
        let _ = chunks.finalize();
        result
    }

    /// Takes the next chunk of stream `id`, at most `max_len` bytes, as quinn holds it: no
    /// copy. `Finished` once every byte has been taken.
    pub fn read_chunk(&mut self, id: StreamId, max_len: usize) -> Result<Recv<Bytes>, StreamError> {
        if let Some(end) = self.take_ended(id) {
            return Ok(match end {
                Recv::Data(_) | Recv::Finished => Recv::Finished,
                Recv::Blocked => Recv::Blocked,
            });
        }
        if !id.readable() {
            return Err(StreamError::Closed);
        }
        let mut stream = self.quinn.recv_stream(id.0);
        let mut chunks = stream.read(true).map_err(readable_error)?;
        let result = match chunks.next(max_len) {
            Ok(Some(chunk)) => Ok(Recv::Data(chunk.bytes)),
            Ok(None) => Ok(Recv::Finished),
            Err(ReadError::Blocked) => Ok(Recv::Blocked),
            Err(ReadError::Reset(code)) => {
                self.extra.resets.push((id, code.into_inner()));
                Err(StreamError::Reset(code.into_inner()))
            }
        };
        let _ = chunks.finalize();
        result
    }

    /// A stream whose end an earlier read reached: `Finished` now.
    fn take_ended(&mut self, id: StreamId) -> Option<Recv<usize>> {
        let at = self.extra.ended.iter().position(|&e| e == id)?;
        self.extra.ended.swap_remove(at);
        Some(Recv::Finished)
    }

    /// Writes what fits of `data` on stream `id` and returns how many bytes were taken (0
    /// when none fit). When fewer than all were taken, [`super::App::on_writable`] comes
    /// once more fits.
    pub fn write(&mut self, id: StreamId, data: &[u8]) -> Result<usize, StreamError> {
        if !id.writable() {
            return Err(StreamError::Closed);
        }
        let mut stream = self.quinn.send_stream(id.0);
        let mut taken = 0;
        // quinn registers a stream for its Writable event only when a write finds it
        // blocked: after a partial write, writing the rest once more makes sure it is.
        while taken < data.len() {
            match stream.write(&data[taken..]) {
                Ok(0) => break,
                Ok(n) => taken += n,
                Err(quinn_proto::WriteError::Blocked) => break,
                Err(e) if taken == 0 => return Err(write_error(e)),
                Err(_) => break,
            }
        }
        Ok(taken)
    }

    /// Writes what fits of `chunks` on stream `id` without copying them: chunks taken whole
    /// are emptied, one taken in part is advanced in place. As [`Connection::write`], a
    /// writable event follows when not all was taken.
    pub fn write_chunks(
        &mut self,
        id: StreamId,
        chunks: &mut [Bytes],
    ) -> Result<Written, StreamError> {
        if !id.writable() {
            return Err(StreamError::Closed);
        }
        let mut stream = self.quinn.send_stream(id.0);
        let mut written = Written::default();
        while written.chunks < chunks.len() {
            match stream.write_chunks(&mut chunks[written.chunks..]) {
                Ok(w) if w.bytes == 0 && w.chunks == 0 => break,
                Ok(w) => {
                    written.bytes += w.bytes;
                    written.chunks += w.chunks;
                }
                Err(quinn_proto::WriteError::Blocked) => break,
                Err(e) if written.bytes == 0 => return Err(write_error(e)),
                Err(_) => break,
            }
        }
        Ok(written)
    }

    /// [`Connection::write_chunks`] from the front of `queue`: the chunks taken whole leave
    /// it, one taken in part stays at its front, advanced.
    pub fn write_queue(
        &mut self,
        id: StreamId,
        queue: &mut std::collections::VecDeque<Bytes>,
    ) -> Result<Written, StreamError> {
        let written = self.write_chunks(id, queue.make_contiguous())?;
        queue.drain(..written.chunks);
        Ok(written)
    }

    /// Finishes stream `id`: everything written is sent, then the end.
    /// [`super::App::on_finished`] comes when the peer has acknowledged all of it.
    pub fn finish(&mut self, id: StreamId) -> Result<(), StreamError> {
        if !id.writable() {
            return Err(StreamError::Closed);
        }
        self.quinn.send_stream(id.0).finish().map_err(|e| match e {
            FinishError::Stopped(code) => StreamError::Stopped(code.into_inner()),
            FinishError::ClosedStream => StreamError::Closed,
        })
    }

    /// Abandons sending on stream `id` with `code` (RESET_STREAM): what was written and not
    /// yet acknowledged is dropped.
    pub fn reset(&mut self, id: StreamId, code: u64) -> Result<(), StreamError> {
        if !id.writable() {
            return Err(StreamError::Closed);
        }
        let code = VarInt::from_u64(code).unwrap_or(VarInt::MAX);
        self.quinn
            .send_stream(id.0)
            .reset(code)
            .map_err(|_| StreamError::Closed)
    }

    /// Asks the peer to stop sending on stream `id` with `code` (STOP_SENDING); what it
    /// sent and was not read is discarded.
    pub fn stop_sending(&mut self, id: StreamId, code: u64) -> Result<(), StreamError> {
        if !id.readable() {
            return Err(StreamError::Closed);
        }
        self.extra.ended.retain(|&e| e != id);
        let code = VarInt::from_u64(code).unwrap_or(VarInt::MAX);
        self.quinn
            .recv_stream(id.0)
            .stop(code)
            .map_err(|_| StreamError::Closed)
    }

    /// Queues an unreliable datagram (RFC 9221). A full send buffer gives it back
    /// ([`DatagramError::Blocked`]) rather than dropping an older one.
    pub fn send_datagram(&mut self, data: Bytes) -> Result<(), DatagramError> {
        if self.quinn.is_closed() {
            return Err(DatagramError::ConnectionLost);
        }
        self.quinn
            .datagrams()
            .send(data, false)
            .map_err(|e| match e {
                SendDatagramError::Blocked(data) => DatagramError::Blocked(data),
                SendDatagramError::TooLarge => DatagramError::TooLarge,
                SendDatagramError::UnsupportedByPeer | SendDatagramError::Disabled => {
                    DatagramError::Unsupported
                }
            })
    }

    /// The largest datagram the peer takes now (`None`: datagrams unsupported).
    pub fn max_datagram_size(&mut self) -> Option<usize> {
        self.quinn.datagrams().max_size()
    }

    /// Closes the connection with an application CONNECTION_CLOSE carrying `code` and
    /// `reason`. Streams take nothing more; [`super::App::on_closed`] follows once this
    /// callback has returned, with [`super::CloseReason::Local`].
    pub fn close(&mut self, code: u64, reason: &[u8]) {
        if self.quinn.is_closed() {
            return;
        }
        let code = VarInt::from_u64(code).unwrap_or(VarInt::MAX);
        self.quinn
            .close(self.now, code, Bytes::copy_from_slice(reason));
        self.extra.closed_by_app = Some(code.into_inner());
    }

    /// The connection's path and recovery figures.
    pub fn stats(&self) -> ConnStats {
        let stats = self.quinn.stats();
        ConnStats {
            rtt: stats.path.rtt,
            cwnd: stats.path.cwnd,
            sent_packets: stats.path.sent_packets,
            lost_packets: stats.path.lost_packets,
            lost_bytes: stats.path.lost_bytes,
            congestion_events: stats.path.congestion_events,
            mtu: stats.path.current_mtu,
        }
    }

    /// Sets the app's timer of this connection ([`super::App::on_timer`] at `at`), replacing
    /// the one set before; `None` clears it.
    pub fn set_timer(&mut self, at: Option<Instant>) {
        self.extra.timer = at;
    }

    /// A thread-safe handle that posts [`super::App::Message`]s to this connection.
    pub fn remote(&mut self) -> Remote<M> {
        let slot = self.extra.slot;
        let inbox = self
            .extra
            .inbox
            .get_or_insert_with(|| Arc::new(Inbox::new(slot)));
        Remote::new(inbox.clone(), self.ready.clone(), self.extra.id)
    }
}

fn readable_error(e: ReadableError) -> StreamError {
    match e {
        // An ordered read after unordered ones: this wrapper only reads in order.
        ReadableError::ClosedStream | ReadableError::IllegalOrderedRead => StreamError::Closed,
    }
}

fn write_error(e: quinn_proto::WriteError) -> StreamError {
    match e {
        quinn_proto::WriteError::Stopped(code) => StreamError::Stopped(code.into_inner()),
        quinn_proto::WriteError::Blocked | quinn_proto::WriteError::ClosedStream => {
            StreamError::Closed
        }
    }
}
