//! eBPF without a compiler: the instructions udpring's reuseport program uses, assembled in
//! Rust, and the `bpf(2)` calls around them (a `REUSEPORT_SOCKARRAY` map, a program of type
//! `SK_REUSEPORT`, attached with `SO_ATTACH_REUSEPORT_EBPF`). No clang, bpftool or libbpf at
//! build or run time (issue 16).
//!
//! Every object is an [`OwnedFd`]: a map or a program lives as long as a descriptor or an
//! attachment holds it, and the kernel frees it after. A socket in a socket array leaves it
//! when the socket closes (`bpf_sk_reuseport_detach`), so an entry never names a socket that
//! is gone.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

// bpf(2) commands (linux/bpf.h, enum bpf_cmd).
const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_int = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_int = 15;
const BPF_LINK_CREATE: libc::c_int = 28;

/// `BPF_MAP_TYPE_REUSEPORT_SOCKARRAY` (Linux 4.19).
pub const MAP_REUSEPORT_SOCKARRAY: u32 = 20;
/// `BPF_PROG_TYPE_SK_REUSEPORT` (Linux 4.19).
pub const PROG_SK_REUSEPORT: u32 = 21;
/// `BPF_MAP_TYPE_XSKMAP` (Linux 4.18): `u32` keys, AF_XDP sockets as values.
pub const MAP_XSKMAP: u32 = 17;
/// `BPF_PROG_TYPE_XDP` (Linux 4.8).
pub const PROG_XDP: u32 = 6;
/// `BPF_XDP`, the attach type of an XDP link (Linux 5.9).
pub const ATTACH_XDP: u32 = 37;
/// `SO_ATTACH_REUSEPORT_EBPF` (asm-generic/socket.h; the libc crate has no constant).
const SO_ATTACH_REUSEPORT_EBPF: libc::c_int = 52;

/// Helper function numbers (enum bpf_func_id).
pub mod helper {
    pub const GET_SMP_PROCESSOR_ID: i32 = 8;
    pub const SKB_LOAD_BYTES: i32 = 26;
    pub const SK_SELECT_REUSEPORT: i32 = 82;
    pub const REDIRECT_MAP: i32 = 51;
}

/// Register numbers: r0 return value, r1..r5 arguments (clobbered by calls), r6..r9 kept
/// across calls, r10 the read-only frame pointer.
pub type Reg = u8;
pub const R0: Reg = 0;
pub const R1: Reg = 1;
pub const R2: Reg = 2;
pub const R3: Reg = 3;
pub const R4: Reg = 4;
pub const R6: Reg = 6;
pub const R7: Reg = 7;
pub const R5: Reg = 5;
pub const R8: Reg = 8;
pub const R10: Reg = 10;

/// One instruction as the kernel reads it (`struct bpf_insn`): opcode, destination register
/// in the low nibble and source register in the high one, offset, immediate.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

// Opcode parts (linux/bpf_common.h, linux/bpf.h).
const LD: u8 = 0x00;
const LDX: u8 = 0x01;
const STX: u8 = 0x03;
const ALU: u8 = 0x04;
const JMP: u8 = 0x05;
const ALU64: u8 = 0x07;
const JMP32: u8 = 0x06;
const MEM: u8 = 0x60;
const IMM: u8 = 0x00;
const DW: u8 = 0x18;
const W: u8 = 0x00;
const H: u8 = 0x08;
const B: u8 = 0x10;
const K: u8 = 0x00;
const X: u8 = 0x08;
const ADD: u8 = 0x00;
const LSH: u8 = 0x60;
const AND: u8 = 0x50;
const MOD: u8 = 0x90;
const MOV: u8 = 0xb0;
const JA: u8 = 0x00;
const JEQ: u8 = 0x10;
const JGT: u8 = 0x20;
const JGE: u8 = 0x30;
const JSET: u8 = 0x40;
const JNE: u8 = 0x50;
const CALL: u8 = 0x80;
const EXIT: u8 = 0x90;
/// `BPF_PSEUDO_MAP_FD`: a 64-bit immediate load whose immediate is a map descriptor.
const PSEUDO_MAP_FD: u8 = 1;

