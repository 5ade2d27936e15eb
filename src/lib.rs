//! udpring: high-throughput UDP services on Linux, built on io_uring.

pub mod load;
