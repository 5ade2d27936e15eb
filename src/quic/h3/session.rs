//! One HTTP/3 connection on the App API (RFC 9114): the control streams both ways, the
//! QPACK streams (read and discarded: no dynamic table, see `qpack`), and request streams
//! read frame by frame into an [`http::Request`] for the [`Service`], whose response is
//! written back under flow control, its body pieces fetched from the blocking pool as the
//! peer takes them.
//!
//! Errors follow RFC 9114 section 8: a malformed request is a stream error (the stream reset
//! and its reading stopped with H3_MESSAGE_ERROR); a frame where none may be, a second
//! control stream, a closed critical stream are connection errors (CONNECTION_CLOSE with the
//! H3 code). Bad input is counted, never a panic.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::panic::AssertUnwindSafe;

use bytes::Bytes;
use http::{header, Method, Response, StatusCode};

use super::frame::{self, code};
use super::parse::{build_request, connection_specific, control_frames, H3Error, RequestFrames};
use super::pool::BlockingPool;
use super::qpack;
use super::service::{status_only, Body, BodySource, Handled, RequestInfo, Service};
use crate::quic::conn::{Connection, Recv, StreamId};
use crate::quic::Counters;

/// Bytes read from a stream at a time.
const READ_CHUNK: usize = 64 * 1024;
/// A body piece asked of a [`BodySource`]; the next is asked while this one is being sent,
/// so a streamed response holds at most about two pieces besides quinn's send buffer.
/// Measured on the 256 MiB download (`make bench-quic`, h3-bulk): 64 KiB pieces gave 0.86 x
/// the h3 crate's throughput, 256 KiB 1.31 x (a pool trip per piece is the cost).
pub(super) const BODY_CHUNK: usize = 256 * 1024;

/// What the blocking pool posts back to a connection: a response a [`Handled::Blocking`]
/// made, or a body piece. Opaque: only [`super::H3App`] makes and reads them.
pub struct H3Message(Posted);

enum Posted {
    /// `None`: the service's blocking work panicked (answered 500).
    Response(StreamId, Option<Response<Body>>),
    /// The source comes back with its piece (`Err` for an error or a panic).
    Piece(StreamId, Box<dyn BodySource>, io::Result<Option<Bytes>>),
}

/// What a connection's callbacks need besides the connection: the service, the pool, the
/// worker's counters.
pub(super) struct Ctx<'a, S> {
    pub service: &'a mut S,
    pub pool: &'a BlockingPool,
    pub counters: &'a Counters,
}

/// A peer's unidirectional stream.
enum Uni {
    /// Its type is not read yet: the bytes so far.
    Untyped(Vec<u8>),
    /// The peer's control stream: its unparsed bytes, and whether SETTINGS came.
    Control { buf: Vec<u8>, settings: bool },
    /// A QPACK encoder or decoder stream: read and discarded (critical: must stay open).
    Qpack,
}

/// A request stream's progress.
#[derive(Default)]
struct RequestStream {
    /// The request's frames as they arrive.
    frames: RequestFrames,
    /// The peer finished its side.
    read_done: bool,
    /// A HEAD request: no body goes out.
    head: bool,
    /// The response is waiting on the blocking pool (the service's work).
    awaiting_response: bool,
    /// The response's HEADERS frame is queued.
    responded: bool,
    /// Response bytes to write, in order.
    out: VecDeque<Bytes>,
    /// The body still to read, when not on the pool.
    source: Option<Box<dyn BodySource>>,
    /// A body piece is being read on the pool (the source is with it).
    piece_pending: bool,
    /// The body has no more pieces (or never had a source).
    body_done: bool,
    finished: bool,
}

impl RequestStream {
    fn out_len(&self) -> usize {
        self.out.iter().map(Bytes::len).sum()
    }
}

/// One HTTP/3 connection's state ([`super::H3App`]'s per-connection type).
#[derive(Default)]
pub struct H3Conn {
    /// Our control stream: opened, and what of its preface is still to write.
    control: Option<(StreamId, Vec<u8>)>,
    peer_control: bool,
    peer_encoder: bool,
    peer_decoder: bool,
    uni: HashMap<StreamId, Uni>,
    requests: HashMap<StreamId, RequestStream>,
    /// A connection error was raised: nothing more is done.
    failed: bool,
}

