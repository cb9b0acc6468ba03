//! A logging shim in the manner of embassy's `fmt.rs`: with the `defmt` feature the macros forward
//! to defmt (the firmware); without it they type-check their arguments and compile to nothing, so
//! portable crates build and test on the host without defmt's linker sections.
//!
//! Arguments use defmt's format syntax (`{}`, `{=u32}`, `{:?}`); values must implement
//! `defmt::Format` when the feature is on.
#![no_std]

#[cfg(feature = "defmt")]
#[doc(hidden)]
pub use defmt as __defmt;

#[cfg(feature = "defmt")]
#[macro_export]
macro_rules! trace { ($($t:tt)*) => { $crate::__defmt::trace!($($t)*) }; }
#[cfg(feature = "defmt")]
#[macro_export]
macro_rules! debug { ($($t:tt)*) => { $crate::__defmt::debug!($($t)*) }; }
#[cfg(feature = "defmt")]
#[macro_export]
macro_rules! info { ($($t:tt)*) => { $crate::__defmt::info!($($t)*) }; }
#[cfg(feature = "defmt")]
#[macro_export]
macro_rules! warn { ($($t:tt)*) => { $crate::__defmt::warn!($($t)*) }; }
#[cfg(feature = "defmt")]
#[macro_export]
macro_rules! error { ($($t:tt)*) => { $crate::__defmt::error!($($t)*) }; }

#[cfg(not(feature = "defmt"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __ignore { ($fmt:literal $(, $arg:expr)* $(,)?) => {{ $( let _ = &$arg; )* }}; }
#[cfg(not(feature = "defmt"))]
#[macro_export]
macro_rules! trace { ($($t:tt)*) => { $crate::__ignore!($($t)*) }; }
#[cfg(not(feature = "defmt"))]
#[macro_export]
macro_rules! debug { ($($t:tt)*) => { $crate::__ignore!($($t)*) }; }
#[cfg(not(feature = "defmt"))]
#[macro_export]
macro_rules! info { ($($t:tt)*) => { $crate::__ignore!($($t)*) }; }
#[cfg(not(feature = "defmt"))]
#[macro_export]
macro_rules! warn { ($($t:tt)*) => { $crate::__ignore!($($t)*) }; }
#[cfg(not(feature = "defmt"))]
#[macro_export]
macro_rules! error { ($($t:tt)*) => { $crate::__ignore!($($t)*) }; }
