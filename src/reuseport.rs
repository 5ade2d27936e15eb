//! QUIC routing that survives a restart: an `SK_REUSEPORT` eBPF program and a
//! `REUSEPORT_SOCKARRAY` map shared by the processes serving one address (issue 16).
//!
//! Every server connection ID names a worker and a process *generation*
//! (`quic::cid::CidFormat`: the generation byte follows the worker's). A process of
//! generation `g` puts its worker `w`'s socket in slot `g * 256 + w` of the map, and the group's
//! program sends
//! - a short-header packet, and a Handshake packet (its destination CID is one the server
//!   chose), to the slot its destination CID names, when that slot holds a socket;
//! - everything else (Initials, 0-RTT, other datagrams, CIDs naming no live socket) to a
//!   worker of the *current* generation: the one whose `--steer cpu` CPU received it, or
//!   `hash % workers` with the kernel's 4-tuple hash.
//!
//! A `--takeover` in this mode hands the new process the map instead of the sockets: it binds
//! sockets of its own, fills its generation's slots and attaches a program naming itself
//! current. New connections go to it at once; the old process's connections keep reaching the
//! old process's sockets until they close, since a socket array slot holds one socket whatever
//! joins or leaves the group. (Classic BPF returns an index into the group, and removing a
//! socket moves the last one into its place, `reuseport_detach_sock`: indices go wrong as
//! soon as an old process's sockets leave; kernel-notes/quic.md.) When the old process
//! exits its sockets leave the map by themselves.
//!
//! Listing, for a CID of `len` bytes with the worker at offset `o` and the generation at
//! `o + 1`; the packet is read with `bpf_skb_load_bytes` from the UDP header (`skb->data`):
//!
//! ```text
//!   r6 = ctx
//!   load 1 byte at 8 (first byte)            fail -> current
//!   if b & 0x80: long header
//!       if b & 0x30 != 0x20 -> current       (Handshake only)
//!       load 1 byte at 13 (DCID length)      fail or != len -> current
//!       at = 14 + o
//!   else at = 9 + o
//!   load 2 bytes at `at` (worker, generation) fail -> current
//!   if generation >= 16 -> current
//!   key = generation << 8 | worker
//!   if sk_select_reuseport(ctx, map, &key, 0) == 0 -> pass
//! current:
//!   w = worker of this CPU (--steer cpu), else ctx->hash % workers
//!   key = current << 8 | w
//!   sk_select_reuseport(ctx, map, &key, 0)   (no socket there: the kernel's hash)
//! pass:
//!   return SK_PASS
//! ```

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use crate::ebpf::{helper, Asm, Cond, Insn, SocketArray, R0, R1, R10, R2, R3, R4, R6, R7, R8};

/// Generations that can be told apart at once (a generation is a byte of the CID, below this).
pub const GENERATIONS: u8 = 16;
/// Slots per generation: one per worker (a worker index is a byte of the CID).
pub const WORKER_SLOTS: u32 = 256;
/// Slots of the map every process of one address shares.
pub const MAP_ENTRIES: u32 = GENERATIONS as u32 * WORKER_SLOTS;

/// `sk_reuseport_md.hash` (linux/bpf.h): the 4-tuple hash the kernel would pick with.
const CTX_HASH: i16 = 32;
/// The UDP header precedes the payload in `skb->data`.
const UDP_HEADER: i32 = 8;
/// `SK_PASS`.
const SK_PASS: i32 = 1;

/// What the program needs to know of the connection IDs and of the current generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Length of every server CID.
    pub cid_len: u8,
    /// Offset of the worker byte in a CID (the generation byte follows it).
    pub worker_offset: u8,
    /// The generation new connections go to.
    pub generation: u8,
    /// Its workers.
    pub workers: u32,
    /// With `--steer cpu`: (CPU, worker) pairs; the rest by hash.
    pub by_cpu: Vec<(u32, u32)>,
}

/// The map slot of worker `worker` of generation `generation`.
pub fn slot(generation: u8, worker: usize) -> u32 {
    u32::from(generation) * WORKER_SLOTS + worker as u32
}