impl H3Conn {
    /// Opens our control stream with SETTINGS (again later if the peer's limit says no now).
    pub(super) fn open_control<M: Send + 'static>(&mut self, conn: &mut Connection<'_, M>) {
        if self.control.is_some() || self.failed {
            return;
        }
        let Some(id) = conn.open_uni() else {
            return;
        };
        let mut preface = Vec::with_capacity(16);
        frame::put_varint(&mut preface, frame::STREAM_CONTROL);
        frame::server_settings(&mut preface);
        self.control = Some((id, preface));
        self.write_control(conn);
    }

    fn write_control<M: Send + 'static>(&mut self, conn: &mut Connection<'_, M>) {
        if let Some((id, rest)) = self.control.as_mut() {
            if !rest.is_empty() {
                if let Ok(n) = conn.write(*id, rest) {
                    rest.drain(..n);
                }
            }
        }
    }

    pub(super) fn opened(&mut self, id: StreamId) {
        if id.is_bidi() {
            self.requests.insert(id, RequestStream::default());
        } else {
            self.uni.insert(id, Uni::Untyped(Vec::new()));
        }
    }

    pub(super) fn forget(&mut self, id: StreamId) {
        self.requests.remove(&id);
    }

    /// Raises a connection error (RFC 9114 section 8): CONNECTION_CLOSE with `error`.
    fn fail<M: Send + 'static>(
        &mut self,
        conn: &mut Connection<'_, M>,
        counters: &Counters,
        error: u32,
        why: &str,
    ) {
        if !self.failed {
            self.failed = true;
            counters.add(|c| &c.h3_errors);
            conn.close(u64::from(error), why.as_bytes());
        }
        self.requests.clear();
        self.uni.clear();
    }

    /// A stream error: the request stream reset and its reading stopped with `error`.
    fn refuse_stream<M: Send + 'static>(
        &mut self,
        conn: &mut Connection<'_, M>,
        counters: &Counters,
        id: StreamId,
        error: u32,
    ) {
        counters.add(|c| &c.h3_errors);
        let _ = conn.reset(id, u64::from(error));
        let _ = conn.stop_sending(id, u64::from(error));
        self.requests.remove(&id);
    }

    /// Peer stream `id` ended (closed or reset). A control or QPACK stream must stay open
    /// (RFC 9114 section 6.2.1, RFC 9204 section 4.2): its end is a connection error. Returns
    /// whether `id` was one of the peer's unidirectional streams.
    fn critical_stream_ended<M: Send + 'static>(
        &mut self,
        conn: &mut Connection<'_, M>,
        counters: &Counters,
        id: StreamId,
        why: &str,
    ) -> bool {
        match self.uni.remove(&id) {
            None => false,
            Some(Uni::Untyped(_)) => true,
            Some(_) => {
                self.fail(conn, counters, code::CLOSED_CRITICAL_STREAM, why);
                true
            }
        }
    }

    /// The peer reset its side of `id`.
    pub(super) fn peer_reset<M: Send + 'static>(
        &mut self,
        conn: &mut Connection<'_, M>,
        counters: &Counters,
        id: StreamId,
    ) {
        if !self.critical_stream_ended(conn, counters, id, "critical stream reset")
            && self.requests.remove(&id).is_some()
        {
            // The request is abandoned: so is its response.
            let _ = conn.reset(id, u64::from(code::REQUEST_CANCELLED));
        }
    }

    /// The peer stopped `id`: its response is abandoned, both halves end.
    pub(super) fn stopped<M: Send + 'static>(
        &mut self,
        conn: &mut Connection<'_, M>,
        id: StreamId,
    ) {
        if self.requests.remove(&id).is_some() {
            let _ = conn.reset(id, u64::from(code::REQUEST_CANCELLED));
            let _ = conn.stop_sending(id, u64::from(code::NO_ERROR));
        }
    }

    /// Stream `id` is readable or writable: make what progress can be made.
    pub(super) fn pump<S: Service>(
        &mut self,
        conn: &mut Connection<'_, H3Message>,
        id: StreamId,
        ctx: &mut Ctx<'_, S>,
    ) {
        if self.failed {
            return;
        }
        if self.control.as_ref().is_some_and(|(c, _)| *c == id) {
            self.write_control(conn);
        } else if self.uni.contains_key(&id) {
            self.read_uni(conn, id, ctx.counters);
        } else if self.requests.contains_key(&id) {
            self.pump_request(conn, id, ctx);
        }
    }

    /// Reads a peer's unidirectional stream: its type, then its frames (control) or nothing
    /// of interest (QPACK).
    fn read_uni<M: Send + 'static>(
        &mut self,
        conn: &mut Connection<'_, M>,
        id: StreamId,
        counters: &Counters,
    ) {
        loop {
            let chunk = match conn.read_chunk(id, READ_CHUNK) {
                Ok(Recv::Data(chunk)) => chunk,
                Ok(Recv::Blocked) => return,
                Ok(Recv::Finished) | Err(_) => {
                    // A critical stream must stay open (RFC 9114 section 6.2.1, RFC 9204
                    // section 4.2).
                    self.critical_stream_ended(conn, counters, id, "critical stream closed");
                    return;
                }
            };
            let Some(uni) = self.uni.get_mut(&id) else {
                return;
            };
            let mut data: &[u8] = &chunk;
            if let Uni::Untyped(so_far) = uni {
                so_far.extend_from_slice(data);
                let Some((kind, len)) = frame::varint(so_far) else {
                    continue;
                };
                let rest = so_far.split_off(len);
                let duplicate = match kind {
                    frame::STREAM_CONTROL => std::mem::replace(&mut self.peer_control, true),
                    frame::STREAM_QPACK_ENCODER => std::mem::replace(&mut self.peer_encoder, true),
                    frame::STREAM_QPACK_DECODER => std::mem::replace(&mut self.peer_decoder, true),
                    frame::STREAM_PUSH => {
                        // Only a server pushes (RFC 9114 section 6.2.2).
                        return self.fail(
                            conn,
                            counters,
                            code::STREAM_CREATION_ERROR,
                            "push stream from a client",
                        );
                    }
                    _ => {
                        // Unknown (or greased) stream types are ignored (section 6.2.3).
                        self.uni.remove(&id);
                        let _ = conn.stop_sending(id, u64::from(code::STREAM_CREATION_ERROR));
                        return;
                    }
                };
                if duplicate {
                    return self.fail(
                        conn,
                        counters,
                        code::STREAM_CREATION_ERROR,
                        "a second critical stream",
                    );
                }
                *uni = if kind == frame::STREAM_CONTROL {
                    Uni::Control {
                        buf: rest,
                        settings: false,
                    }
                } else {
                    Uni::Qpack
                };
                data = &[];
            }
            if let Uni::Control { buf, settings } = uni {
                buf.extend_from_slice(data);
                if let Err((error, why)) = control_frames(buf, settings) {
                    return self.fail(conn, counters, error, why);
                }
            }
        }
    }

    /// Reads the request on `id`, hands it to the service, and writes the response.
    fn pump_request<S: Service>(
        &mut self,
        conn: &mut Connection<'_, H3Message>,
        id: StreamId,
        ctx: &mut Ctx<'_, S>,
    ) {
        loop {
            let Some(stream) = self.requests.get_mut(&id) else {
                return;
            };
            let mut progress = false;
            while !stream.read_done {
                match conn.read_chunk(id, READ_CHUNK) {
                    Ok(Recv::Data(chunk)) => {
                        progress = true;
                        match stream.frames.feed(&chunk) {
                            Ok(None) => {}
                            Ok(Some(fields)) => {
                                if let Err(e) = self.start(conn, id, fields, ctx) {
                                    return self.fail_or_refuse(conn, id, e, ctx.counters);
                                }
                                // `start` may have answered: look the stream up again.
                                break;
                            }
                            Err(e) => return self.fail_or_refuse(conn, id, e, ctx.counters),
                        }
                    }
                    Ok(Recv::Finished) => {
                        progress = true;
                        stream.read_done = true;
                        if !stream.frames.headed {
                            // Ended before its HEADERS: nothing to answer.
                            let e = H3Error::Stream(code::REQUEST_INCOMPLETE);
                            return self.fail_or_refuse(conn, id, e, ctx.counters);
                        }
                    }
                    Ok(Recv::Blocked) => break,
                    // Reset: `on_reset` follows.
                    Err(_) => return,
                }
            }
            let Some(stream) = self.requests.get_mut(&id) else {
                return;
            };
            if !stream.out.is_empty() {
                match conn.write_queue(id, &mut stream.out) {
                    Ok(written) => {
                        progress |= written.bytes > 0;
                    }
                    Err(_) => {
                        self.requests.remove(&id);
                        return;
                    }
                }
            }
            // Ask for the next piece while this one drains, so the pipe stays full.
            if stream.source.is_some() && !stream.piece_pending && stream.out_len() <= BODY_CHUNK {
                let source = stream.source.take().expect("checked");
                stream.piece_pending = true;
                if !fetch_piece(ctx.pool, conn, id, source) {
                    ctx.counters.add(|c| &c.h3_busy);
                    busy_log();
                    let _ = conn.reset(id, u64::from(code::INTERNAL_ERROR));
                    self.requests.remove(&id);
                    return;
                }
            }
            let complete = stream.responded && stream.body_done && !stream.piece_pending;
            if complete && stream.out.is_empty() && !stream.finished {
                stream.finished = true;
                ctx.counters.add(|c| &c.h3_responses);
                if conn.finish(id).is_err() {
                    self.requests.remove(&id);
                    return;
                }
            }
            if !progress {
                return;
            }
        }
    }

    fn fail_or_refuse<M: Send + 'static>(
        &mut self,
        conn: &mut Connection<'_, M>,
        id: StreamId,
        error: H3Error,
        counters: &Counters,
    ) {
        match error {
            H3Error::Stream(code) => self.refuse_stream(conn, counters, id, code),
            H3Error::Connection(code, why) => self.fail(conn, counters, code, why),
        }
    }

    /// The request's HEADERS came: builds the request and gives it to the service (or
    /// answers it here: 425 for an unsafe method in early data).
    fn start<S: Service>(
        &mut self,
        conn: &mut Connection<'_, H3Message>,
        id: StreamId,
        fields: qpack::Fields,
        ctx: &mut Ctx<'_, S>,
    ) -> Result<(), H3Error> {
        let request = build_request(fields).map_err(|()| H3Error::Stream(code::MESSAGE_ERROR))?;
        ctx.counters.add(|c| &c.h3_requests);
        let early_data = conn.is_early_data();
        let safe = matches!(*request.method(), Method::GET | Method::HEAD);
        if let Some(stream) = self.requests.get_mut(&id) {
            stream.head = *request.method() == Method::HEAD;
        }
        if early_data && !safe {
            // RFC 8470 section 5.2: the client retries after the handshake.
            ctx.counters.add(|c| &c.h3_too_early);
            self.respond(id, status_only(StatusCode::TOO_EARLY));
            return Ok(());
        }
        let info = RequestInfo {
            early_data,
            remote: conn.remote_address(),
            worker: conn.worker(),
        };
        match ctx.service.call(request, &info) {
            Handled::Respond(response) => self.respond(id, response),
            Handled::Blocking(work) => {
                let remote = conn.remote();
                let job = Box::new(move || {
                    let response = std::panic::catch_unwind(AssertUnwindSafe(work)).ok();
                    let _ = remote.post(H3Message(Posted::Response(id, response)));
                });
                if ctx.pool.submit(job).is_ok() {
                    if let Some(stream) = self.requests.get_mut(&id) {
                        stream.awaiting_response = true;
                    }
                } else {
                    ctx.counters.add(|c| &c.h3_busy);
                    busy_log();
                    self.respond(id, status_only(StatusCode::SERVICE_UNAVAILABLE));
                }
            }
        }
        Ok(())
    }

    /// Queues `response`'s HEADERS and what there is of its body.
    fn respond(&mut self, id: StreamId, response: Response<Body>) {
        let Some(stream) = self.requests.get_mut(&id) else {
            return;
        };
        stream.awaiting_response = false;
        stream.responded = true;
        let (parts, body) = response.into_parts();
        let mut fields: Vec<(&[u8], &[u8])> = Vec::with_capacity(parts.headers.len() + 2);
        let status = parts.status.as_str().to_owned();
        fields.push((b":status", status.as_bytes()));
        let length;
        if let (Body::Bytes(bytes), false) =
            (&body, parts.headers.contains_key(header::CONTENT_LENGTH))
        {
            length = bytes.len().to_string();
            fields.push((b"content-length", length.as_bytes()));
        }
        for (name, value) in &parts.headers {
            if !connection_specific(name) {
                fields.push((name.as_str().as_bytes(), value.as_bytes()));
            }
        }
        let mut section = Vec::new();
        qpack::encode(&fields, &mut section);
        let mut headers = Vec::with_capacity(section.len() + 8);
        frame::put_header(&mut headers, frame::HEADERS, section.len() as u64);
        headers.extend_from_slice(&section);
        stream.out.push_back(Bytes::from(headers));
        stream.body_done = true;
        if stream.head {
            return;
        }
        match body {
            Body::Empty => {}
            Body::Bytes(bytes) => push_data(stream, bytes),
            Body::Stream(source) => {
                stream.source = Some(source);
                stream.body_done = false;
            }
        }
    }

    /// A message the pool posted: a response, or a body piece.
    pub(super) fn message<S: Service>(
        &mut self,
        conn: &mut Connection<'_, H3Message>,
        message: H3Message,
        ctx: &mut Ctx<'_, S>,
    ) {
        let id = match message.0 {
            Posted::Response(id, response) => {
                let response = response.unwrap_or_else(|| {
                    ctx.counters.add(|c| &c.h3_errors);
                    status_only(StatusCode::INTERNAL_SERVER_ERROR)
                });
                self.respond(id, response);
                id
            }
            Posted::Piece(id, source, piece) => {
                let Some(stream) = self.requests.get_mut(&id) else {
                    return;
                };
                stream.piece_pending = false;
                match piece {
                    Ok(Some(bytes)) => {
                        push_data(stream, bytes);
                        if source.at_end() {
                            stream.body_done = true;
                        } else {
                            stream.source = Some(source);
                        }
                    }
                    Ok(None) => stream.body_done = true,
                    Err(_) => {
                        // Cut short: the client must see it, not a shorter body.
                        ctx.counters.add(|c| &c.h3_errors);
                        let _ = conn.reset(id, u64::from(code::INTERNAL_ERROR));
                        self.requests.remove(&id);
                        return;
                    }
                }
                id
            }
        };
        if !conn.is_closed() {
            self.pump(conn, id, ctx);
        }
    }
}

