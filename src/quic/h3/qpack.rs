//! QPACK (RFC 9204) with the static table only: this server announces a dynamic table
//! capacity of 0 (the default of `SETTINGS_QPACK_MAX_TABLE_CAPACITY`), so a peer's field
//! section may name static entries and literals only, and every field section this server
//! writes does the same. No encoder or decoder stream instruction is ever needed.
//!
//! Decoding takes Huffman-coded strings (RFC 7541 section 5.2) as clients send them;
//! encoding writes plain literals.

use std::sync::OnceLock;

use super::tables::{HUFFMAN, STATIC};

/// Why a field section could not be decoded (QPACK_DECOMPRESSION_FAILED, or the limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QpackError {
    /// Truncated or malformed encoding, a dynamic-table reference, bad Huffman.
    Malformed,
    /// More field bytes than [`MAX_FIELD_SECTION`].
    TooLarge,
}

/// The largest decoded field section accepted (name + value + 32 per field, as RFC 9114
/// section 4.2.2 counts it); announced as `SETTINGS_MAX_FIELD_SECTION_SIZE`.
pub const MAX_FIELD_SECTION: usize = 16 * 1024;

/// A decoded field section: (name, value) pairs in order.
pub type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// Decodes one field section (a HEADERS frame's payload).
pub fn decode(mut input: &[u8]) -> Result<Fields, QpackError> {
    // Required Insert Count: 0 is the only value possible without a dynamic table. The
    // Base (sign bit and delta) means nothing then; it is read and ignored.
    let required = integer(&mut input, 8)?;
    if required != 0 {
        return Err(QpackError::Malformed);
    }
    integer(&mut input, 7)?;
    let mut fields = Vec::new();
    let mut size = 0usize;
    while let Some(&first) = input.first() {
        let (name, value) = if first & 0x80 != 0 {
            // Indexed field line: T (0x40) must name the static table.
            if first & 0x40 == 0 {
                return Err(QpackError::Malformed);
            }
            let (name, value) = static_entry(integer(&mut input, 6)?)?;
            (name.as_bytes().to_vec(), value.as_bytes().to_vec())
        } else if first & 0x40 != 0 {
            // Literal field line with name reference: T is 0x10.
            if first & 0x10 == 0 {
                return Err(QpackError::Malformed);
            }
            let (name, _) = static_entry(integer(&mut input, 4)?)?;
            (name.as_bytes().to_vec(), string(&mut input, 7)?)
        } else if first & 0x20 != 0 {
            // Literal field line with literal name: H is 0x08, a 3-bit prefix length.
            let name = string(&mut input, 3)?;
            (name, string(&mut input, 7)?)
        } else {
            // Post-base references name the dynamic table.
            return Err(QpackError::Malformed);
        };
        size += name.len() + value.len() + 32;
        if size > MAX_FIELD_SECTION {
            return Err(QpackError::TooLarge);
        }
        fields.push((name, value));
    }
    Ok(fields)
}

/// Encodes `fields` as a field section: static references where an entry matches, plain
/// literals otherwise.
pub fn encode(fields: &[(&[u8], &[u8])], out: &mut Vec<u8>) {
    // Required Insert Count 0, Base 0.
    out.extend_from_slice(&[0, 0]);
    for &(name, value) in fields {
        let exact = STATIC
            .iter()
            .position(|&(n, v)| n.as_bytes() == name && v.as_bytes() == value);
        if let Some(index) = exact {
            put_integer(out, 0xc0, 6, index as u64);
        } else if let Some(index) = STATIC.iter().position(|&(n, _)| n.as_bytes() == name) {
            put_integer(out, 0x50, 4, index as u64);
            put_integer(out, 0x00, 7, value.len() as u64);
            out.extend_from_slice(value);
        } else {
            put_integer(out, 0x20, 3, name.len() as u64);
            out.extend_from_slice(name);
            put_integer(out, 0x00, 7, value.len() as u64);
            out.extend_from_slice(value);
        }
    }
}

fn static_entry(index: u64) -> Result<(&'static str, &'static str), QpackError> {
    usize::try_from(index)
        .ok()
        .and_then(|i| STATIC.get(i))
        .copied()
        .ok_or(QpackError::Malformed)
}

