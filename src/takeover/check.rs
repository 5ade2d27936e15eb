//! What the new process checks of each socket it is handed before it serves on it.

use std::io;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;

use socket2::{Domain, Protocol, SockRef, Type};

/// Whether `fd` is a socket this process may serve `addr` on: a UDP datagram socket of
/// `addr`'s family (`SO_DOMAIN`, `SO_TYPE`, `SO_PROTOCOL`), bound to `addr` (getsockname),
/// in a `SO_REUSEPORT` group (the new process's own connected-session sockets join it).
/// The error says what it is instead, to follow "offered as socket I".
pub(crate) fn check_offered_socket(fd: BorrowedFd<'_>, addr: SocketAddr) -> Result<(), String> {
    let socket = SockRef::from(&fd);
    let unreadable =
        |what: &str, e: io::Error| format!("a descriptor whose {what} is unreadable ({e})");
    let domain = socket.domain().map_err(|e| unreadable("SO_DOMAIN", e))?;
    let want = Domain::for_address(addr);
    if domain != want {
        return Err(format!("a socket of domain {domain:?}, not {want:?}"));
    }
    let kind = socket.r#type().map_err(|e| unreadable("SO_TYPE", e))?;
    if kind != Type::DGRAM {
        return Err(format!("a socket of type {kind:?}, not a datagram socket"));
    }
    let protocol = socket
        .protocol()
        .map_err(|e| unreadable("SO_PROTOCOL", e))?;
    if protocol != Some(Protocol::UDP) {
        return Err(format!("a socket of protocol {protocol:?}, not UDP"));
    }
    let local = socket
        .local_addr()
        .map_err(|e| unreadable("address", e))?
        .as_socket();
    if local.map(|a| (a.ip(), a.port())) != Some((addr.ip(), addr.port())) {
        return Err(match local {
            Some(local) => format!("a UDP socket bound to {local}, not {addr}"),
            None => format!("a UDP socket without an address, not bound to {addr}"),
        });
    }
    if !socket
        .reuse_port()
        .map_err(|e| unreadable("SO_REUSEPORT", e))?
    {
        return Err("a UDP socket without SO_REUSEPORT".into());
    }
    Ok(())
}
