//! Pure byte-level parsing and encoding of what the kernel reads and writes for datagrams:
//! the multishot `io_uring_recvmsg_out` layout, socket addresses and the packet-info control
//! messages. No syscalls and no `unsafe` here, so every parser can be unit-tested and fuzzed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// Size of `struct io_uring_recvmsg_out` (four `u32`s), which the kernel writes at the start
/// of every buffer a multishot recvmsg fills (io_uring_prep_recvmsg_multishot(3)).
pub const RECVMSG_OUT_LEN: usize = 16;
/// `sizeof(struct sockaddr_in)`.
pub const SOCKADDR_IN_LEN: usize = 16;
/// `sizeof(struct sockaddr_in6)`.
pub const SOCKADDR_IN6_LEN: usize = 28;
/// Room for the control messages of one datagram: packet-info of either family
/// (`CMSG_SPACE(20)` = 40), `UDP_GRO` / `UDP_SEGMENT` (24) and `IP_TOS` / `IPV6_TCLASS` (24).
pub const CONTROL_LEN: usize = 88;
/// `MSG_TRUNC` in `recvmsg_out.flags`: the payload did not fit in the buffer.
pub const MSG_TRUNC: u32 = libc::MSG_TRUNC as u32;

const CMSG_HDR_LEN: usize = std::mem::size_of::<libc::cmsghdr>();
const CMSG_ALIGN: usize = std::mem::size_of::<usize>();

/// Why a buffer could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than the fixed header or the areas it declares.
    Short,
    /// An address family we do not serve, or an address of the wrong length.
    BadAddress,
}

/// One received datagram as laid out in a provided buffer.
#[derive(Debug, Clone, Copy)]
pub struct RecvMsgOut<'a> {
    /// Source address bytes (`sockaddr_in` or `sockaddr_in6`), as long as the kernel wrote.
    pub name: &'a [u8],
    /// Control messages (only what the kernel wrote).
    pub control: &'a [u8],
    /// The payload bytes present in the buffer.
    pub payload: &'a [u8],
    /// The datagram's real length; larger than `payload.len()` when truncated.
    pub payload_len: usize,
    /// `msg_flags` of the receive (`MSG_TRUNC`, `MSG_CTRUNC`).
    pub flags: u32,
}

impl RecvMsgOut<'_> {
    /// The datagram did not fit: it must be counted and dropped, never handed on as if whole.
    pub fn is_truncated(&self) -> bool {
        self.flags & MSG_TRUNC != 0 || self.payload_len > self.payload.len()
    }
}

/// Parses a buffer filled by a multishot recvmsg whose `msghdr` asked for `name_space` bytes of
/// address and `control_space` bytes of control data. `buf` is the part of the buffer the
/// completion says was written (`cqe.res` bytes).
///
/// The kernel always reserves the full `name_space` and `control_space` areas, whatever it
/// wrote into them, and reports the real lengths in the header.
pub fn parse_recvmsg_out(
    buf: &[u8],
    name_space: usize,
    control_space: usize,
) -> Result<RecvMsgOut<'_>, ParseError> {
    if buf.len() < RECVMSG_OUT_LEN {
        return Err(ParseError::Short);
    }
    let namelen = read_u32_ne(buf, 0) as usize;
    let controllen = read_u32_ne(buf, 4) as usize;
    let payload_len = read_u32_ne(buf, 8) as usize;
    let flags = read_u32_ne(buf, 12);
    let name_start = RECVMSG_OUT_LEN;
    let control_start = name_start
        .checked_add(name_space)
        .ok_or(ParseError::Short)?;
    let payload_start = control_start
        .checked_add(control_space)
        .ok_or(ParseError::Short)?;
    if buf.len() < payload_start {
        return Err(ParseError::Short);
    }
    // The name may have been longer than the space we gave (then it is cut); the control
    // length reported is what was written, never more than the space.
    let name = &buf[name_start..name_start + namelen.min(name_space)];
    let control = &buf[control_start..control_start + controllen.min(control_space)];
    let payload = &buf[payload_start..];
    let payload = &payload[..payload.len().min(payload_len)];
    Ok(RecvMsgOut {
        name,
        control,
        payload,
        payload_len,
        flags,
    })
}

