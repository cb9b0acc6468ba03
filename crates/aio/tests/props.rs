//! Property test: random (legal, illegal and stale) transitions against a model.
#![cfg(not(loom))]

use keel_aio::{Aio, AioError, HandleState, IoDesc, IoOp, IoRef};
use proptest::prelude::*;
use HandleState::*;

const N: usize = 4;

#[derive(Clone, Copy, Debug)]
enum Call {
    Acquire,
    Release,
    Define,
    Stage,
    Submit,
    Complete,
    Shared,
    Local,
    Reclaim,
}

/// The model: which state a call requires and which it leads to.
fn rule(call: Call) -> (Option<HandleState>, HandleState) {
    match call {
        Call::Acquire => (Some(Idle), HandedOut),
        Call::Release => (Some(HandedOut), Idle),
        Call::Define => (Some(HandedOut), Defined),
        Call::Stage => (Some(Defined), Staged),
        Call::Submit => (Some(Staged), Submitted),
        Call::Complete => (Some(Submitted), CompletedIo),
        Call::Shared => (Some(CompletedIo), CompletedShared),
        Call::Local => (Some(CompletedShared), CompletedLocal),
        Call::Reclaim => (Some(CompletedLocal), Idle),
    }
}

fn call() -> impl Strategy<Value = Call> {
    prop_oneof![
        Just(Call::Acquire),
        Just(Call::Release),
        Just(Call::Define),
        Just(Call::Stage),
        Just(Call::Submit),
        Just(Call::Complete),
        Just(Call::Shared),
        Just(Call::Local),
        Just(Call::Reclaim),
    ]
}

const DESC: IoDesc = IoDesc {
    op: IoOp::Write,
    lba: 1,
    blocks: 2,
};

proptest! {
    #[test]
    fn transitions_match_model(steps in prop::collection::vec((call(), 0..N, any::<bool>()), 1..300)) {
        let aio = Aio::<N, 1>::new();
        let mut model = [(Idle, 0u32); N];
        for (call, index, stale) in steps {
            if let Call::Acquire = call {
                match aio.acquire() {
                    Ok(io) => {
                        let (state, generation) = model[io.index()];
                        prop_assert_eq!(state, Idle, "acquired a busy handle");
                        prop_assert_eq!(io.generation(), generation);
                        model[io.index()].0 = HandedOut;
                    }
                    Err(e) => {
                        prop_assert_eq!(e, AioError::NoFreeHandle);
                        prop_assert!(model.iter().all(|m| m.0 != Idle));
                    }
                }
                continue;
            }
            let (state, generation) = model[index];
            let used = if stale { generation.wrapping_sub(1) } else { generation };
            let io = IoRef::new(index as u16, used);
            let got = match call {
                Call::Acquire => unreachable!(),
                Call::Release => aio.release(io),
                Call::Define => aio.define(io, DESC),
                Call::Stage => aio.stage(io),
                Call::Submit => aio.submit(io).map(|d| assert_eq!(d, DESC)),
                Call::Complete => aio.complete(io, Ok(7)),
                Call::Shared => aio.complete_shared(io),
                Call::Local => aio.complete_local(io),
                Call::Reclaim => aio.reclaim(io).map(|r| assert_eq!(r, Ok(7))),
            };
            let (from, to) = rule(call);
            if stale {
                let is_stale = matches!(got, Err(AioError::Stale { .. }));
                prop_assert!(is_stale, "stale ref not refused: {:?}", got);
            } else if from == Some(state) {
                prop_assert_eq!(got, Ok(()));
                model[index].0 = to;
                if to == Idle {
                    model[index].1 = generation.wrapping_add(1);
                }
            } else {
                prop_assert_eq!(got, Err(AioError::IllegalTransition { index, from: state, to }));
            }
            for (i, &(state, generation)) in model.iter().enumerate() {
                let snap = aio.snapshot(i).unwrap();
                prop_assert_eq!((snap.state, snap.generation), (state, generation));
            }
            prop_assert_eq!(aio.free_count(), model.iter().filter(|m| m.0 == Idle).count());
        }
    }
}
