//! The one-time kernel probe: which io_uring features this kernel has, tested once at
//! start-up, reported by `udpring probe`, and checked before any worker starts.

use std::fmt::Write as _;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::time::Duration;

use io_uring::{opcode, types, Probe};

use crate::buf_ring::BufRing;
use crate::ring::{has_more, Ring, TaskRunMode};
use crate::sys;

/// One feature the engine uses.
#[derive(Debug, Clone)]
pub struct Feature {
    /// What it is called in the kernel's headers and man pages.
    pub name: &'static str,
    /// The kernel release that brought it.
    pub since: &'static str,
    /// This kernel has it.
    pub present: bool,
    /// Without it udpring cannot run (otherwise it falls back, as `fallback` says).
    pub required: bool,
    /// What udpring does without it.
    pub fallback: &'static str,
}

/// What the probe found.
#[derive(Debug, Clone)]
pub struct Features {
    /// The running kernel's release string (`uname -r`).
    pub kernel_release: String,
    /// (major, minor) parsed from the release, when it parses.
    pub kernel_version: Option<(u32, u32)>,
    /// Why io_uring itself is unusable, if it is.
    pub io_uring_error: Option<String>,
    /// The task-run mode a ring gets on this kernel, when a ring could be made.
    pub task_run: Option<TaskRunMode>,
    /// Every feature the engine uses, present or not.
    pub list: Vec<Feature>,
}

impl Features {
    /// Probes the running kernel. Takes a few milliseconds; call once.
    ///
    /// Runs on a short-lived thread of its own: when a ring that a thread submitted to is torn
    /// down, the kernel queues exit work to that thread as signal-like task work, which makes
    /// its next blocking system call (a `recvfrom` with a timeout, say) fail with EINTR. The
    /// probe's scratch rings must not do that to the caller.
    pub fn probe() -> Features {
        match std::thread::Builder::new()
            .name("udpring-probe".to_string())
            .spawn(Features::probe_here)
        {
            Ok(handle) => handle.join().unwrap_or_else(|_| Features::probe_here()),
            Err(_) => Features::probe_here(),
        }
    }

