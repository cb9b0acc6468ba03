//! A software platform for host tests, fuzzing and instruction counts.
#![forbid(unsafe_op_in_unsafe_fn)]