/// An integer with an N-bit prefix (RFC 7541 section 5.1), from the first byte's low bits.
fn integer(input: &mut &[u8], prefix_bits: u32) -> Result<u64, QpackError> {
    let (&first, rest) = input.split_first().ok_or(QpackError::Malformed)?;
    *input = rest;
    let max = (1u64 << prefix_bits) - 1;
    let mut value = u64::from(first) & max;
    if value < max {
        return Ok(value);
    }
    let mut shift = 0u32;
    loop {
        let (&byte, rest) = input.split_first().ok_or(QpackError::Malformed)?;
        *input = rest;
        // 62 bits is more than any length or index this decoder accepts.
        if shift > 56 {
            return Err(QpackError::Malformed);
        }
        value += u64::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
}

fn put_integer(out: &mut Vec<u8>, flags: u8, prefix_bits: u32, mut value: u64) {
    let max = (1u64 << prefix_bits) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    value -= max;
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A string literal whose length has an N-bit prefix; the bit above the prefix is H.
fn string(input: &mut &[u8], prefix_bits: u32) -> Result<Vec<u8>, QpackError> {
    let huffman = input.first().ok_or(QpackError::Malformed)? & (1 << prefix_bits) != 0;
    let len = integer(input, prefix_bits)?;
    let len = usize::try_from(len).map_err(|_| QpackError::Malformed)?;
    if len > input.len() {
        return Err(if len > MAX_FIELD_SECTION {
            QpackError::TooLarge
        } else {
            QpackError::Malformed
        });
    }
    let (bytes, rest) = input.split_at(len);
    *input = rest;
    if huffman {
        huffman_decode(bytes)
    } else {
        Ok(bytes.to_vec())
    }
}

/// The canonical form of the Huffman code: per length, the first code and where its
/// symbols start in `symbols` (codes of one length are consecutive, in symbol order).
struct Canonical {
    first_code: [u32; 31],
    count: [u32; 31],
    offset: [usize; 31],
    symbols: Vec<u16>,
}

fn canonical() -> &'static Canonical {
    static CANONICAL: OnceLock<Canonical> = OnceLock::new();
    CANONICAL.get_or_init(|| {
        let mut symbols: Vec<u16> = (0..=256).collect();
        symbols.sort_by_key(|&s| (HUFFMAN[usize::from(s)].1, HUFFMAN[usize::from(s)].0));
        let mut c = Canonical {
            first_code: [0; 31],
            count: [0; 31],
            offset: [0; 31],
            symbols,
        };
        for (i, &s) in c.symbols.iter().enumerate() {
            let (code, len) = HUFFMAN[usize::from(s)];
            let len = usize::from(len);
            if c.count[len] == 0 {
                c.first_code[len] = code;
                c.offset[len] = i;
            }
            c.count[len] += 1;
        }
        c
    })
}

/// RFC 7541 section 5.2: the padding is at most 7 bits, all ones (a prefix of EOS), and EOS
/// itself never appears.
fn huffman_decode(bytes: &[u8]) -> Result<Vec<u8>, QpackError> {
    let table = canonical();
    let mut out = Vec::with_capacity(bytes.len() * 8 / 5);
    let mut code = 0u32;
    let mut len = 0usize;
    for &byte in bytes {
        for bit in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> bit) & 1);
            len += 1;
            if len > 30 {
                return Err(QpackError::Malformed);
            }
            let index = code.wrapping_sub(table.first_code[len]);
            if table.count[len] > 0 && code >= table.first_code[len] && index < table.count[len] {
                let symbol = table.symbols[table.offset[len] + index as usize];
                if symbol == 256 {
                    return Err(QpackError::Malformed);
                }
                out.push(symbol as u8);
                code = 0;
                len = 0;
            }
        }
    }
    if len > 7 || code != (1 << len) - 1 {
        return Err(QpackError::Malformed);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn huffman_encode(text: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let (mut acc, mut bits) = (0u64, 0u32);
        for &b in text {
            let (code, len) = HUFFMAN[usize::from(b)];
            acc = (acc << len) | u64::from(code);
            bits += u32::from(len);
            while bits >= 8 {
                out.push((acc >> (bits - 8)) as u8);
                bits -= 8;
            }
        }
        if bits > 0 {
            out.push(((acc << (8 - bits)) as u8) | ((1u8 << (8 - bits)) - 1));
        }
        out
    }

    #[test]
    fn huffman_round_trips_every_byte() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(huffman_decode(&huffman_encode(&all)).unwrap(), all);
        // RFC 7541 C.4.1: "www.example.com".
        let coded = [
            0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
        ];
        assert_eq!(huffman_decode(&coded).unwrap(), b"www.example.com");
    }

    #[test]
    fn huffman_refuses_bad_padding_and_eos() {
        // 'a' is 00011 (5 bits): padding of zeros is invalid.
        assert_eq!(huffman_decode(&[0b0001_1000]), Err(QpackError::Malformed));
        assert_eq!(huffman_decode(&[0b0001_1111]).unwrap(), b"a");
        // A full byte of padding (8 ones) is too long.
        assert_eq!(huffman_decode(&[0xff]), Err(QpackError::Malformed));
        // EOS is 30 ones.
        assert_eq!(
            huffman_decode(&[0xff, 0xff, 0xff, 0xff]),
            Err(QpackError::Malformed)
        );
    }

    #[test]
    fn field_sections_round_trip() {
        let fields: [(&[u8], &[u8]); 4] = [
            (b":status", b"200"),
            (b":status", b"418"),
            (b"content-length", b"123456789"),
            (b"x-custom-header-longer-than-seven", b"v"),
        ];
        let mut out = Vec::new();
        encode(&fields, &mut out);
        let decoded = decode(&out).unwrap();
        let want: Vec<(Vec<u8>, Vec<u8>)> = fields
            .iter()
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect();
        assert_eq!(decoded, want);
        // `:status 200` is one byte: static index 25.
        assert_eq!(out[2], 0xc0 | 25);
    }

    #[test]
    fn a_client_request_with_huffman_literals_decodes() {
        // :method GET (17), :scheme https (23), :path /index.html (name 1, Huffman value),
        // :authority www.example.com (name 0, Huffman value).
        let mut block = vec![0, 0, 0xc0 | 17, 0xc0 | 23];
        let path = huffman_encode(b"/index.html");
        block.push(0x50 | 1);
        block.push(0x80 | path.len() as u8);
        block.extend_from_slice(&path);
        let host = huffman_encode(b"www.example.com");
        block.push(0x50);
        block.push(0x80 | host.len() as u8);
        block.extend_from_slice(&host);
        let fields = decode(&block).unwrap();
        assert_eq!(fields[0], (b":method".to_vec(), b"GET".to_vec()));
        assert_eq!(fields[1], (b":scheme".to_vec(), b"https".to_vec()));
        assert_eq!(fields[2], (b":path".to_vec(), b"/index.html".to_vec()));
        assert_eq!(
            fields[3],
            (b":authority".to_vec(), b"www.example.com".to_vec())
        );
    }

    #[test]
    fn dynamic_references_and_truncation_are_refused() {
        // Required Insert Count 1.
        assert_eq!(decode(&[1, 0]), Err(QpackError::Malformed));
        // Indexed field line naming the dynamic table (T = 0).
        assert_eq!(decode(&[0, 0, 0x80]), Err(QpackError::Malformed));
        // Post-base index, post-base name reference.
        assert_eq!(decode(&[0, 0, 0x10]), Err(QpackError::Malformed));
        assert_eq!(decode(&[0, 0, 0x00]), Err(QpackError::Malformed));
        // Static index 99 is past the table.
        assert_eq!(decode(&[0, 0, 0xff, 36]), Err(QpackError::Malformed));
        // A literal longer than what follows.
        assert_eq!(decode(&[0, 0, 0x51, 5, b'/']), Err(QpackError::Malformed));
        // An integer that never ends.
        assert_eq!(
            decode(&[0, 0, 0xff, 0xff, 0xff]),
            Err(QpackError::Malformed)
        );
        // Too many fields.
        let mut big = vec![0, 0];
        for _ in 0..1000 {
            big.push(0xc0 | 17);
        }
        assert_eq!(decode(&big), Err(QpackError::TooLarge));
    }
}
