//! A Prometheus scrape endpoint (`GET /metrics`, text exposition format 0.0.4) on one
//! background thread.
//!
//! Nothing here touches the datagram path: a scrape calls a source closure that reads the
//! counters the workers already publish once per loop turn ([`udpring::Server::counter_source`]),
//! builds the families afresh and encodes them. The format comes from the `prometheus` crate
//! (the command line's, feature `cli`, so the library does not depend on it); the cost is
//! paid per scrape, on this thread, never per datagram.
//!
//! The HTTP side is a poll(2) loop on that one thread, not a thread per connection: whatever
//! clients do costs at most [`Limits::max_connections`] descriptors and buffers, never a
//! thread. A connection beyond the limit is answered 503 and closed; one that has not sent
//! its request and read the answer within [`Limits::timeout`] is closed. Both are counted
//! (`udpring_metrics_connections_refused_total`, `udpring_metrics_connections_timed_out_total`)
//! and logged at most every 10 s (issue 14: 50 idle connections held 50 threads of the HTTP
//! crate used before, which set no timeout).

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use udpring::Stats;

mod http;

#[cfg(test)]
pub use http::MAX_CONNECTIONS;
pub use http::{serve, Limits, MetricsServer, TIMEOUT};

/// Every family name starts with this.
pub const PREFIX: &str = "udpring_";
/// The label that tells workers apart.
pub const WORKER_LABEL: &str = "worker";

/// The families of one scrape. The collect closure given to [`serve_with`] adds to it; the
/// names it is given are without the `udpring_` prefix (and, for counters, without the
/// `_total` suffix), which are added here so every family is named the same way.
pub struct Families {
    registry: Registry,
}

impl Families {
    fn new() -> Families {
        Families {
            registry: Registry::new(),
        }
    }

    /// One counter family per field of [`Stats::fields`], `udpring_<field>_total`, with a
    /// `worker="N"` sample for each entry of `per_worker` (its index is the worker id).
    /// Generic over `fields()`, so a counter added to `stats.rs` is exported without a change
    /// here (with a plain HELP text until [`counter_help`] learns about it).
    pub fn worker_counters(&mut self, per_worker: &[Stats]) {
        let rows: Vec<Vec<(&'static str, u64)>> = per_worker.iter().map(Stats::fields).collect();
        // Every row lists the same fields in the same order (one struct, one macro).
        let names: Vec<&'static str> = Stats::default().fields().iter().map(|f| f.0).collect();
        for (column, field) in names.into_iter().enumerate() {
            let values: Vec<u64> = rows.iter().map(|row| row[column].1).collect();
            if Stats::GAUGES.contains(&field) {
                let levels: Vec<i64> = values.iter().map(|&v| v as i64).collect();
                self.gauge(field, &counter_help(field), &levels);
            } else {
                self.counter(field, &counter_help(field), &values);
            }
        }
    }

    /// A counter family `udpring_<name>_total`, one `worker="N"` sample per entry.
    pub fn counter(&mut self, name: &str, help: &str, per_worker: &[u64]) {
        let full = format!("{PREFIX}{name}_total");
        let family = match IntCounterVec::new(Opts::new(full.clone(), help), &[WORKER_LABEL]) {
            Ok(f) => f,
            Err(e) => return skip(&full, &e),
        };
        for (worker, &value) in per_worker.iter().enumerate() {
            family
                .with_label_values(&[&worker.to_string()])
                .inc_by(value);
        }
        if let Err(e) = self.registry.register(Box::new(family)) {
            skip(&full, &e);
        }
    }

    /// A gauge family `udpring_<name>` (a value that goes up and down, e.g. `sessions_open`),
    /// one `worker="N"` sample per entry.
    pub fn gauge(&mut self, name: &str, help: &str, per_worker: &[i64]) {
        let full = format!("{PREFIX}{name}");
        let family = match IntGaugeVec::new(Opts::new(full.clone(), help), &[WORKER_LABEL]) {
            Ok(f) => f,
            Err(e) => return skip(&full, &e),
        };
        for (worker, &value) in per_worker.iter().enumerate() {
            family.with_label_values(&[&worker.to_string()]).set(value);
        }
        if let Err(e) = self.registry.register(Box::new(family)) {
            skip(&full, &e);
        }
    }

    /// A counter family `udpring_<name>_total` with one sample and no labels (a count of
    /// the process, not of a worker).
    pub fn process_counter(&mut self, name: &str, help: &str, value: u64) {
        let full = format!("{PREFIX}{name}_total");
        let family = match IntCounter::new(full.clone(), help) {
            Ok(f) => f,
            Err(e) => return skip(&full, &e),
        };
        family.inc_by(value);
        if let Err(e) = self.registry.register(Box::new(family)) {
            skip(&full, &e);
        }
    }

    /// The exposition text (format 0.0.4).
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        // Encoding into a Vec cannot fail on I/O; it fails only on families the registry
        // already refused to register, so there is nothing more to report than `skip` did.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut body) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        body
    }
}

/// A bad name or a family added twice is a programming error in the collect closure; one
/// family is left out rather than failing the whole scrape.
fn skip(name: &str, error: &prometheus::Error) {
    tracing::warn!(family = name, error = %error, "metric family left out");
}

/// HELP text for a field of [`Stats`]: its doc comment in `stats.rs`.
pub fn counter_help(field: &str) -> String {
    Stats::descriptions()
        .into_iter()
        .find(|(name, _)| *name == field)
        .map(|(_, text)| text)
        .filter(|text| !text.is_empty())
        .unwrap_or_else(|| format!("udpring counter {field}."))
}

#[cfg(test)]
mod tests;
