//! The AF_XDP path (`udpring serve --xdp IFACE`, issue 17 part 2), over a veth pair between
//! two network namespaces: the server in one, the client (this process's client threads,
//! moved there with `setns`) in the other.
//!
//! The client's veth sends with its TX checksum offload off (`ETHTOOL_STXCSUM`): a veth
//! otherwise hands over frames whose UDP checksum the sender never finished, which the AF_XDP
//! path, verifying checksums as a NIC-fed one must, refuses.
//!
//! Needs root and `ip`; skips with the reason locally, fails under `CI=true`.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::Duration;

use udpring::xdp::frame;

use crate::common::*;
use crate::ops::process::*;

const PORT: u16 = 9000;
const SERVER_V4: &str = "10.78.0.1";
const CLIENT_V4: &str = "10.78.0.2";
const SERVER_V6: &str = "fd78::1";
const CLIENT_V6: &str = "fd78::2";

/// A server namespace and a client namespace joined by a veth pair (`s0` there, `c0` here),
/// MTU 1600 so that a 1,472-byte payload fits over IPv6 too. Removed when dropped.
struct Pair {
    server: String,
    client: String,
}

fn sh(cmd: &str) -> std::process::Output {
    Command::new("sh").args(["-c", cmd]).output().expect("sh")
}

impl Pair {
    fn up(tag: &str) -> Option<Pair> {
        Pair::with_queues(tag, 1)
    }

    /// A pair whose ends have `queues` queues each (a veth's native XDP wants its RX queues
    /// to be at least its peer's TX queues).
    fn with_queues(tag: &str, queues: u32) -> Option<Pair> {
        // SAFETY: geteuid(2) takes no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            skip_or_fail("the AF_XDP tests need root (network namespaces, XDP, AF_XDP)");
            return None;
        }
        if !sh("command -v ip").status.success() {
            skip_or_fail("the AF_XDP tests need ip (iproute2)");
            return None;
        }
        let id = std::process::id() % 100_000;
        let pair = Pair {
            server: format!("urx{id}{tag}s"),
            client: format!("urx{id}{tag}c"),
        };
        let (s, c) = (&pair.server, &pair.client);
        let script = format!(
            "set -e
             ip netns add {s}; ip netns add {c}
             ip link add s0 numrxqueues {queues} numtxqueues {queues} netns {s} type veth peer name c0 numrxqueues {queues} numtxqueues {queues} netns {c}
             ip -n {s} link set s0 mtu 1600; ip -n {c} link set c0 mtu 1600
             ip -n {s} addr add {SERVER_V4}/24 dev s0; ip -n {c} addr add {CLIENT_V4}/24 dev c0
             ip -n {s} addr add {SERVER_V6}/64 dev s0 nodad; ip -n {c} addr add {CLIENT_V6}/64 dev c0 nodad
             ip -n {s} link set s0 up; ip -n {c} link set c0 up
             ip -n {s} link set lo up; ip -n {c} link set lo up"
        );
        let out = sh(&script);
        assert!(
            out.status.success(),
            "namespaces: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::scope(|t| {
            t.spawn(|| {
                enter_netns(c);
                tx_checksum_offload("c0", false);
            });
        });
        Some(pair)
    }

    fn serve(&self, args: &[&str]) -> Proc {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.server])
            .arg(env!("CARGO_BIN_EXE_udpring"))
            .args(["serve", "--workers", "1", "--xdp", "s0"])
            .args(args);
        spawn_serving(cmd)
    }

    /// Runs `f` on a thread in the client namespace.
    fn client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|t| {
            t.spawn(|| {
                enter_netns(&self.client);
                f()
            })
            .join()
            .expect("client thread")
        })
    }

    /// Whether an XDP program is attached to the server's veth.
    fn program_attached(&self) -> bool {
        let out = sh(&format!("ip -n {} link show dev s0", self.server));
        String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
    }

    fn mac(&self, ns: &str, dev: &str) -> [u8; 6] {
        let out = sh(&format!("ip -n {ns} -o link show dev {dev}"));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let at = text.find("link/ether ").expect("an Ethernet address") + 11;
        let mut mac = [0u8; 6];
        for (b, part) in mac.iter_mut().zip(text[at..at + 17].split(':')) {
            *b = u8::from_str_radix(part, 16).expect("hex");
        }
        mac
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = sh(&format!(
            "ip netns del {} 2>/dev/null; ip netns del {} 2>/dev/null",
            self.server, self.client
        ));
    }
}

