//! Connection IDs that route: which worker a QUIC packet belongs to, decided by the kernel
//! before any worker sees it.
//!
//! Every worker's endpoint issues server connection IDs that carry the worker's index
//! (`super::cid`): their first byte, or with a QUIC-LB configuration the byte just past the
//! first octet and the server ID (the program reads it at that offset). A client puts one of them in the destination
//! connection ID of every short-header packet it sends, whatever its address: after NAT
//! rebinding or migration, the 4-tuple hash of `SO_REUSEPORT` would pick a worker at random,
//! but the connection ID still names the owner.
//!
//! The classic BPF program attached with `SO_ATTACH_REUSEPORT_CBPF` (Linux 4.5) reads the
//! UDP payload at offset 0 (the kernel has pulled the UDP header; kernel-notes/quic.md). It is
//! one *stage* followed by `ret #FALLBACK`: a stage loads what it needs itself and either
//! returns a group index or falls through to the instruction just past its end (the layout
//! of `src/steer.rs`, issue 11, so that stages compose: this one goes before a CPU stage,
//! which then spreads only what this one does not recognise).
//!
//! ```text
//! 0: ld   len                  A = payload length
//! 1: jge  #2+o, 0, 5           too short to hold the worker byte: fall through (-> 7)
//! 2: ldb  [0]                  the first byte
//! 3: jset #0x80, 3, 0          long header (Initial, Handshake, 0-RTT, Retry): fall through
//! 4: ldb  [1+o]                short header: the worker byte, at offset o of the DCID
//! 5: jge  #workers, 1, 0       not one of our workers: fall through
//! 6: ret  a                    the socket at that index of the group (= worker index)
//! 7: ret  #0xffffffff          FALLBACK (alone: the kernel's hash)
//! ```
//!
//! Even alone the bound check matters little: an index the group does not have is no drop,
//! the kernel falls back to its hash (`reuseport_select_sock`). The group's order is the
//! order the workers' sockets joined it, which is worker order (`Server::start` binds them in
//! turn). The length check does matter: a load past the end of the packet ends a classic BPF
//! program with 0, which would send every runt to worker 0.

/// What the program returns for packets it leaves to the kernel's hash.
#[cfg(test)]
pub const FALLBACK: u32 = u32::MAX;

// Classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
const BPF_LD: u16 = 0x00;
const BPF_JMP: u16 = 0x05;
const BPF_RET: u16 = 0x06;
const BPF_W: u16 = 0x00;
const BPF_B: u16 = 0x10;
const BPF_ABS: u16 = 0x20;
const BPF_LEN: u16 = 0x80;
const BPF_JGE: u16 = 0x30;
const BPF_JSET: u16 = 0x40;
const BPF_K: u16 = 0x00;
const BPF_A: u16 = 0x10;

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

const fn insn(code: u16, jt: u8, jf: u8, k: u32) -> Insn {
    Insn { code, jt, jf, k }
}

/// The connection-ID stage for a group of `workers` sockets whose CIDs carry the worker at
/// `offset` (`CidFormat::worker_offset`): returns the worker a short-header packet's
/// destination CID names, or falls through to the instruction just past its end (see the
/// module docs for the listing).
pub fn cid_stage(workers: usize, offset: usize) -> [Insn; 7] {
    let workers = workers.min(256) as u32;
    let offset = offset.min(64) as u32;
    [
        insn(BPF_LD | BPF_W | BPF_LEN, 0, 0, 0),
        insn(BPF_JMP | BPF_JGE | BPF_K, 0, 5, 2 + offset),
        insn(BPF_LD | BPF_B | BPF_ABS, 0, 0, 0),
        insn(BPF_JMP | BPF_JSET | BPF_K, 3, 0, 0x80),
        insn(BPF_LD | BPF_B | BPF_ABS, 0, 0, 1 + offset),
        insn(BPF_JMP | BPF_JGE | BPF_K, 1, 0, workers),
        insn(BPF_RET | BPF_A, 0, 0, 0),
    ]
}

