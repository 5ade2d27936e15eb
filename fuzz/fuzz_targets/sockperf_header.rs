//! The sockperf header parser and the in-place reply rewrite.
#![no_main]

use libfuzzer_sys::fuzz_target;
use udpring::apps::sockperf::{mark_as_reply, Header, FLAG_CLIENT, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let mut reply = data.to_vec();
    mark_as_reply(&mut reply);
    let header = match Header::parse(data) {
        Ok(h) => h,
        Err(_) => {
            assert!(data.len() < HEADER_LEN);
            // Too short to be a request: left untouched.
            assert_eq!(reply, data);
            return;
        }
    };
    // parse then write gives back the first 14 bytes exactly.
    let mut written = [0u8; HEADER_LEN];
    header.write(&mut written);
    assert_eq!(&written[..], &data[..HEADER_LEN]);
    assert_eq!(Header::parse(&written), Ok(header));

    // The reply differs only in the CLIENT flag.
    let replied = Header::parse(&reply).expect("same length as an input that parsed");
    assert_eq!(replied.sequence, header.sequence);
    assert_eq!(replied.length, header.length);
    assert_eq!(replied.flags, header.flags & !FLAG_CLIENT);
    assert_eq!(replied.wants_reply(), header.wants_reply());
    assert_eq!(&reply[..8], &data[..8]);
    assert_eq!(&reply[10..], &data[10..]);
});
