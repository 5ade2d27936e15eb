//! Measures what per-client *connected* UDP sockets cost the kernel (benchmarks only; see
//! `kernel-notes/connected-sockets.md`).
//!
//! All traffic is on loopback, by default inside a private network namespace that this
//! program creates (needs root; `--no-netns` uses the host's loopback instead).
//!
//! * **a**: per-datagram kernel cost (send + the whole receive path + `recv`) with N connected
//!   sockets bound to the same `127.0.0.1:P` as two unconnected SO_REUSEPORT listeners:
//!   traffic to an established session's socket, to a socket whose hash4 entry is stale (so
//!   the lookup takes the pre-6.13 chain walk), and from an unknown peer (lands on a listener).
//!   The server-side sockets are connected to `127.0.0.2:port_i`; nothing needs to exist
//!   there because `connect()` on UDP sends nothing, so N sessions cost N descriptors.
//! * **b**: set-up cost per session (socket + setsockopt + bind + connect), with and without
//!   SO_REUSEADDR, with E sessions already on the port; and close cost.
//! * **c**: the bind/connect window: under a flood from other peers, how many of their
//!   datagrams land on freshly set-up per-client sockets.
//!
//! `cargo run --release --example measure_connected -- --n 1,1000,10000,15000`

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Kernel cost of per-client connected UDP sockets (loopback)")]
struct Args {
    /// Connected-socket counts for part a (skipped if they would not fit the fd limit).
    #[arg(long, value_delimiter = ',', default_value = "0,1,1000,10000,15000")]
    n: Vec<usize>,
    /// Milliseconds per timed run in part a.
    #[arg(long, default_value_t = 300)]
    ms: u64,
    /// Runs per configuration (medians are reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Existing-session counts for part b.
    #[arg(long, value_delimiter = ',', default_value = "0,1000,10000")]
    setup_existing: Vec<usize>,
    /// Sessions set up (and closed) per run in part b.
    #[arg(long, default_value_t = 200)]
    setup_k: usize,
    /// Sessions set up back to back under the flood in part c (per variant).
    #[arg(long, default_value_t = 3000)]
    window_sessions: usize,
    /// Extra busy wait between bind() and connect() in part c's second variant (µs).
    #[arg(long, default_value_t = 20)]
    window_gap_us: u64,
    /// Parts to run (a, b, c).
    #[arg(long, value_delimiter = ',', default_value = "a,b,c")]
    parts: Vec<String>,
    /// CPU to pin the measuring thread to (part c's flood gets another one).
    #[arg(long, default_value_t = 1)]
    cpu: usize,
    /// Use the host's loopback instead of a private network namespace.
    #[arg(long)]
    no_netns: bool,
    /// First server port used (a few consecutive ports are used).
    #[arg(long, default_value_t = 7000)]
    port: u16,
}

const SERVER_IP: [u8; 4] = [127, 0, 0, 1];
const PEER_IP: [u8; 4] = [127, 0, 0, 2];
const OTHER_IP: [u8; 4] = [127, 0, 0, 3];
/// Fake client ports of sessions start here (127.0.0.2:PEER_BASE + i).
const PEER_BASE: u32 = 10_000;
const PAYLOAD: usize = 64;

// ---------------------------------------------------------------- syscall helpers

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn sin(ip: [u8; 4], port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip),
        },
        sin_zero: [0; 8],
    }
}

fn peer_port(i: usize) -> u16 {
    let p = PEER_BASE + i as u32;
    assert!(p < 65_536, "too many sessions for the fake peer port range");
    p as u16
}

