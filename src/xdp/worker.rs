//! An AF_XDP worker: frames from the RX ring to the handler, replies to frames on the TX
//! ring, the kernel's counters published with the handler's.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{frame, xsk, Interface};
use crate::handler::{Datagram, Reply, SessionHandler, SessionInfo};
use crate::send_pool::{Dest, SendPool};
use crate::session::SessionId;
use crate::shared::WorkerShared;
use crate::stats::Stats;

/// Frames read per turn.
const BATCH: usize = 64;
/// Peers whose MAC address a worker remembers; past it the table starts over.
const MAX_NEIGHBOURS: usize = 1 << 16;

/// Where a peer's frames came from: its (next hop's) MAC, and the local address it wrote to.
#[derive(Clone, Copy)]
struct Neighbour {
    mac: [u8; 6],
    local: IpAddr,
}

pub(super) struct Worker {
    id: usize,
    bind: SocketAddr,
    xsk: xsk::Xsk,
    iface: Interface,
    pool: SendPool,
    shared: Arc<WorkerShared>,
    stats: Stats,
    neighbours: HashMap<IpAddr, Neighbour>,
    /// Frames put on the TX ring since the last kick.
    unkicked: usize,
    last_log: Option<Instant>,
}

impl Worker {
    pub(super) fn new(
        id: usize,
        bind: SocketAddr,
        xsk: xsk::Xsk,
        iface: Interface,
        max_datagram: usize,
        shared: Arc<WorkerShared>,
    ) -> io::Result<Worker> {
        Ok(Worker {
            id,
            bind,
            xsk,
            iface,
            pool: SendPool::new(BATCH, max_datagram, bind.is_ipv6(), false)?,
            shared,
            stats: Stats::default(),
            neighbours: HashMap::new(),
            unkicked: 0,
            last_log: None,
        })
    }

    pub(super) fn run<H: SessionHandler>(mut self, mut handler: H) -> io::Result<Stats> {
        let info = SessionInfo {
            peer: SocketAddr::new(self.bind.ip(), 0),
            local: None,
            worker: self.id,
            id: SessionId {
                slot: u32::MAX,
                generation: 0,
            },
            own_socket: false,
        };
        let mut state = handler.session_open(&info);
        let mut frames = Vec::with_capacity(BATCH);
        let mut published = Instant::now();
        while !self.shared.shutdown.load(Ordering::Acquire) {
            self.xsk.complete();
            frames.clear();
            self.xsk.receive(BATCH, &mut frames);
            for &(addr, len) in &frames {
                self.serve_frame(&mut handler, &mut state, addr, len);
                self.xsk.recycle(addr);
            }
            self.xsk.refill();
            if !frames.is_empty() {
                self.xsk.wake_rx();
            }
            let now = Instant::now();
            let timer = handler.next_timer();
            if timer.is_some_and(|at| at <= now) {
                self.stats.handler_timers += 1;
                let mut reply = Reply::unaddressed(&mut self.pool, &mut self.stats, -1);
                handler.on_timer(now, &mut reply);
                self.transmit();
            }
            self.kick();
            if !frames.is_empty() && now.duration_since(published) < Duration::from_millis(1) {
                continue;
            }
            self.publish();
            published = now;
            if frames.is_empty() {
                let wait = timer.map_or(Duration::from_millis(200), |at| {
                    at.saturating_duration_since(now)
                        .min(Duration::from_millis(200))
                });
                self.wait(wait);
            }
        }
        let mut reply = Reply::unaddressed(&mut self.pool, &mut self.stats, -1);
        handler.on_shutdown(Instant::now(), &mut reply);
        self.transmit();
        self.kick();
        // What is on the TX ring goes out before the UMEM is unmapped (the socket closes
        // first in any case: see xsk's drop order).
        let deadline = Instant::now() + Duration::from_millis(200);
        while self.xsk.tx_in_flight() > 0 && Instant::now() < deadline {
            self.xsk.complete();
            self.kick_always();
            std::thread::sleep(Duration::from_millis(1));
        }
        handler.session_close(state, &info, crate::session::CloseReason::Shutdown);
        self.publish();
        Ok(self.stats)
    }

    fn serve_frame<H: SessionHandler>(
        &mut self,
        handler: &mut H,
        state: &mut H::State,
        addr: u64,
        len: u32,
    ) {
        self.stats.xdp_frames_rx += 1;
        let Some(bytes) = self.xsk.rx_frame(addr, len) else {
            self.stats.malformed += 1;
            return;
        };
        let udp = match frame::parse(bytes) {
            Ok(udp) => udp,
            Err(frame::Refused::NotUdp) => {
                self.stats.xdp_not_ours += 1;
                return;
            }
            Err(frame::Refused::Malformed) => {
                self.stats.malformed += 1;
                return;
            }
            Err(frame::Refused::BadChecksum) => {
                self.stats.xdp_bad_checksum += 1;
                return;
            }
        };
        if !self.serves(&udp.local) {
            self.stats.xdp_not_ours += 1;
            return;
        }
        if self.neighbours.len() >= MAX_NEIGHBOURS && !self.neighbours.contains_key(&udp.peer.ip())
        {
            self.neighbours.clear();
        }
        self.neighbours.insert(
            udp.peer.ip(),
            Neighbour {
                mac: udp.peer_mac,
                local: udp.local.ip(),
            },
        );
        let payload = &bytes[udp.payload_at..udp.payload_at + udp.payload_len];
        self.stats.rx_datagrams += 1;
        self.stats.rx_bytes += payload.len() as u64;
        let datagram = Datagram {
            peer: udp.peer,
            local: Some(udp.local.ip()),
            payload,
            worker: self.id,
            ecn: udp.ecn,
        };
        let mut reply = Reply {
            pool: &mut self.pool,
            counters: &mut self.stats,
            dest: Dest {
                fd: -1,
                peer: udp.peer,
                local: Some(udp.local.ip()),
                connected: false,
            },
            listener_fd: -1,
            session: None,
            budget: None,
            worker: None,
        };
        handler.session_datagram(state, &datagram, &mut reply);
        self.transmit();
    }

