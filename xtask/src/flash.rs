//! `cargo xtask flash`: the firmware as the image a machine's boot flash holds.
//!
//! The image (layout in `keel-flashimg`) carries a header (magic, format version, build id,
//! length, CRC32C), the job line in its config area, the firmware's PT_LOAD segments and, in its
//! last 4 KiB, the reset stub assembled into the firmware ELF (`platform/x86_64-qemu/src/flash.rs`).
//! QEMU boots it with `-bios PATH` (or as a pflash drive); no BIOS, bootloader or `-kernel`.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use keel_flashimg::{self as img, Header, ImageError, Segment};
use object::elf::PT_LOAD;
use object::read::elf::{ElfFile64, ProgramHeader};
use object::{Object, ObjectSymbol};

#[derive(Clone, Debug, clap::Args)]
pub struct FlashArgs {
    /// Where to write the image (default: target/keel/keel-flash.bin).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Overwrite OUT even if it is not a previous Keel image.
    #[arg(long)]
    pub force: bool,
    /// Image size, e.g. 1M (the flash chip's; a multiple of 64K). Default: the smallest that fits.
    #[arg(long)]
    pub size: Option<String>,
    /// Build nothing: verify an existing image file (header, layout, CRC32C, job line).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["out", "force", "job", "size"])]
    pub verify: Option<PathBuf>,
    /// The job line stored in the image's config area, e.g. `boot wait_ms=100` (default: boot).
    #[arg(last = true)]
    pub job: Vec<String>,
}

/// Why no image could be built or accepted.
#[derive(Debug)]
pub enum FlashError {
    /// The firmware ELF could not be parsed or lacks what the image needs.
    Elf(String),
    /// The job line does not parse.
    BadJob { line: String, why: String },
    /// The job line is longer than the config area.
    JobTooLong(usize),
    /// The segments and stub do not fit the format's limits.
    Layout(String),
    /// OUT exists and is not a Keel image.
    NotAKeelImage(PathBuf),
    /// OUT is a directory.
    IsADirectory(PathBuf),
    /// An image file failed verification.
    BadImage { path: PathBuf, why: ImageError },
    /// What was read back differs from what was written.
    ReadBackMismatch(PathBuf),
}

impl fmt::Display for FlashError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Elf(s) => write!(f, "firmware ELF: {s}"),
            Self::BadJob { line, why } => write!(f, "job line '{line}' does not parse: {why}"),
            Self::JobTooLong(n) => write!(
                f,
                "job line is {n} bytes; the config area holds {}",
                img::CONFIG_LEN - 1
            ),
            Self::Layout(s) => write!(f, "image layout: {s}"),
            Self::NotAKeelImage(p) => write!(
                f,
                "{} exists and is not a Keel flash image; refusing to overwrite it (use --force)",
                p.display()
            ),
            Self::IsADirectory(p) => write!(f, "{} is a directory", p.display()),
            Self::BadImage { path, why } => write!(f, "{}: {why}", path.display()),
            Self::ReadBackMismatch(p) => write!(
                f,
                "{}: the bytes read back differ from the bytes written",
                p.display()
            ),
        }
    }
}

impl std::error::Error for FlashError {}

pub fn default_out() -> PathBuf {
    crate::work_dir().join("keel-flash.bin")
}

/// Checks a job line the way the firmware will parse it.
pub fn check_job(line: &str) -> Result<(), FlashError> {
    if line.len() >= img::CONFIG_LEN || line.contains('\0') {
        return Err(FlashError::JobTooLong(line.len()));
    }
    // The firmware's own job table: an unknown job, option or value is refused here already.
    keel_cmdline::Cmdline::parse_for(line, "boot", keel_jobs::JOBS)
        .map(|_| ())
        .map_err(|e| FlashError::BadJob {
            line: line.into(),
            why: e.to_string(),
        })
}

fn elf_err(s: impl Into<String>) -> FlashError {
    FlashError::Elf(s.into())
}

/// Builds the smallest image for the firmware ELF `elf` with `job` in its config area.
pub fn build_image(elf: &[u8], job: &str) -> Result<Vec<u8>, FlashError> {
    build_image_sized(elf, job, None)
}