/// Decodes a `sockaddr_in` / `sockaddr_in6`. IPv4-mapped IPv6 addresses (what a dual-stack
/// socket reports for IPv4 peers) come back as plain IPv4, so handlers see one form per peer.
pub fn decode_sockaddr(name: &[u8]) -> Result<SocketAddr, ParseError> {
    if name.len() < 2 {
        return Err(ParseError::BadAddress);
    }
    let family = u16::from_ne_bytes([name[0], name[1]]);
    match i32::from(family) {
        libc::AF_INET if name.len() >= 8 => {
            let port = u16::from_be_bytes([name[2], name[3]]);
            let ip = Ipv4Addr::new(name[4], name[5], name[6], name[7]);
            Ok(SocketAddr::V4(SocketAddrV4::new(ip, port)))
        }
        libc::AF_INET6 if name.len() >= SOCKADDR_IN6_LEN => {
            let port = u16::from_be_bytes([name[2], name[3]]);
            let flowinfo = u32::from_be_bytes([name[4], name[5], name[6], name[7]]);
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&name[8..24]);
            let scope_id = read_u32_ne(name, 24);
            let ip = Ipv6Addr::from(octets);
            match ip.to_ipv4_mapped() {
                Some(v4) => Ok(SocketAddr::V4(SocketAddrV4::new(v4, port))),
                None => Ok(SocketAddr::V6(SocketAddrV6::new(
                    ip, port, flowinfo, scope_id,
                ))),
            }
        }
        _ => Err(ParseError::BadAddress),
    }
}

/// Encodes `addr` for a socket of the given family into `out` and returns the length to put
/// in `msg_namelen`. An IPv4 peer on an IPv6 (dual-stack) socket is written IPv4-mapped.
/// `None` when an IPv6 peer is asked of an IPv4 socket.
pub fn encode_sockaddr(addr: SocketAddr, socket_is_v6: bool, out: &mut [u8; 28]) -> Option<u32> {
    out.fill(0);
    match (addr, socket_is_v6) {
        (SocketAddr::V4(v4), false) => {
            out[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            out[2..4].copy_from_slice(&v4.port().to_be_bytes());
            out[4..8].copy_from_slice(&v4.ip().octets());
            Some(SOCKADDR_IN_LEN as u32)
        }
        (SocketAddr::V4(v4), true) => {
            write_sockaddr_in6(out, v4.ip().to_ipv6_mapped(), v4.port(), 0, 0);
            Some(SOCKADDR_IN6_LEN as u32)
        }
        (SocketAddr::V6(v6), true) => {
            write_sockaddr_in6(out, *v6.ip(), v6.port(), v6.flowinfo(), v6.scope_id());
            Some(SOCKADDR_IN6_LEN as u32)
        }
        (SocketAddr::V6(_), false) => None,
    }
}

fn write_sockaddr_in6(out: &mut [u8; 28], ip: Ipv6Addr, port: u16, flowinfo: u32, scope: u32) {
    out[0..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
    out[2..4].copy_from_slice(&port.to_be_bytes());
    out[4..8].copy_from_slice(&flowinfo.to_be_bytes());
    out[8..24].copy_from_slice(&ip.octets());
    out[24..28].copy_from_slice(&scope.to_ne_bytes());
}

/// Finds the local address a datagram was sent to in its control messages: `IP_PKTINFO`
/// (`ipi_spec_dst`, the address the kernel itself would answer from) or `IPV6_PKTINFO`
/// (`ipi6_addr`). A dual-stack socket reports IPv4 datagrams with `IP_PKTINFO`.
pub fn find_pktinfo(control: &[u8]) -> Option<IpAddr> {
    for (level, kind, data) in cmsgs(control) {
        if level == libc::IPPROTO_IP && kind == libc::IP_PKTINFO && data.len() >= 12 {
            // struct in_pktinfo { int ipi_ifindex; in_addr ipi_spec_dst; in_addr ipi_addr; }
            return Some(IpAddr::V4(Ipv4Addr::new(
                data[4], data[5], data[6], data[7],
            )));
        }
        if level == libc::IPPROTO_IPV6 && kind == libc::IPV6_PKTINFO && data.len() >= 20 {
            // struct in6_pktinfo { in6_addr ipi6_addr; unsigned ipi6_ifindex; }
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&data[..16]);
            let ip = Ipv6Addr::from(octets);
            return Some(match ip.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(ip),
            });
        }
    }
    None
}

