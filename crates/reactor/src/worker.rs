//! The channel to a dedicated worker core (seed 003).
//!
//! A poller must never wait for something that needs a poller to make progress. So slow work is
//! not done under a lock on the poller's core, and the poller does not wait for its result: it
//! puts a request into the worker's ring, keeps polling, and picks the answer up on a later
//! pass. The worker, in turn, may ask pollers for I/O through the same mesh without ever
//! holding anything a poller needs.

use crate::ring::{Consumer, Producer, Ring};

/// Rings for one poller ↔ worker pair (capacity `N` each way).
pub struct Channel<Req, Resp, const N: usize> {
    req: Ring<Req, N>,
    resp: Ring<Resp, N>,
}

impl<Req, Resp, const N: usize> Channel<Req, Resp, N> {
    /// Both rings empty.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self {
            req: Ring::new(),
            resp: Ring::new(),
        }
    }

    /// Loom build: not `const`.
    #[cfg(loom)]
    pub fn new() -> Self {
        Self {
            req: Ring::new(),
            resp: Ring::new(),
        }
    }

    /// The poller's end and the worker's end.
    pub fn split(&mut self) -> (PollerEnd<'_, Req, Resp>, WorkerEnd<'_, Req, Resp>) {
        let (req_tx, req_rx) = self.req.split();
        let (resp_tx, resp_rx) = self.resp.split();
        (
            PollerEnd {
                tx: req_tx,
                rx: resp_rx,
                outstanding: 0,
            },
            WorkerEnd {
                rx: req_rx,
                tx: resp_tx,
            },
        )
    }
}

impl<Req, Resp, const N: usize> Default for Channel<Req, Resp, N> {
    fn default() -> Self {
        Self::new()
    }
}

/// The poller's side: never blocks.
pub struct PollerEnd<'a, Req, Resp> {
    tx: Producer<'a, Req>,
    rx: Consumer<'a, Resp>,
    outstanding: usize,
}

impl<Req, Resp> PollerEnd<'_, Req, Resp> {
    /// Hands `req` to the worker; a full ring gives it back (backpressure).
    pub fn request(&mut self, req: Req) -> Result<(), Req> {
        self.tx.enqueue(req)?;
        self.outstanding += 1;
        Ok(())
    }

    /// An answer, if one is ready.
    pub fn try_response(&mut self) -> Option<Resp> {
        // A corrupted slot (reported by the ring and repaired) holds no answer.
        let r = self.rx.dequeue().ok().flatten()?;
        self.outstanding = self.outstanding.saturating_sub(1);
        Some(r)
    }

    /// Requests sent and not yet answered.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }
}

/// The worker's side.
pub struct WorkerEnd<'a, Req, Resp> {
    rx: Consumer<'a, Req>,
    tx: Producer<'a, Resp>,
}

impl<Req, Resp> WorkerEnd<'_, Req, Resp> {
    /// Serves requests while there is room for their answers; a request whose answer would not
    /// fit stays queued (never dropped). Returns how many were served.
    pub fn serve(&mut self, mut f: impl FnMut(Req) -> Resp) -> usize {
        let mut n = 0;
        while self.tx.ready() {
            // A corrupted slot (reported by the ring and repaired) holds no request.
            let Ok(Some(req)) = self.rx.dequeue() else {
                break;
            };
            // `ready()` above guarantees room for exactly this answer.
            if self.tx.enqueue(f(req)).is_err() {
                break;
            }
            n += 1;
        }
        n
    }
}
