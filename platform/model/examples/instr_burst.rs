//! Workload for `cargo xtask instr` (run under callgrind): `instr_burst <ios> <batch> [reactor]`
//! is `instr_io`, but with `reactor` each batch goes in with one `Reactor::submit_burst` (the
//! firmware bench job's path) instead of one `Reactor::submit` per I/O. A binary of its own, so
//! that `instr_io`'s code (and its rows) stay what they were: the compiler inlines differently
//! when one binary has both loops.

mod common;

use common::{reactor, read, reap, Qp};
use keel_hal::DmaRegion;

fn with_reactor(qp: Qp, buf: &DmaRegion, ios: u32, batch: u32) -> u32 {
    let mut re = reactor(qp);
    let (mut done, mut tag) = (0u32, 0u32);
    let mut ops = [(read(buf, 0), 0u32); 32];
    while tag < ios {
        let n = batch.min(ios - tag);
        let m = n as usize;
        for (i, o) in ops.iter_mut().enumerate().take(m) {
            *o = (read(buf, i as u32), tag + i as u32);
        }
        assert_eq!(re.submit_burst(&ops[..m]).expect("burst"), m);
        tag += n;
        done += reap(&mut re);
    }
    done
}

fn main() {
    common::main_with(with_reactor);
}
