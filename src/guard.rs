//! The instance guard: before a server binds its SO_REUSEPORT sockets, it checks that nobody
//! serves the address yet. A second SO_REUSEPORT bind by the same user joins the first one's
//! group without a word and takes a share of its traffic, including datagrams of peers whose
//! state lives in the first (issue 11). A plain `bind()` without SO_REUSEPORT, by contrast,
//! fails with `EADDRINUSE` while any socket holds the address, the exact one or an
//! overlapping wildcard (kernel-reference, "Reuseport programs and a second instance"): that
//! probe is the test. The owner is then looked up in `/proc` so the refusal can name it.

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

/// Fails with [`io::ErrorKind::AddrInUse`] and one line naming the owner when another socket
/// already serves `addr`. Port 0 is never checked (the kernel picks a free port). Errors other
/// than `EADDRINUSE` are left to the real bind, which explains them.
pub(crate) fn check_unserved(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM.cloexec(),
        Some(Protocol::UDP),
    )?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // The server's `[::]` socket is dual-stack: the probe must collide with IPv4 owners too.
        probe.set_only_v6(false)?;
    }
    // A socket no visible process holds may be on its way out: a process that has just
    // exited can leave its sockets to the kernel's asynchronous teardown of its io_uring for
    // a moment. Give that up to a second before refusing.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        match probe.bind(&addr.into()) {
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
                let owner = find_owner(addr);
                if matches!(owner, Some(Owner::Uid(_)) | None)
                    && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    continue;
                }
                let owner = owner.map_or_else(
                    || "another socket (its owner is not visible here)".to_string(),
                    |o| o.to_string(),
                );
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "udp {addr} is already served by {owner}; stop it or start with --takeover"
                    ),
                ));
            }
            _ => return Ok(()),
        }
    }
}

/// Who holds a UDP address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Owner {
    /// A process found through `/proc/PID/fd`, with its command name.
    Process { pid: u32, comm: String },
    /// The socket is in `/proc/net/udp*` but no visible process has it open (another user's
    /// process, or a container's): the socket's uid is all there is.
    Uid(u32),
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Process { pid, comm } => write!(f, "pid {pid} ({comm})"),
            Owner::Uid(uid) => write!(f, "a socket of uid {uid} (its process is not visible)"),
        }
    }
}

/// One line of `/proc/net/udp` or `/proc/net/udp6`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct UdpEntry {
    local: SocketAddr,
    /// `st` is 07 (TCP_CLOSE) for an unconnected socket, 01 for a connected one.
    connected: bool,
    uid: u32,
    inode: u64,
}

/// The owner of a socket bound to an address that overlaps `addr`. Unconnected sockets
/// (listeners) are preferred over connected ones (per-client sockets of the same server).
pub(crate) fn find_owner(addr: SocketAddr) -> Option<Owner> {
    let mut entries: Vec<UdpEntry> = ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .filter_map(|p| fs::read_to_string(p).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(parse_line)
                .collect::<Vec<_>>()
        })
        .filter(|e| overlaps(e.local, addr))
        .collect();
    entries.sort_by_key(|e| e.connected);
    let first = entries.first()?.clone();
    for entry in &entries {
        if let Some(pid) = pid_holding_inode(entry.inode) {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim().to_string())
                .unwrap_or_else(|_| "?".to_string());
            return Some(Owner::Process { pid, comm });
        }
    }
    Some(Owner::Uid(first.uid))
}

/// Whether a socket bound to `held` keeps a socket from binding `wanted` (same port, and the
/// same address, or either one a wildcard; IPv4-mapped IPv6 addresses count as IPv4).
fn overlaps(held: SocketAddr, wanted: SocketAddr) -> bool {
    if held.port() != wanted.port() {
        return false;
    }
    let (a, b) = (canonical(held.ip()), canonical(wanted.ip()));
    a == b || a.is_unspecified() || b.is_unspecified()
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Parses `  12: 0100007F:2328 00000000:0000 07 ... uid timeout inode ...`. The address is
/// the kernel's `%08X` of the big-endian word(s) as the CPU reads them, so the bytes in
/// memory order are the native-endian bytes of the printed number; the port is printed in
/// host order.
fn parse_line(line: &str) -> Option<UdpEntry> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 10 {
        return None;
    }
    let (ip_hex, port_hex) = fields[1].split_once(':')?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    let ip = match ip_hex.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(ip_hex, 16).ok()?.to_ne_bytes(),
        )),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(ip_hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(UdpEntry {
        local: SocketAddr::new(ip, port),
        connected: fields[3] == "01",
        uid: fields[7].parse().ok()?,
        inode: fields[9].parse().ok()?,
    })
}

/// The first process with a descriptor `socket:[inode]`. Processes this user may not inspect
/// are skipped.
fn pid_holding_inode(inode: u64) -> Option<u32> {
    let target = format!("socket:[{inode}]");
    for proc_entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()) {
                return Some(pid);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_udp_lines_parse() {
        let v4 = "  123: 0100007F:2328 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 4242 2 0000000000000000 0";
        let e = parse_line(v4).unwrap();
        assert_eq!(e.local, "127.0.0.1:9000".parse().unwrap());
        assert_eq!((e.connected, e.uid, e.inode), (false, 1000, 4242));
        let v6 = "  7: 00000000000000000000000001000000:0035 00000000000000000000000000000000:0000 01 00000000:00000000 00:00000000 00000000     0        0 77 2 0000000000000000 0";
        let e = parse_line(v6).unwrap();
        assert_eq!(e.local, "[::1]:53".parse().unwrap());
        assert!(e.connected);
        assert_eq!(parse_line("  sl  local_address rem_address st"), None);
    }

    #[test]
    fn wildcards_and_mapped_addresses_overlap() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(overlaps(a("0.0.0.0:9000"), a("127.0.0.1:9000")));
        assert!(overlaps(a("127.0.0.1:9000"), a("0.0.0.0:9000")));
        assert!(overlaps(a("[::]:9000"), a("127.0.0.1:9000")));
        assert!(overlaps(a("[::ffff:127.0.0.1]:9000"), a("127.0.0.1:9000")));
        assert!(!overlaps(a("127.0.0.1:9000"), a("127.0.0.2:9000")));
        assert!(!overlaps(a("127.0.0.1:9001"), a("127.0.0.1:9000")));
    }

    /// A SO_REUSEPORT holder (what a second udpring would otherwise join silently) is found,
    /// and named as this very process.
    #[test]
    fn a_reuseport_holder_is_refused_and_named() {
        let holder = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        holder.set_reuse_port(true).unwrap();
        holder
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let addr = holder.local_addr().unwrap().as_socket().unwrap();
        let err = check_unserved(addr).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        // The wildcard overlaps it too.
        let wild = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port());
        assert!(check_unserved(wild).is_err());
        drop(holder);
        assert!(check_unserved(addr).is_ok());
    }
}
