//! The integration tests, one crate so that they compile and link once: `cargo test --test
//! it`, one area with `cargo test --test it sessions::`. Each module tests one area and was
//! once a test binary of its own; what they share is in `common`. A test that needs the
//! process to itself (it counts descriptors, or lowers `RLIMIT_NOFILE`) runs again alone in
//! a child process of this binary (`common::alone`).

mod common;

mod cli;
mod deferred_shutdown;
mod engine;
mod examples;
mod faults;
mod fd_exhaustion;
#[cfg(feature = "quic")]
mod fleet;
mod gro;
mod hardening;
#[cfg(feature = "bench-h3")]
mod http3;
mod idle_close;
mod interop;
mod load_gso;
mod ops;
mod quic;
mod quic_api;
mod quic_flood;
mod quic_idle;
mod quic_relay;
mod quic_zero_rtt;
mod sessions;
mod timers;
mod xdp;
