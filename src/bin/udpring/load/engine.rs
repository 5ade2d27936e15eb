//! The generator's state for one run and what it does on each event: issue new requests,
//! refill closed-loop windows, fire retransmission timers and drain replies.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Instant;

use hdrhistogram::Histogram;
use socket2::Socket;

use super::gso;
use super::report::{print_progress, record, Interval, RequestTally};
use super::retransmit::{capped_backoff, Timers};
use super::sys::{send_to, Io, RawAddr, BATCH};
use super::wire::{decode_reply, encode_request, Outstanding};
use super::LoadArgs;

/// One client: its socket (connected, unless --follow-reply-port) and its requests.
pub(super) struct Client {
    pub(super) sock: Socket,
    pub(super) out: Outstanding,
    /// --follow-reply-port: where this client's requests go (the target until a reply
    /// arrives from another port of the target's address).
    pub(super) dest: Option<RawAddr>,
}

/// The generator's state for one run.
pub(super) struct Gen<'a> {
    pub(super) args: &'a LoadArgs,
    pub(super) clients: Vec<Client>,
    pub(super) timers: Timers,
    pub(super) io: Io,
    pub(super) c: RequestTally,
    pub(super) iv: Interval,
    pub(super) hist: Histogram<u64>,
    pub(super) iv_hist: Histogram<u64>,
    /// Counting starts once the warm-up is over.
    pub(super) counting: bool,
    /// Measured requests issued so far (for --requests).
    pub(super) issued_counted: u64,
    pub(super) last_answer: Option<Instant>,
    /// Closed loop: clients whose window must be refilled.
    pub(super) refill: Vec<u32>,
    /// `--target` in the kernel's format (resends under --follow-reply-port).
    pub(super) target_raw: RawAddr,
    pub(super) refill_flag: Vec<bool>,
    /// `--gso`: requests per train.
    pub(super) gso: Option<usize>,
    /// `--gso`: the kernel has taken a train, so UDP GSO works on this route.
    pub(super) gso_confirmed: bool,
    /// An error that ends the run (the kernel refused the first GSO train).
    pub(super) fatal: Option<io::Error>,
}

impl<'a> Gen<'a> {
    pub(super) fn quota_left(&self) -> u64 {
        match self.args.requests {
            Some(n) if self.counting => n.saturating_sub(self.issued_counted),
            _ => u64::MAX,
        }
    }

    /// Issues `origins.len()` new requests on client `ci` (batched `sendmmsg`; with `--gso`,
    /// of trains: each chunk holds whole trains, so only the last train of a window is short).
    pub(super) fn issue(&mut self, ci: u32, origins: &[Instant]) {
        let size = self.args.size;
        let proto = self.args.proto;
        let counted = self.counting;
        let now = Instant::now();
        let first_timeout = self.args.timeout;
        let chunk_len = self.gso.map_or(BATCH, |per| gso::chunk_len(per, BATCH));
        for chunk in origins.chunks(chunk_len) {
            let client = &mut self.clients[ci as usize];
            for (i, &origin) in chunk.iter().enumerate() {
                let seq = client.out.push(origin, counted);
                self.timers.push(0, now + first_timeout, ci, seq);
                encode_request(
                    proto,
                    &mut self.io.send_buf[i * size..(i + 1) * size],
                    seq,
                    ci,
                );
            }
            let n = chunk.len() as u64;
            self.iv.sent += n;
            if counted {
                self.c.sent += n;
                self.issued_counted += n;
            }
            let fd = client.sock.as_raw_fd();
            let dest = client.dest.as_ref();
            let took = match self.gso {
                None => self
                    .io
                    .send_batch(fd, chunk.len(), dest)
                    .unwrap_or_default(),
                Some(per) => match self.io.send_trains(fd, chunk.len(), per, dest) {
                    Ok(took) => {
                        self.gso_confirmed |= took > 0;
                        took
                    }
                    // Probe once, on the first train: a kernel or route without UDP GSO
                    // refuses every train, so falling back silently would measure other
                    // traffic than asked for.
                    Err(e) if !self.gso_confirmed && gso::is_refusal(&e) => {
                        self.fatal.get_or_insert(gso::refused(e));
                        0
                    }
                    Err(_) => 0,
                },
            };
            // Requests the kernel refused stay pending; the retransmit timer resends them.
            if counted {
                self.c.send_errors += (chunk.len() - took) as u64;
            }
        }
    }

    /// Closed loop: tops up client `ci` to its window.
    pub(super) fn refill_client(&mut self, ci: u32, now: Instant) {
        let pending = self.clients[ci as usize].out.pending();
        let want = (self.args.window as usize).saturating_sub(pending);
        let want = want.min(usize::try_from(self.quota_left()).unwrap_or(usize::MAX));
        if want == 0 {
            return;
        }
        let origins = [now; BATCH];
        let mut left = want;
        while left > 0 {
            let n = left.min(BATCH);
            self.issue(ci, &origins[..n]);
            left -= n;
        }
    }

