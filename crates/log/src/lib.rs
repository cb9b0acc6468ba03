//! A logging shim in the manner of embassy's `fmt.rs`: with the `defmt` feature the macros forward
//! to defmt (the firmware); without it they type-check their arguments and compile to nothing, so
//! portable crates build and test on the host without defmt's linker sections.
//!
//! Arguments use defmt's format syntax (`{}`, `{=u32}`, `{:?}`); values must implement
//! `defmt::Format` when the feature is on.
#![no_std]
#![warn(missing_docs)]

#[cfg(feature = "defmt")]
#[doc(hidden)]
pub use defmt as __defmt;

#[cfg(feature = "defmt")]
/// Logs at `trace` level (defmt syntax).
#[macro_export]
macro_rules! trace { ($($t:tt)*) => { $crate::__defmt::trace!($($t)*) }; }
#[cfg(feature = "defmt")]
/// Logs at `debug` level (defmt syntax).
#[macro_export]
macro_rules! debug { ($($t:tt)*) => { $crate::__defmt::debug!($($t)*) }; }
#[cfg(feature = "defmt")]
/// Logs at `info` level (defmt syntax).
#[macro_export]
macro_rules! info { ($($t:tt)*) => { $crate::__defmt::info!($($t)*) }; }
#[cfg(feature = "defmt")]
/// Logs at `warn` level (defmt syntax).
#[macro_export]
macro_rules! warn { ($($t:tt)*) => { $crate::__defmt::warn!($($t)*) }; }
#[cfg(feature = "defmt")]
/// Logs at `error` level (defmt syntax).
#[macro_export]
macro_rules! error { ($($t:tt)*) => { $crate::__defmt::error!($($t)*) }; }

#[cfg(not(feature = "defmt"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __ignore { ($fmt:literal $(, $arg:expr)* $(,)?) => {{ $( let _ = &$arg; )* }}; }
#[cfg(not(feature = "defmt"))]
/// Logs at `trace` level (defmt syntax).
#[macro_export]
macro_rules! trace { ($($t:tt)*) => { $crate::__ignore!($($t)*) }; }
#[cfg(not(feature = "defmt"))]
/// Logs at `debug` level (defmt syntax).
#[macro_export]
macro_rules! debug { ($($t:tt)*) => { $crate::__ignore!($($t)*) }; }
#[cfg(not(feature = "defmt"))]
/// Logs at `info` level (defmt syntax).
#[macro_export]
macro_rules! info { ($($t:tt)*) => { $crate::__ignore!($($t)*) }; }
#[cfg(not(feature = "defmt"))]
/// Logs at `warn` level (defmt syntax).
#[macro_export]
macro_rules! warn { ($($t:tt)*) => { $crate::__ignore!($($t)*) }; }
#[cfg(not(feature = "defmt"))]
/// Logs at `error` level (defmt syntax).
#[macro_export]
macro_rules! error { ($($t:tt)*) => { $crate::__ignore!($($t)*) }; }

#[cfg(feature = "defmt")]
pub use defmt::{Debug2Format, Display2Format};

/// Logs a value through its `Debug` impl (defmt's `Debug2Format`; nothing on the host).
#[cfg(not(feature = "defmt"))]
pub struct Debug2Format<'a, T: core::fmt::Debug + ?Sized>(pub &'a T);

/// Logs a value through its `Display` impl (defmt's `Display2Format`; nothing on the host).
#[cfg(not(feature = "defmt"))]
pub struct Display2Format<'a, T: core::fmt::Display + ?Sized>(pub &'a T);
