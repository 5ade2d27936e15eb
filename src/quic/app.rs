//! What the QUIC server says on its streams, by ALPN: `echo` (every bidirectional stream sent
//! back as it arrives and finished when the peer finishes) and `hq-interop` (HTTP/0.9 as the
//! QUIC interop runner speaks it: `GET /path` answered with the file under the root, a 404
//! text for a missing one, and never a file outside the root).
//!
//! Sans-IO over `quinn_proto::Connection`: stream events in, stream reads and writes out;
//! the handler polls the connection for transmits afterwards. Each stream is pumped (read,
//! produce, write) until it makes no progress; a stream whose peer is slow to read stops
//! being read (at most [`ECHO_BUFFER`] bytes wait per stream), so flow control, not memory,
//! holds the peer back.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use quinn_proto::{Connection, Dir, ReadError, StreamEvent, StreamId, VarInt};

use super::Counters;

/// The ALPN protocol of the echo service.
pub const ALPN_ECHO: &[u8] = b"echo";
/// The ALPN protocol of HTTP/0.9 over QUIC (the interop runner's `hq-interop`).
pub const ALPN_HQ: &[u8] = b"hq-interop";

/// Bytes an echo stream holds that the peer has not yet let us send.
const ECHO_BUFFER: usize = 256 * 1024;
/// Longest HTTP/0.9 request line.
const MAX_REQUEST: usize = 4096;
/// File bytes read per refill of a response.
const FILE_CHUNK: usize = 64 * 1024;

/// The service a connection negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    Echo,
    Hq,
}

/// One bidirectional stream's progress.
#[derive(Default)]
struct Stream {
    /// Bytes to send, in order (echo: what was read; hq: the response).
    out: VecDeque<Bytes>,
    out_len: usize,
    /// The peer finished its side (or it is of no more interest).
    read_done: bool,
    /// hq: the request line so far.
    request: Vec<u8>,
    /// hq: the response is decided (`out` and `file` hold it).
    answered: bool,
    /// hq: the rest of the file to send.
    file: Option<File>,
    finished: bool,
}

/// The streams of one connection.
#[derive(Default)]
pub(super) struct Streams {
    service: Option<Service>,
    streams: HashMap<StreamId, Stream>,
}

impl Streams {
    /// Handles one stream event of `conn`.
    pub fn on_event(
        &mut self,
        conn: &mut Connection,
        event: StreamEvent,
        root: Option<&Path>,
        counters: &Counters,
    ) {
        if self.service.is_none() {
            self.service = negotiated(conn);
        }
        match event {
            StreamEvent::Opened { dir: Dir::Bi } => {
                while let Some(id) = conn.streams().accept(Dir::Bi) {
                    self.streams.insert(id, Stream::default());
                    counters.add(|c| &c.streams);
                    self.pump(conn, id, root, counters);
                }
            }
            StreamEvent::Opened { dir: Dir::Uni } => {
                // Neither service uses unidirectional streams: refuse their data.
                while let Some(id) = conn.streams().accept(Dir::Uni) {
                    let _ = conn.recv_stream(id).stop(VarInt::from_u32(0));
                }
            }
            StreamEvent::Readable { id } | StreamEvent::Writable { id } => {
                self.pump(conn, id, root, counters)
            }
            StreamEvent::Finished { id } => {
                self.streams.remove(&id);
            }
            StreamEvent::Stopped { id, .. } => {
                let _ = conn.send_stream(id).reset(VarInt::from_u32(0));
                self.streams.remove(&id);
            }
            StreamEvent::Available { .. } => {}
        }
    }

    /// The connection is gone: drop every stream's state.
    pub fn clear(&mut self) {
        self.streams.clear();
    }

