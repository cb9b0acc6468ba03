//! The boot command line: `JOB [key=value]...`, e.g. `bench qd=32 bs=4K`, checked against the
//! job's [`JobSpec`].
//!
//! A [`JobSpec`] names a job, gives a line of help and lists its options ([`OptSpec`]: name,
//! type, default, choices, help). [`Cmdline::bind`] checks a parsed line against the spec
//! before the job runs: an option the job does not take, a value that does not parse or one
//! outside the choices is a typed error naming it. The job then reads its options by name
//! ([`Cmdline::int`], [`Cmdline::size`], [`Cmdline::flag`], [`Cmdline::choice`],
//! [`Cmdline::text`]); defaults come from the spec, so the spec is the one place an option is
//! described. The firmware, `cargo xtask run --help` and `cargo xtask flash`'s job-line check
//! all use the same specs.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(test)]
extern crate std;

use core::cell::Cell;
use core::fmt;

/// Most options one command line may carry.
pub const MAX_OPTIONS: usize = 24;

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
        /// The option.
        key: &'a str,
        /// What was given.
        value: &'a str,
        /// What would have parsed.
        expected: &'static str,
    },
    /// An option whose value is not one of the job's choices.
    NotAChoice {
        /// The option.
        key: &'a str,
        /// What was given.
        value: &'a str,
        /// What the job takes.
        choices: &'static [&'static str],
    },
    /// A job name nobody knows.
    UnknownJob(&'a str),
    /// The job read an option its spec does not list (a bug in the job, found by its tests).
    NotInSpec(&'static str),
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
            Self::NotInSpec(k) => write!(f, "the job read option '{k}', which its spec lacks"),
        }
    }
}

/// The type, default and choices of one option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptKind {
    /// A decimal or `0x` hex integer.
    Int(u64),
    /// A size with an optional `K`/`M`/`G` suffix.
    Size(u64),
    /// `on`/`off` (also `true`/`false`, `1`/`0`, `yes`/`no`).
    Flag(bool),
    /// One of a fixed set of words.
    Choice {
        /// The words.
        choices: &'static [&'static str],
        /// The default (one of `choices`).
        default: &'static str,
    },
    /// Any word.
    Text(&'static str),
}

/// One option a job takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptSpec {
    /// The key in `key=value`.
    pub name: &'static str,
    /// Type and default.
    pub kind: OptKind,
    /// One line of help.
    pub help: &'static str,
}

impl OptSpec {
    /// An integer option.
    pub const fn int(name: &'static str, default: u64, help: &'static str) -> Self {
        Self {
            name,
            kind: OptKind::Int(default),
            help,
        }
    }
    /// A size option (`4K`, `1M`).
    pub const fn size(name: &'static str, default: u64, help: &'static str) -> Self {
        Self {
            name,
            kind: OptKind::Size(default),
            help,
        }
    }
    /// An on/off option.
    pub const fn flag(name: &'static str, default: bool, help: &'static str) -> Self {
        Self {
            name,
            kind: OptKind::Flag(default),
            help,
        }
    }
    /// One of `choices`; `choices[0]` is the default.
    pub const fn choice(
        name: &'static str,
        choices: &'static [&'static str],
        help: &'static str,
    ) -> Self {
        Self {
            name,
            kind: OptKind::Choice {
                choices,
                default: choices[0],
            },
            help,
        }
    }
    /// Free text.
    pub const fn text(name: &'static str, default: &'static str, help: &'static str) -> Self {
        Self {
            name,
            kind: OptKind::Text(default),
            help,
        }
    }

    /// Checks one value against this option's type and choices.
    pub fn check<'a>(&self, value: &'a str) -> Result<(), CmdlineError<'a>> {
        let key = self.name;
        let bad = |expected| CmdlineError::BadValue {
            key,
            value,
            expected,
        };
        match self.kind {
            OptKind::Int(_) => parse_u64(value).map(|_| ()).ok_or(bad("an integer")),
            OptKind::Size(_) => parse_size(value)
                .map(|_| ())
                .ok_or(bad("a size like 4096, 4K, 1M")),
            OptKind::Flag(_) => parse_bool(value).map(|_| ()).ok_or(bad("on or off")),
            OptKind::Choice { choices, .. } => {
                if choices.contains(&value) {
                    Ok(())
                } else {
                    Err(CmdlineError::NotAChoice {
                        key,
                        value,
                        choices,
                    })
                }
            }
            OptKind::Text(_) => Ok(()),
        }
    }
}

