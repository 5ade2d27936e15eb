//! Per-worker counters. The worker bumps plain integers on its own thread and publishes a copy
//! to shared atomics once per loop turn, so the datagram path has no atomic read-modify-write
//! and no lock, while the main thread can still print summaries at any time.
//!
//! Every datagram is in exactly one counter of each stage (issue 14):
//! - what reached a worker's sockets = `rx_datagrams + truncated + malformed + kernel_drops`
//!   (the kernel's drops are read on the listener only);
//! - `rx_datagrams` = those handed to the handler + `shutdown_dropped` + the refusals
//!   (`refused()`) + Retry answers (`retries_sent`, or `amplification_limited` /
//!   `send_dropped` for a Retry not sent) + `cookies_forged`, summed over the workers. A
//!   datagram forwarded to the worker that owns its peer (`forwarded`, a tally outside this
//!   sum) ends in one of these there, or in `deferred_dropped` when that worker's mailbox
//!   refused it or closed with it;
//! - replies asked for (handler replies, Retries, deferred replies taken from the mailbox) =
//!   `tx_datagrams + send_errors + send_dropped + amplification_limited`, and a deferred reply
//!   that finds its session closed is `deferred_dropped` instead.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! define_counters {
    ($( $(#[doc = $doc:literal])* $name:ident ),* $(,)?) => {
        /// A worker's counters (plain integers, owned by the worker thread).
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct Stats {
            $( $(#[doc = $doc])* pub $name: u64, )*
        }

        /// The published copy of a worker's counters, readable from any thread.
        #[derive(Debug, Default)]
        pub struct SharedStats {
            $( $name: AtomicU64, )*
        }

        impl SharedStats {
            pub fn publish(&self, c: &Stats) {
                $( self.$name.store(c.$name, Ordering::Relaxed); )*
            }

            pub fn snapshot(&self) -> Stats {
                Stats { $( $name: self.$name.load(Ordering::Relaxed), )* }
            }
        }

        impl Stats {
            /// `(name, value)` for every counter, in declaration order.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![ $( (stringify!($name), self.$name), )* ]
            }

            /// `(name, description)` for every counter: its doc comment, one line. The
            /// metrics endpoint uses it as HELP text, so the two cannot drift apart.
            pub fn descriptions() -> Vec<(&'static str, String)> {
                vec![ $( (
                    stringify!($name),
                    [$($doc),*].iter().map(|l: &&str| l.trim()).collect::<Vec<_>>().join(" "),
                ), )* ]
            }

            /// Field-by-field sum.
            pub fn add(&mut self, other: &Stats) {
                $( self.$name += other.$name; )*
            }
        }
    };
}

define_counters! {
    /// Datagrams handed to the handler.
    rx_datagrams,
    /// Payload bytes handed to the handler.
    rx_bytes,
    /// Replies the kernel accepted.
    tx_datagrams,
    /// Reply payload bytes the kernel accepted.
    tx_bytes,
    /// Multishot receives that ended because the buffer ring was empty (`-ENOBUFS`).
    enobufs,
    /// Datagrams larger than `--max-datagram`, dropped (`MSG_TRUNC`).
    truncated,
    /// Buffers that could not be parsed or carried an unusable source address.
    malformed,
    /// Datagrams the handler rejected as bad input (e.g. a short sockperf header).
    bad_input,
    /// Calls of the handler's timer (`on_timer`).
    handler_timers,
    /// Replies the kernel refused (the completion carried an error).
    send_errors,
    /// Replies that found no free send slot or did not fit; dropped and counted.
    send_dropped,
    /// Receive errors other than `-ENOBUFS`.
    recv_errors,
    /// Times the multishot receive was armed again after it ended.
    rearms,
    /// Times the worker stopped taking datagrams because every send slot was busy.
    backpressure,
    /// Completions that name no operation in flight (a generation that no longer matches its
    /// slot, a send naming a member of a GSO train rather than its head): dropped, never used
    /// to free what the kernel may still read.
    stale_completions,
    /// Calls into the kernel to submit and wait (`io_uring_enter`).
    enters,
    /// Replies sent as UDP GSO trains of more than one datagram.
    gso_trains,
    /// GSO trains the kernel refused: after EIO GSO is off for the worker; after EINVAL trains
    /// to that destination stop until a datagram to it goes through.
    gso_refused,
    /// Receives that carried a UDP GRO train of more than one datagram.
    gro_trains,
    /// Sessions open now (a level, not a running total).
    sessions_open,
    /// Sessions opened.
    sessions_opened,
    /// Sessions closed after `--idle-timeout` without a datagram.
    closed_idle,
    /// Sessions closed because the handler asked (`Reply::close_session`).
    closed_by_handler,
    /// Sessions closed at shutdown.
    closed_shutdown,
    /// New peers refused: this worker's session limit.
    refused_worker_full,
    /// New peers refused: the server's session limit.
    refused_total_full,
    /// New peers refused: new-session rate limit.
    refused_rate,
    /// New peers refused: per-source-address limit.
    refused_source,
    /// Datagrams read from a per-client socket whose source was another peer (the
    /// bind/connect window); routed to the right session.
    strays,
    /// Datagrams handed to the worker that owns their peer's session.
    forwarded,
    /// Per-client sockets not opened because descriptors ran out (peer served without one).
    fd_exhausted,
    /// Per-client sockets not opened because `--max-connected` was reached.
    connected_cap,
    /// Per-client sockets that failed to open for another reason (peer served without one).
    session_socket_errors,
    /// Deferred replies (sent through a session handle from any thread) queued.
    deferred_sent,
    /// Deferred replies whose session had closed before the worker got them.
    deferred_dropped,
    /// Datagrams received after shutdown had closed the sessions (still queued on a closing
    /// per-client socket, or forwarded late), dropped: no session or handler state is left.
    shutdown_dropped,
    /// Cookie (Retry) replies sent to unvalidated new peers.
    retries_sent,
    /// Valid cookies that opened a session.
    cookies_accepted,
    /// Cookies whose MAC did not match the sender (forged, altered, or another address's).
    cookies_forged,
    /// Cookies too old or from a retired key.
    cookies_expired,
    /// Cookies presented again after they had opened a session.
    cookies_replayed,
    /// Replies withheld because an unvalidated peer's budget (bytes received times the
    /// amplification factor) was spent.
    amplification_limited,
    /// Datagrams the kernel dropped on the worker's listening socket (SO_MEMINFO drops),
    /// read when counters are collected.
    kernel_drops,
    /// Receive-buffer tokens refused: a buffer id reported twice, a buffer recycled twice, a
    /// token recycled into another ring. Each one a bug, refused so that the kernel never
    /// writes into a buffer being read.
    buffer_tokens_refused,
    /// AF_XDP (`--xdp`): frames the XDP program redirected to the worker's socket and it read.
    xdp_frames_rx,
    /// AF_XDP: frames the kernel dropped for want of a fill-ring frame or RX ring room.
    xdp_no_fill,
    /// AF_XDP: replies dropped because the TX ring or its frames were full.
    xdp_tx_full,
    /// AF_XDP: TX descriptors the kernel found invalid.
    xdp_tx_invalid,
    /// AF_XDP: frames that reached the socket but are not UDP to the served address and port.
    xdp_not_ours,
    /// AF_XDP: frames with a wrong IPv4 header checksum or UDP checksum, dropped unanswered.
    xdp_bad_checksum,
}

impl Stats {
    /// Fields that are levels (gauges), not running totals: the metrics endpoint exports
    /// them as gauges and a sum over time means nothing for them.
    pub const GAUGES: &'static [&'static str] = &["sessions_open"];

    /// Sessions closed, all reasons.
    pub fn sessions_closed(&self) -> u64 {
        self.closed_idle + self.closed_by_handler + self.closed_shutdown
    }

    /// New peers refused, all limits.
    pub fn refused(&self) -> u64 {
        self.refused_worker_full + self.refused_total_full + self.refused_rate + self.refused_source
    }

    /// The one-line summary printed every `--stats-interval` and at shutdown.
    pub fn summary(&self) -> impl fmt::Display + '_ {
        Summary(self)
    }
}

