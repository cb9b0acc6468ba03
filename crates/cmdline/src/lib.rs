//! The boot command line: `JOB [key=value]...`, e.g. `selftest ns=all size=1M`.
//!
//! A job reads its options by name ([`Cmdline::u64`], [`Cmdline::size`], [`Cmdline::str`], ...);
//! each read marks the option used. [`Cmdline::finish`] then rejects whatever is left, so an
//! option no job asked for is reported by name instead of being silently ignored.
#![no_std]
#![forbid(unsafe_code)]

#[cfg(test)]
extern crate std;

use core::cell::{Cell, RefCell};
use core::fmt;

/// Most options one command line may carry.
pub const MAX_OPTIONS: usize = 24;

/// Most distinct option names one job may ask for (see [`Cmdline::asked`]).
pub const MAX_ASKED: usize = 32;

/// What went wrong with a command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmdlineError<'a> {
    /// More than [`MAX_OPTIONS`] options.
    TooManyOptions,
    /// A word after the job that is not `key=value`.
    NotKeyValue(&'a str),
    /// The same key twice.
    Duplicate(&'a str),
    /// An option the job does not take.
    UnknownOption(&'a str),
    /// An option whose value does not parse.
    BadValue {
        key: &'a str,
        value: &'a str,
        expected: &'static str,
    },
    /// An option whose value is not one of the job's choices.
    NotAChoice {
        key: &'a str,
        value: &'a str,
        choices: &'static [&'static str],
    },
    /// A job name nobody knows.
    UnknownJob(&'a str),
}

impl fmt::Display for CmdlineError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooManyOptions => write!(f, "more than {MAX_OPTIONS} options"),
            Self::NotKeyValue(w) => write!(f, "'{w}' is not key=value"),
            Self::Duplicate(k) => write!(f, "option '{k}' given twice"),
            Self::UnknownOption(k) => write!(f, "unknown option '{k}'"),
            Self::BadValue {
                key,
                value,
                expected,
            } => {
                write!(f, "option {key}={value}: expected {expected}")
            }
            Self::NotAChoice {
                key,
                value,
                choices,
            } => {
                write!(f, "option {key}={value}: expected one of ")?;
                for (i, c) in choices.iter().enumerate() {
                    write!(f, "{}{c}", if i == 0 { "" } else { ", " })?;
                }
                Ok(())
            }
            Self::UnknownJob(j) => write!(f, "unknown job '{j}'"),
        }
    }
}

/// A parsed command line.
#[derive(Debug)]
pub struct Cmdline<'a> {
    job: &'a str,
    opts: heapless::Vec<(&'a str, &'a str, Cell<bool>), MAX_OPTIONS>,
    /// Every option name the job asked for, given or not, in order (for error messages).
    asked: RefCell<heapless::Vec<&'a str, MAX_ASKED>>,
}