impl fmt::Display for OptSpec {
    /// `name=default  help (one of: a, b)`, for `--help` output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = heapless::String::<32>::new();
        let _ = match self.kind {
            OptKind::Int(d) | OptKind::Size(d) => {
                fmt::write(&mut buf, format_args!("{}={d}", self.name))
            }
            OptKind::Flag(d) => fmt::write(
                &mut buf,
                format_args!("{}={}", self.name, if d { "on" } else { "off" }),
            ),
            OptKind::Choice { default, .. } => {
                fmt::write(&mut buf, format_args!("{}={default}", self.name))
            }
            OptKind::Text(d) => fmt::write(&mut buf, format_args!("{}={d}", self.name)),
        };
        write!(f, "{buf:<22} {}", self.help)?;
        if let OptKind::Choice { choices, .. } = self.kind {
            f.write_str(" (")?;
            for (i, c) in choices.iter().enumerate() {
                write!(f, "{}{c}", if i == 0 { "" } else { "|" })?;
            }
            f.write_str(")")?;
        }
        Ok(())
    }
}

/// A job: its name, a line of help and its options (in groups, so jobs can share a group).
#[derive(Debug, Clone, Copy)]
pub struct JobSpec {
    /// The first word of the command line.
    pub name: &'static str,
    /// One line of help.
    pub help: &'static str,
    /// The options, in groups.
    pub opts: &'static [&'static [OptSpec]],
}

impl JobSpec {
    /// Every option, in order.
    pub fn options(&self) -> impl Iterator<Item = &'static OptSpec> + '_ {
        self.opts.iter().flat_map(|g| g.iter())
    }

    /// The option called `name`.
    pub fn option(&self, name: &str) -> Option<&'static OptSpec> {
        self.options().find(|o| o.name == name)
    }

    /// The spec of job `name` among `jobs`.
    pub fn find<'j>(jobs: &'j [JobSpec], name: &str) -> Option<&'j JobSpec> {
        jobs.iter().find(|j| j.name == name)
    }
}

/// The option names of a job, joined by spaces (for "job X takes: ..." messages).
pub struct OptionNames<'a>(pub &'a JobSpec);

impl fmt::Display for OptionNames<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, o) in self.0.options().enumerate() {
            write!(f, "{}{}", if i == 0 { "" } else { " " }, o.name)?;
        }
        Ok(())
    }
}

/// A parsed command line.
#[derive(Debug)]
pub struct Cmdline<'a> {
    job: &'a str,
    opts: heapless::Vec<(&'a str, &'a str), MAX_OPTIONS>,
    spec: Cell<Option<&'static JobSpec>>,
    /// Bit `i`: the job read the spec's option `i` (for [`Cmdline::unread`]).
    read: Cell<u64>,
}

