//! The board's description, read from one place: the `[package.metadata.keel-board]` table of
//! the board package's `Cargo.toml` (`platform/<board>/Cargo.toml`). xtask builds, runs,
//! flashes and tests whatever board that names; `KEEL_BOARD=<package>` picks one when the
//! workspace has several.

use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

/// What xtask needs to know about a board.
#[derive(Debug, Clone)]
pub struct Board {
    /// The Cargo package (board library + firmware binary).
    pub package: String,
    /// The firmware binary's name.
    pub bin: String,
    /// The emulator.
    pub qemu: String,
    /// The Debian package that provides it.
    pub qemu_package: String,
    /// Arguments every run gets.
    pub machine_args: Vec<String>,
    /// `-cpu` under TCG and under KVM.
    pub cpu_tcg: String,
    /// `-cpu` under KVM.
    pub cpu_kvm: String,
}

fn parse(manifest: &str) -> Result<Option<Board>> {
    let v: toml::Table = manifest.parse().context("parsing Cargo.toml")?;
    let Some(pkg) = v.get("package").and_then(|p| p.as_table()) else {
        return Ok(None);
    };
    let Some(meta) = pkg
        .get("metadata")
        .and_then(|m| m.get("keel-board"))
        .and_then(|m| m.as_table())
    else {
        return Ok(None);
    };
    let s = |k: &str| -> Result<String> {
        meta.get(k)
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .with_context(|| format!("[package.metadata.keel-board] needs `{k}`"))
    };
    let machine_args = meta
        .get("machine-args")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Ok(Some(Board {
        package: pkg
            .get("name")
            .and_then(|n| n.as_str())
            .context("package without a name")?
            .to_string(),
        bin: s("bin")?,
        qemu: s("qemu")?,
        qemu_package: s("qemu-package")?,
        machine_args,
        cpu_tcg: s("cpu-tcg")?,
        cpu_kvm: s("cpu-kvm")?,
    }))
}

fn find() -> Result<Board> {
    let mut boards = vec![];
    let dir = crate::root().join("platform");
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let manifest: PathBuf = e?.path().join("Cargo.toml");
        if let Ok(text) = std::fs::read_to_string(&manifest) {
            if let Some(b) = parse(&text).with_context(|| manifest.display().to_string())? {
                boards.push(b);
            }
        }
    }
    boards.sort_by(|a, b| a.package.cmp(&b.package));
    match std::env::var("KEEL_BOARD") {
        Ok(want) => boards
            .into_iter()
            .find(|b| b.package == want)
            .with_context(|| format!("KEEL_BOARD={want}: no such board package under platform/")),
        Err(_) => match boards.len() {
            0 => bail!("no board under platform/ has [package.metadata.keel-board]"),
            1 => Ok(boards.remove(0)),
            _ => bail!(
                "several boards ({}); pick one with KEEL_BOARD=<package>",
                boards
                    .iter()
                    .map(|b| b.package.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    }
}

/// The board this run builds for.
pub fn get() -> &'static Board {
    static B: OnceLock<Board> = OnceLock::new();
    B.get_or_init(|| {
        find().unwrap_or_else(|e| {
            eprintln!("xtask: error: {e:#}");
            std::process::exit(1)
        })
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_workspace_board_parses() {
        let b = super::find().unwrap();
        assert_eq!(b.bin, "keel-fw");
        assert!(b.machine_args.iter().any(|a| a.contains("isa-debug-exit")));
    }
}
