//! What a load run reports: its counters and latency histograms, the per-second progress
//! line, and the final [`LoadReport`] (human-readable or one JSON object).

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use hdrhistogram::Histogram;

use super::wire::Proto;

/// Largest value recorded in the latency histogram (µs); larger values are clamped.
const HIST_MAX_US: u64 = 600_000_000;

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Latency {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl Latency {
    pub(super) fn from_hist(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }
}

/// Final report of a load run. Stats cover requests first sent after the warm-up.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub target: SocketAddr,
    pub proto: Proto,
    pub clients: u32,
    pub window: u32,
    pub size: usize,
    /// Open-loop rate, or `None` for closed loop.
    pub rate: Option<f64>,
    /// `--gso`: requests per GSO train, or `None` when each request is its own send.
    pub gso: Option<u32>,
    /// Measured interval (after warm-up, until the last answer or the end of sending).
    pub elapsed_s: f64,
    pub sent: u64,
    pub answered: u64,
    pub retransmitted: u64,
    pub given_up: u64,
    /// Still unanswered after the final drain.
    pub outstanding: u64,
    /// Replies that matched no pending request (duplicates, late, foreign).
    pub stray: u64,
    pub send_errors: u64,
    pub recv_errors: u64,
    /// Answered requests per second.
    pub throughput: f64,
    pub latency: Latency,
    /// Generator CPU (getrusage RUSAGE_SELF) over the measured interval and drain.
    pub cpu_user_s: f64,
    pub cpu_sys_s: f64,
    /// Generator CPU as % of one core over the same interval.
    pub cpu_pct: f64,
}

impl LoadReport {
    /// `sent == answered + given_up + outstanding`.
    pub fn invariant_ok(&self) -> bool {
        self.sent == self.answered + self.given_up + self.outstanding
    }

    /// Requests not answered (given up or still outstanding), % of sent.
    pub fn loss_pct(&self) -> f64 {
        if self.sent == 0 {
            0.0
        } else {
            (self.given_up + self.outstanding) as f64 * 100.0 / self.sent as f64
        }
    }

    /// The report as one JSON object (no trailing newline).
    pub fn to_json(&self) -> String {
        let l = &self.latency;
        let rate = self.rate.map_or_else(|| "null".to_string(), fmt_f);
        let gso = self
            .gso
            .map_or_else(|| "null".to_string(), |n| n.to_string());
        let mut s = String::with_capacity(768);
        // Writing into a String cannot fail.
        let _ =
            write!(
            s,
            "{{\"target\":\"{}\",\"proto\":\"{}\",\"mode\":\"{}\",\"clients\":{},\"window\":{},\
             \"size\":{},\"rate\":{},\"gso\":{},\"elapsed_s\":{},\"sent\":{},\"answered\":{},\
             \"retransmitted\":{},\"given_up\":{},\"outstanding\":{},\"stray\":{},\
             \"send_errors\":{},\"recv_errors\":{},\"loss_pct\":{},\"throughput\":{},\
             \"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{},\
             \"mean_us\":{},\"cpu_user_s\":{},\"cpu_sys_s\":{},\"cpu_pct\":{},\
             \"invariant_ok\":{}}}",
            self.target,
            self.proto.name(),
            if self.rate.is_some() { "open" } else { "closed" },
            self.clients,
            self.window,
            self.size,
            rate,
            gso,
            fmt_f(self.elapsed_s),
            self.sent,
            self.answered,
            self.retransmitted,
            self.given_up,
            self.outstanding,
            self.stray,
            self.send_errors,
            self.recv_errors,
            fmt_f(self.loss_pct()),
            fmt_f(self.throughput),
            l.p50_us,
            l.p90_us,
            l.p99_us,
            l.p999_us,
            l.max_us,
            fmt_f(l.mean_us),
            fmt_f(self.cpu_user_s),
            fmt_f(self.cpu_sys_s),
            fmt_f(self.cpu_pct),
            self.invariant_ok(),
        );
        s
    }
}

