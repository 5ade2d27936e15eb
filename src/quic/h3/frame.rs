//! HTTP/3 frames (RFC 9114 section 7) and QUIC variable-length integers (RFC 9000
//! section 16): what the server reads from its peer's streams and writes on its own.

/// Frame types this server acts on (RFC 9114 section 7.2).
pub const DATA: u64 = 0x0;
pub const HEADERS: u64 = 0x1;
pub const CANCEL_PUSH: u64 = 0x3;
pub const SETTINGS: u64 = 0x4;
pub const PUSH_PROMISE: u64 = 0x5;
pub const GOAWAY: u64 = 0x7;
pub const MAX_PUSH_ID: u64 = 0xd;

/// Unidirectional stream types (RFC 9114 section 6.2, RFC 9204 section 4.2).
pub const STREAM_CONTROL: u64 = 0x0;
pub const STREAM_PUSH: u64 = 0x1;
pub const STREAM_QPACK_ENCODER: u64 = 0x2;
pub const STREAM_QPACK_DECODER: u64 = 0x3;

/// Settings (RFC 9114 section 7.2.4.1, RFC 9204 section 5).
pub const SETTING_QPACK_MAX_TABLE_CAPACITY: u64 = 0x1;
pub const SETTING_MAX_FIELD_SECTION_SIZE: u64 = 0x6;
pub const SETTING_QPACK_BLOCKED_STREAMS: u64 = 0x7;

/// HTTP/3 error codes (RFC 9114 section 8.1).
pub mod code {
    pub const NO_ERROR: u32 = 0x100;
    pub const INTERNAL_ERROR: u32 = 0x102;
    pub const STREAM_CREATION_ERROR: u32 = 0x103;
    pub const CLOSED_CRITICAL_STREAM: u32 = 0x104;
    pub const FRAME_UNEXPECTED: u32 = 0x105;
    pub const FRAME_ERROR: u32 = 0x106;
    pub const EXCESSIVE_LOAD: u32 = 0x107;
    pub const SETTINGS_ERROR: u32 = 0x109;
    pub const MISSING_SETTINGS: u32 = 0x10a;
    pub const REQUEST_CANCELLED: u32 = 0x10c;
    pub const REQUEST_INCOMPLETE: u32 = 0x10d;
    pub const MESSAGE_ERROR: u32 = 0x10e;
    /// RFC 9204 section 6.
    pub const QPACK_DECOMPRESSION_FAILED: u32 = 0x200;
}

/// A variable-length integer from the front of `input`, and the bytes it took; `None` when
/// `input` holds only part of it.
pub fn varint(input: &[u8]) -> Option<(u64, usize)> {
    let first = *input.first()?;
    let len = 1usize << (first >> 6);
    if input.len() < len {
        return None;
    }
    let mut value = u64::from(first & 0x3f);
    for &b in &input[1..len] {
        value = (value << 8) | u64::from(b);
    }
    Some((value, len))
}

/// Appends `value` (below 2^62) as a variable-length integer in its shortest form.
pub fn put_varint(out: &mut Vec<u8>, value: u64) {
    if value < 1 << 6 {
        out.push(value as u8);
    } else if value < 1 << 14 {
        out.extend_from_slice(&((value as u16) | 0x4000).to_be_bytes());
    } else if value < 1 << 30 {
        out.extend_from_slice(&((value as u32) | 0x8000_0000).to_be_bytes());
    } else {
        out.extend_from_slice(&(value | 0xc000_0000_0000_0000).to_be_bytes());
    }
}

/// A frame header: type and payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u64,
    pub len: u64,
    /// Bytes the type and length took.
    pub header_len: usize,
}

/// The frame header at the front of `input`, `None` while incomplete.
pub fn header(input: &[u8]) -> Option<Header> {
    let (kind, a) = varint(input)?;
    let (len, b) = varint(&input[a..])?;
    Some(Header {
        kind,
        len,
        header_len: a + b,
    })
}

/// Appends a frame header.
pub fn put_header(out: &mut Vec<u8>, kind: u64, len: u64) {
    put_varint(out, kind);
    put_varint(out, len);
}

/// Frame types HTTP/2 had and HTTP/3 reserves: receiving one is a connection error
/// (H3_FRAME_UNEXPECTED, RFC 9114 section 7.2.8).
pub fn reserved_http2(kind: u64) -> bool {
    matches!(kind, 0x2 | 0x6 | 0x8 | 0x9)
}

/// The server's SETTINGS frame: no dynamic QPACK table, no blocked streams (both the
/// defaults, written out for clarity), the field section limit.
pub fn server_settings(out: &mut Vec<u8>) {
    let mut payload = Vec::new();
    for (id, value) in [
        (SETTING_QPACK_MAX_TABLE_CAPACITY, 0),
        (SETTING_QPACK_BLOCKED_STREAMS, 0),
        (
            SETTING_MAX_FIELD_SECTION_SIZE,
            super::qpack::MAX_FIELD_SECTION as u64,
        ),
    ] {
        put_varint(&mut payload, id);
        put_varint(&mut payload, value);
    }
    put_header(out, SETTINGS, payload.len() as u64);
    out.extend_from_slice(&payload);
}

/// Checks a peer's SETTINGS payload: whole (identifier, value) pairs, no HTTP/2 setting
/// (0x2..=0x5 are reserved), no identifier twice (RFC 9114 section 7.2.4).
pub fn check_settings(mut payload: &[u8]) -> Result<(), u32> {
    let mut seen = Vec::new();
    while !payload.is_empty() {
        let (id, a) = varint(payload).ok_or(code::FRAME_ERROR)?;
        let (_, b) = varint(&payload[a..]).ok_or(code::FRAME_ERROR)?;
        payload = &payload[a + b..];
        if matches!(id, 0x2..=0x5) || seen.contains(&id) {
            return Err(code::SETTINGS_ERROR);
        }
        seen.push(id);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_at_every_length() {
        for value in [
            0,
            63,
            64,
            16_383,
            16_384,
            (1 << 30) - 1,
            1 << 30,
            (1 << 62) - 1,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!(varint(&out), Some((value, out.len())), "{value}");
            assert_eq!(varint(&out[..out.len() - 1]), None);
        }
        // RFC 9000 A.1's examples.
        assert_eq!(
            varint(&[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c]),
            Some((151_288_809_941_952_652, 8))
        );
        assert_eq!(varint(&[0x40, 0x25]), Some((37, 2)));
    }

    #[test]
    fn settings_are_checked() {
        let mut out = Vec::new();
        server_settings(&mut out);
        let h = header(&out).unwrap();
        assert_eq!(h.kind, SETTINGS);
        assert_eq!(check_settings(&out[h.header_len..]), Ok(()));
        assert_eq!(check_settings(&[0x1, 0, 0x1, 0]), Err(code::SETTINGS_ERROR));
        assert_eq!(check_settings(&[0x2, 0]), Err(code::SETTINGS_ERROR));
        assert_eq!(check_settings(&[0x1]), Err(code::FRAME_ERROR));
        // An unknown (greased) setting is fine.
        assert_eq!(check_settings(&[0x40, 0x21, 0x05]), Ok(()));
    }
}