impl<'a> Cmdline<'a> {
    /// Splits `line` on ASCII whitespace. An empty line yields `default_job` with no options.
    pub fn parse(line: &'a str, default_job: &'a str) -> Result<Self, CmdlineError<'a>> {
        let mut words = line.split_ascii_whitespace();
        let job = words.next().unwrap_or(default_job);
        let mut opts = heapless::Vec::new();
        for w in words {
            let (k, v) = w.split_once('=').ok_or(CmdlineError::NotKeyValue(w))?;
            if k.is_empty() {
                return Err(CmdlineError::NotKeyValue(w));
            }
            if opts
                .iter()
                .any(|(k2, _, _): &(&str, &str, Cell<bool>)| *k2 == k)
            {
                return Err(CmdlineError::Duplicate(k));
            }
            opts.push((k, v, Cell::new(false)))
                .map_err(|_| CmdlineError::TooManyOptions)?;
        }
        Ok(Self {
            job,
            opts,
            asked: RefCell::new(heapless::Vec::new()),
        })
    }

    /// The job name (first word).
    pub fn job(&self) -> &'a str {
        self.job
    }

    /// The raw value of `key`, marking it used.
    pub fn str(&self, key: &'a str) -> Option<&'a str> {
        if let Ok(mut asked) = self.asked.try_borrow_mut() {
            if !asked.contains(&key) {
                // Past MAX_ASKED names the list is only incomplete, never wrong.
                let _ = asked.push(key);
            }
        }
        self.opts
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, v, used)| {
                used.set(true);
                *v
            })
    }

    /// A decimal (or `0x` hex) integer, or `default` when absent.
    pub fn u64(&self, key: &'a str, default: u64) -> Result<u64, CmdlineError<'a>> {
        match self.str(key) {
            None => Ok(default),
            Some(v) => parse_u64(v).ok_or(CmdlineError::BadValue {
                key,
                value: v,
                expected: "an integer",
            }),
        }
    }

    /// A size with an optional `K`/`M`/`G` (binary) suffix, or `default` when absent.
    pub fn size(&self, key: &'a str, default: u64) -> Result<u64, CmdlineError<'a>> {
        match self.str(key) {
            None => Ok(default),
            Some(v) => parse_size(v).ok_or(CmdlineError::BadValue {
                key,
                value: v,
                expected: "a size like 4096, 4K, 1M",
            }),
        }
    }

    /// `on/off/true/false/1/0/yes/no`, or `default` when absent.
    pub fn bool(&self, key: &'a str, default: bool) -> Result<bool, CmdlineError<'a>> {
        match self.str(key) {
            None => Ok(default),
            Some(v) => parse_bool(v).ok_or(CmdlineError::BadValue {
                key,
                value: v,
                expected: "on or off",
            }),
        }
    }

    /// One of `choices`, or `default` when absent.
    pub fn choice(
        &self,
        key: &'a str,
        choices: &'static [&'static str],
        default: &'static str,
    ) -> Result<&'static str, CmdlineError<'a>> {
        match self.str(key) {
            None => Ok(default),
            Some(v) => choices
                .iter()
                .copied()
                .find(|c| *c == v)
                .ok_or(CmdlineError::NotAChoice {
                    key,
                    value: v,
                    choices,
                }),
        }
    }

    /// Marks `key` as known without reading it (options consumed by the platform, not the job).
    pub fn accept(&self, key: &'a str) {
        let _ = self.str(key);
    }

    /// The option names the job has asked for so far, given or not, in the order it asked:
    /// after [`Cmdline::finish`] fails, what the job does take.
    pub fn asked(&self) -> heapless::Vec<&'a str, MAX_ASKED> {
        self.asked.borrow().clone()
    }

    /// Fails on the first option nobody read.
    pub fn finish(&self) -> Result<(), CmdlineError<'a>> {
        match self.opts.iter().find(|(_, _, used)| !used.get()) {
            Some((k, _, _)) => Err(CmdlineError::UnknownOption(k)),
            None => Ok(()),
        }
    }
}

/// Decimal or `0x`-prefixed hexadecimal.
pub fn parse_u64(v: &str) -> Option<u64> {
    if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else {
        v.parse().ok()
    }
}

/// `512`, `4K`, `4k`, `1M`, `2G`, `1KiB`.
pub fn parse_size(v: &str) -> Option<u64> {
    let v = v
        .strip_suffix("iB")
        .or_else(|| v.strip_suffix('B'))
        .unwrap_or(v);
    let (num, shift) = match v.as_bytes().last()? {
        b'k' | b'K' => (&v[..v.len() - 1], 10),
        b'm' | b'M' => (&v[..v.len() - 1], 20),
        b'g' | b'G' => (&v[..v.len() - 1], 30),
        _ => (v, 0),
    };
    let n = parse_u64(num)?;
    n.checked_mul(1u64 << shift)
}