/// Asks the pool for `source`'s next piece, posted back to `id`; false when the pool refused.
fn fetch_piece(
    pool: &BlockingPool,
    conn: &mut Connection<'_, H3Message>,
    id: StreamId,
    mut source: Box<dyn BodySource>,
) -> bool {
    let remote = conn.remote();
    pool.submit(Box::new(move || {
        let piece = std::panic::catch_unwind(AssertUnwindSafe(|| source.next_chunk(BODY_CHUNK)))
            .unwrap_or_else(|_| Err(io::Error::other("the body source panicked")));
        let _ = remote.post(H3Message(Posted::Piece(id, source, piece)));
    }))
    .is_ok()
}

/// A line, at most every 10 s, when the pool is full.
fn busy_log() {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST.load(Ordering::Relaxed);
    if now >= last + 10
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            "HTTP/3: the blocking pool's queue is full ({} jobs): requests answered 503, \
             bodies reset (counted in h3_busy)",
            super::pool::QUEUE
        );
    }
}

fn push_data(stream: &mut RequestStream, bytes: Bytes) {
    if bytes.is_empty() {
        return;
    }
    let mut head = Vec::with_capacity(9);
    frame::put_header(&mut head, frame::DATA, bytes.len() as u64);
    stream.out.push_back(Bytes::from(head));
    stream.out.push_back(bytes);
}
