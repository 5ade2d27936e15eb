//! Zero-downtime restart: a running server hands its listening sockets to the process that
//! replaces it, over a Unix socket with `SCM_RIGHTS` (unix(7)), the way nginx hands its
//! sockets to a new master. Both processes then hold the same socket files, so what the
//! kernel has queued on them moves with them: nothing queued is dropped (issue 11).
//!
//! The running server listens on an abstract-namespace `SOCK_SEQPACKET` socket named
//! `udpring/ADDR` (its bound address; abstract names live in the network namespace and
//! vanish with the process). The exchange, one message each:
//! 1. new → old: `udpring-takeover/2` (or `/1`, see below)
//! 2. old → new: `sockets N`, then N messages `socket I`, each carrying one descriptor, in
//!    worker order (the order they joined the SO_REUSEPORT group)
//! 3. version 2 only, old → new: `state LEN`, then the application's state (QUIC: its TLS
//!    session cache, so resumed clients keep working) in `ceil(LEN / 32 KiB)` messages of
//!    32 KiB, the last one the rest; LEN is at most [`MAX_STATE`] and may be 0
//! 4. the new process starts its workers on them; only then new → old: `go`. If it fails or
//!    exits instead, the old one sees the connection close and keeps serving.
//! 5. old: stops offering (closes its named socket), releases its listeners
//!    ([`Server::release_listeners`]) and answers `done`; the new process may now offer
//!    takeover itself under the same name.
//!
//! An old process of version 1 closes the connection on the `/2` hello; the new process then
//! asks again in version 1 and starts without the old one's state (one log line says so). A
//! version-2 old process serves both.
//!
//! An abstract socket has no file permissions, so each side checks the other's credentials
//! (`SO_PEERCRED`) instead: only a process of the same user (or root) is served, and the new
//! process takes sockets only from one. It also bounds the count it is told
//! ([`MAX_SOCKETS`]) and checks every descriptor it receives (a UDP socket bound to the
//! address, with `SO_REUSEPORT`) before it serves on any.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::server::Server;

mod check;
mod state;
mod wire;

pub(crate) use check::check_offered_socket;
use state::{receive_state, send_state};

use wire::{peer_cred, readable, recv, send};

/// The hello of this version: the sockets or the routing map, then the application's state.
const HELLO_V3: &[u8] = b"udpring-takeover/3";
/// The hello of version 2: the sockets, then the application's state.
const HELLO: &[u8] = b"udpring-takeover/2";
/// The hello of version 1 (sockets only), spoken to an old process that knows no other.
const HELLO_V1: &[u8] = b"udpring-takeover/1";
/// The most bytes of application state a takeover carries; a larger count is refused.
pub const MAX_STATE: usize = 64 << 20;
/// The state's message size: well below a Unix socket's send buffer (net.core.wmem_default).
const STATE_CHUNK: usize = 32 * 1024;

/// What a server hands the process taking it over besides its sockets, made when asked
/// (after the sockets are sent; at most [`MAX_STATE`] bytes, or nothing is sent). The bytes
/// cross to another process: the receiver checks every length in them before use.
pub type StateExport = Box<dyn Fn() -> Vec<u8> + Send>;
/// How long either side waits for the other's next message. The new process's wait before
/// `go` includes starting its workers.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the offering thread looks at its stop flag.
const POLL_MS: libc::c_int = 100;

/// The abstract socket name a server bound to `addr` offers takeover under.
pub fn socket_name(addr: SocketAddr) -> String {
    format!("udpring/{addr}")
}

fn abstract_addr(addr: SocketAddr) -> io::Result<SockAddr> {
    SockAddr::unix(format!("\0{}", socket_name(addr)))
}

