//! Workload for `cargo xtask instr` (run under callgrind): `instr_io <ios> <batch> [reactor]`
//! brings up the model controller and does `ios` 4 KiB reads on one queue pair, `batch` per
//! doorbell, polling each batch back; with `reactor`, through a keel-reactor (and keel-aio
//! handles) instead of on the raw queue pair. xtask runs two I/O counts and subtracts to cancel
//! setup cost.

mod common;

use common::{reactor, read, reap, Qp};
use keel_hal::DmaRegion;

fn with_reactor(qp: Qp, buf: &DmaRegion, ios: u32, batch: u32) -> u32 {
    let mut re = reactor(qp);
    let (mut done, mut tag) = (0u32, 0u32);
    while tag < ios {
        let n = batch.min(ios - tag);
        for i in 0..n {
            re.submit(read(buf, i), tag).expect("submit");
            tag += 1;
        }
        done += reap(&mut re);
    }
    done
}

fn main() {
    common::main_with(with_reactor);
}