    /// Whether a datagram to `local` is one this server answers.
    fn serves(&self, local: &SocketAddr) -> bool {
        if local.port() != self.bind.port() {
            return false;
        }
        match (self.bind.ip(), local.ip()) {
            (IpAddr::V4(b), IpAddr::V4(l)) => b.is_unspecified() || b == l,
            (IpAddr::V6(b), IpAddr::V6(l)) => b.is_unspecified() || b == l,
            (IpAddr::V6(b), IpAddr::V4(_)) => b.is_unspecified(),
            _ => false,
        }
    }

    /// Turns every queued reply into a frame on the TX ring, or counts it.
    fn transmit(&mut self) {
        let Worker {
            pool,
            xsk,
            stats,
            neighbours,
            iface,
            bind,
            unkicked,
            ..
        } = self;
        pool.drain_queued(|dest, ecn, payload| {
            let peer = match dest.peer {
                SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
                    Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
                    None => dest.peer,
                },
                p => p,
            };
            let Some(n) = neighbours.get(&peer.ip()).copied() else {
                // Never heard from on this queue: no MAC address to send to.
                stats.send_errors += 1;
                return;
            };
            let src_ip = match dest.local {
                Some(l) if l.is_ipv4() == peer.is_ipv4() => l,
                _ => n.local,
            };
            let route = frame::Route {
                src_mac: iface.mac,
                dst_mac: n.mac,
                src: SocketAddr::new(src_ip, bind.port()),
                dst: peer,
                ecn,
            };
            let hdr = frame::header_len(&route.src);
            if hdr - frame::ETH_LEN + payload.len() > iface.mtu {
                stats.send_dropped += 1;
                return;
            }
            let mut slot = xsk.tx_frame_mut();
            if slot.is_none() {
                // Take back what the kernel has sent, once, before giving up.
                xsk.kick_now();
                *unkicked = 0;
                xsk.complete();
                slot = xsk.tx_frame_mut();
            }
            let Some((addr, buf)) = slot else {
                stats.xdp_tx_full += 1;
                stats.send_dropped += 1;
                return;
            };
            buf[hdr..hdr + payload.len()].copy_from_slice(payload);
            let Some(len) = frame::write_headers(buf, &route, payload.len()) else {
                stats.send_errors += 1;
                return;
            };
            if xsk.send(addr, len as u32) {
                stats.tx_datagrams += 1;
                stats.tx_bytes += payload.len() as u64;
                *unkicked += 1;
            } else {
                stats.xdp_tx_full += 1;
                stats.send_dropped += 1;
            }
        });
    }

    fn kick(&mut self) {
        if self.unkicked > 0 {
            self.xsk.kick();
            self.unkicked = 0;
        }
    }

    fn kick_always(&mut self) {
        self.xsk.kick_now();
        self.unkicked = 0;
    }

    fn publish(&mut self) {
        let k = self.xsk.stats();
        self.stats.xdp_no_fill = k.rx_dropped + k.rx_ring_full;
        self.stats.xdp_tx_invalid = k.tx_invalid;
        self.stats.buffer_tokens_refused = self.xsk.refused;
        self.shared.counters.publish(&self.stats);
        if k.rx_dropped + k.rx_ring_full > 0 {
            let now = Instant::now();
            if self
                .last_log
                .map_or(true, |t| now.duration_since(t) >= Duration::from_secs(10))
            {
                self.last_log = Some(now);
                tracing::warn!(
                    worker = self.id,
                    dropped = k.rx_dropped + k.rx_ring_full,
                    "AF_XDP: frames dropped for want of fill frames or RX ring room (the worker falls behind)"
                );
            }
        }
    }

    /// Sleeps until a frame arrives, the worker is woken, or `wait` passes.
    fn wait(&mut self, wait: Duration) {
        let mut fds = [
            libc::pollfd {
                fd: self.xsk.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.shared.wake_fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = wait.as_millis().clamp(1, 1000) as libc::c_int;
        // SAFETY: `fds` is a live array of two pollfd, its length passed.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if fds[1].revents & libc::POLLIN != 0 {
            let mut v = 0u64;
            // SAFETY: reads 8 bytes into `v`, a live local, from the non-blocking eventfd.
            unsafe {
                libc::read(
                    self.shared.wake_fd.as_raw_fd(),
                    (&mut v as *mut u64).cast(),
                    8,
                )
            };
        }
    }
}
