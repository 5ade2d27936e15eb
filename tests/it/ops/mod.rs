//! Operations (issue 11), with real `udpring` processes: the instance guard, restarts that
//! hand the listening sockets over (`--takeover`) under load, systemd socket activation
//! (`systemd-socket-activate`), and CPU steering (`--steer cpu`). The long variants are
//! `#[ignore = "stress: make stress"]`.

pub mod process;

mod activation;
mod guard;
#[cfg(feature = "quic")]
mod quic_takeover;
mod restart;
mod steer;
mod takeover_trust;
