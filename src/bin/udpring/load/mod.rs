//! `udpring load`: a cheap, single-threaded UDP request/response load generator.
//!
//! Each client owns one connected, non-blocking UDP socket (its own source port). All sockets
//! sit in one level-triggered epoll set; replies are drained with `recvmmsg` (64 per call) and
//! new requests leave through `sendmmsg`, one call per client refill.
//!
//! Two modes:
//! * closed loop (default): every client keeps `--window` requests in flight; each answer (or
//!   give-up) immediately triggers the next request of that client;
//! * open loop (`--rate R`): request `k` is *scheduled* at `start + k / R`, handed round-robin
//!   to the clients, and its latency is measured from the scheduled time, so a stalled server
//!   (or generator) shows up in the latency instead of silently lowering the offered load
//!   (no coordinated omission).
//!
//! Every request carries a per-client sequence number; replies are matched by it. Unanswered
//! requests are resent with the same sequence number after `--timeout`, doubling the timeout
//! each time, and given up after `--retries` resends.
//!
//! With `--gso N` clients batch as QUIC stacks do: new requests leave as UDP GSO trains of up
//! to N requests and replies are read with `UDP_GRO` on; a train counts as the requests it
//! carries and each reply split out of a coalesced receive as one reply. Resends go out
//! singly.

//!
//! Layout: `wire` holds the request/reply formats and sequence matching, `retransmit` the
//! timeout schedule and timers, `gso` how requests are cut into trains and coalesced replies
//! split, `report` the counters, progress line and final report, `sys`
//! the raw socket, epoll, `recvmmsg` and `sendmmsg` calls (the only `unsafe` code of the load
//! generator), and `engine` the per-run generator state; this file holds the arguments and the
//! main loop.

mod engine;
mod gso;
mod report;
mod retransmit;
mod sys;
mod wire;

use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use udpring::config::{MAX_UDP4_PAYLOAD, MAX_UDP6_PAYLOAD};

use crate::args::parse_duration;

use report::{Latency, LoadReport};
use retransmit::{give_up_after, Timers};
use wire::{Outstanding, Proto};

use engine::{Client, Gen};
use report::{new_hist, Interval, RequestTally};
use sys::{cpu_times, enable_gro, open_client, set_timer_slack, Epoll, Io, RawAddr};

/// Arguments of `udpring load`.
#[derive(clap::Args, Debug, Clone)]
#[command(about = "UDP request/response load generator (closed loop, or open loop with --rate)")]
pub struct LoadArgs {
    /// Server to load, as IP:PORT (IPv6 as [ADDR]:PORT).
    #[arg(long, value_name = "ADDR:PORT")]
    pub target: SocketAddr,

    /// Number of clients; each has its own UDP socket and source port.
    #[arg(long, default_value_t = 64, value_name = "C",
          value_parser = clap::value_parser!(u32).range(1..=16_000))]
    pub clients: u32,

    /// Requests in flight per client (closed-loop mode; ignored with --rate).
    #[arg(long, default_value_t = 8, value_name = "W",
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub window: u32,

    /// Request payload size in bytes (at least 8 for echo, 14 for sockperf).
    #[arg(long, default_value_t = 64, value_name = "S")]
    pub size: usize,

    /// How long to send after the warm-up, e.g. 10s, 500ms, 1m.
    #[arg(long, default_value = "10s", value_name = "DUR", value_parser = parse_duration,
          conflicts_with = "requests")]
    pub duration: Duration,

    /// Stop after N measured requests instead of after --duration.
    #[arg(long, value_name = "N")]
    pub requests: Option<u64>,

    /// Open loop: total requests per second on a fixed schedule; latency is measured from each
    /// request's scheduled send time (no coordinated omission).
    #[arg(long, value_name = "R")]
    pub rate: Option<f64>,

    /// Request format.
    #[arg(long, value_enum, default_value_t = Proto::Echo)]
    pub proto: Proto,

    /// First retransmission timeout; doubles after each resend.
    #[arg(long, default_value = "200ms", value_name = "DUR", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Resends of an unanswered request before it is given up.
    #[arg(long, default_value_t = 3, value_name = "N",
          value_parser = clap::value_parser!(u32).range(0..=16))]
    pub retries: u32,

    /// Print the final report as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,

    /// No per-second progress line on stderr.
    #[arg(long)]
    pub quiet: bool,

    /// Run this long before measuring; requests sent during warm-up are not counted.
    #[arg(long, default_value = "0s", value_name = "DUR", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Upper bound on the retransmission timeout: the doubling stops here [default: none].
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub max_timeout: Option<Duration>,

    /// After sending stops, keep retransmitting until every request is answered or given up
    /// (so `outstanding` is 0 and sent = answered + given up). Without it, requests still
    /// unanswered one --timeout after sending stops are reported as outstanding.
    #[arg(long)]
    pub settle: bool,

    /// Servers that answer from another port (udpring --sessions port-per-client): use
    /// unconnected sockets, accept replies from any port of the target's address, and send
    /// each client's new requests to the address its latest reply came from. Resends go to
    /// --target (the session's port may have closed meanwhile).
    #[arg(long)]
    pub follow_reply_port: bool,

    /// Batch as QUIC stacks do: send new requests as UDP GSO trains of up to N (1..=64) and
    /// read replies with UDP_GRO [default: off].
    ///
    /// Each train is one sendmsg with a UDP_SEGMENT control message (segment size = --size)
    /// carrying up to N requests back to back; a window that is not a multiple of N ends with
    /// a shorter train, and with --rate a train carries the requests due at once. Replies
    /// are read with UDP_GRO on, so one receive may carry several. Counting is unchanged: a
    /// train is as many requests as it carries, each reply split out of a coalesced receive
    /// is one reply; resends go out singly. N x --size must not exceed 65507 bytes, and each
    /// segment must fit the route's MTU (GSO segments are not fragmented). Needs UDP GSO
    /// (Linux 4.18) and UDP GRO (Linux 5.0): a kernel that refuses either ends the run with
    /// an error, never a silent fallback.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub gso: Option<u32>,
}

