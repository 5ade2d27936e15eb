//! The `udpring` command line: `serve`, `probe`, `load`. It is built with feature `cli` (on by
//! default) and uses the library's public API only; `load` uses its socket-address and
//! control-message codec (`udpring::kernel::wire`), so both ends of the wire share one
//! implementation.

mod args;
mod load;
mod metrics;

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use udpring::apps::{Discard, Echo, Sockperf};
use udpring::kernel::Features;
use udpring::ops::{self, activation, takeover, SocketOrigin};
use udpring::{Server, ServerConfig, SessionHandler, Stats};

use args::{App, Cli, Command, ServeArgs, Sessions, SteerArg};

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(&args),
        Command::Probe => probe(),
        Command::Load(args) => load::run_cli(&args)
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

/// Logs go to stderr, `RUST_LOG` filters them (default `info`). Colours only for a person at
/// a terminal: in a file or a pipe the escape codes are noise for whoever reads it later.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Writes a line for scripts on stdout: the readiness line and the final counters. A person
/// at a terminal reads the same event in the log on stderr, so it is not shown twice there.
/// A reader that went away is no reason to stop serving, so a failed write is ignored.
fn print_for_scripts(line: std::fmt::Arguments<'_>) {
    let stdout = std::io::stdout();
    if !stdout.is_terminal() {
        let _ = writeln!(stdout.lock(), "{line}");
    }
}

fn probe() -> Result<ExitCode> {
    let features = Features::probe();
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

fn serve(args: &ServeArgs) -> Result<ExitCode> {
    match args.app {
        App::Echo => run(args, args.config(), Carry::default(), |_| Echo),
        App::Discard => run(args, args.config(), Carry::default(), |_| Discard),
        App::Sockperf => run(args, args.config(), Carry::default(), |_| Sockperf),
        App::Quic => serve_quic(args),
    }
}

/// Takes what the process taken over from handed over (`None`: it speaks takeover version 1).
type StateImport = Box<dyn FnOnce(Option<Vec<u8>>)>;

/// What a server hands the process that takes it over besides its sockets (`--takeover`).
#[derive(Default)]
struct Carry {
    /// Made in this process when the next one takes over.
    export: Option<takeover::StateExport>,
    /// Called in this process, before its workers start, with what the process taken over
    /// from handed over (`None`: it speaks takeover version 1 and had nothing to give).
    import: Option<StateImport>,
    /// Called before the workers start with the generation a takeover gave this process.
    generation: Option<Box<dyn FnOnce(u8)>>,
    /// After a takeover that left this process its connections: stops accepting new ones.
    drain: Option<Box<dyn Fn()>>,
    /// Whether no connection is left to drain.
    drained: Option<Box<dyn Fn() -> bool>>,
}

/// `--app quic`: the TLS identity (given, or made and written out), the QUIC service, the
/// engine options it needs; its counters are logged at exit. Its TLS sessions pass to the
/// next process with `--takeover`, so resumed clients keep resuming (with 0-RTT).
fn serve_quic(args: &ServeArgs) -> Result<ExitCode> {
    use udpring::quic::{Identity, Quic, QuicConfig};
    let mut config = args.config();
    // Refused options first: no certificate is made for a server that cannot start.
    Quic::check_engine(&config)?;
    let load_balancer = match &args.quic_server_id {
        Some(id) => Some(
            udpring::quic::cid::LbConfig::new(args.quic_lb_config_id, id.0.clone())
                .map_err(anyhow::Error::msg)?,
        ),
        None => None,
    };
    let stateless_reset_key = match &args.stateless_reset_key {
        Some(path) => Some(read_reset_key(path)?),
        None => None,
    };
    let identity = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => Identity::from_pem_files(cert, key)?,
        _ => {
            let mut names = vec!["localhost".to_string()];
            if !config.bind.ip().is_unspecified() {
                names.push(config.bind.ip().to_string());
            } else {
                names.extend(["127.0.0.1".to_string(), "::1".to_string()]);
            }
            let made = Identity::self_signed(&names)?;
            let dir = std::env::temp_dir().join(format!("udpring-quic-{}", std::process::id()));
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let cert = dir.join("cert.pem");
            std::fs::write(&cert, &made.cert_pem)
                .with_context(|| format!("cannot write {}", cert.display()))?;
            tracing::info!(path = %cert.display(), names = ?names, "self-signed certificate written");
            print_for_scripts(format_args!("udpring certificate {}", cert.display()));
            made.identity
        }
    };
    tracing::info!(sha256 = %identity.fingerprint(), "QUIC certificate");
    let quic = Quic::new(QuicConfig {
        root: args.root.clone(),
        validate_peers: args.validate_peers,
        idle_timeout: args.idle_timeout.0,
        retry_above_handshakes: args.quic_retry_above,
        max_handshakes: args.quic_max_handshakes,
        early_data: !args.no_0rtt,
        session_cache: args.session_cache,
        session_lifetime: args.session_lifetime.0,
        load_balancer,
        stateless_reset_key,
        ..QuicConfig::new(identity)
    })?;
    quic.configure(&mut config)?;
    let stats = quic.stats_source();
    let carry = {
        let (cache_out, cache_in) = (quic.sessions().clone(), quic.sessions().clone());
        Carry {
            export: Some(Box::new(move || {
                cache_out.export(udpring::quic::MAX_SESSION_EXPORT)
            })),
            // Key material is never logged: counts and the reason only.
            import: Some(Box::new(move |state: Option<Vec<u8>>| match state {
                // The takeover logged that the old process speaks version 1.
                None => {}
                Some(bytes) => match cache_in.import(&bytes) {
                    Ok(sessions) => tracing::info!(
                        sessions,
                        "TLS sessions taken over: their clients resume here"
                    ),
                    Err(e) => tracing::warn!(
                        error = %e,
                        "TLS sessions of the process taken over from not used; starting with none"
                    ),
                },
            })),
            ..Carry::default()
        }
    };
    let quic = std::sync::Arc::new(quic);
    let carry = Carry {
        generation: Some(Box::new({
            let quic = quic.clone();
            move |g| quic.set_generation(g)
        })),
        drain: Some(Box::new(quic.drainer())),
        drained: Some(Box::new({
            let stats = quic.stats_source();
            move || stats().open() == 0
        })),
        ..carry
    };
    let code = run(args, config, carry, move |worker| quic.handler(worker))?;
    tracing::info!("quic final {}", stats().summary());
    print_for_scripts(format_args!("udpring quic {}", stats().summary()));
    Ok(code)
}

