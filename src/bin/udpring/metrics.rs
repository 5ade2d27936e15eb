//! A Prometheus scrape endpoint (`GET /metrics`, text exposition format 0.0.4) on a
//! background thread.
//!
//! Nothing here touches the datagram path: a scrape calls a source closure that reads the
//! counters the workers already publish once per loop turn ([`udpring::Server::counter_source`]),
//! builds the families afresh and encodes them. The format comes from the `prometheus` crate's
//! `TextEncoder` and the HTTP side from `tiny_http`; the cost of both is paid per scrape, on
//! this thread, never per datagram. Both crates are the command line's (feature `cli`), so the
//! library does not depend on them.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use prometheus::{Encoder, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use udpring::Stats;

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

/// A running metrics endpoint. Dropping it (or [`MetricsServer::shutdown`]) stops it.
pub struct MetricsServer {
    http: Arc<tiny_http::Server>,
    local_addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

/// Serves the worker counters `source` returns (index = worker id) at `GET /metrics` on
/// `addr`; port 0 picks a free port ([`MetricsServer::local_addr`] tells which).
pub fn serve(
    addr: SocketAddr,
    source: impl Fn() -> Vec<Stats> + Send + Sync + 'static,
) -> io::Result<MetricsServer> {
    serve_with(addr, move |families: &mut Families| {
        families.worker_counters(&source());
    })
}

/// Like [`serve`], with the families of each scrape built by `collect`: the extension point
/// for families beyond the worker counters (`Families::gauge` adds a level such as a queue
/// depth beside them).
pub fn serve_with(
    addr: SocketAddr,
    collect: impl Fn(&mut Families) + Send + Sync + 'static,
) -> io::Result<MetricsServer> {
    let http = tiny_http::Server::http(addr).map_err(io::Error::other)?;
    let local_addr = http
        .server_addr()
        .to_ip()
        .ok_or_else(|| io::Error::other("metrics listener has no IP address"))?;
    let http = Arc::new(http);
    let thread = {
        let http = http.clone();
        std::thread::Builder::new()
            .name("udpring-metrics".into())
            .spawn(move || {
                // Ends when `MetricsServer` calls `unblock`.
                for request in http.incoming_requests() {
                    respond(request, &collect);
                }
            })?
    };
    Ok(MetricsServer {
        http,
        local_addr,
        thread: Some(thread),
    })
}

fn respond(request: tiny_http::Request, collect: &impl Fn(&mut Families)) {
    use tiny_http::{Header, Method, Response};

    // Prometheus asks for exactly `/metrics`; a query string (some proxies add one) is ignored.
    let path = request.url().split('?').next().unwrap_or_default();
    let method = request.method().clone();
    let response = match (path, &method) {
        ("/metrics", Method::Get | Method::Head) => {
            let mut families = Families::new();
            collect(&mut families);
            let content_type = TextEncoder::new().format_type().to_string();
            let body = families.encode();
            let mut response = Response::from_data(body);
            // The header is built from constant ASCII, which is always valid.
            if let Ok(h) = Header::from_bytes("Content-Type", content_type) {
                response.add_header(h);
            }
            response
        }
        ("/metrics", _) => Response::from_string("only GET\n").with_status_code(405),
        _ => Response::from_string("not found; try /metrics\n").with_status_code(404),
    };
    // The scraper went away: nothing to do, the next scrape gets a fresh answer.
    if let Err(e) = request.respond(response) {
        tracing::debug!(error = %e, "metrics response not delivered");
    }
}

impl MetricsServer {
    /// The address it listens on (with the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops serving and waits for the serving thread: at most the time one scrape in
    /// progress takes to answer.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.http.unblock();
        if thread.join().is_err() {
            tracing::error!("metrics thread panicked");
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    const TIMEOUT: Duration = Duration::from_secs(5);

    /// A bare HTTP/1.0 request, as a scraper without keep-alive sends it; returns the status
    /// code and the body.
    fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect");
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        stream.set_write_timeout(Some(TIMEOUT)).expect("timeout");
        write!(stream, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").expect("send request");
        let mut raw = String::new();
        stream.read_to_string(&mut raw).expect("read response");
        let (head, body) = raw.split_once("\r\n\r\n").expect("header/body separator");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status code");
        assert!(
            status != 200 || head.contains("text/plain; version=0.0.4"),
            "{head}"
        );
        (status, body.to_string())
    }

    fn counters(rx: u64) -> Stats {
        Stats {
            rx_datagrams: rx,
            tx_bytes: 7,
            ..Stats::default()
        }
    }

    #[test]
    fn serves_every_counter_per_worker() {
        let server = serve("127.0.0.1:0".parse().unwrap(), || {
            vec![counters(12345), counters(1)]
        })
        .expect("start");
        let (status, body) = get(server.local_addr(), "/metrics");
        assert_eq!(status, 200);
        assert!(
            body.contains("udpring_rx_datagrams_total{worker=\"0\"} 12345\n"),
            "{body}"
        );
        assert!(
            body.contains("udpring_rx_datagrams_total{worker=\"1\"} 1\n"),
            "{body}"
        );
        assert!(
            body.contains("udpring_tx_bytes_total{worker=\"1\"} 7\n"),
            "{body}"
        );
        for (field, _) in Stats::default().fields() {
            let (name, kind) = if Stats::GAUGES.contains(&field) {
                (format!("udpring_{field}"), "gauge")
            } else {
                (format!("udpring_{field}_total"), "counter")
            };
            assert!(
                body.contains(&format!("# TYPE {name} {kind}\n")),
                "{field}: {body}"
            );
            assert!(body.contains(&format!("# HELP {name} ")), "{field}: {body}");
        }
        server.shutdown();
    }

    #[test]
    fn other_paths_are_not_found() {
        let server = serve("127.0.0.1:0".parse().unwrap(), Vec::new).expect("start");
        assert_eq!(get(server.local_addr(), "/").0, 404);
        assert_eq!(get(server.local_addr(), "/metricsx").0, 404);
        // No workers yet: an empty but valid exposition.
        assert_eq!(
            get(server.local_addr(), "/metrics?x=1"),
            (200, String::new())
        );
    }

    #[test]
    fn extra_gauges_sit_beside_the_counters() {
        let server = serve_with("127.0.0.1:0".parse().unwrap(), |f| {
            f.worker_counters(&[counters(3)]);
            f.gauge("queue_depth", "An extra level from the caller.", &[4, -1]);
        })
        .expect("start");
        let (_, body) = get(server.local_addr(), "/metrics");
        assert!(
            body.contains("# TYPE udpring_queue_depth gauge\n"),
            "{body}"
        );
        assert!(
            body.contains("udpring_queue_depth{worker=\"1\"} -1\n"),
            "{body}"
        );
        assert!(
            body.contains("udpring_rx_datagrams_total{worker=\"0\"} 3\n"),
            "{body}"
        );
    }

    #[test]
    fn every_counter_has_its_own_help() {
        for (field, _) in Stats::default().fields() {
            assert!(
                !counter_help(field).starts_with("udpring counter"),
                "write a doc comment for {field} in stats.rs"
            );
        }
    }

    #[test]
    fn stops_on_drop() {
        let server = serve("127.0.0.1:0".parse().unwrap(), Vec::new).expect("start");
        let addr = server.local_addr();
        let started = std::time::Instant::now();
        drop(server);
        assert!(started.elapsed() < TIMEOUT);
        // The listener closes shortly after (tiny_http's accept thread notices on its own).
        let deadline = std::time::Instant::now() + TIMEOUT;
        while TcpStream::connect_timeout(&addr, TIMEOUT).is_ok() {
            assert!(std::time::Instant::now() < deadline, "still listening");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