fn udp_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call with constant arguments.
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_int_opt(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    val: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `val` is a valid c_int for the duration of the call and the length matches.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn bind_to(fd: RawFd, a: &libc::sockaddr_in) -> io::Result<()> {
    // SAFETY: `a` is a valid sockaddr_in and the length matches.
    cvt(unsafe {
        libc::bind(
            fd,
            (a as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn connect_to(fd: RawFd, a: &libc::sockaddr_in) -> io::Result<()> {
    // SAFETY: `a` is a valid sockaddr_in and the length matches.
    cvt(unsafe {
        libc::connect(
            fd,
            (a as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// An unconnected SO_REUSEPORT (and optionally SO_REUSEADDR) socket bound to `ip:port`.
fn bound(ip: [u8; 4], port: u16, reuseaddr: bool) -> io::Result<OwnedFd> {
    let s = udp_socket()?;
    if reuseaddr {
        set_int_opt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    }
    set_int_opt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    bind_to(s.as_raw_fd(), &sin(ip, port))?;
    Ok(s)
}

/// A per-client session socket: bound to the server's `ip:port`, connected to the peer.
fn session(port: u16, peer: u16, reuseaddr: bool) -> io::Result<OwnedFd> {
    let s = bound(SERVER_IP, port, reuseaddr)?;
    connect_to(s.as_raw_fd(), &sin(PEER_IP, peer))?;
    Ok(s)
}

/// A client socket bound to `ip:port` and connected to the server.
fn client(ip: [u8; 4], port: u16, server_port: u16) -> io::Result<OwnedFd> {
    let s = udp_socket()?;
    bind_to(s.as_raw_fd(), &sin(ip, port))?;
    connect_to(s.as_raw_fd(), &sin(SERVER_IP, server_port))?;
    Ok(s)
}

fn local_port(fd: RawFd) -> io::Result<u16> {
    // SAFETY: an all-zero sockaddr_in is a valid value.
    let mut a: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: `a`/`len` describe a valid, writable sockaddr_in.
    cvt(unsafe { libc::getsockname(fd, (&mut a as *mut libc::sockaddr_in).cast(), &mut len) })?;
    Ok(u16::from_be(a.sin_port))
}

fn send_buf(fd: RawFd, buf: &[u8]) -> isize {
    // SAFETY: `buf` is readable for its length; `fd` is open.
    unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), 0) }
}

/// Non-blocking receive; returns the length and the sender.
fn recv_from(fd: RawFd, buf: &mut [u8]) -> Option<(usize, libc::sockaddr_in)> {
    // SAFETY: an all-zero sockaddr_in is a valid value.
    let mut from: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: `buf` is writable for its length; `from`/`len` describe a valid sockaddr_in.
    let n = unsafe {
        libc::recvfrom(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
            (&mut from as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    (n >= 0).then_some((n as usize, from))
}

fn poll_in(fd: RawFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd.
    unsafe { libc::poll(&mut p, 1, timeout_ms) > 0 }
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    // SAFETY: an all-zero timespec is valid; clock_gettime only writes it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn mono_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

fn pin_to(cpu: usize) -> bool {
    // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET only writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the index is reduced modulo CPU_SETSIZE, so CPU_SET writes inside `set`.
    unsafe { libc::CPU_SET(cpu % libc::CPU_SETSIZE as usize, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0 }
}

/// Online CPUs (not the affinity mask, which pinning narrows).
fn ncpus() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    n.max(1) as usize
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Raises the soft fd limit to the hard one; returns the soft limit in force.
fn raise_nofile() -> u64 {
    // SAFETY: an all-zero rlimit is valid; getrlimit only writes it.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `rl` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return 1024;
    }
    if rl.rlim_cur < rl.rlim_max {
        let want = libc::rlimit {
            rlim_cur: rl.rlim_max,
            rlim_max: rl.rlim_max,
        };
        // SAFETY: `want` is a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            rl.rlim_cur = rl.rlim_max;
        }
    }
    rl.rlim_cur
}

/// Moves this process (still single-threaded) into a fresh network namespace and brings
/// its loopback up.
fn enter_netns() -> io::Result<()> {
    // SAFETY: unshare(2) with a constant flag; called before any thread is spawned.
    cvt(unsafe { libc::unshare(libc::CLONE_NEWNET) })?;
    let s = udp_socket()?;
    // SAFETY: an all-zero ifreq is valid (empty name, zero flags).
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, c) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *c as libc::c_char;
    }
    // SAFETY: `ifr` is a valid ifreq naming "lo"; SIOCGIFFLAGS fills ifru_flags.
    cvt(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) })?;
    // SAFETY: SIOCGIFFLAGS initialised the ifru_flags member of the union.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: `ifr` is a valid ifreq; SIOCSIFFLAGS only reads it.
    cvt(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) })?;
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn fmt_ns(ns: f64) -> String {
    if ns.is_nan() {
        return "–".into();
    }
    let n = ns.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn fmt_us(ns: f64) -> String {
    format!("{:.1} µs", ns / 1000.0)
}

// ---------------------------------------------------------------- part a

struct PingPong {
    cpu_ns: f64,
    wall_ns: f64,
    iters: u64,
    misses: u64,
}

/// Sends on `tx`, receives on `rx`, one datagram at a time, for `ms` milliseconds.
fn ping_pong(tx: RawFd, rx: RawFd, ms: u64) -> PingPong {
    let out = [0x5au8; PAYLOAD];
    let mut buf = [0u8; 2048];
    let mut one = |misses: &mut u64| {
        send_buf(tx, &out);
        if recv_from(rx, &mut buf).is_none() {
            // Loopback normally delivers inside send(); allow a late delivery.
            if !(poll_in(rx, 100) && recv_from(rx, &mut buf).is_some()) {
                *misses += 1;
            }
        }
    };
    let mut misses = 0;
    for _ in 0..50 {
        one(&mut misses);
    }
    misses = 0;
    let deadline = Instant::now() + Duration::from_millis(ms);
    let (c0, t0) = (thread_cpu_ns(), Instant::now());
    let mut iters = 0u64;
    loop {
        for _ in 0..16 {
            one(&mut misses);
        }
        iters += 16;
        if Instant::now() >= deadline {
            break;
        }
    }
    let (c1, wall) = (thread_cpu_ns(), t0.elapsed());
    PingPong {
        cpu_ns: (c1 - c0) as f64 / iters as f64,
        wall_ns: wall.as_nanos() as f64 / iters as f64,
        iters,
        misses,
    }
}

/// Finds which of `listeners` receives what `tx` sends.
fn which_listener(tx: RawFd, listeners: &[OwnedFd]) -> io::Result<RawFd> {
    let mut buf = [0u8; 2048];
    send_buf(tx, &[1u8; PAYLOAD]);
    for _ in 0..100 {
        for l in listeners {
            if recv_from(l.as_raw_fd(), &mut buf).is_some() {
                return Ok(l.as_raw_fd());
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Err(io::Error::other(
        "probe from the unknown peer reached no listener",
    ))
}

fn part_a(args: &Args, fd_limit: u64) -> io::Result<()> {
    println!("\n## a. Per-datagram kernel cost (send + receive path + recv), ns per datagram\n");
    println!(
        "Median of {} runs of {} ms each, pinned to CPU {}; CPU = thread CPU time \
         (CLOCK_THREAD_CPUTIME_ID), wall in brackets. N connected sockets on 127.0.0.1:P plus 2 \
         unconnected SO_REUSEPORT listeners.\n",
        args.runs, args.ms, args.cpu
    );
    println!(
        "| connected sockets N | established (hash4 hit) | established, stale hash4 \
         (pre-6.13 walk) | unknown peer -> listener | unknown / established |"
    );
    println!("|---:|---:|---:|---:|---:|");
    {
        // Warm-up (caches, frequency) on a throw-away port; not reported.
        let l = bound(SERVER_IP, args.port + 99, false)?;
        let c = client(OTHER_IP, 40_001, args.port + 99)?;
        ping_pong(c.as_raw_fd(), l.as_raw_fd(), args.ms);
    }
    for (idx, &n) in args.n.iter().enumerate() {
        if n as u64 + 64 > fd_limit {
            println!(
                "| {n} | skipped: needs {} fds, limit {fd_limit} | | | |",
                n + 64
            );
            continue;
        }
        let port = args.port + idx as u16;
        let listeners = vec![
            bound(SERVER_IP, port, false)?,
            bound(SERVER_IP, port, false)?,
        ];
        let mut sessions = Vec::with_capacity(n);
        for i in 0..n {
            sessions.push(session(port, peer_port(i), false)?);
        }
        // The measured established session sits in the middle of the chain.
        let k = n / 2;
        let est = (n > 0)
            .then(|| client(PEER_IP, peer_port(k), port))
            .transpose()?;
        // A session whose hash4 entry is stale: connected to a dummy peer first, then to its
        // real peer. Its traffic misses hash4 and is found by the hash2 chain walk.
        let stale = if n > 0 {
            let s = bound(SERVER_IP, port, false)?;
            connect_to(s.as_raw_fd(), &sin(PEER_IP, 9))?;
            connect_to(s.as_raw_fd(), &sin(PEER_IP, peer_port(n + 1)))?;
            let c = client(PEER_IP, peer_port(n + 1), port)?;
            Some((s, c))
        } else {
            None
        };
        let unknown = client(OTHER_IP, 40_000, port)?;
        let unknown_rx = which_listener(unknown.as_raw_fd(), &listeners)?;

        let (mut e_cpu, mut e_wall, mut s_cpu, mut s_wall, mut u_cpu, mut u_wall) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        let mut misses = 0;
        let mut min_iters = u64::MAX;
        for _ in 0..args.runs {
            if let Some(c) = &est {
                let r = ping_pong(c.as_raw_fd(), sessions[k].as_raw_fd(), args.ms);
                e_cpu.push(r.cpu_ns);
                e_wall.push(r.wall_ns);
                misses += r.misses;
                min_iters = min_iters.min(r.iters);
            }
            if let Some((s, c)) = &stale {
                let r = ping_pong(c.as_raw_fd(), s.as_raw_fd(), args.ms);
                s_cpu.push(r.cpu_ns);
                s_wall.push(r.wall_ns);
                misses += r.misses;
                min_iters = min_iters.min(r.iters);
            }
            let r = ping_pong(unknown.as_raw_fd(), unknown_rx, args.ms);
            u_cpu.push(r.cpu_ns);
            u_wall.push(r.wall_ns);
            misses += r.misses;
            min_iters = min_iters.min(r.iters);
        }
        let (ec, sc, uc) = (median(&mut e_cpu), median(&mut s_cpu), median(&mut u_cpu));
        let (ew, sw, uw) = (
            median(&mut e_wall),
            median(&mut s_wall),
            median(&mut u_wall),
        );
        println!(
            "| {} | {} ({}) | {} ({}) | {} ({}) | {} |",
            fmt_ns(n as f64),
            fmt_ns(ec),
            fmt_ns(ew),
            fmt_ns(sc),
            fmt_ns(sw),
            fmt_ns(uc),
            fmt_ns(uw),
            if ec.is_nan() {
                "–".into()
            } else {
                format!("{:.1}x", uc / ec)
            },
        );
        if misses > 0 {
            println!("|  | ({misses} datagrams not received within 100 ms) | | | |");
        }
        if min_iters < 100 {
            println!("|  | (only {min_iters} datagrams in the shortest run) | | | |");
        }
        drop((sessions, stale, est, listeners));
    }
    part_a_ports(args, fd_limit)
}

/// The port-per-client model: N sockets on kernel-chosen ports (bind to port 0, then
/// connect), so they live in other hash2 slots than the listeners.
fn part_a_ports(args: &Args, fd_limit: u64) -> io::Result<()> {
    println!(
        "\nPort-per-client model for comparison: N sockets bound to 127.0.0.1:0 (kernel-chosen \
         port) and connected to 127.0.0.2:port_i; same listeners on 127.0.0.1:P. Set-up = \
         socket + bind + connect, median over all N.\n"
    );
    println!(
        "| sockets N | to a per-client port | unknown peer -> listener | set-up per session |"
    );
    println!("|---:|---:|---:|---:|");
    for (idx, &n) in args.n.iter().enumerate() {
        if n == 0 || n as u64 + 64 > fd_limit {
            continue;
        }
        let port = args.port + 50 + idx as u16;
        let listeners = vec![
            bound(SERVER_IP, port, false)?,
            bound(SERVER_IP, port, false)?,
        ];
        let mut socks = Vec::with_capacity(n);
        let mut setup = Vec::with_capacity(n);
        for i in 0..n {
            let t = Instant::now();
            let s = udp_socket()?;
            bind_to(s.as_raw_fd(), &sin(SERVER_IP, 0))?;
            connect_to(s.as_raw_fd(), &sin(PEER_IP, peer_port(i)))?;
            setup.push(t.elapsed().as_nanos() as f64);
            socks.push(s);
        }
        let k = n / 2;
        let est = client(PEER_IP, peer_port(k), local_port(socks[k].as_raw_fd())?)?;
        let unknown = client(OTHER_IP, 40_000, port)?;
        let unknown_rx = which_listener(unknown.as_raw_fd(), &listeners)?;
        let (mut e, mut u) = (vec![], vec![]);
        for _ in 0..args.runs {
            e.push(ping_pong(est.as_raw_fd(), socks[k].as_raw_fd(), args.ms).cpu_ns);
            u.push(ping_pong(unknown.as_raw_fd(), unknown_rx, args.ms).cpu_ns);
        }
        println!(
            "| {} | {} | {} | {} |",
            fmt_ns(n as f64),
            fmt_ns(median(&mut e)),
            fmt_ns(median(&mut u)),
            fmt_us(median(&mut setup)),
        );
        drop((socks, est, unknown, listeners));
    }
    Ok(())
}

// ---------------------------------------------------------------- part b

fn part_b(args: &Args, fd_limit: u64) -> io::Result<()> {
    println!("\n## b. Session set-up and close cost (wall time per session, median)\n");
    println!(
        "New session = socket + setsockopt(s) + bind(127.0.0.1:P) + connect(127.0.0.2:port). \
         E existing sessions (same options) + 2 listeners already on the port; {} new sessions \
         per run x {} runs; then each new session is closed.\n",
        args.setup_k, args.runs
    );
    println!(
        "| options | existing sessions E | set-up total | socket | setsockopt | bind | connect \
         | close (new session) | close (mean, teardown of E) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut port = args.port + 100;
    for reuseaddr in [false, true] {
        for &e in &args.setup_existing {
            port += 1;
            let name = if reuseaddr {
                "SO_REUSEADDR + SO_REUSEPORT"
            } else {
                "SO_REUSEPORT"
            };
            if (e + args.setup_k) as u64 + 64 > fd_limit {
                println!("| {name} | {e} | skipped (fd limit {fd_limit}) | | | | | | |");
                continue;
            }
            let listeners = [
                bound(SERVER_IP, port, reuseaddr)?,
                bound(SERVER_IP, port, reuseaddr)?,
            ];
            let mut existing = Vec::with_capacity(e);
            for i in 0..e {
                existing.push(session(port, peer_port(i), reuseaddr)?);
            }
            let mut ph: [Vec<f64>; 6] = Default::default();
            for run in 0..args.runs {
                let mut new = Vec::with_capacity(args.setup_k);
                for j in 0..args.setup_k {
                    let peer = sin(PEER_IP, peer_port(e + run * args.setup_k + j));
                    let local = sin(SERVER_IP, port);
                    let t0 = Instant::now();
                    let s = udp_socket()?;
                    let t1 = Instant::now();
                    if reuseaddr {
                        set_int_opt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
                    }
                    set_int_opt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
                    let t2 = Instant::now();
                    bind_to(s.as_raw_fd(), &local)?;
                    let t3 = Instant::now();
                    connect_to(s.as_raw_fd(), &peer)?;
                    let t4 = Instant::now();
                    let ns = |a: Instant, b: Instant| (b - a).as_nanos() as f64;
                    ph[0].push(ns(t0, t4));
                    ph[1].push(ns(t0, t1));
                    ph[2].push(ns(t1, t2));
                    ph[3].push(ns(t2, t3));
                    ph[4].push(ns(t3, t4));
                    new.push(s);
                }
                for s in new {
                    let t = Instant::now();
                    drop(s);
                    ph[5].push(t.elapsed().as_nanos() as f64);
                }
            }
            let t = Instant::now();
            drop(existing);
            let teardown = if e > 0 {
                fmt_us(t.elapsed().as_nanos() as f64 / e as f64)
            } else {
                "–".into()
            };
            drop(listeners);
            let [a, b, c, d, f, g] = &mut ph;
            println!(
                "| {name} | {} | {} | {} | {} | {} | {} | {} | {teardown} |",
                fmt_ns(e as f64),
                fmt_us(median(a)),
                fmt_us(median(b)),
                fmt_us(median(c)),
                fmt_us(median(d)),
                fmt_us(median(f)),
                fmt_us(median(g)),
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- part c

#[derive(Default)]
struct Window {
    sessions: usize,
    sessions_hit: usize,
    sent_before_bind: u64,
    sent_in_window: u64,
    sent_after_connect: u64,
    late: u64,
    own: u64,
    window_ns: Vec<f64>,
}

/// Sets up `count` sessions back to back on `port` while the flood runs; classifies every
/// datagram from another peer found on them.
fn window_run(port: u16, count: usize, gap_us: u64, peer_off: usize) -> io::Result<Window> {
    let mut w = Window {
        sessions: count,
        ..Default::default()
    };
    let mut buf = [0u8; 2048];
    let mut socks = Vec::with_capacity(count);
    let mut hit = vec![false; count];
    let mut times = Vec::with_capacity(count);
    let classify = |w: &mut Window,
                    n: usize,
                    buf: &[u8],
                    from: &libc::sockaddr_in,
                    bind_ns: u64,
                    conn_ns: u64| {
        if from.sin_addr.s_addr == u32::from_ne_bytes(PEER_IP) {
            w.own += 1;
            return false;
        }
        let sent = if n >= 8 {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[..8]);
            u64::from_ne_bytes(b)
        } else {
            0
        };
        if sent < bind_ns {
            w.sent_before_bind += 1;
        } else if sent < conn_ns {
            w.sent_in_window += 1;
        } else {
            w.sent_after_connect += 1;
        }
        true
    };
    for (i, hit_i) in hit.iter_mut().enumerate() {
        let peer = sin(PEER_IP, peer_port(peer_off + i));
        let s = udp_socket()?;
        set_int_opt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
        let t_bind = mono_ns();
        bind_to(s.as_raw_fd(), &sin(SERVER_IP, port))?;
        if gap_us > 0 {
            let until = mono_ns() + gap_us * 1000;
            while mono_ns() < until {
                std::hint::spin_loop();
            }
        }
        let t_conn = mono_ns();
        connect_to(s.as_raw_fd(), &peer)?;
        let t_done = mono_ns();
        w.window_ns.push((t_done - t_bind) as f64);
        // Drain what is queued when connect() returns.
        while let Some((n, from)) = recv_from(s.as_raw_fd(), &mut buf) {
            if classify(&mut w, n, &buf, &from, t_bind, t_done) {
                *hit_i = true;
            }
        }
        times.push((t_bind, t_conn, t_done));
        socks.push(s);
    }
    // Anything that arrives later was looked up while connect() ran (or is a bug).
    std::thread::sleep(Duration::from_millis(5));
    for (i, s) in socks.iter().enumerate() {
        while let Some((n, from)) = recv_from(s.as_raw_fd(), &mut buf) {
            let (t_bind, _, t_done) = times[i];
            if classify(&mut w, n, &buf, &from, t_bind, t_done) {
                hit[i] = true;
                w.late += 1;
            }
        }
    }
    w.sessions_hit = hit.iter().filter(|h| **h).count();
    Ok(w)
}

fn part_c(args: &Args, fd_limit: u64) -> io::Result<()> {
    println!("\n## c. The bind/connect window (datagrams from other peers on new sessions)\n");
    let count = args
        .window_sessions
        .min(fd_limit.saturating_sub(200) as usize / 2);
    let port = args.port + 200;
    let listeners = [
        bound(SERVER_IP, port, false)?,
        bound(SERVER_IP, port, false)?,
    ];
    // Flood: 64 other peers (127.0.0.3:50000+j) send timestamped datagrams to the port.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let flood_cpu = if ncpus() > 1 {
        (args.cpu + 1) % ncpus()
    } else {
        args.cpu
    };
    let flood = {
        let (stop, sent) = (stop.clone(), sent.clone());
        let mut peers = Vec::new();
        for j in 0..64u16 {
            peers.push(client(OTHER_IP, 50_000 + j, port)?);
        }
        std::thread::spawn(move || {
            pin_to(flood_cpu);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for p in &peers {
                    let mut b = [0u8; PAYLOAD];
                    b[..8].copy_from_slice(&mono_ns().to_ne_bytes());
                    send_buf(p.as_raw_fd(), &b);
                }
                n += peers.len() as u64;
                sent.store(n, Ordering::Relaxed);
            }
        })
    };
    // The listeners are not drained: once full they drop, which does not change which socket
    // the lookup picks. Let the flood reach steady state.
    std::thread::sleep(Duration::from_millis(100));
    println!(
        "Flood: 64 peers on 127.0.0.3 send 64-byte timestamped datagrams to 127.0.0.1:P as fast \
         as one thread can (CPU {flood_cpu}); 2 unconnected SO_REUSEPORT listeners. Sessions are \
         set up back to back on CPU {} (socket, SO_REUSEPORT, bind, [gap], connect) and kept \
         open; each is drained right after connect() returns, and all again 5 ms after the last. \
         'sent before bind' etc. classify strays by the flood's send timestamp (±1 send).\n",
        args.cpu
    );
    println!(
        "| gap bind->connect | sessions | flood rate | bind->connect (median) | sessions with a stray \
         | strays | sent before bind | sent between bind and connect return | sent after connect returned \
         | found only in the late drain |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut off = 0;
    for gap in [0, args.window_gap_us] {
        let (s0, t0) = (sent.load(Ordering::Relaxed), Instant::now());
        let mut w = window_run(port, count, gap, off)?;
        let rate = (sent.load(Ordering::Relaxed) - s0) as f64 / t0.elapsed().as_secs_f64();
        off += count;
        let strays = w.sent_before_bind + w.sent_in_window + w.sent_after_connect;
        println!(
            "| {} µs | {} | {:.0}k/s | {} | {} ({:.1}%) | {} | {} | {} | {} | {} |",
            gap,
            w.sessions,
            rate / 1000.0,
            fmt_us(median(&mut w.window_ns)),
            w.sessions_hit,
            100.0 * w.sessions_hit as f64 / w.sessions.max(1) as f64,
            strays,
            w.sent_before_bind,
            w.sent_in_window,
            w.sent_after_connect,
            w.late,
        );
        if w.own > 0 {
            println!(
                "|  | ({} datagrams from 127.0.0.2: unexpected) | | | | | | | | |",
                w.own
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = flood.join();
    drop(listeners);
    Ok(())
}

fn main() -> io::Result<()> {
    let args = Args::parse();
    let netns = if args.no_netns {
        "no (host loopback)".to_string()
    } else {
        match enter_netns() {
            Ok(()) => "yes (private, created by this program)".to_string(),
            Err(e) => format!("no: unshare(CLONE_NEWNET) failed ({e}); host loopback"),
        }
    };
    let fd_limit = raise_nofile();
    let pinned = pin_to(args.cpu);
    let cmd: Vec<String> = std::env::args().collect();
    println!("# measure_connected\n");
    println!("- command: `{}`", cmd.join(" "));
    println!("- kernel: {}", kernel_release());
    println!("- network namespace: {netns}");
    println!(
        "- RLIMIT_NOFILE: {fd_limit}; CPUs: {}; pinned to CPU {}: {pinned}",
        ncpus(),
        args.cpu
    );
    let t = Instant::now();
    for p in &args.parts {
        match p.as_str() {
            "a" => part_a(&args, fd_limit)?,
            "b" => part_b(&args, fd_limit)?,
            "c" => part_c(&args, fd_limit)?,
            other => eprintln!("unknown part {other:?} (a, b, c)"),
        }
    }
    println!("\n(total {:.1} s)", t.elapsed().as_secs_f64());
    Ok(())
}