/// Validates the arguments.
fn check_args(args: &LoadArgs) -> io::Result<()> {
    let invalid = |m: String| Err(io::Error::new(io::ErrorKind::InvalidInput, m));
    let min = args.proto.min_size();
    let max = if args.target.is_ipv6() {
        MAX_UDP6_PAYLOAD
    } else {
        MAX_UDP4_PAYLOAD
    };
    if args.size < min || args.size > max {
        return invalid(format!(
            "--size {} out of range for --proto {} to this target ({min}..={max})",
            args.size,
            args.proto.name()
        ));
    }
    if let Some(r) = args.rate {
        if !(r.is_finite() && r > 0.0) {
            return invalid(format!("--rate must be a positive number, got {r}"));
        }
    }
    if args.requests == Some(0) {
        return invalid("--requests must be at least 1".into());
    }
    if args.timeout.is_zero() {
        return invalid("--timeout must be positive".into());
    }
    if let Some(n) = args.gso {
        gso::check(n as usize, args.size).or_else(invalid)?;
    }
    Ok(())
}

/// Runs the generator, printing progress (unless `--quiet`) and the final report
/// (JSON with `--json`).
pub fn run_cli(args: &LoadArgs) -> io::Result<()> {
    let report = run(args)?;
    // Not println!: a closed stdout (e.g. a broken pipe) is an error, not a panic.
    let mut out = io::stdout().lock();
    if args.json {
        writeln!(out, "{}", report.to_json())?;
    } else {
        writeln!(out, "{report}")?;
    }
    out.flush()?;
    if !report.invariant_ok() {
        return Err(io::Error::other(
            "accounting invariant violated: sent != answered + given up + outstanding",
        ));
    }
    Ok(())
}