/// A running server's offer to hand its sockets over, served by a thread of its own until
/// it is dropped or a takeover completes.
pub struct TakeoverOffer {
    stop: Arc<AtomicBool>,
    taken: Arc<AtomicBool>,
    draining: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TakeoverOffer {
    /// Whether another process has taken the sockets over (the listeners are released).
    pub fn taken_over(&self) -> bool {
        self.taken.load(Ordering::Acquire)
    }

    /// Whether the takeover left this process its sockets and its connections (version 3,
    /// with generation routing): the new process serves new connections on sockets of its
    /// own, and this one drains what it has (for QUIC, `Quic::drain`, then exit when no
    /// connection is left). Implies [`TakeoverOffer::taken_over`].
    pub fn drains(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

impl Drop for TakeoverOffer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Server {
    /// Offers this server's listening sockets to a process that asks for them with
    /// [`request`] (`udpring serve --takeover`). Fails with `AddrInUse` if another process
    /// offers under the same name.
    pub fn offer_takeover(&self) -> io::Result<TakeoverOffer> {
        self.offer_takeover_with(None)
    }

    /// [`Server::offer_takeover`], handing over `state()` too (a version-2 taker receives it
    /// in [`Handover::take_state`]). Secrets in it are never logged.
    pub fn offer_takeover_with(&self, state: Option<StateExport>) -> io::Result<TakeoverOffer> {
        let listener = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None)?;
        listener.bind(&abstract_addr(self.local_addr())?)?;
        listener.listen(4)?;
        let sockets = self.listeners();
        let release = self.releaser();
        let routing = self.routing();
        let stop = Arc::new(AtomicBool::new(false));
        let taken = Arc::new(AtomicBool::new(false));
        let draining = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, taken, draining) = (stop.clone(), taken.clone(), draining.clone());
            std::thread::Builder::new()
                .name("udpring-takeover".into())
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        if !readable(&listener, POLL_MS) {
                            continue;
                        }
                        let Ok((conn, _)) = listener.accept() else {
                            continue;
                        };
                        match hand_over(&conn, &sockets, routing.as_deref(), &stop, state.as_ref()) {
                            Ok((pid, Given::Sockets)) => {
                                // No one else may ask once the sockets are gone: stop
                                // offering before saying `done`, which frees the name.
                                drop(listener);
                                release();
                                taken.store(true, Ordering::Release);
                                tracing::info!(pid, "listeners handed over; finishing what this process still serves");
                                let _ = send(&conn, b"done", None);
                                return;
                            }
                            Ok((pid, Given::Routing)) => {
                                drop(listener);
                                draining.store(true, Ordering::Release);
                                taken.store(true, Ordering::Release);
                                tracing::info!(pid, "new connections go to the new process; draining the connections of this one");
                                let _ = send(&conn, b"done", None);
                                return;
                            }
                            Err(e) => {
                                // The new process may have attached its program before it
                                // failed: new connections come here again.
                                if let Some(r) = &routing {
                                    if let Err(e) = r.attach(&sockets[0]) {
                                        tracing::error!(error = %e, "cannot attach this process's reuseport program again");
                                    }
                                }
                                tracing::warn!(error = %e, "takeover did not complete; still serving")
                            }
                        }
                    }
                })?
        };
        Ok(TakeoverOffer {
            stop,
            taken,
            draining,
            thread: Some(thread),
        })
    }
}

/// What a takeover handed over.
enum Given {
    /// The listening sockets: this process lets go of them.
    Sockets,
    /// The routing map: the new process serves on sockets of its own, this one keeps its own.
    Routing,
}