    fn probe_here() -> Features {
        let kernel_release = sys::kernel_release();
        let ring = match Ring::new(8, 16) {
            Ok(r) => r,
            Err(e) => {
                return Features {
                    kernel_version: sys::kernel_version(&kernel_release),
                    kernel_release,
                    io_uring_error: Some(crate::ring::explain_setup_error(&e)),
                    task_run: None,
                    list: Vec::new(),
                }
            }
        };
        let mode = ring.mode();
        let params = ring.uring().params();
        let mut probe = Probe::new();
        let have_probe = ring.uring().submitter().register_probe(&mut probe).is_ok();
        let op = |code: u8| have_probe && probe.is_supported(code);
        let buf_ring = probe_buf_ring();
        let multishot = buf_ring && probe_recvmsg_multishot();
        let list = vec![
            Feature {
                name: "IORING_OP_SENDMSG / IORING_OP_RECVMSG",
                since: "5.3",
                present: op(opcode::SendMsg::CODE) && op(opcode::RecvMsg::CODE),
                required: true,
                fallback: "none",
            },
            Feature {
                name: "IORING_FEAT_EXT_ARG (timed waits)",
                since: "5.11",
                present: params.is_feature_ext_arg(),
                required: true,
                fallback: "none",
            },
            Feature {
                name: "IORING_FEAT_NODROP (no lost completions)",
                since: "5.5",
                present: params.is_feature_nodrop(),
                required: false,
                fallback: "completion queue sized to everything in flight",
            },
            Feature {
                name: "IORING_SETUP_COOP_TASKRUN",
                since: "5.19",
                present: mode != TaskRunMode::Plain,
                required: false,
                fallback: "plain task-work interrupts",
            },
            Feature {
                name: "IORING_SETUP_SINGLE_ISSUER|DEFER_TASKRUN",
                since: "6.1",
                present: mode == TaskRunMode::Deferred,
                required: false,
                fallback: "COOP_TASKRUN, then plain",
            },
            Feature {
                name: "IORING_REGISTER_PBUF_RING (provided buffer ring)",
                since: "5.19",
                present: buf_ring,
                required: true,
                fallback: "none",
            },
            Feature {
                name: "multishot IORING_OP_RECVMSG (tested by receiving)",
                since: "6.0",
                present: multishot,
                required: true,
                fallback: "none",
            },
            Feature {
                name: "IORING_OP_ASYNC_CANCEL",
                since: "5.5",
                present: op(opcode::AsyncCancel::CODE),
                required: true,
                fallback: "none",
            },
            Feature {
                name: "IORING_OP_READ (wake-up eventfd)",
                since: "5.6",
                present: op(opcode::Read::CODE),
                required: true,
                fallback: "none",
            },
            Feature {
                name: "IORING_OP_MSG_RING",
                since: "5.18",
                present: op(opcode::MsgRingData::CODE),
                required: false,
                fallback: "eventfd wake-ups",
            },
            Feature {
                name: "IORING_OP_TIMEOUT (idle sessions)",
                since: "5.4",
                present: op(opcode::Timeout::CODE),
                required: true,
                fallback: "none",
            },
            Feature {
                name: "IORING_REGISTER_RING_FDS (enter by registered index)",
                since: "5.18",
                present: ring.ring_fd_registered(),
                required: false,
                fallback: "enter by descriptor (one file lookup per enter)",
            },
            Feature {
                name: "IORING_ENTER_NO_IOWAIT (idle waits are not iowait)",
                since: "6.15",
                present: params.is_feature_no_iowait(),
                required: false,
                fallback: "waits accounted as iowait",
            },
            Feature {
                name: "UDP_SEGMENT (GSO reply trains)",
                since: "4.18",
                present: probe_udp_option(libc::UDP_SEGMENT, false),
                required: false,
                fallback: "one SENDMSG per reply",
            },
            Feature {
                name: "UDP_GRO (coalesced receives)",
                since: "5.0",
                present: probe_udp_option(libc::UDP_GRO, true),
                required: false,
                fallback: "one receive per datagram",
            },
            Feature {
                name: "IOU_PBUF_RING_INC (probed, not used: truncates datagrams)",
                since: "6.12",
                present: buf_ring && probe_buf_ring_flags(IOU_PBUF_RING_INC),
                required: false,
                fallback: "whole 64 KiB buffers, resident only where written",
            },
            Feature {
                name: "AF_XDP sockets (--xdp)",
                since: "4.18",
                present: crate::xdp::af_xdp_available(),
                required: false,
                fallback: "--xdp serves on the ring path only, with one warning line",
            },
        ];
        Features {
            kernel_version: sys::kernel_version(&kernel_release),
            kernel_release,
            io_uring_error: None,
            task_run: Some(mode),
            list,
        }
    }

    /// `Err` with one line naming the first missing required feature and the kernel that
    /// has it.
    pub fn check_required(&self) -> Result<(), String> {
        if let Some(e) = &self.io_uring_error {
            return Err(e.clone());
        }
        for f in &self.list {
            if f.required && !f.present {
                return Err(format!(
                    "this kernel ({}) lacks {}, which udpring needs: it arrived in Linux {}; upgrade the kernel",
                    self.kernel_release, f.name, f.since
                ));
            }
        }
        Ok(())
    }

    /// Whether the named feature is present (by a prefix of its name).
    pub fn has(&self, prefix: &str) -> bool {
        self.list
            .iter()
            .any(|f| f.name.starts_with(prefix) && f.present)
    }

    /// The `udpring probe` report.
    pub fn report(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "kernel: {}", self.kernel_release);
        match &self.io_uring_error {
            Some(e) => {
                let _ = writeln!(out, "io_uring: unavailable: {e}");
                return out;
            }
            None => {
                let _ = writeln!(out, "io_uring: available");
            }
        }
        if let Some(mode) = self.task_run {
            let _ = writeln!(out, "ring set-up: {}", mode.describe());
        }
        for f in &self.list {
            let _ = writeln!(
                out,
                "{:<3} {:<52} since {:<5} {}",
                if f.present { "yes" } else { "no" },
                f.name,
                f.since,
                if f.required {
                    "required".to_string()
                } else {
                    format!("optional (without: {})", f.fallback)
                }
            );
        }
        out
    }
}

/// `IOU_PBUF_RING_INC` from include/uapi/linux/io_uring.h (not in the libc crate).
const IOU_PBUF_RING_INC: u16 = 2;

fn probe_buf_ring() -> bool {
    probe_buf_ring_flags(0)
}

