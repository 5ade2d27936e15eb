//! The transport options a QUIC service may set, as udpring's own plain struct: the crate's
//! public API does not change when quinn-proto's builder does. [`TransportConfig::build`] maps
//! it onto `quinn_proto::TransportConfig`.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use quinn_proto::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
use quinn_proto::{IdleTimeout, MtuDiscoveryConfig, VarInt};

/// The smallest UDP payload QUIC allows (RFC 9000 section 14: every path carries 1,200).
pub const MIN_UDP_PAYLOAD: u16 = 1200;
/// The largest UDP payload this server builds: a send slot holds a GSO train of segments of
/// at most this size (`QuicHandler`'s transmit loop).
pub const MAX_UDP_PAYLOAD: u16 = 1500;

/// The congestion controller of every connection (RFC 9002 section 7 and its successors).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Congestion {
    /// CUBIC (RFC 9438), quinn's default.
    #[default]
    Cubic,
    /// NewReno (RFC 9002 section 7).
    NewReno,
    /// BBR (version 1, quinn-proto's experimental implementation).
    Bbr,
}

/// Transport parameters and recovery settings of every connection. The idle timeout is
/// [`super::QuicConfig::idle_timeout`] (the command line's `--idle-timeout`).
#[derive(Debug, Clone, PartialEq)]
pub struct TransportConfig {
    /// Bidirectional streams the peer may have open at once (`initial_max_streams_bidi`).
    pub max_bidi_streams: u32,
    /// Unidirectional streams the peer may have open at once (`initial_max_streams_uni`).
    pub max_uni_streams: u32,
    /// Bytes the peer may send on one stream ahead of what the application has read.
    pub stream_receive_window: u32,
    /// Bytes the peer may send on all streams together ahead of what was read (`None`: no
    /// connection-wide limit beyond the streams').
    pub receive_window: Option<u64>,
    /// Bytes this side keeps unacknowledged across all streams of a connection.
    pub send_window: u64,
    /// A PING after this long without sending, so a quiet connection outlives the peer's idle
    /// timeout (`None`: no keep-alive).
    pub keep_alive: Option<Duration>,
    /// The congestion controller.
    pub congestion: Congestion,
    /// Bytes of received unreliable datagrams (RFC 9221) held until the application takes
    /// them; `None` turns datagram support off (the peer is told the limit is 0).
    pub datagram_receive_buffer: Option<usize>,
    /// Bytes of unreliable datagrams queued for sending before older ones are dropped.
    pub datagram_send_buffer: usize,
    /// The RTT assumed before the first sample (RFC 9002 section 6.2.2 recommends 333 ms).
    pub initial_rtt: Duration,
    /// The largest UDP payload: path MTU discovery probes up to it, and it is announced as
    /// `max_udp_payload_size`. Between [`MIN_UDP_PAYLOAD`] and [`MAX_UDP_PAYLOAD`].
    pub max_udp_payload: u16,
}

impl Default for TransportConfig {
    /// udpring's QUIC defaults: 1,000 bidirectional streams (the interop runner's
    /// multiplexing case wants at most 1,000) and 16 unidirectional ones (HTTP/3's control
    /// and QPACK streams, and room for a peer's greased ones), quinn's windows and timers, CUBIC, datagrams
    /// received up to 1.25 MB, MTU discovery up to 1,452 bytes.
    fn default() -> TransportConfig {
        TransportConfig {
            max_bidi_streams: super::MAX_CONCURRENT_BIDI_STREAMS,
            max_uni_streams: 16,
            stream_receive_window: 1_250_000,
            receive_window: None,
            send_window: 10_000_000,
            keep_alive: None,
            congestion: Congestion::Cubic,
            datagram_receive_buffer: Some(1_250_000),
            datagram_send_buffer: 1024 * 1024,
            initial_rtt: Duration::from_millis(333),
            max_udp_payload: 1452,
        }
    }
}