/// Jump conditions against an immediate.
#[derive(Debug, Clone, Copy)]
pub enum Cond {
    Eq,
    Ne,
    /// Unsigned `>=`.
    Ge,
    /// `dst & imm != 0`.
    Set,
}

/// A jump target, bound to an instruction index with [`Asm::bind`].
#[derive(Debug, Clone, Copy)]
pub struct Label(usize);

/// A program being written: instructions and the jumps still to resolve.
#[derive(Default)]
pub struct Asm {
    insns: Vec<Insn>,
    labels: Vec<Option<usize>>,
    /// (instruction index, label) of every jump to a label.
    jumps: Vec<(usize, usize)>,
}

fn insn(code: u8, dst: Reg, src: Reg, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (dst & 0x0f) | ((src & 0x0f) << 4),
        off,
        imm,
    }
}

impl Asm {
    /// A new label, bound later.
    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// Binds `label` to the next instruction.
    pub fn bind(&mut self, label: Label) {
        self.labels[label.0] = Some(self.insns.len());
    }

    fn push(&mut self, i: Insn) -> &mut Asm {
        self.insns.push(i);
        self
    }

    /// `dst = imm` (64-bit, sign-extended).
    pub fn mov_imm(&mut self, dst: Reg, imm: i32) -> &mut Asm {
        self.push(insn(ALU64 | MOV | K, dst, 0, 0, imm))
    }

    /// `dst = src`.
    pub fn mov(&mut self, dst: Reg, src: Reg) -> &mut Asm {
        self.push(insn(ALU64 | MOV | X, dst, src, 0, 0))
    }

    /// `dst += imm` (64-bit).
    pub fn add_imm(&mut self, dst: Reg, imm: i32) -> &mut Asm {
        self.push(insn(ALU64 | ADD | K, dst, 0, 0, imm))
    }

    /// `dst += src` (64-bit).
    pub fn add(&mut self, dst: Reg, src: Reg) -> &mut Asm {
        self.push(insn(ALU64 | ADD | X, dst, src, 0, 0))
    }

    /// `dst <<= imm` (64-bit).
    pub fn lsh_imm(&mut self, dst: Reg, imm: i32) -> &mut Asm {
        self.push(insn(ALU64 | LSH | K, dst, 0, 0, imm))
    }

    /// `dst &= imm` (64-bit).
    pub fn and_imm(&mut self, dst: Reg, imm: i32) -> &mut Asm {
        self.push(insn(ALU64 | AND | K, dst, 0, 0, imm))
    }

    /// `dst = (u32)dst % imm` (32-bit; `imm` must not be 0: the kernel refuses it).
    pub fn mod32_imm(&mut self, dst: Reg, imm: i32) -> &mut Asm {
        self.push(insn(ALU | MOD | K, dst, 0, 0, imm))
    }

    /// `dst = *(u8 *)(src + off)`.
    pub fn load_u8(&mut self, dst: Reg, src: Reg, off: i16) -> &mut Asm {
        self.push(insn(LDX | MEM | B, dst, src, off, 0))
    }

    /// `dst = *(u16 *)(src + off)` (host order: a big-endian field reads byte-swapped).
    pub fn load_u16(&mut self, dst: Reg, src: Reg, off: i16) -> &mut Asm {
        self.push(insn(LDX | MEM | H, dst, src, off, 0))
    }

    /// `dst = *(u32 *)(src + off)`.
    pub fn load_u32(&mut self, dst: Reg, src: Reg, off: i16) -> &mut Asm {
        self.push(insn(LDX | MEM | W, dst, src, off, 0))
    }

    /// `*(u32 *)(dst + off) = src`.
    pub fn store_u32(&mut self, dst: Reg, off: i16, src: Reg) -> &mut Asm {
        self.push(insn(STX | MEM | W, dst, src, off, 0))
    }