pub fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "on" | "true" | "yes" => Some(true),
        "0" | "off" | "false" | "no" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_and_options() {
        let c = Cmdline::parse("bench qd=32 bs=4K pattern=randread", "boot").unwrap();
        assert_eq!(c.job(), "bench");
        assert_eq!(c.u64("qd", 1), Ok(32));
        assert_eq!(c.size("bs", 512), Ok(4096));
        assert_eq!(
            c.choice("pattern", &["read", "randread"], "read"),
            Ok("randread")
        );
        assert_eq!(c.u64("cores", 1), Ok(1));
        assert_eq!(c.finish(), Ok(()));
    }

    #[test]
    fn unknown_option_is_named() {
        let c = Cmdline::parse("boot bogus=1 qd=2", "boot").unwrap();
        c.u64("qd", 1).unwrap();
        assert_eq!(c.finish(), Err(CmdlineError::UnknownOption("bogus")));
    }

    #[test]
    fn what_the_job_takes_is_listed() {
        // `duration` is not an option; the job asked for `qd`, `secs` and `pattern` (given or
        // not, each once, in order), which is what an error message can offer instead.
        let c = Cmdline::parse("bench duration=8 qd=2", "boot").unwrap();
        c.u64("qd", 1).unwrap();
        c.u64("secs", 2).unwrap();
        c.u64("qd", 1).unwrap();
        let e = c.choice("pattern", &["read", "randread"], "read");
        assert_eq!(e, Ok("read"));
        assert_eq!(c.finish(), Err(CmdlineError::UnknownOption("duration")));
        assert_eq!(c.asked().as_slice(), &["qd", "secs", "pattern"]);
        // A value outside the choices names them.
        let c = Cmdline::parse("bench pattern=seq", "boot").unwrap();
        let e = c
            .choice("pattern", &["read", "randread"], "read")
            .unwrap_err();
        assert_eq!(
            std::format!("{e}"),
            "option pattern=seq: expected one of read, randread"
        );
    }

    #[test]
    fn empty_line_is_default_job() {
        let c = Cmdline::parse("  ", "boot").unwrap();
        assert_eq!(c.job(), "boot");
        assert_eq!(c.finish(), Ok(()));
    }

    #[test]
    fn malformed_words_and_values() {
        assert_eq!(
            Cmdline::parse("boot x", "b").unwrap_err(),
            CmdlineError::NotKeyValue("x")
        );
        assert_eq!(
            Cmdline::parse("boot =1", "b").unwrap_err(),
            CmdlineError::NotKeyValue("=1")
        );
        assert_eq!(
            Cmdline::parse("boot a=1 a=2", "b").unwrap_err(),
            CmdlineError::Duplicate("a")
        );
        let c = Cmdline::parse("boot qd=lots", "b").unwrap();
        assert!(matches!(
            c.u64("qd", 1),
            Err(CmdlineError::BadValue { key: "qd", .. })
        ));
        assert_eq!(parse_size("1M"), Some(1 << 20));
        assert_eq!(parse_size("4KiB"), Some(4096));
        assert_eq!(parse_size("0x10"), Some(16));
        assert_eq!(parse_size("99999999999G"), None);
        assert_eq!(parse_size(""), None);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,80}") {
            if let Ok(c) = Cmdline::parse(&s, "boot") {
                let _ = c.u64("a", 0);
                let _ = c.size("b", 0);
                let _ = c.finish();
            }
        }

        #[test]
        fn every_unread_option_is_reported(keys in proptest::collection::hash_set("[a-z]{1,6}", 1..8)) {
            let line: std::string::String = keys.iter().map(|k| std::format!(" {k}=1")).collect();
            let line = std::format!("job{line}");
            let c = Cmdline::parse(&line, "boot").unwrap();
            let first = keys.iter().next().unwrap();
            for k in keys.iter().skip(1) { c.accept(k); }
            proptest::prop_assert_eq!(c.finish(), Err(CmdlineError::UnknownOption(first.as_str())));
        }
    }
}
