//! Reuseport programs: which socket of the SO_REUSEPORT group (which worker) gets a datagram.
//!
//! `--steer cpu` attaches a classic BPF program with `SO_ATTACH_REUSEPORT_CBPF` (Linux 4.5)
//! that returns the group index of the worker pinned to the CPU that ran the receive path, so
//! a NIC queue's packets are served on the core whose cache already holds them. The kernel
//! facts it relies on (kernel-reference, "Reuseport programs and a second instance"):
//! - the program sees the UDP payload at offset 0, and `ld #cpu` (`SKF_AD_OFF + SKF_AD_CPU`)
//!   is `raw_smp_processor_id()` of the receive path (on loopback: the sender's CPU);
//! - the returned value is an index into the group, which is the order in which the sockets
//!   joined it (the workers bind in worker order);
//! - an index outside the group is not a drop: `reuseport_select_sock` falls back to its
//!   hash. So a program routes what it recognises and returns [`FALLBACK`] for the rest.
//!
//! # Program layout (for composing with other routing, e.g. QUIC connection IDs, issue 10)
//! A program is a sequence of *stages* followed by `ret #FALLBACK`. A stage loads what it
//! needs itself (it assumes nothing about the A and X registers) and either returns a group
//! index or *falls through* to the next stage, i.e. every jump of a stage lands on one of its
//! own `ret`s or on the instruction just past its end. Stages are therefore independent and
//! ordered by priority: a connection-ID stage (`ldb [0]`, `jset #0x80` → fall through for long
//! headers, load the worker bytes of the DCID at offset 1, `jge #workers` → fall through,
//! `ret a`) goes *before* the CPU stage, so a packet of a known connection reaches the worker
//! holding its state and only unrecognised packets (new connections, long headers) are spread
//! by CPU. Conditional jumps reach at most 255 instructions ahead, so a stage that jumps to
//! its end is at most 256 instructions long (the CPU stage only ever skips one instruction);
//! the kernel bounds a whole program to 4,096 (`BPF_MAXINSNS`), i.e. 2,047 CPUs.

use std::io;
use std::os::fd::AsRawFd;

use crate::sys::cvt;

/// `SO_ATTACH_REUSEPORT_CBPF` from `asm-generic/socket.h` (x86, arm, arm64, riscv; the libc
/// crate lists it for Android only).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// `SO_DETACH_REUSEPORT_BPF` (Linux 5.3), from `asm-generic/socket.h`.
const SO_DETACH_REUSEPORT_BPF: libc::c_int = 68;

/// Returned for "not mine": out of any group's range, so the kernel uses its hash.
pub(crate) const FALLBACK: u32 = u32::MAX;

/// `BPF_MAXINSNS`: the longest classic BPF program the kernel accepts.
const MAX_INSNS: usize = 4096;

const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Builds a reuseport program from stages (see the module documentation for the layout).
#[derive(Default)]
pub(crate) struct ProgramBuilder {
    insns: Vec<libc::sock_filter>,
}

impl ProgramBuilder {
    /// The CPU stage: `ld #cpu`, then for each `(cpu, index)` a `jeq #cpu` that returns the
    /// index; any other CPU falls through.
    pub(crate) fn cpu_stage(mut self, by_cpu: &[(u32, u32)]) -> io::Result<ProgramBuilder> {
        // This stage, and the closing `ret`.
        if self.insns.len() + 1 + 2 * by_cpu.len() + 1 > MAX_INSNS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "--steer cpu: a program for {} CPUs exceeds the kernel's {MAX_INSNS} instructions",
                    by_cpu.len()
                ),
            ));
        }
        let cpu_offset = (libc::SKF_AD_OFF + libc::SKF_AD_CPU) as u32;
        self.insns.push(insn(LD_W_ABS, 0, 0, cpu_offset));
        for &(cpu, index) in by_cpu {
            // Equal: the next instruction returns the index; otherwise skip it.
            self.insns.push(insn(JEQ_K, 0, 1, cpu));
            self.insns.push(insn(RET_K, 0, 0, index));
        }
        Ok(self)
    }

    /// Closes the program with `ret #FALLBACK`.
    /// A stage built elsewhere (the QUIC connection-ID stage), which must follow the layout
    /// above: every jump lands on one of its own instructions or just past its end.
    pub(crate) fn raw_stage(mut self, stage: &[libc::sock_filter]) -> io::Result<ProgramBuilder> {
        if self.insns.len() + stage.len() + 1 > MAX_INSNS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a reuseport program exceeds the kernel's {MAX_INSNS} instructions"),
            ));
        }
        self.insns.extend_from_slice(stage);
        Ok(self)
    }

    pub(crate) fn finish(mut self) -> Vec<libc::sock_filter> {
        self.insns.push(insn(RET_K, 0, 0, FALLBACK));
        self.insns
    }
}