impl<'a> Cmdline<'a> {
    /// Splits `line` on ASCII whitespace. An empty line yields `default_job` with no options.
    pub fn parse(line: &'a str, default_job: &'a str) -> Result<Self, CmdlineError<'a>> {
        let mut words = line.split_ascii_whitespace();
        let job = words.next().unwrap_or(default_job);
        let mut opts: heapless::Vec<(&str, &str), MAX_OPTIONS> = heapless::Vec::new();
        for w in words {
            let (k, v) = w.split_once('=').ok_or(CmdlineError::NotKeyValue(w))?;
            if k.is_empty() {
                return Err(CmdlineError::NotKeyValue(w));
            }
            if opts.iter().any(|(k2, _)| *k2 == k) {
                return Err(CmdlineError::Duplicate(k));
            }
            opts.push((k, v))
                .map_err(|_| CmdlineError::TooManyOptions)?;
        }
        Ok(Self {
            job,
            opts,
            spec: Cell::new(None),
            read: Cell::new(0),
        })
    }

    /// Parses `line` and binds it to its job's spec among `jobs` (see [`Cmdline::bind`]).
    pub fn parse_for(
        line: &'a str,
        default_job: &'a str,
        jobs: &'static [JobSpec],
    ) -> Result<Self, CmdlineError<'a>> {
        let c = Self::parse(line, default_job)?;
        let spec = JobSpec::find(jobs, c.job).ok_or(CmdlineError::UnknownJob(c.job))?;
        c.bind(spec)?;
        Ok(c)
    }

    /// Checks every given option against `spec` (known, parses, one of its choices) and makes
    /// `spec` the source of defaults for the readers below.
    pub fn bind(&self, spec: &'static JobSpec) -> Result<(), CmdlineError<'a>> {
        for &(k, v) in &self.opts {
            spec.option(k)
                .ok_or(CmdlineError::UnknownOption(k))?
                .check(v)?;
        }
        self.spec.set(Some(spec));
        Ok(())
    }

    /// The job name (first word).
    pub fn job(&self) -> &'a str {
        self.job
    }

    /// The spec this line was bound to.
    pub fn spec(&self) -> Option<&'static JobSpec> {
        self.spec.get()
    }

    /// The spec's options the job never read (a test of the job finds dead spec entries).
    pub fn unread(&self) -> impl Iterator<Item = &'static OptSpec> + '_ {
        let read = self.read.get();
        self.spec
            .get()
            .into_iter()
            .flat_map(|s| s.options())
            .enumerate()
            .filter(move |(i, _)| read & 1u64.checked_shl(*i as u32).unwrap_or(0) == 0)
            .map(|(_, o)| o)
    }

    /// The options given, in order.
    pub fn given(&self) -> impl Iterator<Item = (&'a str, &'a str)> + '_ {
        self.opts.iter().copied()
    }

    /// `key`'s spec and the value given for it (if any).
    fn lookup(
        &self,
        key: &'static str,
    ) -> Result<(&'static OptSpec, Option<&'a str>), CmdlineError<'a>> {
        let (i, spec) = self
            .spec
            .get()
            .and_then(|s| s.options().enumerate().find(|(_, o)| o.name == key))
            .ok_or(CmdlineError::NotInSpec(key))?;
        self.read
            .set(self.read.get() | 1u64.checked_shl(i as u32).unwrap_or(0));
        let v = self.opts.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        Ok((spec, v))
    }

    /// An integer option.
    pub fn int(&self, key: &'static str) -> Result<u64, CmdlineError<'a>> {
        match self.lookup(key)? {
            (
                OptSpec {
                    kind: OptKind::Int(d),
                    ..
                },
                None,
            ) => Ok(*d),
            (
                OptSpec {
                    kind: OptKind::Int(_),
                    ..
                },
                Some(v),
            ) => parse_u64(v).ok_or(CmdlineError::BadValue {
                key,
                value: v,
                expected: "an integer",
            }),
            _ => Err(CmdlineError::NotInSpec(key)),
        }
    }

    /// A size option.
    pub fn size(&self, key: &'static str) -> Result<u64, CmdlineError<'a>> {
        match self.lookup(key)? {
            (
                OptSpec {
                    kind: OptKind::Size(d),
                    ..
                },
                None,
            ) => Ok(*d),
            (
                OptSpec {
                    kind: OptKind::Size(_),
                    ..
                },
                Some(v),
            ) => parse_size(v).ok_or(CmdlineError::BadValue {
                key,
                value: v,
                expected: "a size like 4096, 4K, 1M",
            }),
            _ => Err(CmdlineError::NotInSpec(key)),
        }
    }

    /// An on/off option.
    pub fn flag(&self, key: &'static str) -> Result<bool, CmdlineError<'a>> {
        match self.lookup(key)? {
            (
                OptSpec {
                    kind: OptKind::Flag(d),
                    ..
                },
                None,
            ) => Ok(*d),
            (
                OptSpec {
                    kind: OptKind::Flag(_),
                    ..
                },
                Some(v),
            ) => parse_bool(v).ok_or(CmdlineError::BadValue {
                key,
                value: v,
                expected: "on or off",
            }),
            _ => Err(CmdlineError::NotInSpec(key)),
        }
    }

    /// A choice option: one of the spec's words.
    pub fn choice(&self, key: &'static str) -> Result<&'static str, CmdlineError<'a>> {
        match self.lookup(key)? {
            (
                OptSpec {
                    kind: OptKind::Choice { default, .. },
                    ..
                },
                None,
            ) => Ok(default),
            (
                OptSpec {
                    kind: OptKind::Choice { choices, .. },
                    ..
                },
                Some(v),
            ) => choices
                .iter()
                .copied()
                .find(|c| *c == v)
                .ok_or(CmdlineError::NotAChoice {
                    key,
                    value: v,
                    choices,
                }),
            _ => Err(CmdlineError::NotInSpec(key)),
        }
    }

    /// A text option.
    pub fn text(&self, key: &'static str) -> Result<&'a str, CmdlineError<'a>> {
        match self.lookup(key)? {
            (
                OptSpec {
                    kind: OptKind::Text(d),
                    ..
                },
                None,
            ) => Ok(d),
            (
                OptSpec {
                    kind: OptKind::Text(_),
                    ..
                },
                Some(v),
            ) => Ok(v),
            _ => Err(CmdlineError::NotInSpec(key)),
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

/// `on`/`off`, `true`/`false`, `1`/`0`, `yes`/`no`.
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

    const COMMON: &[OptSpec] = &[OptSpec::flag("dbbuf", false, "shadow doorbells")];
    const BENCH: &[OptSpec] = &[
        OptSpec::int("qd", 32, "queue depth"),
        OptSpec::size("bs", 4096, "block size"),
        OptSpec::choice("pattern", &["randread", "read"], "access pattern"),
        OptSpec::text("msg", "hello", "text"),
    ];
    static JOBS: &[JobSpec] = &[
        JobSpec {
            name: "bench",
            help: "load",
            opts: &[BENCH, COMMON],
        },
        JobSpec {
            name: "boot",
            help: "boot",
            opts: &[],
        },
    ];

    #[test]
    fn job_options_and_defaults() {
        let c = Cmdline::parse_for("bench qd=7 bs=4K pattern=read dbbuf=on", "boot", JOBS).unwrap();
        assert_eq!(c.job(), "bench");
        assert_eq!(c.int("qd"), Ok(7));
        assert_eq!(c.size("bs"), Ok(4096));
        assert_eq!(c.choice("pattern"), Ok("read"));
        assert_eq!(c.flag("dbbuf"), Ok(true));
        assert_eq!(c.text("msg"), Ok("hello"));
        let c = Cmdline::parse_for("bench", "boot", JOBS).unwrap();
        assert_eq!((c.int("qd"), c.choice("pattern")), (Ok(32), Ok("randread")));
        assert_eq!(
            c.unread().map(|o| o.name).collect::<std::vec::Vec<_>>(),
            ["bs", "msg", "dbbuf"]
        );
        // Reading an option the spec lacks, or as the wrong type, is the job's bug.
        assert_eq!(c.int("cores"), Err(CmdlineError::NotInSpec("cores")));
        assert_eq!(c.flag("qd"), Err(CmdlineError::NotInSpec("qd")));
    }

    #[test]
    fn bind_rejects_what_the_spec_does_not_allow() {
        assert_eq!(
            Cmdline::parse_for("boot bogus=1", "boot", JOBS).unwrap_err(),
            CmdlineError::UnknownOption("bogus")
        );
        assert!(matches!(
            Cmdline::parse_for("bench qd=lots", "boot", JOBS),
            Err(CmdlineError::BadValue { key: "qd", .. })
        ));
        let e = Cmdline::parse_for("bench pattern=seq", "boot", JOBS).unwrap_err();
        assert_eq!(
            std::format!("{e}"),
            "option pattern=seq: expected one of randread, read"
        );
        assert_eq!(
            Cmdline::parse_for("frob", "boot", JOBS).unwrap_err(),
            CmdlineError::UnknownJob("frob")
        );
        assert_eq!(
            std::format!("{}", OptionNames(&JOBS[0])),
            "qd bs pattern msg dbbuf"
        );
    }

    #[test]
    fn help_lines() {
        assert_eq!(
            std::format!("{}", BENCH[2]),
            "pattern=randread       access pattern (randread|read)"
        );
    }

    #[test]
    fn empty_line_is_default_job() {
        let c = Cmdline::parse_for("  ", "boot", JOBS).unwrap();
        assert_eq!(c.job(), "boot");
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
        assert_eq!(parse_size("1M"), Some(1 << 20));
        assert_eq!(parse_size("4KiB"), Some(4096));
        assert_eq!(parse_size("0x10"), Some(16));
        assert_eq!(parse_size("99999999999G"), None);
        assert_eq!(parse_size(""), None);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,80}") {
            if let Ok(c) = Cmdline::parse_for(&s, "boot", JOBS) {
                let _ = c.int("qd");
                let _ = c.size("bs");
                let _ = c.choice("pattern");
            }
        }

        #[test]
        fn every_unknown_option_is_reported(keys in proptest::collection::hash_set("[a-z]{1,6}", 1..8)) {
            let keys: std::vec::Vec<_> = keys.into_iter().filter(|k| JOBS[0].option(k).is_none()).collect();
            proptest::prop_assume!(!keys.is_empty());
            let line: std::string::String = keys.iter().map(|k| std::format!(" {k}=1")).collect();
            let line = std::format!("bench qd=1{line}");
            proptest::prop_assert_eq!(
                Cmdline::parse_for(&line, "boot", JOBS).unwrap_err(),
                CmdlineError::UnknownOption(keys[0].as_str())
            );
        }
    }
}
