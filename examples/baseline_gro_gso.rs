//! The best GRO+GSO echo loop a user could write without io_uring (benchmarks only; row
//! `gro-gso` of `make bench`, issue 17): what the C loop of the shared kernel reference does,
//! in Rust on libc.
//!
//! One blocking UDP socket with `UDP_GRO`: `recvmmsg(MSG_WAITFORONE)` fills up to 32 buffers
//! of 64 KiB, each holding one datagram or a GRO train of equal-sized datagrams from one peer
//! (the `UDP_GRO` control message gives the segment size). The replies of a batch are grouped
//! by peer, keeping each peer's order, and leave as `UDP_SEGMENT` trains built over an iovec
//! list that points into the receive buffers (no copy; contiguous segments of one buffer share
//! one iovec): every segment of a train is the train's segment size, only the last may be
//! shorter, at most 64 segments and 65,507 bytes. One `sendmmsg` sends every train of the
//! batch.
//!
//! `cargo run --release --example baseline_gro_gso -- --bind 127.0.0.1:9000`

mod common;

use std::os::fd::AsRawFd;

use clap::Parser;

const BATCH: usize = 32;
/// A GRO receive holds at most this much.
const SLOT: usize = 64 * 1024;
/// Limits of one GSO train (`UDP_MAX_SEGMENTS`, the largest IPv4 UDP payload).
const MAX_SEGMENTS: usize = 64;
const MAX_TRAIN_BYTES: usize = 65_507;
/// Control message space for one `int` (UDP_GRO on receive, UDP_SEGMENT on send).
const CMSG_SPACE: usize = 32;

/// One train to send: its peer, its iovecs (a range of `Batch::out_iov`) and its segment size.
struct Train {
    peer: usize,
    iov_start: usize,
    iov_len: usize,
    segment: usize,
    segments: usize,
    /// The size of its last segment (a shorter one closes the train).
    last: usize,
}

/// Receive slots, their headers and the send side's tables. Allocated once; every header
/// points into vectors that never grow past their capacity (no reallocation moves them).
struct Batch {
    bufs: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    iov: Vec<libc::iovec>,
    cmsg: Vec<[u8; CMSG_SPACE]>,
    msgs: Vec<libc::mmsghdr>,
    out_iov: Vec<libc::iovec>,
    out_cmsg: Vec<[u8; CMSG_SPACE]>,
    out_msgs: Vec<libc::mmsghdr>,
    trains: Vec<Train>,
    /// Per received message: the peer group it belongs to.
    group_of: Vec<usize>,
    /// The received messages ordered by group, each group in arrival order.
    order: Vec<usize>,
    /// The first message of each group.
    leaders: Vec<usize>,
}

