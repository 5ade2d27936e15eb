//! Starts one worker per CPU, each on its own thread with its own socket and ring, and stops
//! them: request, flush, drain, join.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::config::{ServerConfig, SessionMode, Steer};
use crate::directory::Directory;
use crate::features::Features;
use crate::handler::SessionHandler;
use crate::ring::TaskRunMode;
use crate::shared::{ServerShared, WorkerShared};
use crate::socket::{bind_worker_socket, BoundSocket};
use crate::stats::Stats;
use crate::sys;
use crate::worker::Worker;

struct WorkerHandle {
    shared: Arc<WorkerShared>,
    thread: Option<JoinHandle<io::Result<Stats>>>,
}

/// Where the sockets given to [`Server::start_with_sockets`] come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketOrigin {
    /// A running server handed them over and still receives on them until told to go: their
    /// `UDP_GRO` setting is kept as found, since changing it would change what that server's
    /// receives return.
    HandedOver,
    /// A service manager (systemd) created them for this process alone: they are set up like
    /// sockets the server binds itself.
    ServiceManager,
}

/// A running server.
pub struct Server {
    workers: Vec<WorkerHandle>,
    /// Duplicates of the workers' listening sockets, to read kernel drop counts.
    listeners: Arc<Vec<socket2::Socket>>,
    local_addr: SocketAddr,
    features: Features,
    task_run: TaskRunMode,
    recv_buffer: usize,
    /// The generation routing this server attached (`ServerConfig::generation_routing`),
    /// `None` where classic BPF routes.
    routing: Option<Arc<crate::reuseport::Routing>>,
    /// The AF_XDP path (`ServerConfig::xdp`): its program stays attached while this lives.
    /// Its workers are in `workers`, after the ring workers.
    xdp: Option<XdpInfo>,
}

/// What the AF_XDP path got from the kernel.
struct XdpInfo {
    _attached: crate::xdp::program::Attached,
    mode: crate::xdp::CopyMode,
    native: bool,
    queues: u32,
}

/// What a worker reports once its ring is built, before it serves.
struct Ready {
    task_run: TaskRunMode,
    recv_buffer: usize,
}

impl Server {
    /// Probes the kernel, binds every worker's socket, builds every ring and starts serving.
    /// `factory(i)` makes worker `i`'s handler on that worker's thread. Every set-up error
    /// (address in use, io_uring blocked, kernel too old) is returned before anything serves.
    ///
    /// With `config.exclusive` (the default) an address another socket already serves is
    /// refused with [`io::ErrorKind::AddrInUse`] and a line naming the owner (`guard`).
    pub fn start<H, F>(config: ServerConfig, factory: F) -> io::Result<Server>
    where
        H: SessionHandler,
        F: Fn(usize) -> H + Send + Sync + 'static,
    {
        let (config, features) = prepare(config)?;
        // Joining the group of the process taken over from is the point of a routing map.
        if config.exclusive && config.routing_map.is_none() {
            crate::guard::check_unserved(config.bind)?;
        }
        // Bind in this thread so errors surface here, and so port 0 is resolved by the first
        // socket and shared by the rest.
        let first = bind_worker_socket(
            config.bind,
            config.recv_buffer_bytes,
            config.send_buffer_bytes,
            config.gro,
        )?;
        let local_addr = first.local_addr;
        let mut sockets = vec![first];
        for _ in 1..config.workers {
            sockets.push(bind_worker_socket(
                local_addr,
                config.recv_buffer_bytes,
                config.send_buffer_bytes,
                config.gro,
            )?);
        }
        Server::launch(config, features, sockets, factory)
    }

