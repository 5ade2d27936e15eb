//! The AF_XDP path (`udpring serve --xdp IFACE`, issue 17 part 2): past the kernel's UDP
//! stack for the same handlers.
//!
//! One AF_XDP socket per receive queue of the interface, each served by a worker thread of
//! its own (`udpring-x{queue}`), beside the ring workers: an XDP program that udpring
//! assembles and loads itself redirects UDP for the served address and port to the socket of
//! the frame's queue, and passes everything else to the kernel, where the ring workers still
//! serve what reaches the UDP socket (IPv4 options, fragments, a queue without a socket). The
//! program is attached through a BPF link, which the kernel detaches when the process ends,
//! however it ends.
//!
//! A worker reads frames from the RX ring, checks them ([`frame::parse`]: every length and
//! both checksums), hands the payload to the handler as the same [`Datagram`] the ring path
//! gives, and turns each reply into a frame on the TX ring (addresses swapped, checksums
//! computed). Replies go to the MAC address the peer's frames came from; a peer never heard
//! from on this queue cannot be reached from it (counted in `send_errors`).

pub mod frame;
pub(crate) mod program;
mod worker;
mod xsk;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::handler::SessionHandler;
use crate::shared::WorkerShared;
use crate::stats::Stats;

pub use xsk::CopyMode;

/// Where the XDP program runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum XdpMode {
    /// Native (in the driver) where it can, generic otherwise.
    #[default]
    Auto,
    /// Native only: an error where the driver has no XDP.
    Native,
    /// Generic (after the kernel built the skb): any interface, less gain.
    Generic,
}

/// `--xdp IFACE` and its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdpConfig {
    /// The interface whose queues are served.
    pub iface: String,
    /// Native or generic XDP (`--xdp-mode`).
    pub mode: XdpMode,
    /// Copy mode even where the driver could do zero-copy.
    pub force_copy: bool,
    /// Entries of each of the four rings (a power of two); the UMEM has twice as many frames.
    pub ring: u32,
}

impl XdpConfig {
    /// `iface` with the defaults: auto mode, zero-copy where possible, rings of 2,048.
    pub fn new(iface: impl Into<String>) -> XdpConfig {
        XdpConfig {
            iface: iface.into(),
            mode: XdpMode::Auto,
            force_copy: false,
            ring: 2048,
        }
    }
}

/// Whether this kernel opens AF_XDP sockets (the probe `udpring probe` reports; whether
/// the XDP program loads depends on privileges too, checked when `--xdp` starts).
pub fn af_xdp_available() -> bool {
    xsk::open_socket().is_ok()
}

/// What the interface is, read from sysfs.
#[derive(Debug, Clone)]
pub struct Interface {
    /// Its index in this network namespace.
    pub index: u32,
    /// Its Ethernet address: the source of every frame sent.
    pub mac: [u8; 6],
    /// Its MTU: the longest IP datagram a reply may be.
    pub mtu: usize,
    /// Its receive queues: one AF_XDP socket and worker each.
    pub rx_queues: u32,
}

impl Interface {
    /// Reads `name`'s index, MAC address, MTU and receive queue count; the error names what
    /// is missing.
    pub fn lookup(name: &str) -> io::Result<Interface> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("--xdp {name:?}: not an interface name"),
            ));
        }
        let c = std::ffi::CString::new(name)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "--xdp: a NUL in the name"))?;
        // SAFETY: `c` is a NUL-terminated string that outlives the call.
        let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
        if index == 0 {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("--xdp {name}: no such interface in this network namespace"),
            ));
        }
        let sys = format!("/sys/class/net/{name}");
        let read = |f: &str| std::fs::read_to_string(format!("{sys}/{f}"));
        let mac = parse_mac(read("address")?.trim()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("--xdp {name}: not an Ethernet interface (its address is not a MAC)"),
            )
        })?;
        let mtu = read("mtu")?
            .trim()
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "unreadable MTU"))?;
        let rx_queues = std::fs::read_dir(format!("{sys}/queues"))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
            .count() as u32;
        Ok(Interface {
            index,
            mac,
            mtu,
            rx_queues: rx_queues.max(1),
        })
    }
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The largest payload a frame of `mtu` carries over IPv4 (IPv6 carries 20 bytes less).
pub fn max_payload(mtu: usize) -> usize {
    let frame_room = xsk::FRAME_SIZE as usize - 256 - frame::ETH_LEN;
    mtu.min(frame_room)
        .saturating_sub(frame::IPV4_LEN + frame::UDP_LEN)
}

/// The AF_XDP side of a server: the program and its link, and one worker per queue.
pub(crate) struct XdpGroup {
    pub attached: program::Attached,
    pub workers: Vec<(
        Arc<WorkerShared>,
        std::thread::JoinHandle<io::Result<Stats>>,
    )>,
    pub mode: CopyMode,
    pub iface: Interface,
}