/// `--stateless-reset-key FILE`: its bytes, 32 to 4096 of them. A key file others may read
/// is used, with a warning: whoever reads it can reset this fleet's connections.
fn read_reset_key(path: &std::path::Path) -> Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let file = std::fs::File::open(path)
        .with_context(|| format!("--stateless-reset-key {}: cannot open", path.display()))?;
    let mode = file.metadata().map(|m| m.permissions().mode()).unwrap_or(0);
    if mode & 0o004 != 0 {
        tracing::warn!(
            path = %path.display(),
            "the stateless reset key file is readable by every user: chmod o-r"
        );
    }
    let mut key = Vec::new();
    file.take(4097)
        .read_to_end(&mut key)
        .with_context(|| format!("--stateless-reset-key {}: cannot read", path.display()))?;
    if key.len() < udpring::quic::MIN_RESET_KEY || key.len() > 4096 {
        anyhow::bail!(
            "--stateless-reset-key {}: {} bytes; a key has {} to 4096 (e.g. head -c 32 /dev/urandom > FILE)",
            path.display(),
            if key.len() > 4096 { "over 4096".to_string() } else { key.len().to_string() },
            udpring::quic::MIN_RESET_KEY
        );
    }
    Ok(key)
}

/// The name an option value has on the command line (`port-per-client`, not `PortPerClient`).
fn cli_name(value: &impl ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

fn run<H, F>(args: &ServeArgs, config: ServerConfig, carry: Carry, factory: F) -> Result<ExitCode>
where
    H: SessionHandler,
    F: Fn(usize) -> H + Send + Sync + 'static,
{
    let (sessions, steer) = (
        Sessions::from(config.sessions),
        SteerArg::from(config.steer),
    );
    // Block the shutdown signals before any worker exists so they inherit the mask and only
    // this thread sees SIGINT/SIGTERM.
    ops::block_shutdown_signals().context("cannot block signals")?;
    let Carry {
        export,
        import,
        generation,
        drain,
        drained,
    } = carry;
    let (server, origin) = start(args, config, import, generation, factory)?;
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
        sockets = %origin,
        app = %cli_name(&args.app),
        sessions = %cli_name(&sessions),
        steer = %cli_name(&steer),
        ring = %server.task_run_mode().describe(),
        rcvbuf = server.recv_buffer(),
        kernel = %server.features().kernel_release,
        features = features.join(", "),
        "listening"
    );
    // The next restart takes over from this process (`--takeover`).
    let offer = match server.offer_takeover_with(export) {
        Ok(offer) => Some(offer),
        Err(e) => {
            tracing::warn!(error = %e, "cannot offer takeover; a restart with --takeover will not find this process");
            None
        }
    };
    // Off the datagram path: a scrape reads the counters the workers publish each loop turn.
    let mut metrics = match args.metrics {
        None => None,
        // The process taken over from lets go of the port once it was told to go; the
        // sockets are served already, so a late or missing endpoint must not stop that.
        Some(addr) if matches!(origin, Origin::TakenOver(_)) => {
            metrics_when_free(addr, args.metrics_limits(), &server)
        }
        Some(addr) => Some(
            metrics::serve(addr, args.metrics_limits(), server.counter_source())
                .context("cannot serve metrics")?,
        ),
    };
    if let Some(m) = &metrics {
        tracing::info!("metrics on http://{}/metrics", m.local_addr());
    }
    print_for_scripts(format_args!("udpring listening on {}", server.local_addr()));

    let started = Instant::now();
    let handed_over = || offer.as_ref().is_some_and(|o| o.taken_over());
    let signal = match wait_logging_stats(&server, args.stats_interval(), &handed_over)? {
        Some(signal) => Some(signal),
        None => {
            // The next process serves the metrics port from now on.
            if let Some(m) = metrics.take() {
                m.shutdown();
            }
            if offer.as_ref().is_some_and(|o| o.drains()) {
                // New connections go to the new process; this one's stay here until they
                // close, or until the drain timeout closes them.
                if let Some(drain) = &drain {
                    drain();
                }
                let deadline = Instant::now() + args.drain_timeout.0;
                let left = || drained.as_ref().map_or(true, |d| d());
                let signal = wait_logging_stats(&server, args.stats_interval(), &|| {
                    left() || Instant::now() >= deadline
                })?;
                if signal.is_none() && !left() {
                    tracing::warn!(
                        timeout = ?args.drain_timeout.0,
                        "drain timeout: closing the connections still open"
                    );
                }
                signal
            } else {
                wait_logging_stats(&server, args.stats_interval(), &|| server.is_finished())?
            }
        }
    };
    match signal {
        Some(signal) => tracing::info!(signal, "shutting down"),
        None if offer.as_ref().is_some_and(|o| o.drains()) => {
            tracing::info!("taken over: every connection of this process has closed")
        }
        None => tracing::info!("taken over: every worker has finished"),
    }
    drop(offer);
    // Scrapes stop before the workers do, so none reads counters of a server half gone.
    if let Some(m) = metrics {
        m.shutdown();
    }
    let finals = server.shutdown()?;
    let mut total = Stats::default();
    for (i, c) in finals.iter().enumerate() {
        tracing::debug!(worker = i, "final {}", c.summary());
        total.add(c);
    }
    let per_worker_rx: Vec<u64> = finals.iter().map(|c| c.rx_datagrams).collect();
    tracing::info!(
        uptime_s = started.elapsed().as_secs_f64(),
        per_worker_rx = ?per_worker_rx,
        "final total {}",
        total.summary()
    );
    print_for_scripts(format_args!("udpring final {}", total.summary()));
    Ok(ExitCode::SUCCESS)
}