/// `ethtool -K DEV tx on|off` without ethtool: `ETHTOOL_STXCSUM` through `SIOCETHTOOL`.
fn tx_checksum_offload(dev: &str, on: bool) {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    let mut value = EthtoolValue {
        cmd: 0x17,
        data: u32::from(on),
    };
    let mut req = IfReq {
        name: [0; 16],
        data: &mut value,
        _pad: [0; 16],
    };
    req.name[..dev.len()].copy_from_slice(dev.as_bytes());
    // SAFETY: a UDP socket for the ioctl, owned at once.
    let sock = unsafe { OwnedFd::from_raw_fd(libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0)) };
    // SAFETY: SIOCETHTOOL reads the ifreq and the ethtool_value it points at, both live.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), 0x8946, &mut req as *mut IfReq) };
    assert_eq!(
        rc,
        0,
        "ETHTOOL_STXCSUM: {}",
        std::io::Error::last_os_error()
    );
}

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + n) as u8).collect()
}

/// Every size from 0 to 1,472 bytes, over IPv4 and IPv6, echoes exactly, and every one of
/// them went through the AF_XDP socket (none through the ring path's UDP socket).
#[test]
fn every_size_echoes_exactly_over_ipv4_and_ipv6() {
    let Some(pair) = Pair::up("e") else { return };
    let server = pair.serve(&["--bind", &format!("[::]:{PORT}")]);
    assert!(pair.program_attached(), "no XDP program on s0");
    let sizes = 0..=1472usize;
    let sent = pair.client(|| {
        let mut sent = 0u64;
        for (bind, to) in [
            ("0.0.0.0:0", format!("{SERVER_V4}:{PORT}")),
            ("[::]:0", format!("[{SERVER_V6}]:{PORT}")),
        ] {
            let sock = UdpSocket::bind(bind).expect("client socket");
            let to: SocketAddr = to.parse().unwrap();
            for n in sizes.clone() {
                let p = payload(n);
                let (reply, from) = round_trip(&sock, to, &p)
                    .unwrap_or_else(|| panic!("no echo of {n} bytes to {to}"));
                assert_eq!(from, to);
                assert!(reply == p, "the echo of {n} bytes to {to} differs");
                sent += 1;
            }
        }
        sent
    });
    let done = server.term();
    assert_exit_0(&done, "udpring --xdp");
    assert_eq!(
        final_counter(&done, "xdp_frames_rx"),
        sent,
        "{}",
        done.stdout
    );
    assert_eq!(final_counter(&done, "rx"), sent);
    assert_eq!(final_counter(&done, "tx"), sent);
    assert_eq!(final_counter(&done, "xdp_bad_checksum"), 0);
}

/// One AF_XDP socket and worker per receive queue: with two queues, flows spread over both
/// (the veth picks the queue by the sender's flow hash), and every datagram of every flow
/// is answered exactly, by the worker of its queue.
#[test]
fn each_queue_has_its_own_socket_and_worker() {
    let Some(pair) = Pair::with_queues("q", 2) else {
        return;
    };
    let server = pair.serve(&["--bind", &format!("{SERVER_V4}:{PORT}")]);
    let flows = 32;
    let per_flow = 20;
    pair.client(|| {
        let to: SocketAddr = format!("{SERVER_V4}:{PORT}").parse().unwrap();
        for f in 0..flows {
            let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
            for i in 0..per_flow {
                let p = format!("flow {f} datagram {i}").into_bytes();
                let (reply, _) = round_trip(&sock, to, &p).expect("echo");
                assert_eq!(reply, p);
            }
        }
    });
    let done = server.term();
    assert_exit_0(&done, "udpring --xdp");
    assert_eq!(final_counter(&done, "xdp_frames_rx"), flows * per_flow);
    // The `final total` log line lists each worker's datagrams: the ring worker's, then one
    // per queue's AF_XDP worker.
    let line = done
        .stderr
        .lines()
        .find(|l| l.contains("final total"))
        .unwrap_or_else(|| panic!("no final total line:\n{}", done.stderr));
    let list = &line[line.find("per_worker_rx=[").expect("per_worker_rx") + 15..];
    let per_worker: Vec<u64> = list[..list.find(']').unwrap()]
        .split(", ")
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(per_worker.len(), 3, "{line}");
    assert_eq!(per_worker[0], 0, "the ring worker got datagrams: {line}");
    assert!(
        per_worker[1] > 0 && per_worker[2] > 0,
        "a queue's worker got nothing: {line}"
    );
}