/// Builds the image, `size` bytes long if given (the size of the flash chip), else the smallest.
pub fn build_image_sized(
    elf: &[u8],
    job: &str,
    size: Option<usize>,
) -> Result<Vec<u8>, FlashError> {
    if let Some(n) = size {
        if n % img::BLOCK != 0 || n == 0 || n > img::MAX_IMAGE_LEN {
            return Err(FlashError::Layout(format!(
                "size {n} is not a multiple of {} up to {}",
                img::BLOCK,
                img::MAX_IMAGE_LEN
            )));
        }
    }
    check_job(job)?;
    let file = ElfFile64::<object::Endianness>::parse(elf).map_err(|e| elf_err(e.to_string()))?;
    let endian = file.endian();
    let sym = |name: &str| {
        file.symbols()
            .find(|s| s.name() == Ok(name))
            .map(|s| s.address())
            .ok_or_else(|| {
                elf_err(format!(
                    "no symbol {name} (a firmware without flash support?)"
                ))
            })
    };
    let (stub_start, stub_end) = (sym("keel_reset_start")?, sym("keel_reset_end")?);
    let base_slot = sym("keel_reset_image_base")?;
    let entry = sym("pvh_start32")?;
    if stub_end.checked_sub(stub_start) != Some(img::STUB_LEN as u64) {
        return Err(elf_err(format!(
            "reset stub is {} bytes, expected {}",
            stub_end.wrapping_sub(stub_start),
            img::STUB_LEN
        )));
    }
    // Every PT_LOAD with its file bytes; the stub's bytes are found through the one holding it.
    let mut loads = Vec::new();
    let mut stub = None;
    for ph in file.elf_program_headers() {
        if ph.p_type(endian) != PT_LOAD || ph.p_memsz(endian) == 0 {
            continue;
        }
        let (vaddr, paddr) = (ph.p_vaddr(endian), ph.p_paddr(endian));
        let data = ph
            .data(endian, elf)
            .map_err(|_| elf_err("segment outside the file"))?;
        let memsz = ph.p_memsz(endian);
        if stub_start >= vaddr && stub_end <= vaddr + data.len() as u64 {
            let off = (stub_start - vaddr) as usize;
            stub = Some(data[off..off + img::STUB_LEN].to_vec());
        }
        if paddr < 0x10_0000 || paddr + memsz > 0xE000_0000 {
            return Err(FlashError::Layout(format!(
                "segment at {paddr:#x} (+{memsz:#x}) is not in RAM between 1 MiB and 3.5 GiB"
            )));
        }
        loads.push((paddr, data, memsz));
    }
    let mut stub = stub.ok_or_else(|| elf_err("the reset stub is not in a loadable segment"))?;
    if loads.len() > img::MAX_SEGMENTS {
        return Err(FlashError::Layout(format!("{} segments", loads.len())));
    }
    let align16 = |x: usize| (x + 15) & !15;
    let mut off = align16(img::SEGTAB_OFFSET + loads.len() * img::SEGMENT_ENTRY_LEN);
    let mut segs = Vec::new();
    for (paddr, data, memsz) in &loads {
        segs.push(Segment {
            paddr: *paddr as u32,
            offset: off as u32,
            filesz: data.len() as u32,
            memsz: *memsz as u32,
        });
        off = align16(off + data.len());
    }
    let need = (off + img::STUB_LEN).div_ceil(img::BLOCK) * img::BLOCK;
    let len = match size {
        Some(n) if n < need => {
            return Err(FlashError::Layout(format!(
                "the firmware needs {need} bytes; --size is {n}"
            )))
        }
        Some(n) => n,
        None => need,
    };
    if len > img::MAX_IMAGE_LEN {
        return Err(FlashError::Layout(format!("{len} bytes is too large")));
    }
    let base = img::base_paddr(len);
    let mut image = vec![0xFFu8; len];
    img::set_config(&mut image, job).ok_or(FlashError::JobTooLong(job.len()))?;
    for (i, (s, (_, data, _))) in segs.iter().zip(&loads).enumerate() {
        let e = img::SEGTAB_OFFSET + i * img::SEGMENT_ENTRY_LEN;
        s.write(&mut image[e..e + img::SEGMENT_ENTRY_LEN]);
        image[s.offset as usize..s.offset as usize + data.len()].copy_from_slice(data);
    }
    let slot = (base_slot - stub_start) as usize;
    stub[slot..slot + 4].copy_from_slice(&(base as u32).to_le_bytes());
    image[len - img::STUB_LEN..].copy_from_slice(&stub);
    let mut h = Header {
        version: img::FORMAT_VERSION,
        image_len: len as u32,
        crc: 0,
        build_id: img::build_id(elf),
        seg_count: segs.len() as u32,
        entry: entry as u32,
    };
    h.write(&mut image);
    h.crc = img::image_crc(&image);
    h.write(&mut image);
    Ok(image)
}