    /// `dst = map` (the map's descriptor, which the kernel turns into its address at load).
    pub fn load_map(&mut self, dst: Reg, map: RawFd) -> &mut Asm {
        self.push(insn(LD | IMM | DW, dst, PSEUDO_MAP_FD, 0, map));
        self.push(insn(0, 0, 0, 0, 0))
    }

    /// `if dst <cond> imm goto target`.
    pub fn jump_if(&mut self, cond: Cond, dst: Reg, imm: i32, target: Label) -> &mut Asm {
        let op = match cond {
            Cond::Eq => JEQ,
            Cond::Ne => JNE,
            Cond::Ge => JGE,
            Cond::Set => JSET,
        };
        self.jumps.push((self.insns.len(), target.0));
        self.push(insn(JMP | op | K, dst, 0, 0, imm))
    }

    /// `if (u32)dst <cond> (u32)imm goto target`: compares the low 32 bits, so a `u32`
    /// constant with its top bit set compares as itself, not sign-extended.
    pub fn jump32_if(&mut self, cond: Cond, dst: Reg, imm: u32, target: Label) -> &mut Asm {
        let op = match cond {
            Cond::Eq => JEQ,
            Cond::Ne => JNE,
            Cond::Ge => JGE,
            Cond::Set => JSET,
        };
        self.jumps.push((self.insns.len(), target.0));
        self.push(insn(JMP32 | op | K, dst, 0, 0, imm as i32))
    }

    /// `if dst > src goto target` (unsigned): the packet bounds check of an XDP program.
    pub fn jump_if_greater(&mut self, dst: Reg, src: Reg, target: Label) -> &mut Asm {
        self.jumps.push((self.insns.len(), target.0));
        self.push(insn(JMP | JGT | X, dst, src, 0, 0))
    }

    /// `goto target`.
    pub fn jump(&mut self, target: Label) -> &mut Asm {
        self.jumps.push((self.insns.len(), target.0));
        self.push(insn(JMP | JA, 0, 0, 0, 0))
    }

    /// Calls helper `id`: arguments in r1..r5, result in r0, r1..r5 clobbered.
    pub fn call(&mut self, id: i32) -> &mut Asm {
        self.push(insn(JMP | CALL, 0, 0, 0, id))
    }

    /// Returns r0.
    pub fn exit(&mut self) -> &mut Asm {
        self.push(insn(JMP | EXIT, 0, 0, 0, 0))
    }

    /// The instructions, every jump resolved. An unbound label or a jump farther than an
    /// offset holds is an error (a bug in the program's writer, never the input's).
    pub fn finish(mut self) -> io::Result<Vec<Insn>> {
        for &(at, label) in &self.jumps {
            let target = self.labels[label].ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "eBPF: a jump to an unbound label",
                )
            })?;
            let off = target as i64 - (at as i64 + 1);
            self.insns[at].off = i16::try_from(off)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "eBPF: a jump too far"))?;
        }
        Ok(self.insns)
    }
}

fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, exclusively borrowed `repr(C)` prefix of `union bpf_attr` for
    // `cmd`, its size passed with it (the kernel reads at most that much and writes only the
    // fields `cmd` defines as outputs, all inside it); every pointer in it points at memory
    // that outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The descriptor a create or load returned, owned.