/// Worker `i` is pinned to `cpus[i]` and is group index `i`: the CPU stage's table.
pub(crate) fn by_cpu(cpus: &[usize]) -> Vec<(u32, u32)> {
    cpus.iter()
        .enumerate()
        .map(|(index, &cpu)| (cpu as u32, index as u32))
        .collect()
}

/// The CPU program for workers pinned to `cpus` (worker `i` to `cpus[i]`, group index `i`).
#[cfg(test)]
pub(crate) fn cpu_program(cpus: &[usize]) -> io::Result<Vec<libc::sock_filter>> {
    Ok(ProgramBuilder::default().cpu_stage(&by_cpu(cpus))?.finish())
}

/// Attaches `program` to the reuseport group `socket` belongs to (the program is the
/// group's: one attach serves every socket in it, and a later attach replaces it).
pub(crate) fn attach(socket: &impl AsRawFd, program: &[libc::sock_filter]) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: program.len() as libc::c_ushort,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` is a live local whose `filter` points at `program`, which outlives the
    // call (the kernel copies the instructions during setsockopt and keeps no pointer); the
    // length passed is the size of `prog`.
    cvt(unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    })
    .map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot attach the --steer cpu program (SO_ATTACH_REUSEPORT_CBPF): {e}"),
        )
    })?;
    Ok(())
}

/// Removes a reuseport program from the group `socket` belongs to, if one is attached: a
/// process that takes sockets over with `--steer none` must not be steered by the program its
/// predecessor attached. No program (`ENOENT`), a socket without SO_REUSEPORT (`EINVAL`, e.g.
/// a single socket from systemd) and a kernel without the option (before 5.3) are not errors.
pub(crate) fn detach(socket: &impl AsRawFd) -> io::Result<()> {
    let unused: libc::c_int = 0;
    // SAFETY: the option value points at `unused`, a live local of the length passed (the
    // kernel ignores it for this option).
    let rc = cvt(unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_DETACH_REUSEPORT_BPF,
            (&unused as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    });
    match rc {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::EINVAL | libc::ENOPROTOOPT)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A classic BPF interpreter for the instructions reuseport programs here use, so that
    /// the layout's promises (every path returns; stages fall through) are tested without a
    /// kernel. `cpu` stands for `raw_smp_processor_id()`.
    fn run(program: &[libc::sock_filter], payload: &[u8], cpu: u32) -> u32 {
        let mut a: u32 = 0;
        let mut pc = 0usize;
        let cpu_offset = (libc::SKF_AD_OFF + libc::SKF_AD_CPU) as u32;
        loop {
            let i = program[pc];
            pc += 1;
            match u32::from(i.code) {
                c if c == u32::from(LD_W_ABS) => {
                    a = if i.k == cpu_offset {
                        cpu
                    } else {
                        let at = i.k as usize;
                        match payload.get(at..at + 4) {
                            Some(b) => u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                            None => return 0, // the kernel's verdict for a short packet
                        }
                    }
                }
                c if c == u32::from(JEQ_K) => {
                    pc += usize::from(if a == i.k { i.jt } else { i.jf });
                }
                c if c == u32::from(RET_K) => return i.k,
                other => panic!("instruction {other:#x} not interpreted"),
            }
        }
    }

    #[test]
    fn each_cpu_reaches_its_worker_and_others_fall_back() {
        let program = cpu_program(&[2, 5, 7]).unwrap();
        assert_eq!(program.len(), 1 + 2 * 3 + 1);
        assert_eq!(run(&program, b"x", 2), 0);
        assert_eq!(run(&program, b"x", 5), 1);
        assert_eq!(run(&program, b"x", 7), 2);
        assert_eq!(run(&program, b"x", 0), FALLBACK);
        assert_eq!(run(&program, b"x", 6), FALLBACK);
    }

    #[test]
    fn a_stage_falls_through_to_the_next() {
        // Two CPU stages: the first knows CPU 1 only; CPU 3 must reach the second.
        let program = ProgramBuilder::default()
            .cpu_stage(&[(1, 9)])
            .unwrap()
            .cpu_stage(&[(3, 4)])
            .unwrap()
            .finish();
        assert_eq!(run(&program, b"", 1), 9);
        assert_eq!(run(&program, b"", 3), 4);
        assert_eq!(run(&program, b"", 8), FALLBACK);
    }

    #[test]
    fn too_many_cpus_for_one_stage_is_an_error() {
        let cpus: Vec<usize> = (0..2048).collect();
        assert!(cpu_program(&cpus).is_err());
        assert!(cpu_program(&cpus[..2047]).is_ok());
    }
}
