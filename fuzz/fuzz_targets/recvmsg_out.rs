//! `parse_recvmsg_out` on whatever a (buggy or hostile) kernel could leave in a provided
//! buffer, then every parser that runs on the pieces it returns, as the worker does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use udpring::datagram::{cmsgs, decode_sockaddr, find_pktinfo, parse_recvmsg_out, MSG_TRUNC};

fuzz_target!(|data: &[u8]| {
    // The first two bytes choose the name and control areas the msghdr "asked for", so the
    // fuzzer explores layouts other than the one the worker uses (28 + 64). Ranges reach a
    // little past the sizes the worker uses; huge values are covered by the overflow checks
    // tested in datagram.rs and would only make every input `Short`.
    let [name_byte, control_byte, buf @ ..] = data else {
        return;
    };
    let name_space = usize::from(*name_byte % 64);
    let control_space = usize::from(*control_byte);
    let Ok(out) = parse_recvmsg_out(buf, name_space, control_space) else {
        return;
    };
    // The slices never claim more than the areas reserved for them or the header declared.
    assert!(out.name.len() <= name_space);
    assert!(out.control.len() <= control_space);
    assert!(out.payload.len() <= out.payload_len);
    assert_eq!(
        out.is_truncated(),
        out.flags & MSG_TRUNC != 0 || out.payload.len() < out.payload_len
    );
    // Every slice is a part of the input, laid out in order.
    let base = buf.as_ptr() as usize;
    let end = base + buf.len();
    for piece in [out.name, out.control, out.payload] {
        let start = piece.as_ptr() as usize;
        assert!(start >= base && start + piece.len() <= end);
    }

    // A decoded address is never an IPv4-mapped IPv6 one: handlers see one form per peer.
    if let Ok(std::net::SocketAddr::V6(v6)) = decode_sockaddr(out.name) {
        assert!(v6.ip().to_ipv4_mapped().is_none());
    }
    if let Some(std::net::IpAddr::V6(v6)) = find_pktinfo(out.control) {
        assert!(v6.to_ipv4_mapped().is_none());
    }
    for (_, _, payload) in cmsgs(out.control) {
        let start = payload.as_ptr() as usize;
        assert!(start >= out.control.as_ptr() as usize);
        assert!(start + payload.len() <= out.control.as_ptr() as usize + out.control.len());
    }
});
