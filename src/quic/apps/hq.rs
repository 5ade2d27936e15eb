//! `hq-interop`: HTTP/0.9 as the QUIC interop runner speaks it: `GET /path` answered with the
//! file under the root, a 404 text for a missing one, and never a file outside the root.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Read;
use std::path::Path;

use bytes::Bytes;

use super::files::{resolve, Refusal};
use crate::quic::conn::{Connection, Recv, StreamId};
use crate::quic::Counters;

/// Longest HTTP/0.9 request line.
const MAX_REQUEST: usize = 4096;
/// File bytes read per refill of a response.
const FILE_CHUNK: usize = 64 * 1024;

/// One request stream's progress.
#[derive(Default)]
struct Stream {
    /// The response bytes to send, in order.
    out: VecDeque<Bytes>,
    /// The peer finished its side (or it is of no more interest).
    read_done: bool,
    /// The request line so far.
    request: Vec<u8>,
    /// The response is decided (`out` and `file` hold it).
    answered: bool,
    /// The rest of the file to send.
    file: Option<File>,
    finished: bool,
}

/// The request streams of one hq-interop connection.
#[derive(Default)]
pub struct HqConn {
    streams: HashMap<StreamId, Stream>,
}

impl HqConn {
    pub(super) fn opened<M: Send + 'static>(&mut self, conn: &mut Connection<'_, M>, id: StreamId) {
        if id.is_bidi() {
            self.streams.insert(id, Stream::default());
        } else {
            let _ = conn.stop_sending(id, 0);
        }
    }

    pub(super) fn forget(&mut self, id: StreamId) {
        self.streams.remove(&id);
    }

    /// Reads the request, produces the response and writes it until no progress is made.
    pub(super) fn pump<M: Send + 'static>(
        &mut self,
        conn: &mut Connection<'_, M>,
        id: StreamId,
        root: Option<&Path>,
        counters: &Counters,
    ) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        loop {
            let mut progress = false;
            while !stream.read_done && !stream.answered {
                match conn.read_chunk(id, MAX_REQUEST + 1 - stream.request.len()) {
                    Ok(Recv::Data(chunk)) => {
                        progress = true;
                        stream.request.extend_from_slice(&chunk);
                        if stream.request.len() > MAX_REQUEST || chunk.contains(&b'\n') {
                            break;
                        }
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
            progress |= produce(stream, root, counters);
            if !stream.out.is_empty() {
                match conn.write_queue(id, &mut stream.out) {
                    Ok(written) => {
                        progress |= written.bytes > 0;
                    }
                    Err(_) => {
                        self.streams.remove(&id);
                        return;
                    }
                }
            }
            let complete = stream.answered && stream.file.is_none();
            if complete && stream.out.is_empty() && !stream.finished {
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

/// Decides the response once the request line is complete, and refills it from the file as
/// it drains. Returns whether it added anything.
fn produce(stream: &mut Stream, root: Option<&Path>, counters: &Counters) -> bool {
    if !stream.answered {
        let line_end = stream.request.iter().position(|&b| b == b'\n');
        if line_end.is_none() && !stream.read_done && stream.request.len() <= MAX_REQUEST {
            return false;
        }
        stream.answered = true;
        // Nothing more is read: the request is all that matters.
        stream.read_done = true;
        let line = &stream.request[..line_end.unwrap_or(stream.request.len())];
        match respond(line, root) {
            Response::File(file) => {
                counters.add(|c| &c.hq_files);
                stream.file = Some(file);
            }
            Response::Text(text, refused) => {
                if refused {
                    counters.add(|c| &c.hq_refused);
                } else {
                    counters.add(|c| &c.hq_missing);
                }
                stream.out.push_back(Bytes::from_static(text));
            }
        }
    }
    let Some(file) = stream.file.as_mut() else {
        return false;
    };
    if !stream.out.is_empty() {
        return false;
    }
    let mut chunk = vec![0u8; FILE_CHUNK];
    match file.read(&mut chunk) {
        Ok(0) | Err(_) => {
            // End of the file (or a read error: the response ends short, as a failed disk
            // read can only be reported that way in HTTP/0.9).
            stream.file = None;
            false
        }
        Ok(n) => {
            chunk.truncate(n);
            stream.out.push_back(Bytes::from(chunk));
            true
        }
    }
}

enum Response {
    File(File),
    /// The text, and whether the request was refused (not merely missing).
    Text(&'static [u8], bool),
}

const NOT_FOUND: &[u8] = b"404 not found\n";
const BAD_REQUEST: &[u8] = b"400 bad request\n";

/// The response to one request line (`GET /path`, CR optional).
fn respond(line: &[u8], root: Option<&Path>) -> Response {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(target) = line.strip_prefix(b"GET ") else {
        return Response::Text(BAD_REQUEST, true);
    };
    let Ok(target) = std::str::from_utf8(target) else {
        return Response::Text(BAD_REQUEST, true);
    };
    let Some(root) = root else {
        return Response::Text(NOT_FOUND, false);
    };
    match resolve(root, target.trim()) {
        Ok(path) => match File::open(&path) {
            Ok(file) if file.metadata().is_ok_and(|m| m.is_file()) => Response::File(file),
            _ => Response::Text(NOT_FOUND, false),
        },
        Err(Refusal::Missing) => Response::Text(NOT_FOUND, false),
        Err(Refusal::Outside) => Response::Text(NOT_FOUND, true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_parsed_strictly() {
        let root = std::env::temp_dir();
        assert!(matches!(
            respond(b"POST /x", Some(&root)),
            Response::Text(BAD_REQUEST, true)
        ));
        assert!(matches!(
            respond(b"GET /\xff", Some(&root)),
            Response::Text(BAD_REQUEST, true)
        ));
        assert!(matches!(
            respond(b"GET /x\r", None),
            Response::Text(NOT_FOUND, false)
        ));
        assert!(matches!(
            respond(b"GET /../etc/passwd\r", Some(&root)),
            Response::Text(NOT_FOUND, true)
        ));
    }
}