/// Reads and fully verifies an image file (header, layout, CRC, job line).
pub fn verify_file(path: &Path) -> Result<(Header, Vec<u8>)> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let h = img::verify(&bytes).map_err(|why| FlashError::BadImage {
        path: path.into(),
        why,
    })?;
    let job = img::config(&bytes).map_err(|why| FlashError::BadImage {
        path: path.into(),
        why,
    })?;
    check_job(job)?;
    Ok((h, bytes))
}

/// Writes `image` to `path` (refusing to clobber anything but a Keel image unless `force`), then
/// reads it back and verifies it.
pub fn write_image(path: &Path, image: &[u8], force: bool) -> Result<Header> {
    if path.is_dir() {
        return Err(FlashError::IsADirectory(path.into()).into());
    }
    if path.exists() && !force {
        let old = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        if Header::parse(&old).is_err() {
            return Err(FlashError::NotAKeelImage(path.into()).into());
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    fs::write(path, image).with_context(|| format!("writing {}", path.display()))?;
    let (h, back) = verify_file(path)?;
    if back != image {
        return Err(FlashError::ReadBackMismatch(path.into()).into());
    }
    Ok(h)
}

/// Builds the firmware and writes the image for `job` to `out`.
pub fn make(fw: &Path, job: &str, out: &Path, force: bool) -> Result<Header> {
    make_sized(fw, job, out, force, None)
}

/// [`make`] with an image size (the flash chip's); `None`: the smallest that fits.
pub fn make_sized(
    fw: &Path,
    job: &str,
    out: &Path,
    force: bool,
    size: Option<usize>,
) -> Result<Header> {
    let elf = fs::read(fw).with_context(|| format!("reading {}", fw.display()))?;
    let image = build_image_sized(&elf, job, size)?;
    let h = write_image(out, &image, force)?;
    // The unstripped ELF beside the image: `cargo xtask run --image` decodes its logs with it.
    fs::write(elf_beside(out), &elf)?;
    Ok(h)
}

/// Where [`make`] keeps the ELF an image was built from: `<image>.elf`.
pub fn elf_beside(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".elf");
    PathBuf::from(p)
}

pub fn flash(args: FlashArgs) -> Result<()> {
    if let Some(path) = &args.verify {
        let (h, bytes) = verify_file(path)?;
        println!("flash: {} is a valid Keel flash image", path.display());
        print_summary(&h, img::config(&bytes).unwrap_or_default());
        return Ok(());
    }
    let job = if args.job.is_empty() {
        "boot".to_string()
    } else {
        args.job.join(" ")
    };
    check_job(&job)?;
    let fw = crate::build_firmware()?;
    let out = args.out.unwrap_or_else(default_out);
    let size = match &args.size {
        Some(s) => Some(crate::qemu::parse_size(s)? as usize),
        None => None,
    };
    let h = make_sized(&fw, &job, &out, args.force, size)?;
    println!(
        "flash: wrote {} and verified it by reading it back",
        out.display()
    );
    print_summary(&h, &job);
    println!(
        "flash: boot it with `qemu-system-x86_64 -bios {}` or `cargo xtask run --flash`",
        out.display()
    );
    Ok(())
}

fn print_summary(h: &Header, job: &str) {
    println!(
        "flash: {} bytes ({} KiB), format {}, build id {:016x}, CRC32C {:#010x}, {} segments",
        h.image_len,
        h.image_len >> 10,
        h.version,
        h.build_id,
        h.crc,
        h.seg_count
    );
    println!(
        "flash: maps at {:#x}..4 GiB, reset stub at {:#x}; job: '{job}'",
        img::base_paddr(h.image_len as usize),
        img::STUB_PADDR
    );
}

/// Flips one byte of a copy of `image` inside a loaded segment (the firmware's version banner
/// text, so the stub still reaches the CRC check) and fixes nothing else.
pub fn corrupt_copy(image: &[u8]) -> Option<Vec<u8>> {
    let needle = b"x86_64-qemu firmware";
    let at = image.windows(needle.len()).position(|w| w == needle)?;
    let mut bad = image.to_vec();
    bad[at + 3] ^= 0x20;
    Some(bad)
}

/// The host-side rejects, checked against the real firmware ELF (rows for `cargo xtask test`).
pub fn self_check(fw: &Path) -> Vec<(String, bool)> {
    let dir = crate::work_dir().join("flash-self-check");
    let _ = fs::create_dir_all(&dir);
    let elf = fs::read(fw).unwrap_or_default();
    let mut rows = Vec::new();
    let mut row = |name: &str, ok: bool| rows.push((format!("flash: {name}"), ok));

    let good = build_image(&elf, "boot wait_ms=10");
    row(
        "image builds and verifies",
        good.as_ref()
            .is_ok_and(|i| img::verify(i).is_ok() && img::config(i) == Ok("boot wait_ms=10")),
    );
    row(
        "rejects a job the firmware does not have",
        matches!(
            build_image(&elf, "frobnicate"),
            Err(FlashError::BadJob { .. })
        ),
    );
    row(
        "rejects a job line that does not parse",
        matches!(
            build_image(&elf, "boot wait_ms"),
            Err(FlashError::BadJob { .. })
        ),
    );
    row(
        "rejects a job line longer than the config area",
        matches!(
            build_image(&elf, &"x".repeat(img::CONFIG_LEN)),
            Err(FlashError::JobTooLong(_))
        ),
    );
    row(
        "rejects an ELF without the reset stub",
        matches!(
            build_image(b"\x7fELF garbage", "boot"),
            Err(FlashError::Elf(_))
        ),
    );
    let Ok(good) = good else {
        return rows;
    };
    let other = dir.join("not-keel.txt");
    let _ = fs::write(&other, b"precious data");
    let refused = write_image(&other, &good, false)
        .err()
        .is_some_and(|e| matches!(e.downcast_ref(), Some(FlashError::NotAKeelImage(_))));
    row(
        "won't overwrite a non-Keel file without --force",
        refused && fs::read(&other).is_ok_and(|b| b == b"precious data"),
    );
    row(
        "overwrites it with --force",
        write_image(&other, &good, true).is_ok(),
    );
    row(
        "overwrites a previous Keel image",
        write_image(&other, &good, false).is_ok(),
    );
    let bad_path = dir.join("corrupt.bin");
    let caught = corrupt_copy(&good).is_some_and(|bad| {
        fs::write(&bad_path, bad).is_ok()
            && verify_file(&bad_path).err().is_some_and(|e| {
                matches!(
                    e.downcast_ref(),
                    Some(FlashError::BadImage {
                        why: ImageError::CrcMismatch { .. },
                        ..
                    })
                )
            })
    });
    row("verification catches a flipped byte", caught);
    let short = dir.join("short.bin");
    let _ = fs::write(&short, &good[..100]);
    row(
        "verification rejects a truncated image",
        verify_file(&short).is_err(),
    );
    let _ = fs::remove_dir_all(&dir);
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_lines() {
        assert!(check_job("boot").is_ok());
        assert!(check_job("boot wait_ms=100").is_ok());
        assert!(matches!(
            check_job("boot wait_ms"),
            Err(FlashError::BadJob { .. })
        ));
        assert!(matches!(
            check_job("boot a=1 a=2"),
            Err(FlashError::BadJob { .. })
        ));
        // Checked against the firmware's job table: unknown job, option, value, choice.
        for bad in [
            "frobnicate",
            "boot bogus=1",
            "boot wait_ms=soon",
            "fault kind=bogus",
        ] {
            assert!(
                matches!(check_job(bad), Err(FlashError::BadJob { .. })),
                "{bad}"
            );
        }
        assert!(check_job("bench qd=8 raw=both").is_ok());
        assert!(matches!(
            check_job(&"y".repeat(600)),
            Err(FlashError::JobTooLong(600))
        ));
    }

    #[test]
    fn bad_elf_is_an_error_not_a_panic() {
        assert!(matches!(build_image(b"", "boot"), Err(FlashError::Elf(_))));
        assert!(matches!(
            build_image(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0], "boot"),
            Err(FlashError::Elf(_))
        ));
    }

    #[test]
    fn refuses_to_clobber() {
        let dir = std::env::temp_dir().join(format!("keel-flash-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.bin");
        fs::write(&p, b"not an image").unwrap();
        let e = write_image(&p, &[0u8; 16], false).unwrap_err();
        assert!(matches!(
            e.downcast_ref(),
            Some(FlashError::NotAKeelImage(_))
        ));
        assert_eq!(fs::read(&p).unwrap(), b"not an image");
        let e = write_image(&dir, &[0u8; 16], true).unwrap_err();
        assert!(matches!(
            e.downcast_ref(),
            Some(FlashError::IsADirectory(_))
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