/// Where the listening sockets came from, for the `listening` lines.
enum Origin {
    Bound,
    SocketActivated(Vec<String>),
    TakenOver(u32),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Bound => write!(f, "bound"),
            Origin::SocketActivated(names) if names.is_empty() => write!(f, "socket-activated"),
            Origin::SocketActivated(names) => write!(f, "socket-activated: {}", names.join(",")),
            Origin::TakenOver(pid) => write!(f, "taken over from pid {pid}"),
        }
    }
}

/// Starts the server on the sockets systemd passed, on the sockets of the udpring it takes
/// over from (`--takeover`), or on sockets of its own.
fn start<H, F>(
    args: &ServeArgs,
    mut config: ServerConfig,
    import: Option<StateImport>,
    on_generation: Option<Box<dyn FnOnce(u8)>>,
    factory: F,
) -> Result<(Server, Origin)>
where
    H: SessionHandler,
    F: Fn(usize) -> H + Send + Sync + 'static,
{
    if let Some(passed) = activation::listen_fds().context("socket activation")? {
        let activation::ListenFds { fds, names } = passed;
        // The passed sockets define the address; --bind and --workers do not apply.
        let first = socket2::SockRef::from(&fds[0])
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .context("the first passed socket is not a bound IPv4/IPv6 socket")?;
        config.bind = first;
        let server =
            Server::start_with_sockets(config, fds, SocketOrigin::ServiceManager, factory)?;
        return Ok((server, Origin::SocketActivated(names)));
    }
    if args.takeover {
        match takeover::request(config.bind)
            .with_context(|| format!("cannot take over from the udpring serving {}", config.bind))?
        {
            Some(mut handover) => {
                let pid = handover.pid();
                if let Some(generation) = handover.generation() {
                    // The old process keeps its sockets and connections; this one joins the
                    // group with sockets of its own and takes the new connections.
                    if let Some(import) = import {
                        import(handover.take_state());
                    }
                    if let Some(set) = on_generation {
                        set(generation);
                    }
                    config.generation = generation;
                    config.routing_map = handover.routing_map();
                    let server = Server::start(config, factory)?;
                    tracing::info!(
                        pid,
                        generation,
                        "took over new connections; the old process drains its own"
                    );
                    if let Err(e) = handover.complete() {
                        tracing::warn!(pid, error = %e, "the process taken over from did not confirm; serving anyway");
                    }
                    return Ok((server, Origin::TakenOver(pid)));
                }
                let sockets = handover.take_sockets();
                if let Some(import) = import {
                    import(handover.take_state());
                }
                // On an error here the handover is dropped without `go`: the old process
                // keeps serving.
                let server =
                    Server::start_with_sockets(config, sockets, SocketOrigin::HandedOver, factory)?;
                // The sockets are this process's now whatever the old one answers: a process
                // that exited in the meantime cannot confirm, and that is no reason to stop.
                if let Err(e) = handover.complete() {
                    tracing::warn!(pid, error = %e, "the process taken over from did not confirm; serving anyway");
                }
                return Ok((server, Origin::TakenOver(pid)));
            }
            None => tracing::info!(
                addr = %config.bind,
                "--takeover: no udpring offers this address; starting on sockets of its own"
            ),
        }
    }
    Ok((Server::start(config, factory)?, Origin::Bound))
}

