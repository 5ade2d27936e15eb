//! The XDP program udpring builds and loads itself (no clang or bpftool): UDP for the served
//! address and port goes to the AF_XDP socket of the frame's receive queue; everything else
//! (ARP, ICMP, other ports and addresses, IPv4 options and fragments, IPv6 extension
//! headers, VLAN tags, frames too short for the headers) passes to the kernel. A queue without
//! a socket passes too (`bpf_redirect_map`'s default action), so the ring path serves it.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use super::XdpMode;

use crate::ebpf::{self, helper, Asm, Cond, Insn, XskMap, R0, R1, R2, R3, R4, R5, R6};

const XDP_PASS: i32 = 2;
/// `struct xdp_md` field offsets.
const MD_DATA: i16 = 0;
const MD_DATA_END: i16 = 4;
const MD_RX_QUEUE: i16 = 16;

/// `XDP_FLAGS_SKB_MODE` / `XDP_FLAGS_DRV_MODE` (linux/if_link.h).
pub const FLAGS_SKB_MODE: u32 = 1 << 1;
pub const FLAGS_DRV_MODE: u32 = 1 << 2;

/// A 16-bit network-order field as a `u16` load reads it on this host.
fn wire16(v: u16) -> i32 {
    i32::from(u16::from_ne_bytes(v.to_be_bytes()))
}

/// The program for `bind`: frames to its port (and address, unless it is a wildcard) are
/// redirected through `map`. A wildcard IPv6 address takes IPv4 too, as a dual-stack socket.
pub fn build(bind: SocketAddr, map: &XskMap) -> io::Result<Vec<Insn>> {
    let mut a = Asm::default();
    let pass = a.label();
    let v4 = a.label();
    let v6 = a.label();
    let redirect = a.label();
    let port = wire16(bind.port());
    let (take_v4, take_v6) = match bind.ip() {
        IpAddr::V4(_) => (true, false),
        IpAddr::V6(ip) => (ip.is_unspecified(), true),
    };
    a.mov(R6, R1)
        .load_u32(R2, R6, MD_DATA)
        .load_u32(R3, R6, MD_DATA_END)
        .mov(R4, R2)
        .add_imm(R4, 14 + 20 + 8)
        .jump_if_greater(R4, R3, pass)
        .load_u16(R5, R2, 12);
    if take_v4 {
        a.jump_if(Cond::Eq, R5, wire16(0x0800), v4);
    }
    if take_v6 {
        a.jump_if(Cond::Eq, R5, wire16(0x86dd), v6);
    }
    a.jump(pass);

    // The verifier refuses code no path reaches: each family's block only where it is taken.
    if take_v4 {
        a.bind(v4);
        a.load_u8(R5, R2, 14)
            .jump_if(Cond::Ne, R5, 0x45, pass)
            .load_u16(R5, R2, 20)
            .and_imm(R5, wire16(0x3fff))
            .jump_if(Cond::Ne, R5, 0, pass)
            .load_u8(R5, R2, 23)
            .jump_if(Cond::Ne, R5, 17, pass);
        if let IpAddr::V4(ip) = bind.ip() {
            if !ip.is_unspecified() {
                a.load_u32(R5, R2, 30).jump32_if(
                    Cond::Ne,
                    R5,
                    u32::from_ne_bytes(ip.octets()),
                    pass,
                );
            }
        }
        a.load_u16(R5, R2, 36)
            .jump_if(Cond::Ne, R5, port, pass)
            .jump(redirect);
    }
    if take_v6 {
        a.bind(v6);
        a.mov(R4, R2)
            .add_imm(R4, 14 + 40 + 8)
            .jump_if_greater(R4, R3, pass)
            .load_u8(R5, R2, 14)
            .and_imm(R5, 0xf0)
            .jump_if(Cond::Ne, R5, 0x60, pass)
            .load_u8(R5, R2, 20)
            .jump_if(Cond::Ne, R5, 17, pass);
        if let IpAddr::V6(ip) = bind.ip() {
            if !ip.is_unspecified() {
                for (k, word) in ip.octets().chunks_exact(4).enumerate() {
                    let w = u32::from_ne_bytes([word[0], word[1], word[2], word[3]]);
                    a.load_u32(R5, R2, 38 + 4 * k as i16)
                        .jump32_if(Cond::Ne, R5, w, pass);
                }
            }
        }
        a.load_u16(R5, R2, 56).jump_if(Cond::Ne, R5, port, pass);
    }

    a.bind(redirect);
    a.load_u32(R2, R6, MD_RX_QUEUE)
        .load_map(R1, map.fd().as_raw_fd())
        .mov_imm(R3, XDP_PASS)
        .call(helper::REDIRECT_MAP)
        .exit();

    a.bind(pass);
    a.mov_imm(R0, XDP_PASS).exit();
    a.finish()
}

/// The program attached to an interface: the map it redirects through, and the link that
/// keeps it attached while this value lives (and not a moment after the process ends).
pub struct Attached {
    // Held for their drop, in this order: the link first (the program leaves the
    // interface), then the program and the map.
    _link: OwnedFd,
    _program: OwnedFd,
    _map: Arc<XskMap>,
    /// Whether the driver runs it (native XDP) or the generic hook after the skb is built.
    pub native: bool,
    /// Why native XDP was refused, where `Auto` fell back to generic.
    pub native_refused: Option<String>,
}

/// Attaches `program` (built over `map`) to `ifindex`: natively where the driver can, in
/// generic mode where it cannot (`Auto`), or only the one `mode` names.
pub fn attach_loaded(
    ifindex: u32,
    map: Arc<XskMap>,
    program: OwnedFd,
    mode: XdpMode,
) -> io::Result<Attached> {
    let native = match mode {
        XdpMode::Generic => None,
        _ => Some(ebpf::attach_xdp(ifindex, &program, FLAGS_DRV_MODE)),
    };
    let mut native_refused = None;
    let (link, native) = match native {
        Some(Ok(link)) => (link, true),
        Some(Err(e)) if mode == XdpMode::Native => {
            return Err(io::Error::new(
                e.kind(),
                format!("native XDP (XDP_FLAGS_DRV_MODE): {e}"),
            ))
        }
        refused => {
            native_refused = refused.and_then(|r| r.err()).map(|e| e.to_string());
            (ebpf::attach_xdp(ifindex, &program, FLAGS_SKB_MODE)?, false)
        }
    };
    Ok(Attached {
        _link: link,
        _program: program,
        _map: map,
        native,
        native_refused,
    })
}