/// The program for `layout`, selecting from `map`.
pub fn program(layout: &Layout, map: &SocketArray) -> io::Result<Vec<Insn>> {
    if layout.workers == 0 || layout.workers > WORKER_SLOTS || layout.generation >= GENERATIONS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "reuseport program: {} workers (1..={WORKER_SLOTS}), generation {} (below {GENERATIONS})",
                layout.workers, layout.generation
            ),
        ));
    }
    let map = map.fd().as_raw_fd();
    let o = i32::from(layout.worker_offset);
    let mut a = Asm::default();
    let (long, load, current, have, pass) = (a.label(), a.label(), a.label(), a.label(), a.label());
    // bpf_skb_load_bytes(ctx, r2, fp - 8, len); r2 set by the caller.
    let load_bytes = |a: &mut Asm, len: i32| {
        a.mov(R1, R6)
            .mov(R3, R10)
            .add_imm(R3, -8)
            .mov_imm(R4, len)
            .call(helper::SKB_LOAD_BYTES);
    };
    let select = |a: &mut Asm| {
        a.mov(R1, R6)
            .load_map(R2, map)
            .mov(R3, R10)
            .add_imm(R3, -4)
            .mov_imm(R4, 0)
            .call(helper::SK_SELECT_REUSEPORT);
    };
    a.mov(R6, R1);
    a.mov_imm(R2, UDP_HEADER);
    load_bytes(&mut a, 1);
    a.jump_if(Cond::Ne, R0, 0, current);
    a.load_u8(R7, R10, -8);
    a.jump_if(Cond::Set, R7, 0x80, long);
    a.mov_imm(R2, UDP_HEADER + 1 + o).jump(load);
    a.bind(long);
    a.and_imm(R7, 0x30).jump_if(Cond::Ne, R7, 0x20, current);
    a.mov_imm(R2, UDP_HEADER + 5);
    load_bytes(&mut a, 1);
    a.jump_if(Cond::Ne, R0, 0, current);
    a.load_u8(R7, R10, -8);
    a.jump_if(Cond::Ne, R7, i32::from(layout.cid_len), current);
    a.mov_imm(R2, UDP_HEADER + 6 + o);
    a.bind(load);
    load_bytes(&mut a, 2);
    a.jump_if(Cond::Ne, R0, 0, current);
    a.load_u8(R7, R10, -8);
    a.load_u8(R8, R10, -7);
    a.jump_if(Cond::Ge, R8, i32::from(GENERATIONS), current);
    a.lsh_imm(R8, 8).add(R8, R7).store_u32(R10, -4, R8);
    select(&mut a);
    a.jump_if(Cond::Eq, R0, 0, pass);
    a.bind(current);
    if !layout.by_cpu.is_empty() {
        a.call(helper::GET_SMP_PROCESSOR_ID);
        for &(cpu, worker) in &layout.by_cpu {
            let next = a.label();
            a.jump_if(Cond::Ne, R0, cpu as i32, next);
            a.mov_imm(R7, worker as i32).jump(have);
            a.bind(next);
        }
    }
    a.load_u32(R7, R6, CTX_HASH)
        .mod32_imm(R7, layout.workers as i32);
    a.bind(have);
    a.add_imm(R7, slot(layout.generation, 0) as i32)
        .store_u32(R10, -4, R7);
    select(&mut a);
    a.bind(pass);
    a.mov_imm(R0, SK_PASS).exit();
    a.finish()
}

/// The socket map of the processes serving one address, as the process taken over from
/// handed it over ([`crate::ops::takeover::Handover::routing_map`]), for
/// [`crate::ServerConfig::routing_map`].
#[derive(Debug, Clone)]
pub struct RoutingMap(pub(crate) Arc<SocketArray>);

/// The routing of one process: the shared map, its generation, and its program.
#[derive(Debug)]
pub struct Routing {
    map: Arc<SocketArray>,
    layout: Layout,
    program: OwnedFd,
}

impl Routing {
    /// Puts `sockets` (worker order) in `map` as generation `layout.generation` and loads the
    /// program naming it current; nothing is attached yet ([`Routing::attach`]).
    pub fn prepare(
        map: Arc<SocketArray>,
        layout: Layout,
        sockets: &[impl AsRawFd],
    ) -> io::Result<Routing> {
        let program = crate::ebpf::load_program(
            crate::ebpf::PROG_SK_REUSEPORT,
            "udpring_route",
            &program(&layout, &map)?,
        )?;
        for (worker, socket) in sockets.iter().enumerate() {
            let at = slot(layout.generation, worker);
            if worker == 0 && map.occupied(at).unwrap_or(false) {
                tracing::warn!(
                    generation = layout.generation,
                    "a process {GENERATIONS} takeovers back still serves generation {}: its connections now reach this process and are reset",
                    layout.generation
                );
            }
            map.set(at, socket)?;
        }
        Ok(Routing {
            map,
            layout,
            program,
        })
    }

    /// Makes this routing the group's (`socket` is any socket of the group): from now on new
    /// connections reach this process's workers.
    pub fn attach(&self, socket: &impl AsRawFd) -> io::Result<()> {
        crate::ebpf::attach_reuseport(socket, &self.program)
    }

    /// The shared map (handed to the next process).
    pub fn map(&self) -> &Arc<SocketArray> {
        &self.map
    }

    /// This process's generation.
    pub fn generation(&self) -> u8 {
        self.layout.generation
    }
}

