//! The `udpring` command line: `serve`, `probe`, `load`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use udpring::{
    App, Discard, Echo, Server, ServerConfig, SessionHandler, SessionMode, Sockperf, Stats,
};

#[derive(Parser, Debug)]
#[command(
    name = "udpring",
    version,
    about = "High-throughput UDP server on io_uring",
    long_about = "udpring serves UDP on Linux with io_uring: one worker thread per CPU, each with \
its own SO_REUSEPORT socket and ring, multishot receive into provided buffers and batched replies.\n\n\
Examples:\n  udpring serve                          echo on 127.0.0.1:9000, one worker per CPU\n  \
udpring serve --bind [::]:7 --app echo  dual-stack echo on every address\n  \
udpring serve --app sockperf --workers 1  answer `sockperf ping-pong`\n  \
udpring probe                          which io_uring features this kernel has\n\n\
Logging: RUST_LOG=debug (default info)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve UDP until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Print the kernel version and each io_uring feature udpring uses, yes or no.
    Probe,
    /// UDP request/response load generator (closed loop, or open loop with --rate).
    Load(udpring::load::LoadArgs),
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Address to serve on. `0.0.0.0` or `[::]` (dual-stack) serve every address, and replies
    /// leave from the address each request was sent to. Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:9000")]
    bind: SocketAddr,
    /// Worker threads, each with its own socket and io_uring [default: one per CPU].
    #[arg(long)]
    workers: Option<usize>,
    /// What to answer with: echo (RFC 862), discard (RFC 863), or sockperf.
    #[arg(long, value_enum, default_value_t = App::Echo)]
    app: App,
    /// Pin worker i to the i-th CPU this process may use.
    #[arg(long)]
    pin_cpus: bool,
    /// Largest datagram received whole, in bytes; larger ones are counted as truncated and
    /// dropped. The default takes every legal UDP/IPv4 payload.
    #[arg(long, default_value_t = 65_507)]
    max_datagram: usize,
    /// Provided receive buffers per worker (power of two, at most 32768). Each holds one
    /// datagram; untouched pages cost no memory.
    #[arg(long, default_value_t = 1024)]
    buffers: u16,
    /// Reply slots per worker: replies in flight before the worker stops taking datagrams.
    #[arg(long, default_value_t = 1024)]
    send_slots: usize,
    /// Socket receive buffer (SO_RCVBUF) to ask for, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    recv_buffer: usize,
    /// Socket send buffer (SO_SNDBUF) to ask for, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    send_buffer: usize,
    /// Send each reply on its own instead of joining consecutive replies to the same peer
    /// into UDP GSO trains.
    #[arg(long)]
    no_gso: bool,
    /// Let the kernel hold a worker asleep up to this long (e.g. 20us) to gather
    /// --batch-size completions per wake-up: fewer wake-ups and less CPU per datagram under
    /// load, at the cost of that much added latency. 0 (default) wakes on every completion.
    #[arg(long, default_value = "0", value_parser = udpring::parse_duration)]
    batch_wait: Duration,
    /// After a busy loop turn, poll the ring without sleeping for up to this long (e.g. 50us)
    /// before blocking: senders stop paying for wake-ups and replies go out sooner, at the cost
    /// of a core kept busy after each burst. 0 (default) never polls.
    #[arg(long, default_value = "0", value_parser = udpring::parse_duration)]
    busy_poll: Duration,
    /// Completions to gather per wake-up when --batch-wait is set.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// How peers are tracked: none (stateless), shared (sessions demultiplexed on the worker's
    /// socket, no descriptor per client), connected (a socket per client bound to this address
    /// and port and connected to the peer: the seed article's Linux model), port-per-client (a
    /// socket per client on a new port the client must switch to: its IOCP model).
    #[arg(long, value_enum, default_value_t = SessionMode::None)]
    sessions: SessionMode,
    /// Close a session (and its socket) after this long without a datagram.
    #[arg(long, default_value = "30s", value_parser = udpring::parse_duration)]
    idle_timeout: Duration,
    /// Sessions in all workers together; new peers beyond it are refused and counted.
    #[arg(long, default_value_t = 100_000)]
    max_sessions: usize,
    /// Sessions per worker [default: no limit beyond --max-sessions].
    #[arg(long)]
    max_sessions_per_worker: Option<usize>,
    /// New sessions per second per worker [default: no limit].
    #[arg(long)]
    max_new_sessions_per_sec: Option<u32>,
    /// Sessions per source IP address [default: no limit].
    #[arg(long)]
    max_sessions_per_source: Option<u32>,
    /// Connected per-client sockets on the port (--sessions connected); beyond it new peers
    /// are served on the shared socket. Each one lengthens the kernel's lookup for datagrams
    /// from unknown peers (kernel-notes/connected-sockets.md).
    #[arg(long, default_value_t = 1024)]
    max_connected: usize,
    /// Stateless address validation: a new peer is answered with a cookie (a keyed MAC of its
    /// address and time) and gets a session only when it sends a datagram carrying it, so
    /// spoofed-source floods cost no state. Needs --sessions other than none; clients must
    /// speak the cookie exchange (kernel-notes/operations.md).
    #[arg(long)]
    validate_peers: bool,
    /// How often the cookie key changes; a cookie lives at most twice this long.
    #[arg(long, default_value = "30s", value_parser = udpring::parse_duration)]
    cookie_rotation: Duration,
    /// Until a peer is validated, reply bytes are at most this many times the bytes received
    /// from it, whatever the handler asks (RFC 9000 section 8 uses 3). 0 turns it off.
    #[arg(long, default_value_t = 3)]
    amplification_factor: u32,
    /// Serve Prometheus metrics (text format 0.0.4) at http://ADDR:PORT/metrics. Bind it to
    /// loopback or a trusted interface.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,
    /// Log a counter summary this often (e.g. 10s, 500ms); 0 logs only at shutdown.
    #[arg(long, default_value = "10s", value_parser = udpring::parse_duration)]
    stats_interval: Duration,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Probe => probe(),
        Command::Load(args) => udpring::load::run_cli(&args)
            .map(|()| ExitCode::SUCCESS)
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("udpring: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn probe() -> Result<ExitCode> {
    let features = udpring::Features::probe();
    print!("{}", features.report());
    match features.check_required() {
        Ok(()) => {
            println!("udpring can run on this kernel");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("udpring cannot run: {e}");
            Ok(ExitCode::from(2))
        }
    }
}