/// Starts one AF_XDP worker per receive queue of `config.iface`, worker `first_id + q` for
/// queue `q`, each with a handler from `factory`, then attaches the program. `Ok(None)` with
/// one warning line where the kernel lacks AF_XDP or refuses the program (the ring path
/// serves alone); an interface that does not exist, or a queue whose socket cannot be bound,
/// is an error.
pub(crate) fn launch<H, F>(
    config: &XdpConfig,
    bind: SocketAddr,
    max_datagram: usize,
    first_id: usize,
    factory: Arc<F>,
) -> io::Result<Option<XdpGroup>>
where
    H: SessionHandler,
    F: Fn(usize) -> H + Send + Sync + 'static,
{
    let iface = Interface::lookup(&config.iface)?;
    if let Err(e) = xsk::open_socket() {
        tracing::warn!(
            "--xdp {}: this kernel has no AF_XDP sockets ({e}; Linux 4.18 with CONFIG_XDP_SOCKETS); serving on the ring path only",
            config.iface
        );
        return Ok(None);
    }
    let map = crate::ebpf::XskMap::create(iface.rx_queues);
    let prepared = map.and_then(|map| {
        let insns = program::build(bind, &map)?;
        let prog = crate::ebpf::load_program_for(
            crate::ebpf::PROG_XDP,
            crate::ebpf::ATTACH_XDP,
            "udpring_xdp",
            &insns,
        )?;
        Ok((map, prog))
    });
    let (map, prog) = match prepared {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(
                "--xdp {}: the kernel refused the XDP program or its XSKMAP ({e}; it needs Linux 5.9 and CAP_BPF with CAP_NET_ADMIN); serving on the ring path only",
                config.iface
            );
            return Ok(None);
        }
    };
    let map = Arc::new(map);
    let max_datagram = max_datagram.min(max_payload(iface.mtu));
    let mut workers = Vec::new();
    let mut ready = Vec::new();
    for queue in 0..iface.rx_queues {
        let shared = Arc::new(WorkerShared::new()?);
        let (tx, rx) = std::sync::mpsc::channel::<io::Result<CopyMode>>();
        let id = first_id + queue as usize;
        let thread = {
            let shared = shared.clone();
            let factory = factory.clone();
            let map = map.clone();
            let config = config.clone();
            let iface = iface.clone();
            std::thread::Builder::new()
                .name(format!("udpring-x{queue}"))
                .spawn(move || {
                    let xsk = match xsk::Xsk::bind(
                        iface.index,
                        queue,
                        config.ring * 2,
                        config.ring,
                        config.force_copy,
                    )
                    .and_then(|x| map.set(queue, &x).map(|_| x))
                    {
                        Ok(x) => x,
                        Err(e) => {
                            let msg = format!(
                                "--xdp {}: cannot bind an AF_XDP socket to queue {queue}: {e}",
                                config.iface
                            );
                            let _ = tx.send(Err(io::Error::new(e.kind(), msg.clone())));
                            return Err(io::Error::other(msg));
                        }
                    };
                    let _ = tx.send(Ok(xsk.mode));
                    let handler = factory(id);
                    worker::Worker::new(id, bind, xsk, iface, max_datagram, shared)?.run(handler)
                })?
        };
        workers.push((shared, thread));
        ready.push(rx);
    }
    let stop_all = |workers: &[(
        Arc<WorkerShared>,
        std::thread::JoinHandle<io::Result<Stats>>,
    )]| {
        for (s, _) in workers {
            let _ = s.request_shutdown();
        }
    };
    let mut mode = CopyMode::ZeroCopy;
    for rx in ready {
        match rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("an XDP worker exited during set-up")))
        {
            Ok(CopyMode::Copy) => mode = CopyMode::Copy,
            Ok(CopyMode::ZeroCopy) => {}
            Err(e) => {
                stop_all(&workers);
                return Err(e);
            }
        }
    }
    let attached = match program::attach_loaded(iface.index, map, prog, config.mode) {
        Ok(a) => a,
        Err(e) => {
            stop_all(&workers);
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "--xdp {}: cannot attach the XDP program (BPF_LINK_CREATE, Linux 5.9): {e}",
                    config.iface
                ),
            ));
        }
    };
    tracing::info!(
        iface = %config.iface,
        queues = iface.rx_queues,
        xdp = if attached.native { "native" } else { "generic" },
        umem = if mode == CopyMode::ZeroCopy { "zero-copy" } else { "copy" },
        native_refused = attached.native_refused.as_deref().unwrap_or("-"),
        "AF_XDP path serving"
    );
    Ok(Some(XdpGroup {
        attached,
        workers,
        mode,
        iface,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_non_macs_do_not() {
        assert_eq!(parse_mac("02:00:0a:ff:00:01"), Some([2, 0, 10, 255, 0, 1]));
        for bad in [
            "",
            "02:00:0a:ff:00",
            "02:00:0a:ff:00:01:02",
            "zz:00:00:00:00:00",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_payload_limit_follows_the_mtu_and_the_frame() {
        assert_eq!(max_payload(1500), 1472);
        assert_eq!(max_payload(9000), 4096 - 256 - 14 - 28);
    }
}
