//! How far a user gets with QUIC's UDP layer: an echo server on quinn-udp's `UdpSocketState`
//! (recvmmsg, `UDP_GRO`, `UDP_SEGMENT` GSO, ECN) and a current-thread tokio runtime
//! (benchmarks only; row `quinn-udp` of `make bench`).
//!
//! Each wake-up receives one batch (`BATCH_SIZE` buffers; with GRO a buffer holds several
//! datagrams of `meta.stride` bytes from one peer). Every datagram is echoed unchanged, like
//! the other baselines. The replies are grouped per peer, keeping each peer's order, and leave
//! as GSO trains (`Transmit::segment_size`) of at most `max_gso_segments()` segments: a peer
//! whose replies all came in one buffer is answered straight from that buffer, a peer with
//! several buffers in the batch has its replies gathered into one train.
//!
//! `cargo run --release --example baseline_quinn_udp -- --bind 127.0.0.1:9000 --max-size 2048`

mod common;

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::IntoRawFd;
use std::sync::atomic::Ordering;

use clap::Parser;
use quinn_udp::{EcnCodepoint, RecvMeta, Transmit, UdpSockRef, UdpSocketState, BATCH_SIZE};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// The most bytes one GSO train may carry: the largest UDP payload over IPv4.
const MAX_TRAIN_BYTES: usize = 65_507;