    /// Starts a server on sockets bound elsewhere, one worker per socket (`config.workers`
    /// is ignored): the listeners a running server handed over ([`crate::ops::takeover`]) or
    /// those systemd passed ([`crate::ops::activation`]). Each must be a bound UDP socket on
    /// `config.bind` (port 0 there accepts any port), all on the same address, in the order
    /// they joined their SO_REUSEPORT group (what `--steer cpu` maps CPUs onto); handed-over ones
    /// must have `SO_REUSEPORT` set. Nothing new
    /// is bound and the instance guard does not apply: serving these sockets is the point.
    pub fn start_with_sockets<H, F>(
        config: ServerConfig,
        sockets: Vec<OwnedFd>,
        origin: SocketOrigin,
        factory: F,
    ) -> io::Result<Server>
    where
        H: SessionHandler,
        F: Fn(usize) -> H + Send + Sync + 'static,
    {
        if sockets.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no sockets to serve on",
            ));
        }
        let (mut config, features) = prepare(config)?;
        config.workers = sockets.len();
        let gro = match origin {
            // The process handing them over still receives on them until it is told to go.
            SocketOrigin::HandedOver => None,
            SocketOrigin::ServiceManager => Some(config.gro),
        };
        let mut bound = Vec::with_capacity(sockets.len());
        let mut expected = Some(config.bind);
        for fd in sockets {
            // A handed-over socket shares its port with the sockets of the process handing
            // it over and with this one's connected sessions: without SO_REUSEPORT neither
            // could bind beside it. (`takeover::request` refuses such a peer already; this
            // holds for sockets handed over by other means too.)
            if origin == SocketOrigin::HandedOver && !socket2::SockRef::from(&fd).reuse_port()? {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a handed-over socket does not have SO_REUSEPORT set",
                ));
            }
            let socket = crate::socket::adopt_worker_socket(
                socket2::Socket::from(fd),
                expected,
                config.recv_buffer_bytes,
                config.send_buffer_bytes,
                gro,
            )?;
            // The first one fixes the port for the rest.
            expected = Some(socket.local_addr);
            bound.push(socket);
        }
        config.bind = bound[0].local_addr;
        // Every worker's buffers must agree with the sockets: a handed-over socket keeps GRO
        // as the previous process set it.
        let gro = bound.iter().any(|s| s.gro);
        if gro != config.gro {
            tracing::info!(
                gro,
                "UDP_GRO kept as the process that handed the sockets over set it"
            );
        }
        config.gro = gro;
        Server::launch(config, features, bound, factory)
    }

    /// Starts one worker per socket.
    fn launch<H, F>(
        config: ServerConfig,
        features: Features,
        sockets: Vec<BoundSocket>,
        factory: F,
    ) -> io::Result<Server>
    where
        H: SessionHandler,
        F: Fn(usize) -> H + Send + Sync + 'static,
    {
        let local_addr = sockets[0].local_addr;
        for socket in &sockets {
            if config.ecn {
                crate::socket::enable_ecn_reports(socket)?;
            }
            if config.dont_fragment {
                crate::socket::set_dont_fragment(socket)?;
            }
        }
        let listeners = Arc::new(
            sockets
                .iter()
                .map(|s| s.socket.try_clone())
                .collect::<io::Result<Vec<_>>>()?,
        );
        if config.sessions == SessionMode::Connected {
            match features.kernel_version {
                Some(v) if v >= (6, 13) => {}
                _ => tracing::warn!(
                    kernel = %features.kernel_release,
                    "--sessions connected on a kernel without the UDP 4-tuple hash (Linux 6.13+): every datagram walks all connected sockets on the port; keep --max-connected low or use --sessions shared"
                ),
            }
        }
        let shared_parts: Vec<Arc<WorkerShared>> = (0..sockets.len())
            .map(|_| WorkerShared::new().map(Arc::new))
            .collect::<io::Result<_>>()?;
        let server_shared = Arc::new(ServerShared {
            workers: shared_parts.clone(),
            directory: (config.sessions == SessionMode::Connected && sockets.len() > 1)
                .then(Directory::default),
            sessions_total: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            connected_total: std::sync::atomic::AtomicUsize::new(0),
            cookies: if config.validate_peers {
                let secs = config.cookie_rotation.as_secs().min(u64::from(u32::MAX)) as u32;
                Some(crate::cookie::CookieJar::new(
                    sys::random_key()?,
                    secs,
                    secs.saturating_mul(2),
                ))
            } else {
                None
            },
            used_cookies: Default::default(),
            started: std::time::Instant::now(),
        });
        let cpus = if config.pin_cpus {
            Some(sys::allowed_cpus()?)
        } else {
            None
        };
        // One reuseport program for the group, made of stages in priority order: QUIC
        // connection IDs first (a packet of a known connection reaches the worker holding
        // it), then the CPU (what the first stage does not recognise); anything else falls
        // back to the kernel's hash.
        let routing = if config.cid_routing && config.generation_routing {
            generation_routing(&config, &sockets, cpus.as_deref())?
        } else {
            None
        };
        let mut program = crate::steer::ProgramBuilder::default();
        let mut staged = false;
        if config.cid_routing && routing.is_none() {
            program = program.raw_stage(&crate::quic::route::cid_stage_filters(
                sockets.len(),
                usize::from(config.cid_worker_offset),
            ))?;
            staged = true;
        }
        if config.steer == Steer::Cpu {
            // Validated: steering implies pinning.
            let allowed = cpus.as_deref().unwrap_or_default();
            if allowed.len() != sockets.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "--steer cpu needs one worker per allowed CPU: {} CPUs ({allowed:?}), {} workers",
                        allowed.len(),
                        sockets.len()
                    ),
                ));
            }
            program = program.cpu_stage(&crate::steer::by_cpu(allowed))?;
            staged = true;
        }
        if routing.is_some() {
            // Attached once every worker is ready (below).
        } else if staged {
            crate::steer::attach(&sockets[0].socket, &program.finish())?;
        } else {
            // Adopted sockets may come with the previous owner's program.
            crate::steer::detach(&sockets[0].socket)?;
        }
        let config = Arc::new(config);
        let factory = Arc::new(factory);
        let mut workers = Vec::with_capacity(sockets.len());
        let mut ready = Vec::with_capacity(sockets.len());
        for (id, socket) in sockets.into_iter().enumerate() {
            let shared = shared_parts[id].clone();
            let (tx, rx) = mpsc::channel::<io::Result<Ready>>();
            let cpu = cpus.as_ref().map(|c| c[id % c.len()]);
            let thread = {
                let shared = shared.clone();
                let config = config.clone();
                let factory = factory.clone();
                let server_shared = server_shared.clone();
                std::thread::Builder::new()
                    .name(format!("udpring-w{id}"))
                    .spawn(move || {
                        if let Some(cpu) = cpu {
                            if let Err(e) = sys::pin_current_thread(cpu) {
                                tracing::warn!(worker = id, cpu, error = %e, "cannot pin worker");
                            }
                        }
                        let handler = factory(id);
                        let worker = match Worker::new(
                            id,
                            socket,
                            &config,
                            handler,
                            shared,
                            server_shared,
                        ) {
                            Ok(w) => w,
                            Err(e) => {
                                let msg = e.to_string();
                                let _ = tx.send(Err(e));
                                return Err(io::Error::other(msg));
                            }
                        };
                        let _ = tx.send(Ok(Ready {
                            task_run: worker.task_run_mode(),
                            recv_buffer: worker.recv_buffer(),
                        }));
                        worker.run()
                    })?
            };
            workers.push(WorkerHandle {
                shared,
                thread: Some(thread),
            });
            ready.push(rx);
        }
        let mut server = Server {
            workers,
            listeners,
            local_addr,
            features,
            task_run: TaskRunMode::Plain,
            recv_buffer: 0,
            routing: None,
            xdp: None,
        };
        for rx in ready {
            let status = rx
                .recv()
                .unwrap_or_else(|_| Err(io::Error::other("worker exited during set-up")));
            match status {
                Ok(r) => {
                    server.task_run = r.task_run;
                    server.recv_buffer = r.recv_buffer;
                }
                Err(e) => {
                    let _ = server.stop();
                    return Err(e);
                }
            }
        }
        if let Some(routing) = routing {
            // From here on new connections come to these workers.
            if let Err(e) = routing.attach(&server.listeners[0]) {
                let _ = server.stop();
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "cannot attach the reuseport eBPF program (SO_ATTACH_REUSEPORT_EBPF): {e}"
                    ),
                ));
            }
            server.routing = Some(Arc::new(routing));
        }
        if let Some(xdp) = &config.xdp {
            let group = crate::xdp::launch(
                xdp,
                local_addr,
                config.max_datagram,
                server.workers.len(),
                factory,
            );
            match group {
                Ok(Some(group)) => {
                    server.xdp = Some(XdpInfo {
                        native: group.attached.native,
                        _attached: group.attached,
                        mode: group.mode,
                        queues: group.iface.rx_queues,
                    });
                    for (shared, thread) in group.workers {
                        server.workers.push(WorkerHandle {
                            shared,
                            thread: Some(thread),
                        });
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    let _ = server.stop();
                    return Err(e);
                }
            }
        }
        Ok(server)
    }

    /// The AF_XDP path, when `ServerConfig::xdp` asked for one and the kernel gave it:
    /// (queues served, native XDP rather than generic, zero-copy rather than copy mode).
    /// Its workers' counters follow the ring workers' in [`Server::worker_counters`].
    pub fn xdp_path(&self) -> Option<(u32, bool, bool)> {
        self.xdp
            .as_ref()
            .map(|x| (x.queues, x.native, x.mode == crate::xdp::CopyMode::ZeroCopy))
    }

    /// The generation routing attached, if any (for the takeover offer).
    pub(crate) fn routing(&self) -> Option<Arc<crate::reuseport::Routing>> {
        self.routing.clone()
    }

    /// The address the workers are bound to (with the real port when 0 was asked).
    /// The address the workers serve (with the port the kernel chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// What the kernel probe found at start.
    pub fn features(&self) -> &Features {
        &self.features
    }

    /// The ring set-up the workers got.
    pub fn task_run_mode(&self) -> TaskRunMode {
        self.task_run
    }

    /// SO_RCVBUF as the kernel reports it.
    pub fn recv_buffer(&self) -> usize {
        self.recv_buffer
    }

    /// Worker threads serving (one socket and ring each).
    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Each worker's counters as last published (at most one loop turn old).
    pub fn worker_counters(&self) -> Vec<Stats> {
        collect(
            &self
                .workers
                .iter()
                .map(|w| w.shared.clone())
                .collect::<Vec<_>>(),
            &self.listeners,
        )
    }

    /// Reads each worker's published counters like [`Server::worker_counters`], without
    /// borrowing the server, so a thread of its own (the metrics endpoint) can hold it.
    pub fn counter_source(&self) -> impl Fn() -> Vec<Stats> + Send + Sync + 'static {
        let shared: Vec<Arc<WorkerShared>> =
            self.workers.iter().map(|w| w.shared.clone()).collect();
        let listeners = self.listeners.clone();
        move || collect(&shared, &listeners)
    }

    /// The sum over workers.
    pub fn total_counters(&self) -> Stats {
        let mut total = Stats::default();
        for c in self.worker_counters() {
            total.add(&c);
        }
        total
    }

    /// Stops receiving on the listening sockets for good, keeping what else there is to
    /// serve (after a takeover, the new process receives on them). Each worker stops its
    /// listener's receive and never arms it again, answers what it already received, keeps
    /// the sessions that have sockets of their own (`connected`, `port-per-client`) until
    /// they close, closes the others at once (they could never hear from their peer again),
    /// and ends when it has nothing left. [`Server::is_finished`] tells when all have ended;
    /// [`Server::shutdown`] then returns their counters.
    pub fn release_listeners(&self) {
        for w in &self.workers {
            if let Err(e) = w.shared.request_release() {
                tracing::error!(error = %e, "cannot wake a worker to release its listener");
            }
        }
    }

    /// Whether every worker has ended (after [`Server::release_listeners`], or an error).
    pub fn is_finished(&self) -> bool {
        self.workers
            .iter()
            .all(|w| w.thread.as_ref().map_or(true, |t| t.is_finished()))
    }

    /// The listening sockets, one per worker in worker order (for handing them over).
    pub(crate) fn listeners(&self) -> Arc<Vec<socket2::Socket>> {
        self.listeners.clone()
    }

    /// What another thread needs to release the listeners ([`Server::release_listeners`]).
    pub(crate) fn releaser(&self) -> impl Fn() + Send + 'static {
        let shared: Vec<Arc<WorkerShared>> =
            self.workers.iter().map(|w| w.shared.clone()).collect();
        move || {
            for w in &shared {
                if let Err(e) = w.request_release() {
                    tracing::error!(error = %e, "cannot wake a worker to release its listener");
                }
            }
        }
    }

    /// Stops every worker (stop receiving, flush replies, cancel, drain) and joins them.
    /// Returns each worker's final counters, or the first worker error.
    pub fn shutdown(mut self) -> io::Result<Vec<Stats>> {
        self.stop()
    }

    fn stop(&mut self) -> io::Result<Vec<Stats>> {
        for w in &self.workers {
            if let Err(e) = w.shared.request_shutdown() {
                tracing::error!(error = %e, "cannot wake a worker for shutdown");
            }
        }
        let mut finals = Vec::with_capacity(self.workers.len());
        let mut first_error = None;
        for w in &mut self.workers {
            let Some(thread) = w.thread.take() else {
                continue;
            };
            match thread.join() {
                Ok(Ok(mut c)) => {
                    if let Some(socket) = self.listeners.get(finals.len()) {
                        c.kernel_drops = crate::socket::kernel_drops(socket).unwrap_or(0);
                    }
                    finals.push(c)
                }
                Ok(Err(e)) => {
                    finals.push(w.shared.counters.snapshot());
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    finals.push(w.shared.counters.snapshot());
                    first_error.get_or_insert(io::Error::other("a worker thread panicked"));
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(finals),
        }
    }
}

/// The generation routing for `sockets` (not attached yet): in the map of the process taken
/// over from, or in a new one. A kernel that refuses a new map or the program gives one line
/// and `None` (classic BPF routes by worker; QUIC connections then end at a takeover); joining
/// a predecessor's map must work, or the takeover fails and the old process keeps serving.
fn generation_routing(
    config: &ServerConfig,
    sockets: &[BoundSocket],
    cpus: Option<&[usize]>,
) -> io::Result<Option<crate::reuseport::Routing>> {
    use crate::reuseport::{Layout, Routing, MAP_ENTRIES};
    let layout = Layout {
        cid_len: config.cid_len,
        worker_offset: config.cid_worker_offset,
        generation: config.generation % crate::reuseport::GENERATIONS,
        workers: sockets.len() as u32,
        by_cpu: match (config.steer, cpus) {
            (Steer::Cpu, Some(cpus)) => crate::steer::by_cpu(cpus),
            _ => Vec::new(),
        },
    };
    let socks: Vec<std::os::fd::RawFd> = sockets
        .iter()
        .map(|s| std::os::fd::AsRawFd::as_raw_fd(&s.socket))
        .collect();
    match &config.routing_map {
        Some(map) => Routing::prepare(map.0.clone(), layout, &socks)
            .map(Some)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot join the reuseport program of the process taken over from: {e}"
                    ),
                )
            }),
        None => {
            let made = crate::ebpf::SocketArray::create(MAP_ENTRIES)
                .and_then(|map| Routing::prepare(Arc::new(map), layout, &socks));
            match made {
                Ok(routing) => Ok(Some(routing)),
                Err(e) => {
                    tracing::warn!(
                        "QUIC connections will end at a --takeover: the kernel refused the SK_REUSEPORT eBPF program ({e}; it needs Linux 4.19 and CAP_BPF with CAP_NET_ADMIN); routing by worker with classic BPF"
                    );
                    Ok(None)
                }
            }
        }
    }
}

/// Validates the options and probes the kernel, applying the documented fallbacks of the
/// optional socket features.
fn prepare(mut config: ServerConfig) -> io::Result<(ServerConfig, Features)> {
    config
        .validate()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let features = Features::probe();
    features
        .check_required()
        .map_err(|e| io::Error::new(io::ErrorKind::Unsupported, e))?;
    config.gso &= features.has("UDP_SEGMENT");
    config.gro &= features.has("UDP_GRO");
    Ok((config, features))
}

/// Each worker's published counters, with the kernel's drop count for its socket.
fn collect(workers: &[Arc<WorkerShared>], listeners: &[socket2::Socket]) -> Vec<Stats> {
    // AF_XDP workers follow the ring workers and have no listening socket.
    workers
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let mut c = w.counters.snapshot();
            if let Some(socket) = listeners.get(i) {
                c.kernel_drops = crate::socket::kernel_drops(socket).unwrap_or(0);
            }
            c
        })
        .collect()
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.workers.iter().any(|w| w.thread.is_some()) {
            let _ = self.stop();
        }
    }
}