/// Whether a provided-buffer ring registers with `flags`.
fn probe_buf_ring_flags(flags: u16) -> bool {
    let Ok(mut bufs) = BufRing::new(2, 64, 0) else {
        return false;
    };
    let Ok(ring) = Ring::new(8, 16) else {
        return false;
    };
    if bufs.register_with_flags(&ring, flags).is_err() {
        return false;
    }
    // SAFETY: no request was ever submitted on `ring`, so none selects from the group.
    unsafe { bufs.unregister(&ring) }.is_ok()
}

/// Whether a UDP socket knows the `SOL_UDP` option `name`: set to 1 when `set`, else read.
fn probe_udp_option(name: libc::c_int, set: bool) -> bool {
    let Ok(socket) = UdpSocket::bind("127.0.0.1:0") else {
        return false;
    };
    let mut value: libc::c_int = 1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    let rc = if set {
        // SAFETY: `value` is a live local of the length passed.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_UDP,
                name,
                (&value as *const libc::c_int).cast(),
                len,
            )
        }
    } else {
        // SAFETY: `value` and `len` are live locals; the kernel writes at most `len` bytes.
        unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_UDP,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        }
    };
    rc == 0
}

/// Multishot recvmsg shares its opcode with plain recvmsg, so IORING_REGISTER_PROBE cannot
/// tell them apart: arm one on a loopback socket, send it a datagram and see whether the
/// completion says more will follow. Old kernels fail the request with -EINVAL.
fn probe_recvmsg_multishot() -> bool {
    let Ok(rx) = UdpSocket::bind("127.0.0.1:0") else {
        return false;
    };
    let Ok(tx) = UdpSocket::bind("127.0.0.1:0") else {
        return false;
    };
    let Ok(rx_addr) = rx.local_addr() else {
        return false;
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_namelen = 16;
    let Ok(mut bufs) = BufRing::new(4, 256, 1) else {
        return false;
    };
    // Declared last, dropped first: the ring is closed before `msg` and `bufs` go (and `bufs`
    // leaks its memory unless the request was seen to end and the group unregistered).
    let Ok(mut ring) = Ring::new(8, 16) else {
        return false;
    };
    if bufs.register(&ring).is_err() {
        return false;
    }
    let entry = opcode::RecvMsgMulti::new(types::Fd(rx.as_raw_fd()), &msg, 1)
        .build()
        .user_data(1);
    // SAFETY: the kernel reads `msg` when it prepares the request, during this push's
    // submission; `msg` and `bufs` outlive `ring` (declared before it), and `bufs` is not
    // unmapped while registered.
    if unsafe { ring.push(&entry) }.is_err() {
        return false;
    }
    let mut seen = Vec::with_capacity(16);
    let mut verdict = None;
    // The request's final completion (no F_MORE) was seen: nothing selects from the group.
    let mut ended = false;
    // Resend each round: a packet filter on loopback may drop a probe, and a lost probe must
    // not read as a kernel without the feature.
    for _ in 0..20 {
        if tx.send_to(b"probe", rx_addr).is_err() {
            return false;
        }
        if ring
            .submit_and_wait(1, Some(Duration::from_millis(100)))
            .is_err()
        {
            break;
        }
        ring.drain(&mut seen);
        if let Some(c) = seen.first() {
            verdict = Some(c.result() >= 0 && has_more(c.flags()));
            ended = !has_more(c.flags());
            break;
        }
    }
    // End the request and wait for its last completion before the ring goes: a request still
    // live at teardown completes later as task work aimed at this thread, and that task-work
    // notification interrupts the caller's next blocking call with EINTR.
    if verdict == Some(true) {
        let cancel = opcode::AsyncCancel::new(1).build().user_data(2);
        // SAFETY: a cancel request carries no pointers.
        if unsafe { ring.push(&cancel) }.is_ok() {
            for _ in 0..10 {
                seen.clear();
                if ring
                    .submit_and_wait(1, Some(Duration::from_millis(50)))
                    .is_err()
                {
                    break;
                }
                ring.drain(&mut seen);
                if seen
                    .iter()
                    .any(|c| c.user_data() == 1 && !has_more(c.flags()))
                {
                    ended = true;
                    break;
                }
            }
        }
    }
    if ended {
        // SAFETY: the receive's final completion was seen, so no request selects from the
        // group any more.
        let _ = unsafe { bufs.unregister(&ring) };
    }
    verdict.unwrap_or(false)
}