fn main() -> io::Result<()> {
    let args = common::SizedArgs::parse();
    // Self-pipe: the signal handler writes a byte, the runtime wakes up and stops.
    let (wake_rx, wake_tx) = std::os::unix::net::UnixStream::pair()?;
    wake_rx.set_nonblocking(true)?;
    wake_tx.set_nonblocking(true)?;
    common::WAKE_FD.store(wake_tx.into_raw_fd(), Ordering::SeqCst);
    common::install_signal_handlers()?;
    let sock = common::bind_udp(args.common.bind)?;
    // Enables GRO, IP_RECVTOS and PKTINFO on the socket and probes GSO.
    let state = UdpSocketState::new((&sock).into())?;
    common::announce(&sock);
    eprintln!(
        "quinn-udp: gro_segments {}, max_gso_segments {}",
        state.gro_segments(),
        state.max_gso_segments()
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    rt.block_on(async move {
        let sock = UdpSocket::from_std(sock.into())?;
        let wake = tokio::net::UnixStream::from_std(wake_rx)?;
        tokio::select! {
            _ = wake.readable() => Ok(()),
            r = echo(&sock, &state, usize::from(args.max_size)) => r,
        }
    })
}

/// Receives batches and answers every datagram until an unexpected receive error.
async fn echo(sock: &UdpSocket, state: &UdpSocketState, max_size: usize) -> io::Result<()> {
    // quinn sizes its receive buffers the same way: the largest datagram × the GRO segments
    // one buffer may have to hold (a GRO buffer never exceeds 64 KiB).
    let slot_bytes = (max_size * state.gro_segments()).min(usize::from(u16::MAX));
    let mut storage = vec![0u8; slot_bytes * BATCH_SIZE];
    let mut bufs: Vec<IoSliceMut<'_>> = storage
        .chunks_mut(slot_bytes)
        .map(IoSliceMut::new)
        .collect();
    let mut meta = [RecvMeta::default(); BATCH_SIZE];
    let mut plan = Plan::new(slot_bytes * BATCH_SIZE);
    loop {
        sock.readable().await?;
        let n = match sock.try_io(Interest::READABLE, || {
            state.recv(UdpSockRef::from(sock), &mut bufs, &mut meta)
        }) {
            Ok(n) => n,
            // Readiness was stale (try_io cleared it) or an ICMP error surfaced: UDP goes on.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
            Err(e) => return Err(e),
        };
        plan.make(&bufs, &meta[..n], state.max_gso_segments());
        for t in &plan.trains {
            let contents = match t.bytes {
                Bytes::Slot { slot, start, end } => &bufs[slot][start..end],
                Bytes::Scratch { start, end } => &plan.scratch[start..end],
            };
            let transmit = Transmit {
                destination: t.to,
                ecn: t.ecn,
                contents,
                segment_size: (t.segments > 1).then_some(t.segment_bytes),
                // Bound to one address, so the kernel picks the right source; a server bound
                // to a wildcard address would pass the request's `meta.dst_ip` here.
                src_ip: None,
            };
            send(sock, state, &transmit).await;
        }
    }
}

/// Sends one transmit, waiting while the socket's send buffer is full. `UdpSocketState::send`
/// reports only `WouldBlock`; on any other error it drops the train, as UDP allows, and logs
/// it (rate-limited) through `tracing`, which this example does not subscribe to.
async fn send(sock: &UdpSocket, state: &UdpSocketState, transmit: &Transmit<'_>) {
    loop {
        match sock.try_io(Interest::WRITABLE, || {
            state.send(UdpSockRef::from(sock), transmit)
        }) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if sock.writable().await.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// Where a train's bytes are: a run of one receive buffer (sent without copying) or a range
/// of the scratch buffer that gathered one peer's replies from several receive buffers.
#[derive(Debug, Clone, Copy)]
enum Bytes {
    Slot {
        slot: usize,
        start: usize,
        end: usize,
    },
    Scratch {
        start: usize,
        end: usize,
    },
}

/// One reply train: `segments` datagrams of `segment_bytes` each (the last may be shorter).
#[derive(Debug, Clone, Copy)]
struct Train {
    to: SocketAddr,
    ecn: Option<EcnCodepoint>,
    bytes: Bytes,
    segment_bytes: usize,
    segments: usize,
}

/// A train being gathered in the scratch buffer.
#[derive(Debug, Clone, Copy)]
struct Open {
    start: usize,
    ecn: Option<EcnCodepoint>,
    segment_bytes: usize,
    segments: usize,
    /// A shorter segment ended it: GSO allows a short segment only at the end.
    closed: bool,
}

/// The reply trains of one received batch. Allocated once; `make` reuses every vector.
struct Plan {
    /// Distinct peers of the batch in order of first appearance, with their buffer count and
    /// first buffer.
    peers: Vec<(SocketAddr, usize, usize)>,
    /// Index into `peers` of each receive buffer.
    peer_of: Vec<usize>,
    scratch: Vec<u8>,
    scratch_len: usize,
    open: Option<Open>,
    trains: Vec<Train>,
}

impl Plan {
    /// `scratch_bytes` must cover everything one batch can receive.
    fn new(scratch_bytes: usize) -> Self {
        Plan {
            peers: Vec::with_capacity(BATCH_SIZE),
            peer_of: Vec::with_capacity(BATCH_SIZE),
            scratch: vec![0; scratch_bytes],
            scratch_len: 0,
            open: None,
            trains: Vec::with_capacity(BATCH_SIZE),
        }
    }

    /// Plans the echo of `meta.len()` received buffers as per-peer trains.
    fn make(&mut self, bufs: &[IoSliceMut<'_>], meta: &[RecvMeta], max_segments: usize) {
        self.peers.clear();
        self.peer_of.clear();
        self.trains.clear();
        self.scratch_len = 0;
        // A batch holds at most BATCH_SIZE (32) buffers: a linear search beats hashing.
        for (slot, m) in meta.iter().enumerate() {
            let p = match self.peers.iter().position(|(a, _, _)| *a == m.addr) {
                Some(p) => p,
                None => {
                    self.peers.push((m.addr, 0, slot));
                    self.peers.len() - 1
                }
            };
            self.peers[p].1 += 1;
            self.peer_of.push(p);
        }
        for p in 0..self.peers.len() {
            let (to, count, first) = self.peers[p];
            if count == 1 {
                self.in_place(first, &meta[first], max_segments);
                continue;
            }
            for slot in first..meta.len() {
                if self.peer_of[slot] != p {
                    continue;
                }
                let m = &meta[slot];
                let stride = m.stride.max(1);
                for seg in bufs[slot][..m.len].chunks(stride) {
                    self.gather(to, m.ecn, seg, max_segments);
                }
            }
            self.close(to);
        }
    }

    /// A peer with one buffer: its datagrams already form trains, sent in place (split only
    /// where a train would exceed the segment or byte limit). Empty datagrams are not echoed.
    fn in_place(&mut self, slot: usize, m: &RecvMeta, max_segments: usize) {
        let stride = m.stride.max(1);
        let per_train = max_segments.min(MAX_TRAIN_BYTES / stride).max(1) * stride;
        let mut start = 0;
        while start < m.len {
            let end = (start + per_train).min(m.len);
            self.trains.push(Train {
                to: m.addr,
                ecn: m.ecn,
                bytes: Bytes::Slot { slot, start, end },
                segment_bytes: stride,
                segments: (end - start).div_ceil(stride),
            });
            start = end;
        }
    }

    /// Appends one datagram for `to` to the open train, or closes that and opens another
    /// where GSO's rules (equal segments, only the last shorter) or the limits require.
    fn gather(
        &mut self,
        to: SocketAddr,
        ecn: Option<EcnCodepoint>,
        seg: &[u8],
        max_segments: usize,
    ) {
        if let Some(o) = self.open {
            let fits = !o.closed
                && seg.len() <= o.segment_bytes
                && o.ecn == ecn
                && o.segments < max_segments
                && self.scratch_len - o.start + seg.len() <= MAX_TRAIN_BYTES;
            if !fits {
                self.close(to);
            }
        }
        let start = self.scratch_len;
        let o = self.open.get_or_insert(Open {
            start,
            ecn,
            segment_bytes: seg.len(),
            segments: 0,
            closed: false,
        });
        o.segments += 1;
        o.closed = seg.len() < o.segment_bytes;
        self.scratch[start..start + seg.len()].copy_from_slice(seg);
        self.scratch_len += seg.len();
    }

    /// Turns the open train (if any) into a planned one.
    fn close(&mut self, to: SocketAddr) {
        if let Some(o) = self.open.take() {
            self.trains.push(Train {
                to,
                ecn: o.ecn,
                bytes: Bytes::Scratch {
                    start: o.start,
                    end: self.scratch_len,
                },
                segment_bytes: o.segment_bytes,
                segments: o.segments,
            });
        }
    }
}