fn owned(r: libc::c_long) -> io::Result<OwnedFd> {
    let fd = RawFd::try_from(r).map_err(|_| io::Error::other("bpf(2) returned no descriptor"))?;
    // SAFETY: a successful BPF_MAP_CREATE/BPF_PROG_LOAD returns a new descriptor that nothing
    // else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
struct MapElem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
struct InfoByFd {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The first fields of `struct bpf_map_info`.
#[repr(C)]
#[derive(Default, Debug)]
struct MapInfo {
    map_type: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// A new map of `map_type` with `u32` keys and values of `value_size` bytes.
fn create_map(map_type: u32, value_size: u32, entries: u32) -> io::Result<OwnedFd> {
    let mut attr = MapCreate {
        map_type,
        key_size: 4,
        value_size,
        max_entries: entries,
        map_flags: 0,
    };
    owned(bpf(BPF_MAP_CREATE, &mut attr)?)
}

/// Sets slot `key` of `map` (one of `entries`, `what` for the error) to `value`, whose size
/// is the map's value size.
fn update_slot<V>(map: &OwnedFd, entries: u32, what: &str, key: u32, value: &V) -> io::Result<()> {
    if key >= entries {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} slot {key} of {entries}"),
        ));
    }
    let mut attr = MapElem {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: &key as *const u32 as u64,
        value: value as *const V as u64,
        flags: 0,
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

/// A `REUSEPORT_SOCKARRAY` map: `u32` keys, each naming at most one socket of one reuseport
/// group, which the program selects with `bpf_sk_select_reuseport`.
#[derive(Debug)]
pub struct SocketArray {
    fd: OwnedFd,
    entries: u32,
}

impl SocketArray {
    /// A new array of `entries` empty slots.
    pub fn create(entries: u32) -> io::Result<SocketArray> {
        let fd = create_map(MAP_REUSEPORT_SOCKARRAY, 8, entries)?;
        Ok(SocketArray { fd, entries })
    }

    /// Takes `fd` as a socket array of `entries` slots after checking that it is one (another
    /// process passed it: its type, key and value sizes and size are read back from the
    /// kernel). The error says what it is instead.
    pub fn from_fd(fd: OwnedFd, entries: u32) -> Result<SocketArray, String> {
        let mut info = MapInfo::default();
        let mut attr = InfoByFd {
            bpf_fd: fd.as_raw_fd() as u32,
            info_len: std::mem::size_of::<MapInfo>() as u32,
            info: &mut info as *mut MapInfo as u64,
        };
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map_err(|e| format!("is not a BPF map ({e})"))?;
        if info.map_type != MAP_REUSEPORT_SOCKARRAY
            || info.key_size != 4
            || info.value_size != 8
            || info.max_entries != entries
        {
            return Err(format!(
                "is a BPF map of type {}, key {} B, value {} B, {} entries; a reuseport socket array of {entries} was due",
                info.map_type, info.key_size, info.value_size, info.max_entries
            ));
        }
        Ok(SocketArray { fd, entries })
    }

    /// Puts `socket` in slot `key` (replacing what was there). The socket must be a bound UDP
    /// or TCP socket with `SO_REUSEPORT`, in no other socket array.
    pub fn set(&self, key: u32, socket: &impl AsRawFd) -> io::Result<()> {
        let value: u64 = socket.as_raw_fd() as u64;
        update_slot(&self.fd, self.entries, "socket array", key, &value)
    }

    /// Whether slot `key` holds a socket (the kernel answers with its cookie).
    pub fn occupied(&self, key: u32) -> io::Result<bool> {
        let mut cookie: u64 = 0;
        let mut attr = MapElem {
            map_fd: self.fd.as_raw_fd() as u32,
            _pad: 0,
            key: &key as *const u32 as u64,
            value: &mut cookie as *mut u64 as u64,
            flags: 0,
        };
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The map's descriptor (for a program's `load_map`, or to pass to another process).
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }
}

/// A `XSKMAP`: slot `i` names the AF_XDP socket that frames of receive queue `i` go to
/// (`bpf_redirect_map`). A socket leaves it when it closes.
#[derive(Debug)]
pub struct XskMap {
    fd: OwnedFd,
    entries: u32,
}

impl XskMap {
    /// A new map of `entries` empty slots.
    pub fn create(entries: u32) -> io::Result<XskMap> {
        let fd = create_map(MAP_XSKMAP, 4, entries)?;
        Ok(XskMap { fd, entries })
    }

    /// Puts the AF_XDP socket `socket` (bound to a queue) in slot `key`.
    pub fn set(&self, key: u32, socket: &impl AsRawFd) -> io::Result<()> {
        let value: u32 = socket.as_raw_fd() as u32;
        update_slot(&self.fd, self.entries, "XSKMAP", key, &value)
    }

    /// The map's descriptor, for a program's `load_map`.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }
}

#[repr(C)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

/// Attaches an XDP program to interface `ifindex` through a BPF link (`BPF_LINK_CREATE`,
/// Linux 5.9): the program stays attached while the returned descriptor is open and is
/// detached by the kernel when the last one closes, so a process that dies, even by
/// SIGKILL, leaves nothing on the interface. `flags`: `XDP_FLAGS_DRV_MODE` (native) or
/// `XDP_FLAGS_SKB_MODE` (generic).
pub fn attach_xdp(ifindex: u32, program: &OwnedFd, flags: u32) -> io::Result<OwnedFd> {
    let mut attr = LinkCreate {
        prog_fd: program.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: ATTACH_XDP,
        flags,
    };
    owned(bpf(BPF_LINK_CREATE, &mut attr)?)
}

/// Loads `insns` as a program of type `prog_type`. On refusal the error carries the
/// verifier's last line.
pub fn load_program(prog_type: u32, name: &str, insns: &[Insn]) -> io::Result<OwnedFd> {
    load_program_for(prog_type, 0, name, insns)
}

/// [`load_program`] with the attach type the program is loaded for (`ATTACH_XDP` for a
/// program attached through an XDP link).
pub fn load_program_for(
    prog_type: u32,
    expected_attach_type: u32,
    name: &str,
    insns: &[Insn],
) -> io::Result<OwnedFd> {
    let license = b"Dual MIT/GPL\0";
    let mut log = vec![0u8; 64 * 1024];
    let mut prog_name = [0u8; 16];
    for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let mut attr = ProgLoad {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
        prog_ifindex: 0,
        expected_attach_type,
    };
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => owned(fd),
        Err(first)
            if first.raw_os_error() == Some(libc::EACCES)
                || first.raw_os_error() == Some(libc::EINVAL) =>
        {
            // Load again with the verifier's log, for the error line.
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            match bpf(BPF_PROG_LOAD, &mut attr) {
                Ok(fd) => owned(fd),
                Err(e) => {
                    let text = String::from_utf8_lossy(&log);
                    let last = text
                        .trim_end_matches('\0')
                        .lines()
                        .rev()
                        // The verifier ends with its statistics ("processed N insns ..."):
                        // the reason is the line before.
                        .find(|l| !l.trim().is_empty() && !l.starts_with("processed "))
                        .unwrap_or("")
                        .to_string();
                    Err(io::Error::new(e.kind(), format!("{e}: verifier: {last}")))
                }
            }
        }
        Err(e) => Err(e),
    }
}

