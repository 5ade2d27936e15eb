//! Operations (issue 11), with real `udpring` processes: the instance guard, restarts that
//! hand the listening sockets over (`--takeover`) under load, systemd socket activation
//! (`systemd-socket-activate`), and CPU steering (`--steer cpu`). The long variants are
//! `#[ignore = "stress: make stress"]`.

#[path = "../common/mod.rs"]
mod common;
mod process;

mod activation;
mod guard;
mod restart;
mod steer;