/// [`Stats::summary`]'s line.
struct Summary<'a>(&'a Stats);

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.0;
        write!(
            f,
            "rx={} rx_bytes={} tx={} tx_bytes={} enobufs={} truncated={} malformed={} bad_input={} \
             send_errors={} send_dropped={} recv_errors={} rearms={} backpressure={} enters={} gso_trains={}",
            c.rx_datagrams,
            c.rx_bytes,
            c.tx_datagrams,
            c.tx_bytes,
            c.enobufs,
            c.truncated,
            c.malformed,
            c.bad_input,
            c.send_errors,
            c.send_dropped,
            c.recv_errors,
            c.rearms,
            c.backpressure,
            c.enters,
            c.gso_trains
        )?;
        if c.amplification_limited > 0 || c.kernel_drops > 0 || c.shutdown_dropped > 0 {
            write!(
                f,
                " amplification_limited={} kernel_drops={} shutdown_dropped={}",
                c.amplification_limited, c.kernel_drops, c.shutdown_dropped
            )?;
        }
        if c.xdp_frames_rx > 0 || c.xdp_no_fill > 0 || c.xdp_tx_full > 0 || c.xdp_tx_invalid > 0 {
            write!(
                f,
                " xdp_frames_rx={} xdp_no_fill={} xdp_tx_full={} xdp_tx_invalid={} xdp_not_ours={} xdp_bad_checksum={}",
                c.xdp_frames_rx,
                c.xdp_no_fill,
                c.xdp_tx_full,
                c.xdp_tx_invalid,
                c.xdp_not_ours,
                c.xdp_bad_checksum
            )?;
        }
        if c.gso_refused > 0 || c.stale_completions > 0 || c.buffer_tokens_refused > 0 {
            write!(
                f,
                " gso_refused={} stale_completions={} buffer_tokens_refused={}",
                c.gso_refused, c.stale_completions, c.buffer_tokens_refused
            )?;
        }
        if c.sessions_opened > 0 || c.refused() > 0 || c.retries_sent > 0 {
            write!(
                f,
                " sessions_open={} opened={} closed_idle={} closed_by_handler={} closed_shutdown={} \
                 refused={} strays={} forwarded={} fd_exhausted={} connected_cap={} \
                 deferred_sent={} deferred_dropped={} retries_sent={} cookies_accepted={} \
                 cookies_forged={} cookies_expired={} cookies_replayed={}",
                c.sessions_open,
                c.sessions_opened,
                c.closed_idle,
                c.closed_by_handler,
                c.closed_shutdown,
                c.refused(),
                c.strays,
                c.forwarded,
                c.fd_exhausted,
                c.connected_cap,
                c.deferred_sent,
                c.deferred_dropped,
                c.retries_sent,
                c.cookies_accepted,
                c.cookies_forged,
                c.cookies_expired,
                c.cookies_replayed
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_snapshot_round_trip() {
        let shared = SharedStats::default();
        let c = Stats {
            rx_datagrams: 3,
            tx_bytes: 9,
            enobufs: 1,
            ..Stats::default()
        };
        shared.publish(&c);
        assert_eq!(shared.snapshot(), c);
    }

    #[test]
    fn add_sums_every_field() {
        let mut a = Stats {
            rx_datagrams: 1,
            backpressure: 2,
            ..Stats::default()
        };
        a.add(&a.clone());
        assert_eq!(a.rx_datagrams, 2);
        assert_eq!(a.backpressure, 4);
        assert!(a
            .fields()
            .iter()
            .any(|&(n, v)| n == "backpressure" && v == 4));
        assert!(a.summary().to_string().contains("rx=2"));
    }
}