/// The whole routing program: the stage, then `ret #FALLBACK`. The engine composes the stage
/// with others (`src/steer.rs`); the tests run it alone.
#[cfg(test)]
pub fn program(workers: usize, offset: usize) -> Vec<Insn> {
    let mut program = cid_stage(workers, offset).to_vec();
    program.push(insn(BPF_RET | BPF_K, 0, 0, FALLBACK));
    program
}

/// The stage as the kernel's `struct sock_filter`s (for a program builder that composes
/// stages).
pub fn cid_stage_filters(workers: usize, offset: usize) -> Vec<libc::sock_filter> {
    cid_stage(workers, offset)
        .iter()
        .map(|&i| i.to_sock_filter())
        .collect()
}

impl Insn {
    fn to_sock_filter(self) -> libc::sock_filter {
        libc::sock_filter {
            code: self.code,
            jt: self.jt,
            jf: self.jf,
            k: self.k,
        }
    }
}

/// The worker the program routes `payload` to among `workers`, or `None` for the kernel's
/// hash: what the kernel computes, for tests.
#[cfg(test)]
pub fn route(payload: &[u8], workers: usize) -> Option<usize> {
    route_at(payload, workers, 0)
}

/// [`route`] for CIDs that carry the worker at `offset`.
#[cfg(test)]
pub fn route_at(payload: &[u8], workers: usize, offset: usize) -> Option<usize> {
    match run(&program(workers, offset), payload) {
        Some(index) if (index as usize) < workers => Some(index as usize),
        _ => None,
    }
}

/// A classic BPF interpreter for the instructions [`program`] uses, as the kernel runs them
/// (`bpf_prog_run` of the converted program): a load past the end of the packet ends the
/// program with 0. `None` for an instruction it does not know or a jump out of the program.
#[cfg(test)]
fn run(program: &[Insn], packet: &[u8]) -> Option<u32> {
    let mut a: u32 = 0;
    let mut pc = 0usize;
    loop {
        let i = program.get(pc)?;
        pc += 1;
        match i.code {
            c if c == BPF_LD | BPF_W | BPF_LEN => a = packet.len() as u32,
            c if c == BPF_LD | BPF_B | BPF_ABS => match packet.get(i.k as usize) {
                Some(&b) => a = u32::from(b),
                None => return Some(0),
            },
            c if c == BPF_JMP | BPF_JGE | BPF_K => {
                pc += usize::from(if a >= i.k { i.jt } else { i.jf });
            }
            c if c == BPF_JMP | BPF_JSET | BPF_K => {
                pc += usize::from(if a & i.k != 0 { i.jt } else { i.jf });
            }
            c if c == BPF_RET | BPF_A => return Some(a),
            c if c == BPF_RET | BPF_K => return Some(i.k),
            _ => return None,
        }
    }
}