/// JSON-safe float (no NaN/inf).
fn fmt_f(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "null".to_string()
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut mode = match self.rate {
            Some(r) => format!("open loop {r:.0} req/s"),
            None => format!("closed loop, window {}", self.window),
        };
        if let Some(n) = self.gso {
            // Writing into a String cannot fail.
            let _ = write!(mode, ", GSO trains of {n}");
        }
        let l = &self.latency;
        writeln!(
            f,
            "target {} proto {} size {} B, {} clients, {}",
            self.target,
            self.proto.name(),
            self.size,
            self.clients,
            mode
        )?;
        writeln!(
            f,
            "throughput  {:.0} answered/s over {:.2} s",
            self.throughput, self.elapsed_s
        )?;
        writeln!(
            f,
            "latency µs  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {:.1}",
            l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us, l.mean_us
        )?;
        writeln!(
            f,
            "requests    sent {}  answered {}  given up {}  outstanding {}  (loss {:.3}%)",
            self.sent,
            self.answered,
            self.given_up,
            self.outstanding,
            self.loss_pct()
        )?;
        writeln!(
            f,
            "            retransmitted {}  stray {}  send errors {}  recv errors {}",
            self.retransmitted, self.stray, self.send_errors, self.recv_errors
        )?;
        writeln!(
            f,
            "invariant   sent = answered + given up + outstanding: {}",
            if self.invariant_ok() {
                "ok"
            } else {
                "VIOLATED"
            }
        )?;
        write!(
            f,
            "generator   cpu user {:.2} s  sys {:.2} s  = {:.1}% of one core",
            self.cpu_user_s, self.cpu_sys_s, self.cpu_pct
        )
    }
}

/// Stats for requests first sent after the warm-up.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct RequestTally {
    pub(super) sent: u64,
    pub(super) answered: u64,
    pub(super) retransmitted: u64,
    pub(super) given_up: u64,
    pub(super) stray: u64,
    pub(super) send_errors: u64,
    pub(super) recv_errors: u64,
}

/// Per-second progress counters (all requests, warm-up included).
#[derive(Debug, Default)]
pub(super) struct Interval {
    pub(super) sent: u64,
    pub(super) answered: u64,
    pub(super) given_up: u64,
}

pub(super) fn new_hist() -> io::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3)
        .map_err(|e| io::Error::other(format!("histogram: {e}")))
}

pub(super) fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = u64::try_from(d.as_micros())
        .unwrap_or(u64::MAX)
        .clamp(1, HIST_MAX_US);
    // `us` is clamped into the histogram's bounds, so recording cannot fail.
    let _ = h.record(us);
}

/// Prints the per-second progress line of one interval on stderr.
pub(super) fn print_progress(secs: f64, counting: bool, iv: &Interval, iv_hist: &Histogram<u64>) {
    let l = Latency::from_hist(iv_hist);
    let settled = iv.answered + iv.given_up;
    let loss = if settled == 0 {
        0.0
    } else {
        iv.given_up as f64 * 100.0 / settled as f64
    };
    eprintln!(
        "[{:>6.1}s]{} sent/s {:>9.0}  answered/s {:>9.0}  loss {:>6.3}%  p50 {:>6} µs  p99 {:>7} µs",
        secs,
        if counting { "" } else { " warmup" },
        iv.sent as f64,
        iv.answered as f64,
        loss,
        l.p50_us,
        l.p99_us
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_invariant_and_json() {
        let r = LoadReport {
            target: "127.0.0.1:9000".parse().expect("valid literal"),
            proto: Proto::Sockperf,
            clients: 2,
            window: 4,
            size: 64,
            rate: None,
            gso: Some(16),
            elapsed_s: 1.0,
            sent: 10,
            answered: 7,
            retransmitted: 3,
            given_up: 2,
            outstanding: 1,
            stray: 0,
            send_errors: 0,
            recv_errors: 0,
            throughput: 7.0,
            latency: Latency::default(),
            cpu_user_s: 0.1,
            cpu_sys_s: 0.2,
            cpu_pct: 30.0,
        };
        assert!(r.invariant_ok());
        assert!((r.loss_pct() - 30.0).abs() < 1e-9);
        let j = r.to_json();
        assert!(j.starts_with('{') && j.ends_with('}'));
        assert!(j.contains("\"answered\":7"));
        assert!(j.contains("\"rate\":null"));
        assert!(j.contains("\"gso\":16"));
        assert!(r.to_string().contains("GSO trains of 16"));
        assert!(j.contains("\"invariant_ok\":true"));
    }
}