    pub(super) fn mark_refill(&mut self, ci: u32) {
        if !self.refill_flag[ci as usize] {
            self.refill_flag[ci as usize] = true;
            self.refill.push(ci);
        }
    }

    /// Fires expired retransmission timers: resend, or give up after `--retries` resends.
    pub(super) fn fire_timers(&mut self, now: Instant, closed_loop: bool) {
        let retries = self.args.retries;
        let size = self.args.size;
        while let Some((level, ci, seq)) = self.timers.pop_due(now) {
            let client = &mut self.clients[ci as usize];
            let Some(slot) = client.out.get_pending_mut(seq) else {
                continue; // answered meanwhile
            };
            if slot.resends != level {
                continue; // stale timer
            }
            if level < retries {
                slot.resends += 1;
                let counted = slot.counted;
                let fd = client.sock.as_raw_fd();
                self.timers.push(
                    level + 1,
                    now + capped_backoff(self.args.timeout, level + 1, self.args.max_timeout),
                    ci,
                    seq,
                );
                let buf = &mut self.io.send_buf[..size];
                encode_request(self.args.proto, buf, seq, ci);
                // --follow-reply-port: resends go to the target itself, which always reaches
                // the server: the session's port may have closed on idle while every datagram
                // of this client was lost (the server then answers from a new port).
                let dest = client.dest.as_ref().map(|_| &self.target_raw);
                let sent = send_to(fd, buf, dest);
                if counted {
                    self.c.retransmitted += 1;
                    if sent.is_err() {
                        self.c.send_errors += 1;
                    }
                }
            } else {
                if let Some(s) = client.out.settle(seq) {
                    self.iv.given_up += 1;
                    if s.counted {
                        self.c.given_up += 1;
                    }
                }
                if closed_loop {
                    self.mark_refill(ci);
                }
            }
        }
    }

    /// Drains client `ci`'s socket; returns whether any request was answered.
    pub(super) fn drain(&mut self, ci: u32) -> bool {
        let mut answered_any = false;
        // Bounded per wake-up for fairness; level-triggered epoll brings us back.
        for _ in 0..16 {
            let fd = self.clients[ci as usize].sock.as_raw_fd();
            let follow = self.args.follow_reply_port;
            let n = match self.io.recv_batch(fd, follow) {
                Ok(n) => n,
                Err(_) => {
                    // E.g. ECONNREFUSED from an ICMP port unreachable: count, keep going.
                    if self.counting {
                        self.c.recv_errors += 1;
                    }
                    continue;
                }
            };
            if n == 0 {
                break;
            }
            let now = Instant::now();
            // With --gso one receive may hold several replies (UDP_GRO); each is one reply.
            for (i, datagram) in (0..n).flat_map(|i| self.io.datagrams(i).map(move |d| (i, d))) {
                // An unconnected socket hears from anyone: only the target's address counts.
                let from = if follow { self.io.source(i) } else { None };
                let seq = if follow && from.map(|a| a.ip()) != Some(self.args.target.ip()) {
                    None
                } else {
                    decode_reply(self.args.proto, datagram, ci)
                };
                let client = &mut self.clients[ci as usize];
                let settled = seq.and_then(|s| client.out.settle(s));
                if let (Some(_), Some(from), Some(dest)) = (settled, from, client.dest.as_mut()) {
                    // The socket has the target's family, which the source was checked
                    // against above, so it always encodes.
                    if dest.addr != from {
                        if let Some(raw) = RawAddr::for_socket(from, self.args.target.is_ipv6()) {
                            *dest = raw;
                        }
                    }
                }
                match settled {
                    Some(slot) => {
                        answered_any = true;
                        self.iv.answered += 1;
                        let lat = now.saturating_duration_since(slot.origin);
                        record(&mut self.iv_hist, lat);
                        if slot.counted {
                            self.c.answered += 1;
                            record(&mut self.hist, lat);
                            self.last_answer = Some(now);
                        }
                    }
                    None => {
                        if self.counting {
                            self.c.stray += 1;
                        }
                    }
                }
            }
            if n < BATCH {
                break;
            }
        }
        answered_any
    }

    pub(super) fn outstanding(&self) -> usize {
        self.clients.iter().map(|c| c.out.pending()).sum()
    }

    pub(super) fn progress(&mut self, secs: f64) {
        print_progress(secs, self.counting, &self.iv, &self.iv_hist);
        self.iv = Interval::default();
        self.iv_hist.reset();
    }
}
