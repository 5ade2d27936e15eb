//! The application state a takeover carries (version 2 and 3): `state LEN`, then the bytes in
//! chunks of [`STATE_CHUNK`]; the receiver checks every length before use.

use std::io;

use socket2::Socket;

use super::wire::{recv, send};
use super::{MAX_STATE, STATE_CHUNK};

/// Sends `state LEN` and the state in [`STATE_CHUNK`] messages.
pub(super) fn send_state(conn: &Socket, state: &[u8]) -> io::Result<()> {
    send(conn, format!("state {}", state.len()).as_bytes(), None)?;
    for chunk in state.chunks(STATE_CHUNK) {
        send(conn, chunk, None)?;
    }
    Ok(())
}

/// Receives what [`send_state`] sent: a count of at most [`MAX_STATE`], then messages of
/// exactly the sizes it implies, none with a descriptor. The error says what came instead,
/// to follow "takeover refused: peer ...".
pub(super) fn receive_state(conn: &Socket) -> Result<Vec<u8>, String> {
    let mut head = [0u8; 64];
    let (n, fd) = recv(conn, &mut head).map_err(|e| format!("broke off the exchange: {e}"))?;
    let len = std::str::from_utf8(&head[..n])
        .ok()
        .and_then(|s| s.strip_prefix("state "))
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|_| fd.is_none())
        .ok_or_else(|| {
            format!(
                "answered {:?} instead of a state length",
                String::from_utf8_lossy(&head[..n])
            )
        })?;
    let len = usize::try_from(len)
        .ok()
        .filter(|&l| l <= MAX_STATE)
        .ok_or_else(|| format!("offered {len} bytes of state; at most {MAX_STATE} are accepted"))?;
    // Grown as messages arrive, never sized from the peer's count alone.
    let mut state = Vec::new();
    // One byte more than a chunk, so a message too long shows as one (or as MSG_TRUNC).
    let mut buf = vec![0u8; STATE_CHUNK + 1];
    while state.len() < len {
        let want = (len - state.len()).min(STATE_CHUNK);
        let (n, fd) = recv(conn, &mut buf).map_err(|e| format!("broke off the exchange: {e}"))?;
        if fd.is_some() || n != want {
            return Err(format!(
                "sent a state message of {n} bytes{} where {want} were due",
                if fd.is_some() {
                    " with a descriptor"
                } else {
                    ""
                }
            ));
        }
        state.extend_from_slice(&buf[..n]);
    }
    Ok(state)
}