/// Attaches an `SK_REUSEPORT` program to the reuseport group `socket` is in, replacing the
/// group's program (classic or eBPF) for every socket of the group at once.
pub fn attach_reuseport(socket: &impl AsRawFd, program: &OwnedFd) -> io::Result<()> {
    let fd: libc::c_int = program.as_raw_fd();
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `&fd`, a live local.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_EBPF,
            &fd as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_resolve_relative_to_the_next_instruction() {
        let mut asm = Asm::default();
        let end = asm.label();
        asm.mov_imm(R0, 1)
            .jump_if(Cond::Eq, R0, 1, end)
            .mov_imm(R0, 0);
        asm.bind(end);
        asm.exit();
        let insns = asm.finish().unwrap();
        assert_eq!(insns[1].off, 1);
        assert_eq!(insns[1].code, 0x15);
        assert_eq!(insns[0].code, 0xb7);
        assert_eq!(insns[3].code, 0x95);
    }

    #[test]
    fn a_map_load_is_two_instructions_naming_the_descriptor() {
        let mut asm = Asm::default();
        asm.load_map(R2, 7);
        let insns = asm.finish().unwrap();
        assert_eq!(insns.len(), 2);
        assert_eq!(
            (insns[0].code, insns[0].regs, insns[0].imm),
            (0x18, 0x12, 7)
        );
        assert_eq!(insns[1], insn(0, 0, 0, 0, 0));
    }

    #[test]
    fn an_unbound_label_is_an_error() {
        let mut asm = Asm::default();
        let nowhere = asm.label();
        asm.jump(nowhere);
        assert!(asm.finish().is_err());
    }
}