/// Serves one takeover request up to the `go`; returns the new process's pid and what it got.
fn hand_over(
    conn: &Socket,
    sockets: &[Socket],
    routing: Option<&crate::reuseport::Routing>,
    stop: &AtomicBool,
    state: Option<&StateExport>,
) -> io::Result<(u32, Given)> {
    // Short read timeouts, so that a shutdown of this process (the offer dropped) is not held
    // up by a new process that takes its time.
    conn.set_read_timeout(Some(Duration::from_millis(POLL_MS as u64)))?;
    conn.set_write_timeout(Some(STEP_TIMEOUT))?;
    let cred = peer_cred(conn)?;
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    let me = unsafe { libc::geteuid() };
    if cred.uid != me && cred.uid != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "pid {} (uid {}) asked for the sockets; only uid {me} may take over",
                cred.pid, cred.uid
            ),
        ));
    }
    let mut buf = [0u8; 64];
    let (n, _) = recv_or_stop(conn, &mut buf, stop)?;
    let (with_state, may_route) = match &buf[..n] {
        HELLO_V3 => (true, true),
        HELLO => (true, false),
        HELLO_V1 => (false, false),
        _ => {
            return Err(io::Error::other(format!(
                "pid {} does not speak {}",
                cred.pid,
                String::from_utf8_lossy(HELLO)
            )))
        }
    };
    let given = match routing.filter(|_| may_route) {
        Some(r) => {
            send(
                conn,
                format!("generation {}", r.generation()).as_bytes(),
                Some(r.map().fd().as_raw_fd()),
            )?;
            Given::Routing
        }
        None => {
            send(conn, format!("sockets {}", sockets.len()).as_bytes(), None)?;
            for (i, s) in sockets.iter().enumerate() {
                send(conn, format!("socket {i}").as_bytes(), Some(s.as_raw_fd()))?;
            }
            Given::Sockets
        }
    };
    if with_state {
        let mut bytes = state.map(|f| f()).unwrap_or_default();
        if bytes.len() > MAX_STATE {
            tracing::warn!(
                len = bytes.len(),
                max = MAX_STATE,
                "state too large to hand over; the new process starts without it"
            );
            bytes = Vec::new();
        }
        send_state(conn, &bytes)?;
    }
    match given {
        Given::Sockets => tracing::info!(
            pid = cred.pid,
            sockets = sockets.len(),
            "listeners passed to a new process; serving until it says go"
        ),
        Given::Routing => tracing::info!(
            pid = cred.pid,
            "routing map passed to a new process; serving until it says go"
        ),
    }
    let (n, _) = recv_or_stop(conn, &mut buf, stop)?;
    match &buf[..n] {
        b"go" => Ok((cred.pid as u32, given)),
        [] => Err(io::Error::other(format!(
            "pid {} closed the connection before go (it could not start)",
            cred.pid
        ))),
        other => Err(io::Error::other(format!(
            "pid {} sent {:?} instead of go",
            cred.pid,
            String::from_utf8_lossy(other)
        ))),
    }
}

/// The sockets of a running server, received; it keeps serving until [`Handover::complete`].
pub struct Handover {
    conn: Socket,
    sockets: Vec<OwnedFd>,
    /// Version 3 with generation routing: the old process's generation and its map.
    routing: Option<(u8, crate::reuseport::RoutingMap)>,
    /// `None` when the old process spoke version 1 (it has no state to give).
    state: Option<Vec<u8>>,
    pid: u32,
}

impl Handover {
    /// The received listening sockets, in worker order (for [`Server::start_with_sockets`]
    /// with [`crate::ops::SocketOrigin::HandedOver`]).
    pub fn take_sockets(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.sockets)
    }

    /// The state the old process handed over (empty if it had none), or `None` when it
    /// speaks version 1 of the exchange and sent none. Another process's bytes: check every
    /// length before use.
    pub fn take_state(&mut self) -> Option<Vec<u8>> {
        self.state.take()
    }

    /// With generation routing (the old process sent its routing map instead of its
    /// sockets): the generation this process takes, the one after the old process's. Start
    /// with [`crate::ServerConfig::generation`] set to it and
    /// [`crate::ServerConfig::routing_map`] to [`Handover::routing_map`]; the sockets are
    /// then this process's own ([`crate::Server::start`]).
    pub fn generation(&self) -> Option<u8> {
        self.routing
            .as_ref()
            .map(|(g, _)| crate::reuseport::next_generation(*g))
    }

    /// The routing map the old process handed over, if it did (see [`Handover::generation`]).
    pub fn routing_map(&self) -> Option<crate::reuseport::RoutingMap> {
        self.routing.as_ref().map(|(_, m)| m.clone())
    }

    /// The pid of the process handing them over.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Tells the old process to go (call it once this process serves) and waits until it has
    /// stopped offering. Dropping a `Handover` without calling it leaves the old process
    /// serving.
    pub fn complete(self) -> io::Result<()> {
        send(&self.conn, b"go", None)?;
        let mut buf = [0u8; 16];
        let (n, _) = recv(&self.conn, &mut buf)?;
        if &buf[..n] != b"done" {
            return Err(io::Error::other(format!(
                "pid {} did not confirm the takeover",
                self.pid
            )));
        }
        Ok(())
    }
}

