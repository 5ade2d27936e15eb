//! Typed `user_data`: which operation a completion belongs to.
//!
//! The kernel hands back the 64-bit `user_data` of each submission untouched. We pack the
//! operation kind, a generation and a slot index into it, in the spirit of the seed article's
//! IOCP `IO_OP_TYPE` table: one `match` on [`OpKind`] dispatches every completion, and the
//! generation lets a late completion for a slot that has since been reused be recognised and
//! dropped instead of corrupting the new owner's state.
//!
//! Layout: `kind:8 | generation:24 | slot:32`. Kind 0 is reserved so that a zeroed entry (or
//! a completion we never asked for) never decodes.

/// The kinds of operation the worker puts in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpKind {
    /// Multishot `IORING_OP_RECVMSG` on the worker's listening socket.
    Recv = 1,
    /// One `IORING_OP_SENDMSG` from the send pool; slot = send slot index.
    Send = 2,
    /// `IORING_OP_READ` of the worker's wake-up eventfd (shutdown, cross-thread posts).
    Wake = 3,
    /// `IORING_OP_ASYNC_CANCEL` (shutdown, closing a session's socket).
    Cancel = 4,
    /// Multishot `IORING_OP_RECVMSG` on a session's own socket; slot/generation = session.
    SessionRecv = 5,
    /// `IORING_OP_TIMEOUT` driving idle-session expiry.
    Tick = 6,
    /// `IORING_OP_TIMEOUT` for the handler's earliest deadline (`Handler::next_timer`);
    /// generation = the arming's.
    Timer = 7,
    /// `IORING_OP_TIMEOUT_REMOVE` with `IORING_TIMEOUT_UPDATE` (5.11): brings the armed
    /// handler timer forward.
    TimerUpdate = 8,
}

impl OpKind {
    fn from_u8(raw: u8) -> Option<OpKind> {
        match raw {
            1 => Some(OpKind::Recv),
            2 => Some(OpKind::Send),
            3 => Some(OpKind::Wake),
            4 => Some(OpKind::Cancel),
            5 => Some(OpKind::SessionRecv),
            6 => Some(OpKind::Tick),
            7 => Some(OpKind::Timer),
            8 => Some(OpKind::TimerUpdate),
            _ => None,
        }
    }
}

/// Generations wrap at 24 bits; a slot would have to be reused 16 million times while one
/// completion for it is outstanding before two generations collide.
pub const GENERATION_MASK: u32 = (1 << 24) - 1;

/// A decoded `user_data` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserData {
    pub kind: OpKind,
    pub generation: u32,
    pub slot: u32,
}

impl UserData {
    pub fn new(kind: OpKind, generation: u32, slot: u32) -> UserData {
        UserData {
            kind,
            generation: generation & GENERATION_MASK,
            slot,
        }
    }

    #[inline]
    pub fn encode(self) -> u64 {
        (u64::from(self.kind as u8) << 56)
            | (u64::from(self.generation & GENERATION_MASK) << 32)
            | u64::from(self.slot)
    }

    /// `None` for kind 0 or an unknown kind: a completion we did not submit is a bug, and the
    /// caller counts and logs it rather than guessing.
    #[inline]
    pub fn decode(raw: u64) -> Option<UserData> {
        let kind = OpKind::from_u8((raw >> 56) as u8)?;
        Some(UserData {
            kind,
            generation: ((raw >> 32) as u32) & GENERATION_MASK,
            slot: raw as u32,
        })
    }
}

/// Next generation for a reused slot, wrapping inside the 24 bits we keep.
#[inline]
pub fn next_generation(generation: u32) -> u32 {
    generation.wrapping_add(1) & GENERATION_MASK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_kind() {
        for kind in [
            OpKind::Recv,
            OpKind::Send,
            OpKind::Wake,
            OpKind::Cancel,
            OpKind::SessionRecv,
            OpKind::Tick,
            OpKind::Timer,
            OpKind::TimerUpdate,
        ] {
            for (generation, slot) in [(0, 0), (1, 7), (GENERATION_MASK, u32::MAX), (12345, 99)] {
                let ud = UserData::new(kind, generation, slot);
                assert_eq!(UserData::decode(ud.encode()), Some(ud));
            }
        }
    }

    #[test]
    fn zero_and_unknown_kinds_do_not_decode() {
        assert_eq!(UserData::decode(0), None);
        assert_eq!(UserData::decode(0x00ff_ffff_ffff_ffff), None);
        assert_eq!(UserData::decode(0xff00_0000_0000_0001), None);
    }

    #[test]
    fn generation_is_truncated_and_wraps() {
        let ud = UserData::new(OpKind::Send, GENERATION_MASK + 5, 1);
        assert_eq!(ud.generation, 4);
        assert_eq!(next_generation(GENERATION_MASK), 0);
        assert_eq!(next_generation(3), 4);
    }

    #[test]
    fn fields_do_not_bleed_into_each_other() {
        let a = UserData::new(OpKind::Recv, 1, 0).encode();
        let b = UserData::new(OpKind::Recv, 0, 1).encode();
        assert_ne!(a, b);
        assert_eq!(UserData::decode(a).map(|u| u.slot), Some(0));
        assert_eq!(UserData::decode(b).map(|u| u.generation), Some(0));
    }
}
