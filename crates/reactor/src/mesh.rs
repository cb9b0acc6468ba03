//! The message mesh: `C × C` SPSC rings of capacity `N` ([`crate::ring`]), ring `[i][j]`
//! carrying messages from core `i` to core `j`. [`split`] hands every core its [`Links`]: the
//! producer ends of its outbound rings and the consumer ends of its inbound rings. Each end has
//! exactly one owner, so no locks are involved. Each core also has a [`MailFlag`]: senders set
//! it after enqueueing, so a core with no mail finds that out with one load instead of looking
//! at every inbound ring.

use keel_slots::MailFlag;

use crate::ring::{Consumer, Producer, Ring};

/// Storage for every ring. Lives as long as the links split from it (a `static` on the board,
/// a leaked box in host tests).
pub struct MeshStorage<M, const C: usize, const N: usize> {
    rings: [[Ring<M, N>; C]; C],
    mail: [MailFlag; C],
}

impl<M, const C: usize, const N: usize> MeshStorage<M, C, N> {
    /// Every ring empty, every mail flag clear.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self {
            rings: [const { [const { Ring::new() }; C] }; C],
            mail: [const { MailFlag::new() }; C],
        }
    }

    /// Loom build: not `const`.
    #[cfg(loom)]
    pub fn new() -> Self {
        Self::with_mail(core::array::from_fn(|_| MailFlag::new()))
    }

    /// Loom build: storage whose mail flags are `mail` (the models' controls pass flags built
    /// to misbehave, e.g. `MailFlag::plain_store_control`).
    #[cfg(loom)]
    pub fn with_mail(mail: [MailFlag; C]) -> Self {
        Self {
            rings: core::array::from_fn(|_| core::array::from_fn(|_| Ring::new())),
            mail,
        }
    }
}

impl<M, const C: usize, const N: usize> Default for MeshStorage<M, C, N> {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a message was not sent. The message comes back to the sender.
#[derive(Debug, PartialEq, Eq)]
pub enum SendError<M> {
    /// The ring to that core is full: the receiver is behind (backpressure). Retry later.
    Full(M),
    /// No such core, or sending to oneself.
    NoRoute(M),
}

/// One core's ends of the mesh.
pub struct Links<'a, M, const C: usize> {
    core: usize,
    tx: [Option<Producer<'a, M>>; C],
    rx: [Option<Consumer<'a, M>>; C],
    next_rx: usize,
    /// Every core's mail flag (this core's is `mail[core]`).
    mail: &'a [MailFlag; C],
    /// Inbound slots found flagged full with nothing in them (corrupted memory; repaired).
    faults: u32,
}

impl<'a, M, const C: usize> Links<'a, M, C> {
    /// The core these links belong to.
    pub fn core(&self) -> usize {
        self.core
    }

    /// Sends `msg` to core `to`.
    #[inline(always)]
    pub fn send(&mut self, to: usize, msg: M) -> Result<(), SendError<M>> {
        match self.tx.get_mut(to).and_then(|p| p.as_mut()) {
            None => Err(SendError::NoRoute(msg)),
            Some(p) => {
                p.enqueue(msg).map_err(SendError::Full)?;
                self.mail[to].notify();
                Ok(())
            }
        }
    }

    /// `true` when a message to `to` would be accepted now.
    pub fn can_send(&self, to: usize) -> bool {
        self.tx
            .get(to)
            .and_then(|p| p.as_ref())
            .is_some_and(|p| p.ready())
    }

    /// The next inbound message, visiting the inbound rings round-robin so one busy sender
    /// cannot starve the others. `accept` sees the message first: when it returns `false` the
    /// message stays at the head of its ring (the receiver is not ready: backpressure).
    pub fn recv_if(&mut self, accept: impl FnMut(&M) -> bool) -> Option<M> {
        self.recv_from_if(accept).map(|(_, m)| m)
    }

    /// [`Links::recv_if`], also saying which core's ring the message came out of (what the
    /// sender cannot forge, unlike anything inside the message).
    pub fn recv_from_if(&mut self, mut accept: impl FnMut(&M) -> bool) -> Option<(usize, M)> {
        if !self.mail[self.core].take() {
            return None;
        }
        for i in 0..C {
            let from = (self.next_rx + i) % C;
            let Some(c) = self.rx[from].as_mut() else {
                continue;
            };
            match c.peek_with(&mut accept) {
                Ok(None) => {}
                Ok(Some(accepted)) => {
                    // Something is (still) waiting: keep the flag up for the next look.
                    self.mail[self.core].notify();
                    if accepted {
                        self.next_rx = (from + 1) % C;
                        match c.dequeue() {
                            Ok(m) => return m.map(|m| (from, m)),
                            Err(_) => self.faults = self.faults.saturating_add(1),
                        }
                    }
                }
                Err(_) => self.faults = self.faults.saturating_add(1),
            }
        }
        None
    }

    /// How many inbound ring slots were found flagged full with nothing in them (a corrupted
    /// flag; each is repaired when found, see [`crate::ring`]). Must stay 0.
    pub fn ring_faults(&self) -> u32 {
        self.faults
    }

    /// Whether another core may have sent this one something since it last found its inbound
    /// rings empty (a hint: one load; `recv` is still what takes messages).
    #[inline]
    pub fn has_mail(&self) -> bool {
        self.mail[self.core].peek()
    }

    /// The next inbound message (see [`Links::recv_if`]).
    pub fn recv(&mut self) -> Option<M> {
        self.recv_if(|_| true)
    }

    /// The next inbound message and the core it came from (see [`Links::recv_from_if`]).
    pub fn recv_from(&mut self) -> Option<(usize, M)> {
        self.recv_from_if(|_| true)
    }

    /// Messages waiting in all inbound rings.
    pub fn pending(&self) -> usize {
        self.rx.iter().flatten().map(|c| c.len()).sum()
    }
}

/// Splits the storage into one [`Links`] per core.
pub fn split<M, const C: usize, const N: usize>(
    storage: &mut MeshStorage<M, C, N>,
) -> [Links<'_, M, C>; C] {
    let MeshStorage { rings, mail } = storage;
    let mail = &*mail;
    let mut links: [Links<'_, M, C>; C] = core::array::from_fn(|core| Links {
        core,
        tx: [const { None }; C],
        rx: [const { None }; C],
        next_rx: 0,
        mail,
        faults: 0,
    });
    for (from, row) in rings.iter_mut().enumerate() {
        for (to, q) in row.iter_mut().enumerate() {
            if from == to {
                continue;
            }
            let (p, c) = q.split();
            links[from].tx[to] = Some(p);
            links[to].rx[from] = Some(c);
        }
    }
    links
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mail_flag_keeps_every_message_reachable() {
        let mut storage = MeshStorage::<u32, 3, 4>::new();
        let [mut a, mut b, mut c] = split(&mut storage);
        assert_eq!(c.recv(), None, "no mail");
        a.send(2, 1).unwrap();
        b.send(2, 2).unwrap();
        a.send(2, 3).unwrap();
        // Declined messages stay, and so does the flag that leads back to them.
        assert_eq!(c.recv_if(|_| false), None);
        assert_eq!(c.pending(), 3);
        let mut got = [c.recv(), c.recv(), c.recv()].map(Option::unwrap);
        got.sort_unstable();
        assert_eq!(got, [1, 2, 3], "all three, after one declined look");
        assert_eq!((c.recv(), c.pending()), (None, 0));
        // Mail for one core does not wake another.
        b.send(0, 9).unwrap();
        assert_eq!(c.recv(), None);
        assert_eq!(a.recv(), Some(9));
    }
}