/// The generation after `g`.
pub fn next_generation(g: u8) -> u8 {
    (g + 1) % GENERATIONS
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::time::Duration;

    fn bound_group(addr: &str, n: usize) -> Vec<socket2::Socket> {
        let mut out = Vec::new();
        let mut at: std::net::SocketAddr = addr.parse().unwrap();
        for _ in 0..n {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
            s.set_reuse_port(true).unwrap();
            s.bind(&at.into()).unwrap();
            at = s.local_addr().unwrap().as_socket().unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            out.push(s);
        }
        out
    }

    fn received(s: &socket2::Socket) -> Option<Vec<u8>> {
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 256];
        let n = s.recv(&mut buf).ok()?;
        // SAFETY: recv initialised the first n bytes.
        Some(
            buf[..n]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect(),
        )
    }

    /// Which socket of `group` got `payload`.
    fn lands(group: &[socket2::Socket], client: &UdpSocket, payload: &[u8]) -> Option<usize> {
        let to = group[0].local_addr().unwrap().as_socket().unwrap();
        client.send_to(payload, to).unwrap();
        for _ in 0..20 {
            for (i, s) in group.iter().enumerate() {
                s.set_nonblocking(true).unwrap();
                if let Some(got) = received(s) {
                    assert_eq!(got, payload);
                    return Some(i);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    fn short(worker: u8, generation: u8) -> Vec<u8> {
        let mut p = vec![0x40, worker, generation, 1, 2, 3, 4, 5, 6];
        p.extend_from_slice(&[0u8; 20]);
        p
    }

    fn handshake(worker: u8, generation: u8) -> Vec<u8> {
        let mut p = vec![0xe0, 0, 0, 0, 1, 8, worker, generation, 1, 2, 3, 4, 5, 6];
        p.extend_from_slice(&[0u8; 20]);
        p
    }

    /// The kernel runs the program: packets of generation 0 reach the old sockets after
    /// generation 1 took over new connections, wherever the old sockets sit in the group.
    #[test]
    fn generations_route_to_their_own_sockets_and_new_ones_to_the_current() {
        let map = match SocketArray::create(MAP_ENTRIES) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                let why = format!(
                    "BPF_MAP_TYPE_REUSEPORT_SOCKARRAY refused ({e}): needs Linux 4.19 and CAP_BPF"
                );
                assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
                eprintln!("skipped: {why}");
                return;
            }
        };
        let old = bound_group("127.0.0.1:0", 2);
        let addr = old[0].local_addr().unwrap().as_socket().unwrap();
        let layout = |generation, workers| Layout {
            cid_len: 8,
            worker_offset: 0,
            generation,
            workers,
            by_cpu: Vec::new(),
        };
        let gen0 = Routing::prepare(map.clone(), layout(0, 2), &old).unwrap();
        gen0.attach(&old[0]).unwrap();
        let new = bound_group(&addr.to_string(), 3);
        let gen1 = Routing::prepare(map.clone(), layout(1, 3), &new).unwrap();
        gen1.attach(&new[0]).unwrap();
        let all: Vec<socket2::Socket> = old
            .iter()
            .chain(new.iter())
            .map(|s| s.try_clone().unwrap())
            .collect();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(lands(&all, &client, &short(1, 0)), Some(1));
        assert_eq!(lands(&all, &client, &short(0, 0)), Some(0));
        assert_eq!(lands(&all, &client, &short(2, 1)), Some(4));
        assert_eq!(lands(&all, &client, &handshake(1, 0)), Some(1));
        // An Initial, a runt and a CID of no live socket: the current generation.
        for payload in [
            &[0xc0u8, 0, 0, 0, 1, 8, 1, 0, 9, 9, 9, 9, 9, 9][..],
            &[0x40][..],
            &short(7, 0)[..],
            &short(1, 9)[..],
        ] {
            let at = lands(&all, &client, payload).expect("delivered");
            assert!(at >= 2, "{payload:?} went to old socket {at}");
        }
        // The first old socket leaves the group: the last moves into its index, yet old
        // worker 1's packets still reach it.
        let moved = all[1].try_clone().unwrap();
        drop(old);
        drop(all);
        let rest: Vec<socket2::Socket> = std::iter::once(moved)
            .chain(new.iter().map(|s| s.try_clone().unwrap()))
            .collect();
        assert_eq!(lands(&rest, &client, &short(1, 0)), Some(0));
        assert!(lands(&rest, &client, &short(0, 0)).unwrap() >= 1);
        assert!(
            !map.occupied(slot(0, 0)).unwrap(),
            "closed sockets leave the map"
        );
        assert!(map.occupied(slot(1, 2)).unwrap());
    }

    #[test]
    fn a_bad_layout_is_refused_before_the_kernel_sees_it() {
        let Ok(map) = SocketArray::create(MAP_ENTRIES) else {
            return;
        };
        let layout = Layout {
            cid_len: 8,
            worker_offset: 0,
            generation: GENERATIONS,
            workers: 1,
            by_cpu: Vec::new(),
        };
        assert!(program(&layout, &map).is_err());
        assert!(program(
            &Layout {
                generation: 0,
                workers: 0,
                ..layout
            },
            &map
        )
        .is_err());
    }
}