/// Runs the generator and returns its report (prints progress unless `--quiet`).
pub fn run(args: &LoadArgs) -> io::Result<LoadReport> {
    check_args(args)?;
    // Finer timer slack so open-loop wake-ups land close to their schedule (best effort).
    set_timer_slack(5_000);

    let n_clients = args.clients;
    let mut epoll = Epoll::new(n_clients as usize)?;
    let mut clients = Vec::with_capacity(n_clients as usize);
    for ci in 0..n_clients {
        let sock = open_client(args.target, !args.follow_reply_port)?;
        if args.gso.is_some() {
            enable_gro(&sock).map_err(|e| gso::gro_unavailable(&e))?;
        }
        epoll.add(sock.as_raw_fd(), u64::from(ci))?;
        clients.push(Client {
            sock,
            out: Outstanding::new(1),
            dest: args.follow_reply_port.then(|| RawAddr::new(args.target)),
        });
    }
    let mut g = Gen {
        args,
        clients,
        timers: Timers::new(args.retries),
        io: Io::new(args.size, args.gso.is_some()),
        c: RequestTally::default(),
        iv: Interval::default(),
        hist: new_hist()?,
        iv_hist: new_hist()?,
        counting: false,
        issued_counted: 0,
        last_answer: None,
        refill: Vec::new(),
        refill_flag: vec![false; n_clients as usize],
        target_raw: RawAddr::new(args.target),
        gso: args.gso.map(|n| n as usize),
        gso_confirmed: false,
        fatal: None,
    };

    let closed_loop = args.rate.is_none();
    let start = Instant::now();
    let measure_start = start + args.warmup;
    let send_end = match args.requests {
        Some(_) => None,
        None => Some(measure_start + args.duration),
    };
    let mut cpu0 = cpu_times();
    let mut next_progress = start + Duration::from_secs(1);
    // Open loop: requests scheduled so far.
    let mut scheduled: u64 = 0;
    let rate = args.rate.unwrap_or(0.0);
    let sched_at = |k: u64| start + Duration::from_secs_f64(k as f64 / rate);
    let mut per_client: Vec<Vec<Instant>> = vec![Vec::new(); n_clients as usize];

    if closed_loop {
        for ci in 0..n_clients {
            g.mark_refill(ci);
        }
    }
    let mut sending = true;
    let mut drain_deadline = start;
    let mut send_stop = start;

    loop {
        let now = Instant::now();
        if !g.counting && now >= measure_start {
            g.counting = true;
            cpu0 = cpu_times();
        }
        if sending {
            let done = match (send_end, args.requests) {
                (Some(end), _) => now >= end,
                (None, Some(n)) => g.counting && g.issued_counted >= n,
                (None, None) => false,
            };
            if done {
                sending = false;
                send_stop = now;
                if args.settle {
                    // Every pending request is answered or given up by then (plus slack
                    // for the last resend's reply in flight).
                    drain_deadline = now
                        + give_up_after(args.timeout, args.retries, args.max_timeout)
                        + args.timeout;
                } else {
                    drain_deadline = now + args.timeout;
                    g.timers.clear();
                }
            }
        }
        if !sending && (g.outstanding() == 0 || now >= drain_deadline) {
            break;
        }
        if !sending && args.settle {
            // Resends and give-ups continue; no new requests (so nothing to refill).
            g.fire_timers(now, false);
        }

        if sending {
            g.fire_timers(now, closed_loop);
            if closed_loop {
                let todo = std::mem::take(&mut g.refill);
                for &ci in &todo {
                    g.refill_flag[ci as usize] = false;
                    g.refill_client(ci, now);
                }
                g.refill = todo;
                g.refill.clear();
            } else {
                // Everything scheduled up to now, capped per iteration so replies keep
                // being read when far behind (late requests keep their scheduled origin).
                // Request k is due at start + k/rate, so floor(elapsed*rate)+1 are due now.
                let due = ((now - start).as_secs_f64() * rate) as u64 + 1;
                let mut n = due.saturating_sub(scheduled).min(4096);
                n = n.min(g.quota_left());
                for k in scheduled..scheduled + n {
                    // During warm-up all requests count as uncounted; once counting starts
                    // the quota applies.
                    per_client[(k % u64::from(n_clients)) as usize].push(sched_at(k));
                }
                scheduled += n;
                for (ci, origins) in per_client.iter_mut().enumerate() {
                    if !origins.is_empty() {
                        g.issue(ci as u32, origins);
                        origins.clear();
                    }
                }
            }
        }

        if let Some(e) = g.fatal.take() {
            return Err(e);
        }

        if !args.quiet && now >= next_progress {
            g.progress((now - start).as_secs_f64());
            next_progress += Duration::from_secs(1);
        }

        // Sleep until the next thing to do.
        let mut wake = next_progress;
        if sending {
            if let Some(t) = g.timers.next_deadline() {
                wake = wake.min(t);
            }
            if let Some(end) = send_end {
                wake = wake.min(end);
            }
            if !g.counting {
                wake = wake.min(measure_start);
            }
            if !closed_loop {
                wake = wake.min(sched_at(scheduled));
            }
        } else {
            wake = wake.min(drain_deadline);
            if args.settle {
                if let Some(t) = g.timers.next_deadline() {
                    wake = wake.min(t);
                }
            }
        }
        let timeout = if !g.refill.is_empty() {
            Duration::ZERO
        } else {
            wake.saturating_duration_since(Instant::now())
        };
        let n = epoll.wait(timeout)?;
        for i in 0..n {
            let ci = epoll.events[i].u64 as u32;
            if g.drain(ci) && closed_loop && sending {
                g.refill_client(ci, Instant::now());
            }
        }
    }

    // A refusal in the last loop turn (the run's only train, say) still ends the run.
    if let Some(e) = g.fatal.take() {
        return Err(e);
    }
    let end = Instant::now();
    let cpu1 = cpu_times();
    let measured_end = g.last_answer.map_or(send_stop, |t| t.max(send_stop));
    let elapsed = measured_end.saturating_duration_since(measure_start);
    let wall = end.saturating_duration_since(measure_start).as_secs_f64();
    let outstanding_counted: u64 = g
        .clients
        .iter()
        .map(|c| c.out.iter_pending().filter(|s| s.counted).count() as u64)
        .sum();
    let (cpu_user_s, cpu_sys_s) = (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1);
    let elapsed_s = elapsed.as_secs_f64();
    Ok(LoadReport {
        target: args.target,
        proto: args.proto,
        clients: args.clients,
        window: args.window,
        size: args.size,
        rate: args.rate,
        gso: args.gso,
        elapsed_s,
        sent: g.c.sent,
        answered: g.c.answered,
        retransmitted: g.c.retransmitted,
        given_up: g.c.given_up,
        outstanding: outstanding_counted,
        stray: g.c.stray,
        send_errors: g.c.send_errors,
        recv_errors: g.c.recv_errors,
        throughput: if elapsed_s > 0.0 {
            g.c.answered as f64 / elapsed_s
        } else {
            0.0
        },
        latency: Latency::from_hist(&g.hist),
        cpu_user_s,
        cpu_sys_s,
        cpu_pct: if wall > 0.0 {
            (cpu_user_s + cpu_sys_s) * 100.0 / wall
        } else {
            0.0
        },
    })
}

#[cfg(test)]
mod tests;