fn serve(args: ServeArgs) -> Result<ExitCode> {
    let config = ServerConfig {
        bind: args.bind,
        workers: args
            .workers
            .unwrap_or_else(|| udpring::ServerConfig::default().workers),
        pin_cpus: args.pin_cpus,
        max_datagram: args.max_datagram,
        buffers: args.buffers,
        send_slots: args.send_slots,
        recv_buffer_bytes: args.recv_buffer,
        send_buffer_bytes: args.send_buffer,
        stats_interval: (!args.stats_interval.is_zero()).then_some(args.stats_interval),
        gso: !args.no_gso,
        batch_wait: (!args.batch_wait.is_zero()).then_some(args.batch_wait),
        batch_size: args.batch_size,
        busy_poll: (!args.busy_poll.is_zero()).then_some(args.busy_poll),
        sessions: args.sessions,
        idle_timeout: args.idle_timeout,
        max_sessions: args.max_sessions,
        max_sessions_per_worker: args.max_sessions_per_worker.unwrap_or(usize::MAX),
        max_new_sessions_per_sec: args.max_new_sessions_per_sec.unwrap_or(u32::MAX),
        max_sessions_per_source: args.max_sessions_per_source.unwrap_or(u32::MAX),
        max_connected: args.max_connected,
        validate_peers: args.validate_peers,
        cookie_rotation: args.cookie_rotation,
        amplification_factor: args.amplification_factor,
        ..ServerConfig::default()
    };
    match args.app {
        App::Echo => run(config, args.app, args.metrics, |_| Echo),
        App::Discard => run(config, args.app, args.metrics, |_| Discard),
        App::Sockperf => run(config, args.app, args.metrics, |_| Sockperf),
    }
}

fn run<H, F>(
    config: ServerConfig,
    app: App,
    metrics: Option<SocketAddr>,
    factory: F,
) -> Result<ExitCode>
where
    H: SessionHandler,
    F: Fn(usize) -> H + Send + Sync + 'static,
{
    // Block the shutdown signals before any worker exists so they inherit the mask and only
    // this thread sees SIGINT/SIGTERM.
    udpring::block_shutdown_signals().context("cannot block signals")?;
    let interval = config.stats_interval;
    let server = Server::start(config.clone(), factory)?;
    let features: Vec<&str> = server
        .features()
        .list
        .iter()
        .filter(|f| f.present)
        .map(|f| f.name)
        .collect();
    tracing::info!(
        addr = %server.local_addr(),
        workers = server.worker_count(),
        app = ?app,
        sessions = ?config.sessions,
        ring = server.task_run_mode().describe(),
        rcvbuf = server.recv_buffer(),
        kernel = %server.features().kernel_release,
        "listening"
    );
    tracing::info!("kernel features in use: {}", features.join(", "));
    // Off the datagram path: a scrape reads the counters the workers publish each loop turn.
    let metrics = metrics
        .map(|addr| udpring::metrics::serve(addr, server.counter_source()))
        .transpose()
        .context("cannot serve metrics")?;
    if let Some(m) = &metrics {
        tracing::info!("metrics on http://{}/metrics", m.local_addr());
    }
    // Printed on stdout too, for scripts waiting for readiness.
    println!("udpring listening on {}", server.local_addr());
    let started = Instant::now();
    let mut last = Stats::default();
    let mut last_at = Instant::now();
    let tick = interval.unwrap_or(Duration::from_secs(3600));
    let signal = loop {
        if let Some(sig) = udpring::wait_shutdown_signal(tick)? {
            break sig;
        }
        if interval.is_none() {
            continue;
        }
        let now = Instant::now();
        let total = server.total_counters();
        let secs = now.duration_since(last_at).as_secs_f64().max(1e-9);
        let per_worker: Vec<u64> = server
            .worker_counters()
            .iter()
            .map(|c| c.rx_datagrams)
            .collect();
        tracing::info!(
            rx_per_s = ((total.rx_datagrams - last.rx_datagrams) as f64 / secs) as u64,
            tx_per_s = ((total.tx_datagrams - last.tx_datagrams) as f64 / secs) as u64,
            per_worker_rx = ?per_worker,
            "stats {}",
            total.summary()
        );
        last = total;
        last_at = now;
    };
    tracing::info!(signal, "shutting down");
    drop(metrics);
    let finals = server.shutdown()?;
    let mut total = Stats::default();
    for (i, c) in finals.iter().enumerate() {
        tracing::info!(worker = i, "final {}", c.summary());
        total.add(c);
    }
    tracing::info!(
        uptime_s = started.elapsed().as_secs_f64(),
        "final total {}",
        total.summary()
    );
    println!("udpring final {}", total.summary());
    Ok(ExitCode::SUCCESS)
}