/// Attaches the routing program for `workers` workers to the reuseport group of `socket`
/// (which must be bound, with SO_REUSEPORT; the program then applies to every socket of the
/// group, and a later attach replaces it). The engine attaches the composed program
/// (`src/steer.rs`); the tests attach this one alone.
#[cfg(test)]
pub fn attach(socket: &impl std::os::fd::AsRawFd, workers: usize) -> std::io::Result<()> {
    let filters: Vec<libc::sock_filter> = program(workers, 0)
        .iter()
        .map(|&i| i.to_sock_filter())
        .collect();
    let fprog = libc::sock_fprog {
        len: filters.len() as u16,
        filter: filters.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `fprog` and the instructions it points at are live locals for the whole call;
    // the kernel copies the program before returning.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!("cannot attach the QUIC routing program (SO_ATTACH_REUSEPORT_CBPF, Linux 4.5+): {e}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_headers_go_to_the_worker_their_cid_names() {
        let mut packet = vec![0x40u8, 3, 9, 9, 9, 9, 9, 9, 9, 0xaa, 0xbb];
        assert_eq!(route(&packet, 4), Some(3));
        assert_eq!(route(&packet, 3), None, "no such worker: the kernel's hash");
        packet[1] = 0;
        assert_eq!(route(&packet, 1), Some(0));
        // The smallest packet the program looks into.
        assert_eq!(route(&[0x40, 1], 2), Some(1));
    }

    /// Issue 16: with a QUIC-LB configuration the worker byte sits past the first octet and
    /// the server ID; the program reads it there, and a packet too short to hold it goes to
    /// the hash.
    #[test]
    #[cfg(feature = "quic")]
    fn load_balanced_cids_route_by_the_worker_past_the_server_id() {
        let lb = super::super::cid::LbConfig::new(2, vec![0xaa, 0xbb, 0xcc]).unwrap();
        let format = super::super::cid::CidFormat::load_balanced(lb);
        for worker in 0..4u8 {
            let cid = format.make(worker, &[0x55; 16]);
            let mut packet = vec![0x40u8];
            packet.extend_from_slice(&cid);
            packet.extend_from_slice(&[0; 20]);
            assert_eq!(
                route_at(&packet, 4, format.worker_offset()),
                Some(usize::from(worker))
            );
            // Read at offset 0 (today's format) it would name the first octet, 0x4a.
            assert_eq!(route(&packet, 4), None);
        }
        let short = [0x40u8, 0x4a, 0xaa, 0xbb, 0xcc];
        assert_eq!(route_at(&short, 4, 4), None, "no worker byte: the hash");
        assert_eq!(route_at(&[0x40, 0x4a, 0xaa, 0xbb, 0xcc, 1], 4, 4), Some(1));
    }

    #[test]
    fn long_headers_and_runts_go_to_the_hash() {
        // An Initial (0xc0 | type), whatever its bytes after.
        assert_eq!(route(&[0xc3, 0, 0, 0, 1, 8, 1, 2], 255), None);
        // Retry / Handshake / 0-RTT share the long-header bit.
        for first in [0x80u8, 0xa0, 0xd0, 0xf0, 0xff] {
            assert_eq!(route(&[first, 0], 255), None);
        }
        assert_eq!(route(&[], 255), None);
        assert_eq!(route(&[0x40], 255), None, "one byte: no CID to read");
    }

    #[test]
    fn the_interpreter_returns_zero_past_the_end_like_the_kernel() {
        let past = [
            insn(BPF_LD | BPF_B | BPF_ABS, 0, 0, 5),
            insn(BPF_RET | BPF_A, 0, 0, 0),
        ];
        assert_eq!(run(&past, &[1, 2]), Some(0));
        assert_eq!(run(&[insn(0xffff, 0, 0, 0)], &[]), None);
    }

    #[test]
    fn the_stage_falls_through_to_just_past_its_end() {
        // Followed by a marker instead of `ret #FALLBACK`: whatever the stage does not route
        // reaches it, as a composed program's next stage would.
        const NEXT: u32 = 0xabcd;
        let mut composed = cid_stage(4, 0).to_vec();
        composed.push(insn(BPF_RET | BPF_K, 0, 0, NEXT));
        assert_eq!(run(&composed, &[0x40, 2, 0, 0]), Some(2));
        assert_eq!(
            run(&composed, &[0x40, 4, 0, 0]),
            Some(NEXT),
            "no such worker"
        );
        assert_eq!(run(&composed, &[0xc0, 1, 0, 0]), Some(NEXT), "long header");
        assert_eq!(run(&composed, &[0x40]), Some(NEXT), "runt");
        assert_eq!(cid_stage_filters(4, 0).len(), cid_stage(4, 0).len());
    }

    #[test]
    fn the_kernel_accepts_the_program() {
        let a = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        a.set_reuse_port(true).unwrap();
        a.bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
        attach(&a, 2).unwrap();
    }
}