/// What the program passes still reaches the kernel: ARP (the client's neighbour entry is
/// flushed first), ICMP (ping), UDP to another port (a socket of this test), and UDP to the
/// served port with IP options, which the ring path's worker answers.
#[test]
fn arp_icmp_other_ports_and_ip_options_still_reach_the_kernel() {
    let Some(pair) = Pair::up("k") else { return };
    let server = pair.serve(&["--bind", &format!("0.0.0.0:{PORT}")]);
    assert!(pair.program_attached());
    let other = std::thread::scope(|t| {
        t.spawn(|| {
            enter_netns(&pair.server);
            UdpSocket::bind(format!("{SERVER_V4}:{}", PORT + 1)).expect("other port")
        })
        .join()
        .unwrap()
    });
    // A fresh neighbour table: the ping below needs ARP first.
    let flush = sh(&format!("ip -n {} neigh flush dev c0", pair.client));
    assert!(flush.status.success());
    pair.client(|| {
        // SAFETY: a raw ICMP socket, owned at once.
        let icmp = unsafe {
            OwnedFd::from_raw_fd(libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMP,
            ))
        };
        assert!(icmp.as_raw_fd() >= 0);
        let icmp = UdpSocket::from(icmp); // only for its timeouts and send_to/recv_from
        icmp.set_read_timeout(Some(WAIT)).unwrap();
        let mut echo = [8u8, 0, 0, 0, 0x12, 0x34, 0, 1, b'u', b'r'];
        let c = frame::checksum(&echo);
        echo[2..4].copy_from_slice(&c.to_be_bytes());
        icmp.send_to(&echo, format!("{SERVER_V4}:0"))
            .expect("ICMP echo");
        let mut buf = [0u8; 128];
        let got_reply = (0..8).any(|_| match icmp.recv_from(&mut buf) {
            // An IPv4 header of 20 bytes, then an echo reply (type 0) with our identifier.
            Ok((n, _)) => n >= 28 && buf[20] == 0 && buf[24..26] == [0x12, 0x34],
            Err(_) => false,
        });
        assert!(
            got_reply,
            "no ICMP echo reply (ARP or ICMP did not reach the kernel)"
        );
    });
    pair.client(|| {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.send_to(b"other port", format!("{SERVER_V4}:{}", PORT + 1))
            .unwrap();
        let mut buf = [0u8; 64];
        other
            .set_read_timeout(Some(WAIT))
            .expect("timeout on the other port");
        let (n, _) = other.recv_from(&mut buf).expect("the other port got it");
        assert_eq!(&buf[..n], b"other port");
        // Four bytes of IP options (NOP, NOP, NOP, end): the program passes the datagram,
        // the kernel delivers it to the ring worker's socket, which echoes it.
        let opts = [1u8, 1, 1, 0];
        // SAFETY: setsockopt reads `opts.len()` bytes from a live array.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_OPTIONS,
                opts.as_ptr().cast(),
                opts.len() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "IP_OPTIONS");
        let to: SocketAddr = format!("{SERVER_V4}:{PORT}").parse().unwrap();
        let (reply, _) = round_trip(&sock, to, b"with options").expect("echo with IP options");
        assert_eq!(reply, b"with options");
    });
    let done = server.term();
    assert_exit_0(&done, "udpring --xdp");
    // The one datagram with options went through the kernel: not an AF_XDP frame.
    assert_eq!(final_counter(&done, "xdp_frames_rx"), 0, "{}", done.stdout);
    assert_eq!(final_counter(&done, "rx"), 1);
}

