//! `echo`: every bidirectional stream sent back as it arrives, finished when the peer
//! finishes. A stream whose peer is slow to read stops being read (at most [`ECHO_BUFFER`]
//! bytes wait per stream), so flow control, not memory, holds the peer back.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

use crate::quic::conn::{Connection, Recv, StreamId};

/// Bytes an echo stream holds that the peer has not yet let us send.
const ECHO_BUFFER: usize = 256 * 1024;

/// One stream's bytes on their way back.
#[derive(Default)]
struct Stream {
    out: VecDeque<Bytes>,
    out_len: usize,
    /// The peer finished its side.
    read_done: bool,
    finished: bool,
}

/// The streams of one echo connection.
#[derive(Default)]
pub struct EchoConn {
    streams: HashMap<StreamId, Stream>,
}

impl EchoConn {
    pub(super) fn opened<M: Send + 'static>(&mut self, conn: &mut Connection<'_, M>, id: StreamId) {
        if id.is_bidi() {
            self.streams.insert(id, Stream::default());
        } else {
            // Echo has nothing to say on a stream it cannot answer on.
            let _ = conn.stop_sending(id, 0);
        }
    }

    pub(super) fn forget(&mut self, id: StreamId) {
        self.streams.remove(&id);
    }

    /// Reads and writes stream `id` until it makes no progress.
    pub(super) fn pump<M: Send + 'static>(&mut self, conn: &mut Connection<'_, M>, id: StreamId) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        loop {
            let mut progress = false;
            while !stream.read_done && stream.out_len < ECHO_BUFFER {
                match conn.read_chunk(id, ECHO_BUFFER - stream.out_len) {
                    Ok(Recv::Data(chunk)) => {
                        progress = true;
                        stream.out_len += chunk.len();
                        stream.out.push_back(chunk);
                    }
                    Ok(Recv::Finished) => {
                        progress = true;
                        stream.read_done = true;
                    }
                    Ok(Recv::Blocked) => break,
                    // Reset: `on_reset` follows and forgets the stream.
                    Err(_) => return,
                }
            }
            if !stream.out.is_empty() {
                match conn.write_queue(id, &mut stream.out) {
                    Ok(written) => {
                        stream.out_len -= written.bytes;
                        progress |= written.bytes > 0;
                    }
                    Err(_) => {
                        self.streams.remove(&id);
                        return;
                    }
                }
            }
            if stream.read_done && stream.out.is_empty() && !stream.finished {
                // Finishing is final: the stream's state goes when the peer has all of it
                // (`on_finished`); a finish that fails means the stream is already gone.
                stream.finished = true;
                if conn.finish(id).is_err() {
                    self.streams.remove(&id);
                    return;
                }
            }
            if !progress {
                return;
            }
        }
    }
}