/// Serves metrics on `addr` as soon as the process taken over from has closed it (it does
/// within 100 ms of being told to go); after 2 s, serves on without them, with a warning.
fn metrics_when_free(
    addr: std::net::SocketAddr,
    limits: metrics::Limits,
    server: &Server,
) -> Option<metrics::MetricsServer> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match metrics::serve(addr, limits, server.counter_source()) {
            Ok(m) => return Some(m),
            Err(e) if Instant::now() >= deadline => {
                tracing::warn!(%addr, error = %e, "cannot serve metrics; serving without them");
                return None;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// How often the wait looks at its condition (handed over; every worker finished). The look
/// is cheap; the sooner the old process exits, the sooner a deploy script may go on.
const FINISHED_POLL: Duration = Duration::from_millis(100);

/// Waits for SIGINT/SIGTERM (`Some(signal)`) or until `until()` holds (`None`; it is looked
/// at every 100 ms), logging a counter summary every `interval` (never when `None`). A
/// summary is skipped when nothing was counted since the previous tick: an idle server logs
/// nothing, while a line that shows sessions closing on idle (no datagrams, but counters
/// moved) is kept.
fn wait_logging_stats(
    server: &Server,
    interval: Option<Duration>,
    until: &dyn Fn() -> bool,
) -> Result<Option<i32>> {
    let mut last = Stats::default();
    let mut last_at = Instant::now();
    loop {
        let next_stats = interval.map(|i| last_at + i);
        loop {
            if until() {
                return Ok(None);
            }
            let wait = next_stats.map_or(FINISHED_POLL, |at| {
                at.saturating_duration_since(Instant::now())
                    .min(FINISHED_POLL)
            });
            if let Some(sig) = ops::wait_shutdown_signal(wait)? {
                return Ok(Some(sig));
            }
            if next_stats.is_some_and(|at| Instant::now() >= at) {
                break;
            }
        }
        let now = Instant::now();
        let per_worker = server.worker_counters();
        let mut total = Stats::default();
        for c in &per_worker {
            total.add(c);
        }
        let secs = now.duration_since(last_at).as_secs_f64().max(1e-9);
        last_at = now;
        if total == last {
            continue;
        }
        let per_worker_rx: Vec<u64> = per_worker.iter().map(|c| c.rx_datagrams).collect();
        tracing::info!(
            rx_per_s = ((total.rx_datagrams - last.rx_datagrams) as f64 / secs) as u64,
            tx_per_s = ((total.tx_datagrams - last.tx_datagrams) as f64 / secs) as u64,
            per_worker_rx = ?per_worker_rx,
            "stats {}",
            total.summary()
        );
        last = total;
    }
}
