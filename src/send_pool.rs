//! The preallocated pool of reply slots. Each slot owns a `msghdr`, its `iovec`, the peer
//! address, a packet-info control buffer and a data buffer; all of it is allocated once and
//! never moves, because the kernel reads it until the `SENDMSG` completes.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;

use io_uring::{opcode, types};

use crate::datagram::{encode_pktinfo, encode_sockaddr, CONTROL_LEN};
use crate::op::{next_generation, OpKind, UserData};
use crate::ring::Ring;

/// Why a reply was not queued. Each case is counted in `send_dropped`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// Every send slot is in flight; the engine applies backpressure before calling a handler
    /// again, but a handler that sends several replies per datagram can run out.
    PoolExhausted,
    /// The reply is longer than a send slot (`--max-datagram`).
    TooLong,
    /// An IPv6 destination on an IPv4 socket.
    AddressFamily,
    /// The submission queue could not take the entry.
    Submit,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SendError::PoolExhausted => "no free send slot",
            SendError::TooLong => "reply longer than --max-datagram",
            SendError::AddressFamily => "destination address family does not match the socket",
            SendError::Submit => "submission queue refused the send",
        })
    }
}

impl std::error::Error for SendError {}

#[repr(C)]
struct SendSlot {
    msg: libc::msghdr,
    iov: libc::iovec,
    name: [u8; 28],
    control: [u8; CONTROL_LEN],
    generation: u32,
    in_flight: bool,
}

/// A fixed set of reply slots with a free list.
pub struct SendPool {
    slots: Box<[SendSlot]>,
    data: Box<[u8]>,
    slot_capacity: usize,
    free: Vec<u32>,
}

impl SendPool {
    /// `count` slots of `slot_capacity` bytes each. The data area is one zeroed allocation;
    /// pages the replies never touch are never made resident.
    pub fn new(count: usize, slot_capacity: usize) -> SendPool {
        let mut slots: Box<[SendSlot]> = (0..count)
            .map(|_| SendSlot {
                // SAFETY: msghdr and iovec are plain C structs for which all-zero is valid.
                msg: unsafe { std::mem::zeroed() },
                // SAFETY: as above.
                iov: unsafe { std::mem::zeroed() },
                name: [0; 28],
                control: [0; CONTROL_LEN],
                generation: 0,
                in_flight: false,
            })
            .collect();
        let mut data = vec![0u8; count * slot_capacity].into_boxed_slice();
        for (i, slot) in slots.iter_mut().enumerate() {
            // SAFETY: `i * slot_capacity` is inside `data` (i < count).
            slot.iov.iov_base = unsafe { data.as_mut_ptr().add(i * slot_capacity) }.cast();
            slot.iov.iov_len = 0;
            slot.msg.msg_name = slot.name.as_mut_ptr().cast();
            slot.msg.msg_iov = &mut slot.iov;
            slot.msg.msg_iovlen = 1;
        }
        // Pop from the end: hand out low slots first.
        let free = (0..count as u32).rev().collect();
        SendPool {
            slots,
            data,
            slot_capacity,
            free,
        }
    }

    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    pub fn slot_capacity(&self) -> usize {
        self.slot_capacity
    }

    /// Builds a reply to `peer` (leaving from `local` when given) whose payload `fill` writes
    /// into the slot's buffer, returning its length, and pushes the `SENDMSG` onto `ring`.
    pub fn queue(
        &mut self,
        ring: &mut Ring,
        fd: RawFd,
        socket_is_v6: bool,
        peer: SocketAddr,
        local: Option<IpAddr>,
        fill: impl FnOnce(&mut [u8]) -> usize,
    ) -> Result<usize, SendError> {
        let index = self.free.pop().ok_or(SendError::PoolExhausted)?;
        let result = self.prepare(index, socket_is_v6, peer, local, fill);
        let len = match result {
            Ok(len) => len,
            Err(e) => {
                self.free.push(index);
                return Err(e);
            }
        };
        let slot = &mut self.slots[index as usize];
        let user_data = UserData::new(OpKind::Send, slot.generation, index).encode();
        let entry = opcode::SendMsg::new(types::Fd(fd), &slot.msg)
            .build()
            .user_data(user_data);
        // SAFETY: the msghdr, iovec, address, control and data buffers belong to this slot,
        // live in boxed slices that never move, and are not reused until the completion for
        // this generation arrives (`complete`), because the slot is off the free list.
        match unsafe { ring.push(&entry) } {
            Ok(()) => {
                slot.in_flight = true;
                Ok(len)
            }
            Err(_) => {
                self.free.push(index);
                Err(SendError::Submit)
            }
        }
    }

