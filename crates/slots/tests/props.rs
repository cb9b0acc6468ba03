//! Property tests: random acquire / release / stale-lookup sequences against a simple model.
#![cfg(not(loom))]

use std::collections::HashMap;

use keel_slots::{words_for, Handle, SlotArray, SlotError};
use proptest::prelude::*;

const N: usize = 70; // two bitmap words, the second partly used

#[derive(Clone, Debug)]
enum Op {
    Acquire,
    /// Release the k-th live handle (mod count).
    Release(usize),
    /// Use a handle released earlier (k-th, mod count) for lookup and release.
    Stale(usize),
    /// Decode an arbitrary raw value.
    Raw(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Acquire),
        3 => any::<usize>().prop_map(Op::Release),
        2 => any::<usize>().prop_map(Op::Stale),
        1 => any::<u32>().prop_map(Op::Raw),
    ]
}

proptest! {
    #[test]
    fn slot_array_matches_model(ops in prop::collection::vec(op(), 1..400)) {
        let arr = SlotArray::<usize, N, { words_for(N) }>::from_fn(|i| i);
        let mut live: HashMap<usize, Handle> = HashMap::new(); // model: index -> live handle
        let mut dead: Vec<Handle> = Vec::new();
        for op in ops {
            match op {
                Op::Acquire => match arr.acquire() {
                    Ok(h) => {
                        prop_assert!(h.index() < N);
                        prop_assert!(live.insert(h.index(), h).is_none(), "slot handed out twice");
                        prop_assert_eq!(*arr.get(h).unwrap(), h.index());
                    }
                    Err(e) => {
                        prop_assert_eq!(e, SlotError::Full);
                        prop_assert_eq!(live.len(), N, "Full while the model has free slots");
                    }
                },
                Op::Release(k) => {
                    if live.is_empty() { continue; }
                    let mut keys: Vec<_> = live.keys().copied().collect();
                    keys.sort_unstable();
                    let h = live.remove(&keys[k % keys.len()]).unwrap();
                    prop_assert_eq!(arr.release(h), Ok(()));
                    dead.push(h);
                }
                Op::Stale(k) => {
                    if dead.is_empty() { continue; }
                    let h = dead[k % dead.len()];
                    let stale = matches!(arr.get(h), Err(SlotError::Stale { .. }));
                    prop_assert!(stale, "stale handle not detected");
                    let stale = matches!(arr.release(h), Err(SlotError::Stale { .. }));
                    prop_assert!(stale, "stale release not refused");
                }
                Op::Raw(raw) => match arr.pool().handle_from_raw(raw) {
                    Ok(h) => {
                        prop_assert!(h.index() < N);
                        let ok = arr.get(h).is_ok();
                        prop_assert_eq!(ok, live.get(&h.index()) == Some(&h));
                    }
                    Err(e) => {
                        prop_assert!((raw & 0xFFFF) as usize >= N);
                        let oor = matches!(e, SlotError::IndexOutOfRange { .. });
                        prop_assert!(oor);
                    }
                },
            }
            prop_assert_eq!(arr.pool().free_count(), N - live.len(), "slot lost or duplicated");
        }
    }
}