/// Frames with a bad UDP checksum, a bad IPv4 header checksum, a UDP length that disagrees
/// with the IP length, an IP length past the frame, or no UDP checksum over IPv6 are counted
/// and never answered; a good frame sent after them is.
#[test]
fn malformed_frames_are_counted_and_never_answered() {
    let Some(pair) = Pair::up("m") else { return };
    let server = pair.serve(&["--bind", &format!("[::]:{PORT}")]);
    let server_mac = pair.mac(&pair.server, "s0");
    let client_mac = pair.mac(&pair.client, "c0");
    pair.client(|| {
        let listen = UdpSocket::bind("[::]:0").expect("reply socket");
        let port = listen.local_addr().unwrap().port();
        listen
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let build = |v6: bool, body: &[u8]| {
            let (src, dst): (SocketAddr, SocketAddr) = if v6 {
                (
                    format!("[{CLIENT_V6}]:{port}").parse().unwrap(),
                    format!("[{SERVER_V6}]:{PORT}").parse().unwrap(),
                )
            } else {
                (
                    format!("{CLIENT_V4}:{port}").parse().unwrap(),
                    format!("{SERVER_V4}:{PORT}").parse().unwrap(),
                )
            };
            let hdr = frame::header_len(&src);
            let mut f = vec![0u8; hdr + body.len()];
            f[hdr..].copy_from_slice(body);
            let route = frame::Route {
                src_mac: client_mac,
                dst_mac: server_mac,
                src,
                dst,
                ecn: 0,
            };
            frame::write_headers(&mut f, &route, body.len()).unwrap();
            f
        };
        // SAFETY: a packet socket, owned at once.
        let raw = unsafe {
            OwnedFd::from_raw_fd(libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                0, // send only
            ))
        };
        assert!(raw.as_raw_fd() >= 0);
        let ifindex = {
            let name = std::ffi::CString::new("c0").unwrap();
            // SAFETY: a NUL-terminated name that outlives the call.
            unsafe { libc::if_nametoindex(name.as_ptr()) }
        };
        let send = |f: &[u8]| {
            // SAFETY: all-zero is a valid sockaddr_ll, filled in below.
            let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sa.sll_family = libc::AF_PACKET as u16;
            sa.sll_ifindex = ifindex as i32;
            sa.sll_halen = 6;
            sa.sll_addr[..6].copy_from_slice(&server_mac);
            // SAFETY: sends `f`, a live slice, to a live sockaddr_ll of the size given.
            let n = unsafe {
                libc::sendto(
                    raw.as_raw_fd(),
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    &sa as *const libc::sockaddr_ll as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            assert_eq!(n, f.len() as isize, "{}", std::io::Error::last_os_error());
        };
        let udp_at = |v6: bool| if v6 { 54 } else { 34 };
        let mut bad = Vec::new();
        for v6 in [false, true] {
            let mut f = build(v6, b"bad udp checksum");
            *f.last_mut().unwrap() ^= 0xff;
            bad.push(f);
            let mut f = build(v6, b"udp length");
            let at = udp_at(v6) + 4;
            let l = u16::from_be_bytes([f[at], f[at + 1]]) - 1;
            f[at..at + 2].copy_from_slice(&l.to_be_bytes());
            bad.push(f);
        }
        let mut f = build(false, b"ip header checksum");
        f[14 + 8] -= 1; // TTL, under the header checksum
        bad.push(f);
        let mut f = build(false, b"cut short");
        f.truncate(f.len() - 4); // the IP length now runs past the frame
        bad.push(f);
        let mut f = build(true, b"no checksum over IPv6");
        f[54 + 6..54 + 8].copy_from_slice(&[0, 0]);
        bad.push(f);
        for f in &bad {
            send(f);
        }
        let mut buf = [0u8; 2048];
        assert!(
            listen.recv_from(&mut buf).is_err(),
            "a malformed frame was answered"
        );
        // A good one after them is answered: the worker read past them.
        send(&build(false, b"good"));
        listen.set_read_timeout(Some(WAIT)).unwrap();
        let (n, _) = listen
            .recv_from(&mut buf)
            .expect("the good frame is answered");
        assert_eq!(&buf[..n], b"good");
    });
    let done = server.term();
    assert_exit_0(&done, "udpring --xdp");
    // Bad UDP checksums (2), a bad IPv4 header checksum, no checksum over IPv6.
    assert_eq!(
        final_counter(&done, "xdp_bad_checksum"),
        4,
        "{}",
        done.stdout
    );
    // UDP lengths (2) and the IP length past the frame.
    assert_eq!(final_counter(&done, "malformed"), 3, "{}", done.stdout);
    assert_eq!(final_counter(&done, "rx"), 1);
    assert_eq!(final_counter(&done, "tx"), 1);
}

/// The program is attached through a BPF link: SIGKILL leaves nothing on the interface, and
/// a new server attaches at once.
#[test]
fn the_program_is_gone_after_sigkill() {
    let Some(pair) = Pair::up("g") else { return };
    let mut server = pair.serve(&["--bind", &format!("{SERVER_V4}:{PORT}")]);
    assert!(pair.program_attached());
    server.child.kill().expect("SIGKILL");
    let _ = server.child.wait();
    assert!(
        wait_until(WAIT, || !pair.program_attached()),
        "the XDP program outlived the process"
    );
    let again = pair.serve(&["--bind", &format!("{SERVER_V4}:{PORT}")]);
    assert!(pair.program_attached());
    pair.client(|| {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        let to: SocketAddr = format!("{SERVER_V4}:{PORT}").parse().unwrap();
        assert_eq!(round_trip(&sock, to, b"again").expect("echo").0, b"again");
    });
    let done = again.term();
    assert_eq!(final_counter(&done, "xdp_frames_rx"), 1, "{}", done.stdout);
}

/// Without CAP_BPF the kernel refuses the program: one warning line, and the ring path
/// serves alone.
#[test]
fn a_refused_program_is_one_line_and_the_ring_path_serves() {
    let Some(pair) = Pair::up("r") else { return };
    if Command::new("setpriv").arg("--version").output().is_err() {
        skip_or_fail("setpriv (util-linux) is not installed");
        return;
    }
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &pair.server])
        .args([
            "setpriv",
            "--bounding-set",
            "-bpf,-sys_admin,-perfmon",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_udpring"))
        .args(["serve", "--workers", "1", "--xdp", "s0", "--bind"])
        .arg(format!("{SERVER_V4}:{PORT}"));
    let server = spawn_serving(cmd);
    assert!(!pair.program_attached());
    pair.client(|| {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        let to: SocketAddr = format!("{SERVER_V4}:{PORT}").parse().unwrap();
        assert_eq!(round_trip(&sock, to, b"ring").expect("echo").0, b"ring");
    });
    let done = server.term();
    let warnings: Vec<&str> = done
        .stderr
        .lines()
        .filter(|l| l.contains("--xdp s0"))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", done.stderr);
    assert!(warnings[0].contains("ring path only"), "{}", warnings[0]);
    assert_eq!(final_counter(&done, "rx"), 1);
}

/// Options that cannot work with --xdp are refused in one line before anything starts.
#[test]
fn sessions_with_sockets_of_their_own_and_bad_interfaces_are_refused() {
    for (args, expect) in [
        (
            vec!["--xdp", "lo", "--sessions", "connected"],
            "--xdp cannot serve --sessions connected",
        ),
        (
            vec!["--xdp", "lo", "--sessions", "port-per-client"],
            "--xdp cannot serve --sessions port-per-client",
        ),
        (vec!["--xdp", "no-such-if0"], "no such interface"),
        (vec!["--xdp", "lo", "--xdp-ring", "100"], "--xdp-ring"),
    ] {
        let out = udpring()
            .args(["serve", "--bind", "127.0.0.1:0"])
            .args(&args)
            .output()
            .expect("udpring");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
    }
}