    fn prepare(
        &mut self,
        index: u32,
        socket_is_v6: bool,
        peer: SocketAddr,
        local: Option<IpAddr>,
        fill: impl FnOnce(&mut [u8]) -> usize,
    ) -> Result<usize, SendError> {
        let start = index as usize * self.slot_capacity;
        let buf = &mut self.data[start..start + self.slot_capacity];
        let len = fill(buf);
        if len > self.slot_capacity {
            return Err(SendError::TooLong);
        }
        let slot = &mut self.slots[index as usize];
        let namelen =
            encode_sockaddr(peer, socket_is_v6, &mut slot.name).ok_or(SendError::AddressFamily)?;
        slot.msg.msg_namelen = namelen;
        slot.iov.iov_len = len;
        match local {
            Some(ip) => {
                slot.msg.msg_controllen = encode_pktinfo(ip, &mut slot.control);
                slot.msg.msg_control = slot.control.as_mut_ptr().cast();
            }
            None => {
                slot.msg.msg_controllen = 0;
                slot.msg.msg_control = std::ptr::null_mut();
            }
        }
        Ok(len)
    }

    /// Frees the slot a `Send` completion names. `false` when the completion is stale (its
    /// generation no longer matches, or the slot is not in flight): the caller counts it.
    pub fn complete(&mut self, ud: UserData) -> bool {
        let Some(slot) = self.slots.get_mut(ud.slot as usize) else {
            return false;
        };
        if !slot.in_flight || slot.generation != ud.generation {
            return false;
        }
        slot.in_flight = false;
        slot.generation = next_generation(slot.generation);
        self.free.push(ud.slot);
        true
    }
}

/// The errno of a failed send, for logs.
pub fn send_errno(result: i32) -> io::Error {
    io::Error::from_raw_os_error(-result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_checks_generation_and_frees() {
        let mut pool = SendPool::new(2, 16);
        assert_eq!(pool.free_slots(), 2);
        let index = pool.free.pop().unwrap();
        pool.slots[index as usize].in_flight = true;
        let ud = UserData::new(OpKind::Send, 0, index);
        assert!(pool.complete(ud));
        assert_eq!(pool.free_slots(), 2);
        // The same completion again is stale: the slot moved to generation 1.
        assert!(!pool.complete(ud));
        assert!(!pool.complete(UserData::new(OpKind::Send, 0, 99)));
    }

    #[test]
    fn prepare_rejects_overlong_and_wrong_family() {
        let mut pool = SendPool::new(1, 8);
        let peer: SocketAddr = "[::1]:5".parse().unwrap();
        assert_eq!(
            pool.prepare(0, false, peer, None, |_| 0),
            Err(SendError::AddressFamily)
        );
        let peer: SocketAddr = "127.0.0.1:5".parse().unwrap();
        assert_eq!(
            pool.prepare(0, false, peer, None, |_| 9),
            Err(SendError::TooLong)
        );
        assert_eq!(
            pool.prepare(0, false, peer, None, |b| {
                b[..3].copy_from_slice(b"abc");
                3
            }),
            Ok(3)
        );
        assert_eq!(pool.slots[0].iov.iov_len, 3);
        assert_eq!(&pool.data[..3], b"abc");
    }
}