impl Batch {
    fn new() -> Batch {
        // Each received buffer splits into at most 64 segments, and each peer's train may
        // need one iovec per buffer: BATCH * MAX_SEGMENTS bounds both tables.
        let most = BATCH * MAX_SEGMENTS;
        let mut b = Batch {
            bufs: vec![0; BATCH * SLOT],
            // SAFETY: all-zero sockaddr_storage / iovec / mmsghdr are valid values.
            addrs: vec![unsafe { std::mem::zeroed() }; BATCH],
            // SAFETY: as above.
            iov: vec![unsafe { std::mem::zeroed() }; BATCH],
            cmsg: vec![[0; CMSG_SPACE]; BATCH],
            // SAFETY: as above.
            msgs: vec![unsafe { std::mem::zeroed() }; BATCH],
            out_iov: Vec::with_capacity(most),
            out_cmsg: vec![[0; CMSG_SPACE]; most],
            out_msgs: Vec::with_capacity(most),
            trains: Vec::with_capacity(most),
            group_of: Vec::with_capacity(BATCH),
            order: Vec::with_capacity(BATCH),
            leaders: Vec::with_capacity(BATCH),
        };
        for i in 0..BATCH {
            b.iov[i].iov_base = b.bufs[i * SLOT..].as_mut_ptr().cast();
            let h = &mut b.msgs[i].msg_hdr;
            h.msg_name = (&mut b.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_iov = &mut b.iov[i];
            h.msg_iovlen = 1;
            h.msg_control = b.cmsg[i].as_mut_ptr().cast();
            b.rearm(i);
        }
        b
    }

    fn rearm(&mut self, i: usize) {
        self.iov[i].iov_len = SLOT;
        let h = &mut self.msgs[i].msg_hdr;
        h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        h.msg_controllen = CMSG_SPACE as _;
        h.msg_flags = 0;
    }

    /// The GRO segment size of received message `i` (its length when it is one datagram).
    fn stride(&self, i: usize) -> usize {
        let h = &self.msgs[i].msg_hdr;
        let len = self.msgs[i].msg_len as usize;
        // SAFETY: the kernel wrote msg_controllen bytes of well-formed control messages into
        // msg_control, which points at cmsg[i]; CMSG_FIRSTHDR/NXTHDR stay inside them.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(h);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                    let size = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                    if size > 0 {
                        return size as usize;
                    }
                }
                c = libc::CMSG_NXTHDR(h, c);
            }
        }
        len.max(1)
    }

    fn same_peer(&self, a: usize, b: usize) -> bool {
        let (la, lb) = (
            self.msgs[a].msg_hdr.msg_namelen,
            self.msgs[b].msg_hdr.msg_namelen,
        );
        la == lb && {
            // SAFETY: both addresses are sockaddr_storage values, at least `la` bytes each.
            let (pa, pb) = unsafe {
                (
                    std::slice::from_raw_parts(
                        &self.addrs[a] as *const _ as *const u8,
                        la as usize,
                    ),
                    std::slice::from_raw_parts(
                        &self.addrs[b] as *const _ as *const u8,
                        lb as usize,
                    ),
                )
            };
            pa == pb
        }
    }

    /// Builds the trains of `n` received messages: grouped by peer in order of first
    /// appearance, each peer's datagrams in arrival order.
    fn plan(&mut self, n: usize) {
        self.out_iov.clear();
        self.trains.clear();
        self.group_of.clear();
        self.leaders.clear();
        for i in 0..n {
            let g = (0..self.leaders.len()).find(|&g| self.same_peer(self.leaders[g], i));
            let g = g.unwrap_or_else(|| {
                self.leaders.push(i);
                self.leaders.len() - 1
            });
            self.group_of.push(g);
        }
        self.order.clear();
        self.order.extend(0..n);
        let group_of = &self.group_of;
        self.order.sort_by_key(|&i| group_of[i]); // stable: arrival order within a group
        let mut open: Option<usize> = None; // index into self.trains
        let mut group = usize::MAX;
        for k in 0..n {
            let i = self.order[k];
            if self.group_of[i] != group {
                group = self.group_of[i];
                open = None;
            }
            let leader = self.leaders[group];
            {
                let len = self.msgs[i].msg_len as usize;
                let stride = self.stride(i);
                let base = self.iov[i].iov_base as *mut u8;
                let mut off = 0;
                while off < len {
                    let seg = stride.min(len - off);
                    // Does the open train take this segment? Same size (or a shorter last),
                    // under both limits, and the train's last segment was full-sized.
                    let fits = open.is_some_and(|t| {
                        let t = &self.trains[t];
                        seg <= t.segment
                            && t.segments < MAX_SEGMENTS
                            && t.segments * t.segment + seg <= MAX_TRAIN_BYTES
                            && t.last == t.segment
                    });
                    if !fits {
                        self.trains.push(Train {
                            peer: leader,
                            iov_start: self.out_iov.len(),
                            iov_len: 0,
                            segment: seg,
                            segments: 0,
                            last: seg,
                        });
                        open = Some(self.trains.len() - 1);
                    }
                    let t = open.expect("a train is open");
                    // SAFETY: off < len <= SLOT: inside receive buffer i.
                    let ptr = unsafe { base.add(off) };
                    let train = &mut self.trains[t];
                    // Contiguous with the train's last iovec (the same buffer): extend it.
                    let extend = train.iov_len > 0 && {
                        let last = &self.out_iov[train.iov_start + train.iov_len - 1];
                        // SAFETY: pointer arithmetic inside one receive buffer.
                        unsafe { (last.iov_base as *mut u8).add(last.iov_len) == ptr }
                    };
                    if extend {
                        self.out_iov[train.iov_start + train.iov_len - 1].iov_len += seg;
                    } else {
                        self.out_iov.push(libc::iovec {
                            iov_base: ptr.cast(),
                            iov_len: seg,
                        });
                        train.iov_len += 1;
                    }
                    train.segments += 1;
                    train.last = seg;
                    off += seg;
                }
            }
        }
    }

    /// One header per train, with `UDP_SEGMENT` where it has more than one segment.
    fn headers(&mut self) {
        self.out_msgs.clear();
        for (k, t) in self.trains.iter().enumerate() {
            // SAFETY: an all-zero mmsghdr is a valid value.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            let h = &mut m.msg_hdr;
            h.msg_name = (&mut self.addrs[t.peer] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = self.msgs[t.peer].msg_hdr.msg_namelen;
            h.msg_iov = self.out_iov[t.iov_start..].as_mut_ptr();
            h.msg_iovlen = t.iov_len as _;
            if t.segments > 1 {
                let space = &mut self.out_cmsg[k];
                h.msg_control = space.as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE(sizeof(u16)) fits in the 32 bytes of `space`.
                unsafe {
                    h.msg_controllen = libc::CMSG_SPACE(2) as _;
                    let c = libc::CMSG_FIRSTHDR(h);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = libc::UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(2) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, t.segment as u16);
                }
            }
            self.out_msgs.push(m);
        }
    }
}

fn main() -> std::io::Result<()> {
    let args = common::Args::parse();
    common::install_signal_handlers()?;
    let sock = common::bind_udp(args.bind)?;
    sock.set_nonblocking(false)?;
    let fd = sock.as_raw_fd();
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads an int from a live local.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_UDP,
            libc::UDP_GRO,
            &on as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::other(format!(
            "UDP_GRO (Linux 5.0): {}",
            std::io::Error::last_os_error()
        )));
    }
    common::announce(&sock);
    let mut b = Batch::new();
    while !common::stopping() {
        // SAFETY: b.msgs holds BATCH armed headers pointing into b's buffers, which stay put.
        let n = unsafe { common::recv_batch(fd, &mut b.msgs) };
        if n == 0 {
            continue;
        }
        b.plan(n);
        b.headers();
        let mut out = std::mem::take(&mut b.out_msgs);
        // SAFETY: the reply headers point into b's buffers and addresses, which stay put.
        unsafe { common::send_all_blocking(fd, &mut out) };
        b.out_msgs = out;
        for i in 0..n {
            b.rearm(i);
        }
    }
    Ok(())
}
