//! A deferred reply: the handler hands each request to a thread of its own (a database
//! lookup, a call to another service) and returns at once; that thread answers later through
//! a [`SessionHandle`], which is `Send` and cloneable. The worker is woken through its ring
//! and sends from the session's socket; the worker thread never waits for the slow work.
//!
//! It starts a server on a free loopback port, sends itself requests from two
//! `std::net::UdpSocket` clients, checks every answer, and exits 0 (`tests/it/examples.rs`
//! runs it too).
//!
//! cargo run --example deferred

use std::collections::HashSet;
use std::net::UdpSocket;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use udpring::session::DeferredError;
use udpring::{
    Datagram, Reply, Server, ServerConfig, SessionHandle, SessionHandler, SessionInfo, SessionMode,
    Stats,
};

/// A request on its way to the slow thread, with the handle to answer it through.
struct Job {
    handle: SessionHandle,
    request: Vec<u8>,
}

/// One per worker: it only queues jobs.
struct Frontend {
    jobs: mpsc::Sender<Job>,
}

impl SessionHandler for Frontend {
    type State = ();

    fn session_open(&mut self, _info: &SessionInfo) {}

    fn session_datagram(&mut self, _: &mut (), d: &Datagram<'_>, reply: &mut Reply<'_>) {
        // `None` only with `SessionMode::None`, which this server does not use.
        let Some(handle) = reply.session_handle() else {
            return;
        };
        let job = Job {
            handle,
            request: d.payload.to_vec(),
        };
        if self.jobs.send(job).is_err() {
            // The slow thread is gone: nothing will answer; count it so it is seen.
            reply.count_bad_input();
        }
    }
}

/// The slow side: answers each request with its bytes reversed, some time later.
fn backend(jobs: mpsc::Receiver<Job>) {
    for job in jobs {
        std::thread::sleep(Duration::from_millis(5)); // the slow work
        let mut answer = job.request;
        answer.reverse();
        match job.handle.send(&answer) {
            Ok(()) => {}
            // The peer's session ended (idle timeout): nobody to answer any more.
            Err(DeferredError::SessionClosed) => {}
            // The server is stopping (or a reason a later version adds).
            Err(e) => eprintln!("answer dropped: {e}"),
        }
    }
}

fn fail(what: String) -> std::io::Error {
    std::io::Error::other(what)
}

pub fn main() -> std::io::Result<()> {
    let (jobs, queue) = mpsc::channel();
    let slow = std::thread::spawn(move || backend(queue));
    let config = ServerConfig {
        bind: "127.0.0.1:0".parse().expect("literal address"),
        workers: 2,
        sessions: SessionMode::Shared,
        ..ServerConfig::default()
    };
    let server = Server::start(config, move |_worker| Frontend { jobs: jobs.clone() })?;
    let addr = server.local_addr();
    println!("serving deferred replies on {addr}");

    let clients: Vec<UdpSocket> = (0..2)
        .map(|_| {
            let c = UdpSocket::bind("127.0.0.1:0")?;
            c.set_read_timeout(Some(Duration::from_millis(200)))?;
            Ok(c)
        })
        .collect::<std::io::Result<_>>()?;
    // Every request is sent before any answer is read: the worker keeps taking datagrams
    // while the backend works.
    let mut waiting = HashSet::new();
    for i in 0..10 {
        let client = i % clients.len();
        let request = format!("request {i:02}");
        clients[client].send_to(request.as_bytes(), addr)?;
        waiting.insert((client, request.chars().rev().collect::<String>()));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 256];
    while !waiting.is_empty() {
        if Instant::now() > deadline {
            return Err(fail(format!("no answer for {waiting:?}")));
        }
        for (i, client) in clients.iter().enumerate() {
            let Ok((n, from)) = client.recv_from(&mut buf) else {
                continue; // nothing yet on this socket
            };
            let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
            if from != addr || !waiting.remove(&(i, answer.clone())) {
                return Err(fail(format!("unexpected {answer:?} from {from}")));
            }
            println!("client {i}: {answer}");
        }
    }

    let mut total = Stats::default();
    for worker in server.shutdown()? {
        total.add(&worker);
    }
    // The server has dropped its handlers, and with them the last senders: the backend ends.
    slow.join().expect("the backend does not panic");
    println!("{}", total.summary());
    if total.deferred_sent != 10 {
        return Err(fail(format!(
            "expected 10 deferred replies: {}",
            total.summary()
        )));
    }
    Ok(())
}
