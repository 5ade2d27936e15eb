//! Question: what does udpring's own per-datagram work cost, piece by piece, apart from the
//! kernel? (user_data decode, buffer-ring recycle, recvmsg_out parse, handler dispatch)

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use udpring::apps::{Echo, Sockperf};
use udpring::buf_ring::BufRing;
use udpring::datagram::{decode_sockaddr, encode_sockaddr, parse_recvmsg_out, RECVMSG_OUT_LEN};
use udpring::op::{OpKind, UserData};
use udpring::testing::Harness;
use udpring::Datagram;

fn user_data(c: &mut Criterion) {
    let raw: Vec<u64> = (0..1024u32)
        .map(|i| UserData::new(OpKind::Send, i * 7, i).encode())
        .collect();
    c.bench_function("user_data decode x1024", |b| {
        b.iter(|| {
            let mut sum = 0u64;
            for &r in &raw {
                if let Some(ud) = UserData::decode(black_box(r)) {
                    sum += u64::from(ud.slot);
                }
            }
            sum
        })
    });
}

fn buf_ring(c: &mut Criterion) {
    let mut ring = BufRing::new(1024, 2048, 0).expect("buffer ring");
    c.bench_function("buf_ring take+recycle x64 + publish", |b| {
        b.iter(|| {
            for bid in 0..64u16 {
                // SAFETY: the ring is not registered with any io_uring, so no kernel writes
                // its buffers, and each buffer taken here is recycled before it is taken again.
                if let Some(buf) = unsafe { ring.take(black_box(bid), 64) } {
                    ring.recycle(buf);
                }
            }
            ring.publish();
        })
    });
}

fn recvmsg_parse(c: &mut Criterion) {
    let mut buf = Vec::new();
    for x in [16u32, 0, 64, 0] {
        buf.extend_from_slice(&x.to_ne_bytes());
    }
    let mut name = [0u8; 28];
    encode_sockaddr("127.0.0.1:4242".parse().expect("addr"), false, &mut name);
    buf.extend_from_slice(&name[..16]);
    buf.extend_from_slice(&[7u8; 64]);
    assert_eq!(buf.len(), RECVMSG_OUT_LEN + 16 + 64);
    c.bench_function("recvmsg_out parse + sockaddr decode", |b| {
        b.iter(|| {
            let out = parse_recvmsg_out(black_box(&buf), 16, 0).expect("parses");
            let peer = decode_sockaddr(out.name).expect("address");
            (peer, out.payload.len())
        })
    });
}

fn dispatch(c: &mut Criterion) {
    let payload = [3u8; 64];
    let datagram = Datagram::new("127.0.0.1:4242".parse().expect("addr"), &payload);
    let mut harness = Harness::new(1500, 4);
    c.bench_function("handler dispatch: echo 64 B", |b| {
        b.iter(|| {
            let mut n = 0;
            harness.deliver(&mut Echo, black_box(&datagram), |_, r| n += r.len());
            n
        })
    });
    let mut msg = [0u8; 64];
    udpring::apps::sockperf::Header {
        sequence: 1,
        flags: 3,
        length: 64,
    }
    .write(&mut msg);
    let datagram = Datagram {
        payload: &msg,
        ..datagram
    };
    c.bench_function("handler dispatch: sockperf 64 B", |b| {
        b.iter(|| {
            let mut n = 0;
            harness.deliver(&mut Sockperf, black_box(&datagram), |_, r| n += r.len());
            n
        })
    });
}

criterion_group!(benches, user_data, buf_ring, recvmsg_parse, dispatch);
criterion_main!(benches);