/// The segment size of a coalesced receive: the `UDP_GRO` control message (`SOL_UDP`,
/// `UDP_GRO`, an `int`) the kernel adds when it merged several datagrams of one flow into one
/// buffer (`udp_cmsg_recv`, Linux 5.0). Every segment has this size but the last, which may
/// be shorter. `None` without one (the buffer is one datagram) or for a size of 0.
pub fn find_gro_segment_size(control: &[u8]) -> Option<u16> {
    cmsgs(control)
        .find(|&(level, kind, data)| {
            level == libc::SOL_UDP && kind == libc::UDP_GRO && data.len() >= 4
        })
        .and_then(|(_, _, data)| {
            let size = i32::from_ne_bytes(data[..4].try_into().ok()?);
            u16::try_from(size).ok().filter(|&s| s > 0)
        })
}

/// The ECN codepoint (the two low bits of the TOS / traffic class byte) of a datagram
/// received with `IP_RECVTOS` / `IPV6_RECVTCLASS` on: `IP_TOS` carries one byte
/// (`ip_cmsg_recv_tos`), `IPV6_TCLASS` an `int` (`ip6_datagram_recv_specific_ctl`). 0
/// (Not-ECT) without one.
pub fn find_ecn(control: &[u8]) -> u8 {
    for (level, kind, data) in cmsgs(control) {
        if level == libc::IPPROTO_IP && kind == libc::IP_TOS && !data.is_empty() {
            return data[0] & 0b11;
        }
        if level == libc::IPPROTO_IPV6 && kind == libc::IPV6_TCLASS && data.len() >= 4 {
            let class = i32::from_ne_bytes([data[0], data[1], data[2], data[3]]);
            return (class & 0b11) as u8;
        }
    }
    0
}

/// Appends the control message that sets a datagram's ECN codepoint: `IP_TOS` (an `int`) for
/// an IPv4 peer (also on a dual-stack socket, whose IPv4 sends take the IPv4 path),
/// `IPV6_TCLASS` for an IPv6 one.
pub fn encode_ecn(out: &mut [u8], offset: usize, peer_is_v4: bool, ecn: u8) -> Option<usize> {
    let value = i32::from(ecn & 0b11).to_ne_bytes();
    if peer_is_v4 {
        encode_cmsg(out, offset, libc::IPPROTO_IP, libc::IP_TOS, &value)
    } else {
        encode_cmsg(out, offset, libc::IPPROTO_IPV6, libc::IPV6_TCLASS, &value)
    }
}

/// Iterates over `(level, type, data)` of each control message, stopping at the first
/// malformed header instead of trusting its length.
pub fn cmsgs(control: &[u8]) -> impl Iterator<Item = (i32, i32, &[u8])> {
    let mut offset = 0usize;
    std::iter::from_fn(move || {
        let rest = control.get(offset..)?;
        if rest.len() < CMSG_HDR_LEN {
            return None;
        }
        let len = usize::from_ne_bytes(rest[..CMSG_ALIGN].try_into().ok()?);
        if len < CMSG_HDR_LEN || len > rest.len() {
            return None;
        }
        let level = i32::from_ne_bytes(rest[CMSG_ALIGN..CMSG_ALIGN + 4].try_into().ok()?);
        let kind = i32::from_ne_bytes(rest[CMSG_ALIGN + 4..CMSG_ALIGN + 8].try_into().ok()?);
        let data = &rest[CMSG_HDR_LEN..len];
        offset += cmsg_align(len);
        Some((level, kind, data))
    })
}