impl TransportConfig {
    /// quinn-proto's form of these settings, with `idle_timeout`; `InvalidInput` for a value
    /// out of range, naming it.
    pub(super) fn build(&self, idle_timeout: Duration) -> io::Result<quinn_proto::TransportConfig> {
        let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_string());
        self.check()?;
        let idle = IdleTimeout::try_from(idle_timeout)
            .map_err(|_| invalid("the QUIC idle timeout must be below 2^62 ms"))?;
        let receive_window = match self.receive_window {
            None => VarInt::MAX,
            Some(bytes) => VarInt::from_u64(bytes)
                .map_err(|_| invalid("the QUIC receive window must be below 2^62 bytes"))?,
        };
        let mut mtu = MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload);
        let mut transport = quinn_proto::TransportConfig::default();
        transport
            .max_idle_timeout(Some(idle))
            .max_concurrent_bidi_streams(VarInt::from_u32(self.max_bidi_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(self.max_uni_streams))
            .stream_receive_window(VarInt::from_u32(self.stream_receive_window))
            .receive_window(receive_window)
            .send_window(self.send_window)
            .keep_alive_interval(self.keep_alive)
            .datagram_receive_buffer_size(self.datagram_receive_buffer)
            .datagram_send_buffer_size(self.datagram_send_buffer)
            .initial_rtt(self.initial_rtt)
            .mtu_discovery_config(Some(mtu));
        match self.congestion {
            Congestion::Cubic => {
                transport.congestion_controller_factory(Arc::new(CubicConfig::default()))
            }
            Congestion::NewReno => {
                transport.congestion_controller_factory(Arc::new(NewRenoConfig::default()))
            }
            Congestion::Bbr => {
                transport.congestion_controller_factory(Arc::new(BbrConfig::default()))
            }
        };
        Ok(transport)
    }

    /// The ranges quinn-proto would otherwise reject late or silently clamp.
    fn check(&self) -> io::Result<()> {
        let invalid = |what: String| Err(io::Error::new(io::ErrorKind::InvalidInput, what));
        if !(MIN_UDP_PAYLOAD..=MAX_UDP_PAYLOAD).contains(&self.max_udp_payload) {
            return invalid(format!(
                "the QUIC max_udp_payload must be {MIN_UDP_PAYLOAD} to {MAX_UDP_PAYLOAD} bytes, not {}",
                self.max_udp_payload
            ));
        }
        if self.keep_alive == Some(Duration::ZERO) {
            return invalid(
                "the QUIC keep-alive interval must not be 0 (None turns it off)".into(),
            );
        }
        if self.initial_rtt.is_zero() {
            return invalid("the QUIC initial RTT must not be 0".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_build_and_out_of_range_values_are_named() {
        let idle = Duration::from_secs(30);
        assert!(TransportConfig::default().build(idle).is_ok());
        for congestion in [Congestion::Cubic, Congestion::NewReno, Congestion::Bbr] {
            let config = TransportConfig {
                congestion,
                keep_alive: Some(Duration::from_secs(5)),
                datagram_receive_buffer: None,
                ..TransportConfig::default()
            };
            assert!(config.build(idle).is_ok(), "{congestion:?}");
        }
        for (config, named) in [
            (
                TransportConfig {
                    max_udp_payload: 1199,
                    ..TransportConfig::default()
                },
                "max_udp_payload",
            ),
            (
                TransportConfig {
                    max_udp_payload: 9000,
                    ..TransportConfig::default()
                },
                "max_udp_payload",
            ),
            (
                TransportConfig {
                    keep_alive: Some(Duration::ZERO),
                    ..TransportConfig::default()
                },
                "keep-alive",
            ),
            (
                TransportConfig {
                    receive_window: Some(u64::MAX),
                    ..TransportConfig::default()
                },
                "receive window",
            ),
        ] {
            let err = config.build(idle).expect_err("refused");
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
            assert!(err.to_string().contains(named), "{err}");
        }
    }
}