/// The most sockets a takeover peer may offer: one per worker, and a server runs at most
/// 1,024 workers (`--workers`). A larger count is refused before anything is sized from it.
pub const MAX_SOCKETS: usize = 1024;

/// Asks the server offering takeover for `addr` for its sockets. `Ok(None)` when nothing
/// offers them (no server, or one that has already handed them over).
///
/// Nothing the peer says is trusted: it must run as this user or as root (`SO_PEERCRED`; an
/// abstract socket name has no file permissions, so another local user may have bound it),
/// offer 1..=[`MAX_SOCKETS`] sockets, and each must be a UDP datagram socket of `addr`'s
/// family, bound to `addr`, with `SO_REUSEPORT` set. Otherwise the error (kind
/// `PermissionDenied` or `InvalidData`) is one line, `takeover refused: peer pid P uid U ...`,
/// and every descriptor received so far is closed.
pub fn request(addr: SocketAddr) -> io::Result<Option<Handover>> {
    let Some(conn) = connect(addr)? else {
        return Ok(None);
    };
    match receive_offer_in(conn, addr, HELLO_V3)? {
        Some(handover) => return Ok(Some(handover)),
        None => {
            // A version-2 process closes the connection at this hello.
        }
    }
    let Some(conn) = connect(addr)? else {
        return Ok(None);
    };
    match receive_offer_in(conn, addr, HELLO)? {
        Some(handover) => Ok(Some(handover)),
        None => {
            let Some(conn) = connect(addr)? else {
                return Ok(None);
            };
            let handover = receive_offer_in(conn, addr, HELLO_V1)?.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "takeover refused: the peer closed the connection at the hello of version 2 and of version 1",
                )
            })?;
            tracing::info!(
                pid = handover.pid,
                "the process taken over from speaks takeover version 1: no state handed over (QUIC sessions start afresh)"
            );
            Ok(Some(handover))
        }
    }
}

/// A connection to the server offering takeover for `addr`, or `None` when nothing offers.
fn connect(addr: SocketAddr) -> io::Result<Option<Socket>> {
    let conn = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None)?;
    match conn.connect(&abstract_addr(addr)?) {
        Ok(()) => {}
        Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNREFUSED | libc::ENOENT)) => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    }
    conn.set_read_timeout(Some(STEP_TIMEOUT))?;
    conn.set_write_timeout(Some(STEP_TIMEOUT))?;
    Ok(Some(conn))
}

/// The new process's side of the exchange (version 2) on a connected socket, up to the
/// sockets and state received and checked (see [`request`]).
#[cfg(test)]
fn receive_offer(conn: Socket, addr: SocketAddr) -> io::Result<Handover> {
    receive_offer_in(conn, addr, HELLO)?
        .ok_or_else(|| io::Error::other("the peer closed the connection at the hello"))
}