/// `UDP_SEGMENT` (linux/udp.h): a `SOL_UDP` control message carrying the segment size of a
/// GSO train (Linux 4.18).
pub const UDP_SEGMENT: i32 = 103;
/// Most segments the kernel accepts in one GSO train (`UDP_MAX_SEGMENTS`).
pub const MAX_GSO_SEGMENTS: usize = 64;

/// Appends one control message at `offset` in `out`; returns the offset after it, or `None`
/// when it does not fit.
pub fn encode_cmsg(
    out: &mut [u8],
    offset: usize,
    level: i32,
    kind: i32,
    data: &[u8],
) -> Option<usize> {
    let len = CMSG_HDR_LEN + data.len();
    let end = offset.checked_add(cmsg_align(len))?;
    if end > out.len() {
        return None;
    }
    let msg = &mut out[offset..end];
    msg.fill(0);
    msg[..CMSG_ALIGN].copy_from_slice(&len.to_ne_bytes());
    msg[CMSG_ALIGN..CMSG_ALIGN + 4].copy_from_slice(&level.to_ne_bytes());
    msg[CMSG_ALIGN + 4..CMSG_ALIGN + 8].copy_from_slice(&kind.to_ne_bytes());
    msg[CMSG_HDR_LEN..len].copy_from_slice(data);
    Some(end)
}

/// Writes the packet-info control message that makes a reply leave from `local`, matching the
/// form the datagram arrived with, at the start of `out`; returns the bytes used.
pub fn encode_pktinfo(local: IpAddr, out: &mut [u8; CONTROL_LEN]) -> usize {
    let written = match local {
        // struct in_pktinfo: ifindex 0 lets routing pick the interface; ipi_spec_dst sets
        // the source address.
        IpAddr::V4(v4) => {
            let mut data = [0u8; 12];
            data[4..8].copy_from_slice(&v4.octets());
            encode_cmsg(out, 0, libc::IPPROTO_IP, libc::IP_PKTINFO, &data)
        }
        // struct in6_pktinfo { in6_addr ipi6_addr; unsigned ipi6_ifindex; }
        IpAddr::V6(v6) => {
            let mut data = [0u8; 20];
            data[..16].copy_from_slice(&v6.octets());
            encode_cmsg(out, 0, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, &data)
        }
    };
    // Both fit in CONTROL_LEN by construction (40 bytes at most).
    written.unwrap_or(0)
}

/// Appends the `UDP_SEGMENT` message of a GSO train with `segment_len`-byte segments.
pub fn encode_udp_segment(out: &mut [u8], offset: usize, segment_len: u16) -> Option<usize> {
    encode_cmsg(
        out,
        offset,
        libc::SOL_UDP,
        UDP_SEGMENT,
        &segment_len.to_ne_bytes(),
    )
}

fn cmsg_align(len: usize) -> usize {
    (len + CMSG_ALIGN - 1) & !(CMSG_ALIGN - 1)
}