    /// Reads, produces and writes stream `id` until it makes no progress.
    fn pump(&mut self, conn: &mut Connection, id: StreamId, root: Option<&Path>, c: &Counters) {
        let Some(service) = self.service else {
            return;
        };
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        loop {
            let mut progress = false;
            if !stream.read_done && wants_input(stream, service) {
                match read(conn, id, stream, service) {
                    Ok(read) => progress |= read,
                    Err(()) => {
                        self.streams.remove(&id);
                        return;
                    }
                }
            }
            if service == Service::Hq {
                progress |= produce(stream, root, c);
            }
            match write(conn, id, stream) {
                Ok(wrote) => progress |= wrote,
                Err(()) => {
                    self.streams.remove(&id);
                    return;
                }
            }
            let complete = match service {
                Service::Echo => stream.read_done,
                Service::Hq => stream.answered && stream.file.is_none(),
            };
            if complete && stream.out.is_empty() && !stream.finished {
                // Finishing is final: the stream's state goes when the peer has all of it
                // (`Finished`); a finish that fails means the stream is already gone.
                stream.finished = true;
                if conn.send_stream(id).finish().is_err() {
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

/// The service the handshake agreed on.
fn negotiated(conn: &Connection) -> Option<Service> {
    let data = conn.crypto_session().handshake_data()?;
    let data = data
        .downcast::<quinn_proto::crypto::rustls::HandshakeData>()
        .ok()?;
    match data.protocol.as_deref() {
        Some(ALPN_ECHO) => Some(Service::Echo),
        Some(ALPN_HQ) => Some(Service::Hq),
        _ => None,
    }
}

fn wants_input(stream: &Stream, service: Service) -> bool {
    match service {
        Service::Echo => stream.out_len < ECHO_BUFFER,
        Service::Hq => !stream.answered,
    }
}

/// Reads what stream `id` has: returns whether anything was read. `Err` when the stream is
/// gone (reset by the peer, or closed).
fn read(
    conn: &mut Connection,
    id: StreamId,
    stream: &mut Stream,
    service: Service,
) -> Result<bool, ()> {
    let mut recv = conn.recv_stream(id);
    let mut chunks = recv.read(true).map_err(|_| ())?;
    let mut progress = false;
    let result = loop {
        if !wants_input(stream, service) {
            break Ok(progress);
        }
        let room = match service {
            Service::Echo => ECHO_BUFFER - stream.out_len,
            Service::Hq => MAX_REQUEST + 1 - stream.request.len(),
        };
        match chunks.next(room) {
            Ok(Some(chunk)) => {
                progress = true;
                match service {
                    Service::Echo => {
                        stream.out_len += chunk.bytes.len();
                        stream.out.push_back(chunk.bytes);
                    }
                    Service::Hq => stream.request.extend_from_slice(&chunk.bytes),
                }
            }
            Ok(None) => {
                stream.read_done = true;
                break Ok(true);
            }
            Err(ReadError::Blocked) => break Ok(progress),
            Err(ReadError::Reset(_)) => break Err(()),
        }
    };
    // Lets the peer send more (flow-control credit) on the next transmit.
    let _ = chunks.finalize();
    result
}

/// Writes what stream `id` has queued: returns whether anything was written. `Err` when the
/// stream is gone (stopped by the peer, or closed).
fn write(conn: &mut Connection, id: StreamId, stream: &mut Stream) -> Result<bool, ()> {
    if stream.out.is_empty() {
        return Ok(false);
    }
    let mut send = conn.send_stream(id);
    match send.write_chunks(stream.out.make_contiguous()) {
        Ok(written) => {
            stream.out.drain(..written.chunks);
            stream.out_len -= written.bytes;
            Ok(written.bytes > 0)
        }
        Err(quinn_proto::WriteError::Blocked) => Ok(false),
        Err(_) => Err(()),
    }
}

/// hq-interop: decides the response once the request line is complete, and refills it from
/// the file as it drains. Returns whether it added anything.
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
                stream.out_len += text.len();
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
            // End of the file (or a read error: the response ends short, as a
            // failed disk read can only be reported that way in HTTP/0.9).
            stream.file = None;
            false
        }
        Ok(n) => {
            chunk.truncate(n);
            stream.out_len += n;
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

#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    Missing,
    /// The path leaves the root (`..`, an absolute part, a symbolic link pointing out).
    Outside,
}

/// The file `target` names under `root`, refusing anything that is not strictly inside it.
fn resolve(root: &Path, target: &str) -> Result<PathBuf, Refusal> {
    let path = target.split(['?', '#']).next().unwrap_or("");
    let Some(relative) = path.strip_prefix('/') else {
        return Err(Refusal::Outside);
    };
    let mut joined = root.to_path_buf();
    for part in Path::new(relative).components() {
        match part {
            Component::Normal(name) => {
                if name.as_encoded_bytes().contains(&0) {
                    return Err(Refusal::Outside);
                }
                joined.push(name);
            }
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(Refusal::Outside)
            }
        }
    }
    // A symbolic link inside the root may point outside it: compare the real paths.
    let real_root = root.canonicalize().map_err(|_| Refusal::Missing)?;
    let real = joined.canonicalize().map_err(|_| Refusal::Missing)?;
    if !real.starts_with(&real_root) {
        return Err(Refusal::Outside);
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_inside_the_root_only() {
        let root = std::env::temp_dir().join(format!("udpring-hq-{}", std::process::id()));
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/a.txt"), b"a").unwrap();
        assert_eq!(
            resolve(&root, "/sub/a.txt").unwrap(),
            root.join("sub/a.txt").canonicalize().unwrap()
        );
        assert!(resolve(&root, "/./sub//a.txt?x=1").is_ok());
        assert_eq!(resolve(&root, "/missing"), Err(Refusal::Missing));
        for bad in [
            "/../etc/passwd",
            "/sub/../../etc/passwd",
            "etc/passwd",
            "/sub/\0",
        ] {
            assert_eq!(resolve(&root, bad), Err(Refusal::Outside), "{bad}");
        }
        std::os::unix::fs::symlink("/etc", root.join("out")).unwrap();
        assert_eq!(resolve(&root, "/out/passwd"), Err(Refusal::Outside));
        let _ = std::fs::remove_dir_all(root);
    }

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