/// The exchange after sending `hello`; `Ok(None)` when the peer closed the connection at
/// once (an old process that does not speak this version).
fn receive_offer_in(conn: Socket, addr: SocketAddr, hello: &[u8]) -> io::Result<Option<Handover>> {
    let cred = peer_cred(&conn)?;
    let refuse = |kind: io::ErrorKind, why: String| {
        io::Error::new(
            kind,
            format!(
                "takeover refused: peer pid {} uid {} {why}",
                cred.pid, cred.uid
            ),
        )
    };
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    let me = unsafe { libc::geteuid() };
    // Checked before a word is sent: an untrusted peer learns nothing and gets nothing.
    if cred.uid != me && cred.uid != 0 {
        return Err(refuse(
            io::ErrorKind::PermissionDenied,
            "is neither this user nor root".into(),
        ));
    }
    // A peer that breaks off, says too much or too little is refused in the same one line.
    let broke_off = |e: io::Error| refuse(e.kind(), format!("broke off the exchange: {e}"));
    send(&conn, hello, None).map_err(broke_off)?;
    let mut buf = [0u8; 64];
    let (n, fd) = match recv(&conn, &mut buf) {
        Ok((0, None)) if hello != HELLO_V1 => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset && hello != HELLO_V1 => {
            return Ok(None)
        }
        other => other.map_err(broke_off)?,
    };
    let answer = std::str::from_utf8(&buf[..n]).ok();
    if let Some(generation) = answer.and_then(|s| s.strip_prefix("generation ")) {
        if hello != HELLO_V3 {
            return Err(refuse(
                io::ErrorKind::InvalidData,
                "answered with a routing map to a hello before version 3".into(),
            ));
        }
        let generation = generation
            .parse::<u8>()
            .ok()
            .filter(|&g| g < crate::reuseport::GENERATIONS)
            .ok_or_else(|| {
                refuse(
                    io::ErrorKind::InvalidData,
                    format!(
                        "named generation {generation:?}; 0..{} are accepted",
                        crate::reuseport::GENERATIONS
                    ),
                )
            })?;
        let fd = fd.ok_or_else(|| {
            refuse(
                io::ErrorKind::InvalidData,
                "sent its generation without the routing map".into(),
            )
        })?;
        let map = crate::ebpf::SocketArray::from_fd(fd, crate::reuseport::MAP_ENTRIES).map_err(
            |why| {
                refuse(
                    io::ErrorKind::InvalidData,
                    format!("offered as the routing map a descriptor that {why}"),
                )
            },
        )?;
        let state = receive_state(&conn).map_err(|why| refuse(io::ErrorKind::InvalidData, why))?;
        return Ok(Some(Handover {
            conn,
            sockets: Vec::new(),
            routing: Some((generation, crate::reuseport::RoutingMap(Arc::new(map)))),
            state: Some(state),
            pid: cred.pid as u32,
        }));
    }
    if fd.is_some() {
        return Err(refuse(
            io::ErrorKind::InvalidData,
            "sent a descriptor with the socket count".into(),
        ));
    }
    let count = answer
        .and_then(|s| s.strip_prefix("sockets "))
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| {
            refuse(
                io::ErrorKind::InvalidData,
                format!(
                    "answered {:?} instead of a socket count",
                    String::from_utf8_lossy(&buf[..n])
                ),
            )
        })?;
    let count = usize::try_from(count)
        .ok()
        .filter(|c| (1..=MAX_SOCKETS).contains(c))
        .ok_or_else(|| {
            refuse(
                io::ErrorKind::InvalidData,
                format!("offered {count} sockets; 1..={MAX_SOCKETS} are accepted"),
            )
        })?;
    // Bounded above, so this cannot be a peer-chosen allocation. On any error below, the
    // sockets received so far are dropped with the vector: closed.
    let mut sockets = Vec::with_capacity(count);
    for i in 0..count {
        let (_, fd) = recv(&conn, &mut buf).map_err(broke_off)?;
        let fd = fd.ok_or_else(|| {
            refuse(
                io::ErrorKind::InvalidData,
                format!("sent socket {i} without a descriptor"),
            )
        })?;
        check_offered_socket(fd.as_fd(), addr).map_err(|why| {
            refuse(
                io::ErrorKind::InvalidData,
                format!("offered as socket {i} {why}"),
            )
        })?;
        sockets.push(fd);
    }
    let state = if hello == HELLO_V1 {
        None
    } else {
        Some(receive_state(&conn).map_err(|why| refuse(io::ErrorKind::InvalidData, why))?)
    };
    Ok(Some(Handover {
        conn,
        sockets,
        routing: None,
        state,
        pid: cred.pid as u32,
    }))
}

/// [`recv`] on a socket with a short read timeout, retried until a message arrives, `stop`
/// is set, or [`STEP_TIMEOUT`] passes.
fn recv_or_stop(
    conn: &Socket,
    buf: &mut [u8],
    stop: &AtomicBool,
) -> io::Result<(usize, Option<OwnedFd>)> {
    let deadline = std::time::Instant::now() + STEP_TIMEOUT;
    loop {
        match recv(conn, buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if stop.load(Ordering::Acquire) {
                    return Err(io::Error::other("this server is shutting down"));
                }
                if std::time::Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the new process took too long",
                    ));
                }
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests;