fn read_u32_ne(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(namelen: u32, controllen: u32, payload_len: u32, flags: u32) -> Vec<u8> {
        let mut v = Vec::new();
        for x in [namelen, controllen, payload_len, flags] {
            v.extend_from_slice(&x.to_ne_bytes());
        }
        v
    }

    fn v4_name(ip: [u8; 4], port: u16) -> [u8; 28] {
        let mut out = [0u8; 28];
        let addr = SocketAddr::from((Ipv4Addr::from(ip), port));
        encode_sockaddr(addr, false, &mut out);
        out
    }

    #[test]
    fn parses_name_control_and_payload() {
        let mut buf = layout(16, 0, 5, 0);
        buf.extend_from_slice(&v4_name([127, 0, 0, 1], 4242)); // 28 bytes of name space
        buf.extend_from_slice(&[0u8; CONTROL_LEN]);
        buf.extend_from_slice(b"hello");
        let out = parse_recvmsg_out(&buf, 28, CONTROL_LEN).unwrap();
        assert_eq!(out.payload, b"hello");
        assert_eq!(out.payload_len, 5);
        assert!(!out.is_truncated());
        assert!(out.control.is_empty());
        assert_eq!(
            decode_sockaddr(out.name).unwrap(),
            "127.0.0.1:4242".parse().unwrap()
        );
    }

    #[test]
    fn empty_datagram_is_valid() {
        let mut buf = layout(16, 0, 0, 0);
        buf.extend_from_slice(&[0u8; 16]);
        let out = parse_recvmsg_out(&buf, 16, 0).unwrap();
        assert!(out.payload.is_empty());
        assert!(!out.is_truncated());
    }

    #[test]
    fn truncation_is_reported() {
        let mut buf = layout(16, 0, 100, MSG_TRUNC);
        buf.extend_from_slice(&[0u8; 16]);
        buf.extend_from_slice(&[1u8; 10]);
        let out = parse_recvmsg_out(&buf, 16, 0).unwrap();
        assert_eq!(out.payload.len(), 10);
        assert_eq!(out.payload_len, 100);
        assert!(out.is_truncated());
        // Even without the flag, fewer bytes than announced means truncated.
        let mut buf = layout(16, 0, 100, 0);
        buf.extend_from_slice(&[0u8; 16]);
        buf.extend_from_slice(&[1u8; 10]);
        assert!(parse_recvmsg_out(&buf, 16, 0).unwrap().is_truncated());
    }

    #[test]
    fn short_buffers_are_rejected() {
        assert_eq!(
            parse_recvmsg_out(&[0u8; 15], 0, 0).unwrap_err(),
            ParseError::Short
        );
        let buf = layout(16, 0, 0, 0);
        assert_eq!(
            parse_recvmsg_out(&buf, 16, 0).unwrap_err(),
            ParseError::Short
        );
        assert_eq!(
            parse_recvmsg_out(&buf, usize::MAX, 1).unwrap_err(),
            ParseError::Short
        );
    }

    #[test]
    fn lying_lengths_are_clamped() {
        let mut buf = layout(u32::MAX, u32::MAX, 3, 0);
        buf.extend_from_slice(&[0u8; 16 + 8]);
        buf.extend_from_slice(b"abc");
        let out = parse_recvmsg_out(&buf, 16, 8).unwrap();
        assert_eq!(out.name.len(), 16);
        assert_eq!(out.control.len(), 8);
        assert_eq!(out.payload, b"abc");
    }

    #[test]
    fn sockaddr_round_trips() {
        let cases: [(SocketAddr, bool); 4] = [
            ("10.1.2.3:53".parse().unwrap(), false),
            ("10.1.2.3:53".parse().unwrap(), true),
            ("[::1]:9000".parse().unwrap(), true),
            ("[fe80::1%3]:1".parse().unwrap(), true),
        ];
        for (addr, v6) in cases {
            let mut out = [0u8; 28];
            let len = encode_sockaddr(addr, v6, &mut out).unwrap() as usize;
            assert_eq!(decode_sockaddr(&out[..len]).unwrap(), addr);
        }
        let mut out = [0u8; 28];
        assert!(encode_sockaddr("[::1]:1".parse().unwrap(), false, &mut out).is_none());
    }

    #[test]
    fn bad_sockaddrs_are_rejected() {
        assert!(decode_sockaddr(&[]).is_err());
        assert!(decode_sockaddr(&[0xff, 0xff, 0, 0, 0, 0, 0, 0]).is_err());
        let mut v6 = [0u8; 28];
        encode_sockaddr("[::1]:1".parse().unwrap(), true, &mut v6);
        assert!(decode_sockaddr(&v6[..20]).is_err());
    }

    /// A control message as the kernel lays it out: cmsghdr (len, level, type) then data.
    fn cmsg(level: i32, kind: i32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(CMSG_HDR_LEN + data.len()).to_ne_bytes());
        v.extend_from_slice(&level.to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(data);
        v.resize(cmsg_align(v.len()), 0);
        v
    }

    #[test]
    fn pktinfo_round_trips_both_families() {
        for local in [
            "192.0.2.7".parse::<IpAddr>().unwrap(),
            "2001:db8::9".parse().unwrap(),
        ] {
            let mut out = [0u8; CONTROL_LEN];
            let len = encode_pktinfo(local, &mut out);
            assert!(len <= CONTROL_LEN);
            assert_eq!(find_pktinfo(&out[..len]), Some(local));
        }
    }

    #[test]
    fn pktinfo_and_udp_segment_fit_together() {
        let mut out = [0u8; CONTROL_LEN];
        let used = encode_pktinfo("2001:db8::1".parse().unwrap(), &mut out);
        let end = encode_udp_segment(&mut out, used, 1200).unwrap();
        assert!(end <= CONTROL_LEN);
        let msgs: Vec<_> = cmsgs(&out[..end]).collect();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[1].0, libc::SOL_UDP);
        assert_eq!(msgs[1].1, UDP_SEGMENT);
        assert_eq!(msgs[1].2, &1200u16.to_ne_bytes());
        assert!(encode_udp_segment(&mut out, CONTROL_LEN - 8, 1).is_none());
    }

    #[test]
    fn ecn_round_trips_beside_pktinfo_and_udp_segment() {
        for (local, v4) in [
            ("192.0.2.7".parse::<IpAddr>().unwrap(), true),
            ("2001:db8::9".parse().unwrap(), false),
        ] {
            for ecn in 0..4u8 {
                let mut out = [0u8; CONTROL_LEN];
                let used = encode_pktinfo(local, &mut out);
                let used = encode_ecn(&mut out, used, v4, ecn).unwrap();
                let end = encode_udp_segment(&mut out, used, 1200).unwrap();
                assert!(end <= CONTROL_LEN);
                assert_eq!(find_ecn(&out[..end]), ecn);
                assert_eq!(find_pktinfo(&out[..end]), Some(local));
            }
        }
        // As the kernel reports IPv4: IP_TOS with one byte, the whole TOS (DSCP bits too).
        let tos = cmsg(libc::IPPROTO_IP, libc::IP_TOS, &[0xb9]);
        assert_eq!(find_ecn(&tos), 1);
        assert_eq!(find_ecn(&[]), 0);
        let short = cmsg(libc::IPPROTO_IPV6, libc::IPV6_TCLASS, &[3, 0]);
        assert_eq!(find_ecn(&short), 0);
    }

    #[test]
    fn garbage_control_data_is_ignored() {
        assert_eq!(find_pktinfo(&[]), None);
        assert_eq!(find_pktinfo(&[0xffu8; 40]), None);
        let mut lying = [0u8; 24];
        lying[..8].copy_from_slice(&1000usize.to_ne_bytes());
        assert_eq!(cmsgs(&lying).count(), 0);
        let mut tiny = [0u8; 24];
        tiny[..8].copy_from_slice(&1usize.to_ne_bytes());
        assert_eq!(cmsgs(&tiny).count(), 0);
    }

    #[test]
    fn gro_segment_size_is_found() {
        let mut out = [0u8; CONTROL_LEN];
        let used = encode_pktinfo("192.0.2.1".parse().unwrap(), &mut out);
        let end = encode_cmsg(
            &mut out,
            used,
            libc::SOL_UDP,
            libc::UDP_GRO,
            &1200i32.to_ne_bytes(),
        )
        .unwrap();
        assert_eq!(find_gro_segment_size(&out[..end]), Some(1200));
        assert_eq!(find_gro_segment_size(&out[..used]), None);
        // UDP_SEGMENT is not UDP_GRO; a size that is no u16 or not positive is no segment.
        let end = encode_udp_segment(&mut out, 0, 1200).unwrap();
        assert_eq!(find_gro_segment_size(&out[..end]), None);
        for bad in [0i32, -1, 70_000] {
            let end = encode_cmsg(&mut out, 0, libc::SOL_UDP, libc::UDP_GRO, &bad.to_ne_bytes());
            assert_eq!(find_gro_segment_size(&out[..end.unwrap()]), None, "{bad}");
        }
    }
}
