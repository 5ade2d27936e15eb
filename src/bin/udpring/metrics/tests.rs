use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::http::*;
use super::*;

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
    let server = serve("127.0.0.1:0".parse().unwrap(), Limits::default(), || {
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
    let server = serve("127.0.0.1:0".parse().unwrap(), Limits::default(), Vec::new).expect("start");
    assert_eq!(get(server.local_addr(), "/").0, 404);
    assert_eq!(get(server.local_addr(), "/metricsx").0, 404);
    // No workers yet: a valid exposition of the endpoint's own counters alone.
    let (status, body) = get(server.local_addr(), "/metrics?x=1");
    assert_eq!(status, 200);
    let samples: Vec<&str> = body.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        samples,
        [
            "udpring_metrics_connections_refused_total 0",
            "udpring_metrics_connections_timed_out_total 0"
        ],
        "{body}"
    );
}

#[test]
fn extra_gauges_sit_beside_the_counters() {
    let server = serve_with("127.0.0.1:0".parse().unwrap(), Limits::default(), |f| {
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
fn stops_on_drop_closing_the_listener_and_every_connection() {
    let server = serve("127.0.0.1:0".parse().unwrap(), Limits::default(), Vec::new).expect("start");
    let addr = server.local_addr();
    let held = idle(addr);
    // Accepted (the endpoint holds it) once a later connection is answered.
    assert_eq!(get(addr, "/metrics").0, 200);
    let started = std::time::Instant::now();
    drop(server);
    assert!(started.elapsed() < TIMEOUT);
    // The thread has exited and dropped the listener with it: nothing listens now.
    assert!(
        TcpStream::connect_timeout(&addr, TIMEOUT).is_err(),
        "still listening"
    );
    assert_eq!(closed_by_server(held), "");
}

/// A connection that sends nothing, as a slow or hostile client holds one.
fn idle(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    stream
}

/// Waits (bounded by the stream's read timeout) for the server to close `stream`;
/// returns what it sent first.
fn closed_by_server(mut stream: TcpStream) -> String {
    let mut got = Vec::new();
    stream
        .read_to_end(&mut got)
        .expect("closed by the server within the read timeout");
    String::from_utf8_lossy(&got).to_string()
}

#[test]
fn idle_connections_do_not_hold_up_a_scrape() {
    let server = serve("127.0.0.1:0".parse().unwrap(), Limits::default(), || {
        vec![counters(5)]
    })
    .expect("start");
    let idle: Vec<TcpStream> = (0..60).map(|_| idle(server.local_addr())).collect();
    let started = std::time::Instant::now();
    let (status, body) = get(server.local_addr(), "/metrics");
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() < TIMEOUT,
        "answered while 60 idle connections wait"
    );
    assert!(
        body.contains("udpring_metrics_connections_refused_total 0\n"),
        "{body}"
    );
    drop(idle);
}

#[test]
fn a_connection_beyond_the_limit_is_answered_503_and_counted() {
    let limits = Limits {
        max_connections: 4,
        timeout: Duration::from_millis(500),
    };
    let server = serve("127.0.0.1:0".parse().unwrap(), limits, Vec::new).expect("start");
    let addr = server.local_addr();
    let held: Vec<TcpStream> = (0..4).map(|_| idle(addr)).collect();
    let answer = closed_by_server(idle(addr));
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer:?}");
    // The held ones are closed when their time is up, unanswered; then there is room.
    for stream in held {
        assert_eq!(closed_by_server(stream), "", "closed without an answer");
    }
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("udpring_metrics_connections_refused_total 1\n"),
        "{body}"
    );
    assert!(
        body.contains("udpring_metrics_connections_timed_out_total 4\n"),
        "{body}"
    );
}

#[test]
fn a_slow_request_is_closed_after_the_timeout() {
    let limits = Limits {
        max_connections: 4,
        timeout: Duration::from_millis(300),
    };
    let server = serve("127.0.0.1:0".parse().unwrap(), limits, Vec::new).expect("start");
    let mut slow = idle(server.local_addr());
    // Half a request head, and then nothing.
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .expect("send");
    assert_eq!(closed_by_server(slow), "");
}

#[test]
fn a_huge_request_head_is_refused() {
    let server = serve("127.0.0.1:0".parse().unwrap(), Limits::default(), Vec::new).expect("start");
    let mut stream = idle(server.local_addr());
    let junk = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n", "a".repeat(20_000));
    // The server may close before taking all of it.
    let _ = stream.write_all(junk.as_bytes());
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 431 "), "{got:?}");
}

#[test]
fn a_head_request_gets_the_length_without_the_body() {
    let server = serve("127.0.0.1:0".parse().unwrap(), Limits::default(), || {
        vec![counters(1)]
    })
    .expect("start");
    let mut stream = idle(server.local_addr());
    stream
        .write_all(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let got = closed_by_server(stream);
    let (head, body) = got.split_once("\r\n\r\n").expect("a head");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("Content-Length: "), "{head}");
    assert_eq!(body, "");
}
