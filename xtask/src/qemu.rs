//! Running the firmware under QEMU: finding (or installing) QEMU, choosing the accelerator,
//! creating disk images, streaming COM1 (text) and COM2 (defmt, decoded here) while it runs,
//! killing it on timeout, and turning its exit status into pass/fail.

use std::fs;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// QEMU's exit status when the firmware wrote its success value to isa-debug-exit.
pub const SUCCESS_STATUS: i32 = 33;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Machine {
    Q35,
    Pc,
}

/// The NVMe device shape and the machine around it.
#[derive(Clone, Debug, clap::Args)]
pub struct VmOpts {
    /// Number of cores (`-smp`).
    #[arg(long, default_value_t = 2)]
    pub smp: usize,
    /// CPU topology for `-smp`, e.g. `sockets=2,cores=3` (QEMU then numbers the local APICs
    /// per socket with gaps: 0,1,2,4,5,6), to show core numbers are not APIC ids.
    #[arg(long)]
    pub topology: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u32,
    #[arg(long, value_enum, default_value_t = Machine::Q35)]
    pub machine: Machine,
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,
    /// Kill QEMU after this many seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// Size of each namespace's disk image (e.g. 64M, 1G).
    #[arg(long, default_value = "64M")]
    pub disk_size: String,
    /// Use this existing raw image for namespace 1 instead of a fresh one.
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Number of namespaces on the controller.
    #[arg(long, default_value_t = 1)]
    pub namespaces: u32,
    /// Logical block size in bytes (512 or 4096).
    #[arg(long, default_value_t = 512)]
    pub lba_size: u32,
    /// Maximum data transfer size as a power of two of the page size (0 = unlimited).
    #[arg(long, default_value_t = 7)]
    pub mdts: u32,
    /// Most I/O queue pairs the controller offers.
    #[arg(long, default_value_t = 64)]
    pub max_ioqpairs: u32,
    /// Volatile write cache on the namespaces.
    #[arg(long, default_value = "on")]
    pub write_cache: String,
    /// No NVMe controller at all.
    #[arg(long)]
    pub no_nvme: bool,
    /// Number of NVMe controllers ("drives"), each with its own disk images; drive 0 takes
    /// the shape options above, the others the same unless `--drive` says otherwise.
    #[arg(long, default_value_t = 1)]
    pub drives: usize,
    /// The shape of one drive, in order from drive 0 (repeatable; implies enough drives):
    /// comma-separated `ns=N`, `lba=512|4096`, `mdts=N`, `qpairs=N`, `size=64M`, `wc=on|off`,
    /// `nsopt=K=V` for any other QEMU `nvme-ns` property (e.g. `nsopt=ms=8`), and `iops=N` to
    /// throttle its namespaces to N I/Os per second (slow commands, for timeout tests);
    /// `detached=N` creates namespace N detached (attach it with Namespace Attachment).
    #[arg(long = "drive")]
    pub drive_shapes: Vec<String>,
    /// Extra QEMU arguments (repeatable), e.g. --qemu-arg=-device --qemu-arg=...
    #[arg(long = "qemu-arg", allow_hyphen_values = true)]
    pub qemu_args: Vec<String>,
    /// Boot with SeaBIOS instead of qboot (slower; assigns PCI BARs itself).
    #[arg(long)]
    pub seabios: bool,
    /// Put namespace 1 behind QEMU's blkdebug driver with this config file (error injection,
    /// e.g. `[inject-error]` with `event = "read_aio"`, `errno = "5"`, `sector = "1000"`).
    #[arg(long)]
    pub blkdebug: Option<PathBuf>,
    /// Record every write and flush namespace 1 sees into this dm-log-writes file (QEMU's
    /// blklogwrites driver), for power-cut replay.
    #[arg(long)]
    pub write_log: Option<PathBuf>,
    /// Back the namespaces with QEMU's null-co driver (reads return zeroes, writes are dropped):
    /// measures the driver and QEMU's device emulation, not the host's disk.
    #[arg(long)]
    pub null_backend: bool,
    /// Boot this flash image as the machine's firmware (`-bios`) instead of PVH `-kernel`.
    #[arg(skip)]
    pub flash_image: Option<PathBuf>,
    /// With `flash_image`: attach it as a pflash drive instead of `-bios`.
    #[arg(skip)]
    pub pflash: bool,
    /// With `flash_image`: fw_cfg `opt/keel/cmdline`, overriding the image's config area.
    #[arg(skip)]
    pub fw_cfg_cmdline: Option<String>,
}

impl Default for VmOpts {
    fn default() -> Self {
        Self {
            smp: 2,
            topology: None,
            memory: 256,
            machine: Machine::Q35,
            accel: Accel::Auto,
            timeout: 60,
            disk_size: "64M".into(),
            disk: None,
            namespaces: 1,
            lba_size: 512,
            mdts: 7,
            max_ioqpairs: 64,
            write_cache: "on".into(),
            no_nvme: false,
            drives: 1,
            drive_shapes: vec![],
            qemu_args: vec![],
            seabios: false,
            null_backend: false,
            blkdebug: None,
            write_log: None,
            flash_image: None,
            pflash: false,
            fw_cfg_cmdline: None,
        }
    }
}

/// Finds the board's QEMU; installs it on Debian when running as root, else says what to install.
pub fn ensure_qemu() -> Result<()> {
    let board = crate::board::get();
    let (qemu, pkg) = (board.qemu.as_str(), board.qemu_package.as_str());
    if which(qemu) {
        return Ok(());
    }
    let root = running_as_root();
    if root && Path::new("/etc/debian_version").exists() {
        eprintln!("xtask: {qemu} not found; installing Debian package {pkg} (apt-get)...");
        let ok = Command::new("apt-get")
            .arg("update")
            .arg("-qq")
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
            && Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends", pkg])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
        if ok && which(qemu) {
            return Ok(());
        }
        bail!("installing {pkg} failed; install it by hand: apt-get install {pkg}");
    }
    bail!("{qemu} is missing. Install Debian's package: sudo apt-get install {pkg}")
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn which(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false)
}

/// The accelerator to use: KVM only when /dev/kvm opens *and* a probe boot of the firmware
/// succeeds under it (KVM-PVM hosts emulate guests that die at the first SSE instruction);
/// otherwise TCG. The probe's answer is cached per host boot.
pub fn choose_accel(want: Accel, fw: &Path, work: &Path) -> (Accel, String) {
    match want {
        Accel::Tcg => return (Accel::Tcg, "TCG (requested)".into()),
        Accel::Kvm => return (Accel::Kvm, "KVM (requested)".into()),
        Accel::Auto => {}
    }
    if fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return (Accel::Tcg, "TCG (/dev/kvm not usable)".into());
    }
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let cache = work.join("kvm-probe");
    if let Ok(c) = fs::read_to_string(&cache) {
        if let Some((id, verdict)) = c.split_once('\n') {
            if id == boot_id.trim() {
                return if verdict.trim() == "ok" {
                    (Accel::Kvm, "KVM (probe passed earlier)".into())
                } else {
                    (
                        Accel::Tcg,
                        "TCG (KVM probe failed: KVM cannot run this guest here)".into(),
                    )
                };
            }
        }
    }
    let opts = VmOpts {
        smp: 1,
        accel: Accel::Kvm,
        timeout: 10,
        no_nvme: true,
        ..VmOpts::default()
    };
    let ok = run(fw, &opts, "boot wait_ms=30", work, Verbosity::Quiet)
        .map(|o| o.passed())
        .unwrap_or(false);
    let _ = fs::write(
        &cache,
        format!("{}\n{}\n", boot_id.trim(), if ok { "ok" } else { "fail" }),
    );
    if ok {
        (Accel::Kvm, "KVM (probe boot passed)".into())
    } else {
        (
            Accel::Tcg,
            "TCG (KVM probe boot failed: KVM cannot run this guest here)".into(),
        )
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verbosity {
    /// Print every console and log line as it arrives, with a progress line.
    Stream,
    /// Print nothing (tests print their own table).
    Quiet,
}

#[derive(Debug)]
pub struct Outcome {
    /// QEMU's exit status (None: killed on timeout or by a signal).
    pub status: Option<i32>,
    pub timed_out: bool,
    /// Console (COM1) lines.
    pub console: Vec<String>,
    /// Decoded defmt lines.
    pub log: Vec<String>,
    /// Wall time from spawning QEMU to the first line of the job.
    pub boot_time: Option<Duration>,
    pub wall: Duration,
    pub accel: String,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.status == Some(SUCCESS_STATUS)
    }
    /// Every line, console and log.
    pub fn all_lines(&self) -> impl Iterator<Item = &str> {
        self.console
            .iter()
            .chain(self.log.iter())
            .map(|s| s.as_str())
    }
    pub fn has(&self, needle: &str) -> bool {
        self.all_lines().any(|l| l.contains(needle))
    }
    pub fn count(&self, needle: &str) -> usize {
        self.all_lines().filter(|l| l.contains(needle)).count()
    }
    pub fn verdict(&self) -> String {
        match (self.timed_out, self.status) {
            (true, _) => "TIMEOUT (QEMU killed)".into(),
            (_, Some(SUCCESS_STATUS)) => "PASS".into(),
            (_, Some(s)) => format!("FAIL (exit status {s})"),
            (_, None) => "FAIL (QEMU killed by a signal)".into(),
        }
    }
}

pub fn parse_size(s: &str) -> Result<u64> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    Ok(num
        .parse::<u64>()
        .with_context(|| format!("bad size '{s}'"))?
        * mult)
}

/// Creates (or reuses) the namespace images and returns the QEMU arguments for the controller.
/// One controller's shape.
#[derive(Clone, Debug)]
pub struct DriveShape {
    pub namespaces: u32,
    pub lba_size: u32,
    pub mdts: u32,
    pub max_ioqpairs: u32,
    pub size: u64,
    pub write_cache: bool,
    /// Extra `nvme-ns` properties (`ms=8,pi=1`, ...).
    pub ns_props: Vec<String>,
    /// QEMU block-layer throttling of each namespace (`throttling.iops-total`; 0 = none):
    /// slow commands, so a short `io_timeout_ms` makes real commands time out.
    pub iops: u32,
    /// Namespaces created detached from the controller (`nvme-ns,detached=true`: in the
    /// NVM subsystem, not attached until a Namespace Attachment command attaches them).
    pub detached: Vec<u32>,
}

impl VmOpts {
    /// Every drive's shape: the global options, overridden per drive by `--drive`.
    pub fn drive_list(&self) -> Result<Vec<DriveShape>> {
        let base = DriveShape {
            namespaces: self.namespaces.max(1),
            lba_size: self.lba_size,
            mdts: self.mdts,
            max_ioqpairs: self.max_ioqpairs,
            size: parse_size(&self.disk_size)?,
            write_cache: matches!(self.write_cache.as_str(), "on" | "true" | "1"),
            ns_props: vec![],
            iops: 0,
            detached: vec![],
        };
        let n = self.drives.max(self.drive_shapes.len()).max(1);
        let mut out = vec![base.clone(); n];
        for (d, spec) in self.drive_shapes.iter().enumerate() {
            let s = &mut out[d];
            for kv in spec.split(',').filter(|w| !w.is_empty()) {
                let (k, v) = kv
                    .split_once('=')
                    .with_context(|| format!("--drive {spec}: '{kv}' is not key=value"))?;
                let num = || -> Result<u32> {
                    v.parse()
                        .with_context(|| format!("--drive {spec}: {k}={v} is not a number"))
                };
                match k {
                    "ns" => s.namespaces = num()?.max(1),
                    "lba" => s.lba_size = num()?,
                    "mdts" => s.mdts = num()?,
                    "qpairs" => s.max_ioqpairs = num()?.max(1),
                    "size" => s.size = parse_size(v)?,
                    "wc" => s.write_cache = matches!(v, "on" | "true" | "1"),
                    "nsopt" => s.ns_props.push(v.to_string()),
                    "iops" => s.iops = num()?,
                    "detached" => s.detached.push(num()?),
                    _ => bail!(
                        "--drive {spec}: unknown key '{k}' (ns, lba, mdts, qpairs, size, wc, nsopt, iops, detached)"
                    ),
                }
            }
        }
        Ok(out)
    }
}

/// The disk image of namespace `ns` of drive `d` (drive 0 keeps the names of one-drive runs).
pub fn ns_image(work: &Path, d: usize, ns: u32) -> PathBuf {
    if d == 0 {
        work.join(format!("nvme-ns{ns}.img"))
    } else {
        work.join(format!("nvme{d}-ns{ns}.img"))
    }
}

fn nvme_args(o: &VmOpts, work: &Path) -> Result<Vec<String>> {
    if o.no_nvme {
        return Ok(vec![]);
    }
    let mut a: Vec<String> = vec![];
    for (d, shape) in o.drive_list()?.iter().enumerate() {
        let size = shape.size;
        a.push("-device".into());
        a.push(format!("nvme-subsys,id=subsys{d},nqn=keel{d}"));
        a.push("-device".into());
        a.push(format!(
            "nvme,id=nvme{d},serial=KEEL{:04},subsys=subsys{d},mdts={},max_ioqpairs={}",
            d + 1,
            shape.mdts,
            shape.max_ioqpairs
        ));
        let extra: String = shape.ns_props.iter().map(|p| format!(",{p}")).collect();
        for ns in 1..=shape.namespaces {
            let id = format!("d{d}ns{ns}");
            let bs = shape.lba_size;
            let wc = if shape.write_cache { "on" } else { "off" };
            if o.null_backend {
                a.push("-drive".into());
                a.push(format!(
                    "driver=null-co,size={size},read-zeroes=on,if=none,id={id}"
                ));
                a.push("-device".into());
                a.push(format!("nvme-ns,drive={id},bus=nvme{d},nsid={ns},logical_block_size={bs},physical_block_size={bs}{extra}"));
                continue;
            }
            // Options that name one image (`--disk`, `--blkdebug`, `--write-log`) are for
            // drive 0, namespace 1.
            let first = d == 0 && ns == 1;
            let path = match (&o.disk, first) {
                (Some(p), true) => p.clone(),
                _ => {
                    let p = ns_image(work, d, ns);
                    let f = fs::OpenOptions::new()
                        .create(true)
                        .write(true)
                        .truncate(true)
                        .open(&p)?;
                    f.set_len(size)?;
                    p
                }
            };
            a.push("-drive".into());
            let file = match (&o.blkdebug, first) {
                (Some(conf), true) => format!("blkdebug:{}:{}", conf.display(), path.display()),
                _ => path.display().to_string(),
            };
            match (&o.write_log, first) {
                // No cache=unsafe here: the guest's flushes must reach the log.
                (Some(log), true) => {
                    // The file driver opens, it does not create.
                    std::fs::File::create(log)?;
                    a.push(format!(
                        "driver=blklogwrites,file.driver=file,file.filename={},log.driver=file,log.filename={},log-sector-size=512,if=none,id={id}",
                        path.display(),
                        log.display()
                    ));
                }
                _ => a.push(format!(
                    "file={file},if=none,id={id},format=raw,cache=unsafe{}",
                    match shape.iops {
                        0 => String::new(),
                        n => format!(",throttling.iops-total={n}"),
                    }
                )),
            }
            let detached = if shape.detached.contains(&ns) {
                ",detached=true"
            } else {
                ""
            };
            a.push("-device".into());
            a.push(format!(
                "nvme-ns,drive={id},bus=nvme{d},nsid={ns},logical_block_size={bs},physical_block_size={bs},write-cache={wc}{extra}{detached}"
            ));
        }
    }
    Ok(a)
}

/// Boots `fw` with `cmdline` and waits for it to exit (or kills it at the timeout).
pub fn run(fw: &Path, o: &VmOpts, cmdline: &str, work: &Path, v: Verbosity) -> Result<Outcome> {
    fs::create_dir_all(work)?;
    let elf = fs::read(fw).with_context(|| format!("reading {}", fw.display()))?;
    let table = defmt_decoder::Table::parse(&elf)?.context("the firmware has no defmt table")?;
    let id = format!(
        "{}-{}",
        std::process::id(),
        RUN_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let com1 = work.join(format!("com1-{id}.txt"));
    let com2 = work.join(format!("com2-{id}.bin"));
    let (accel_arg, accel_name) = match o.accel {
        Accel::Kvm => ("kvm", "KVM".to_string()),
        _ => ("tcg", "TCG".to_string()),
    };
    let board = crate::board::get();
    let mut cmd = Command::new(&board.qemu);
    cmd.args([
        "-machine",
        match o.machine {
            Machine::Q35 => "q35",
            Machine::Pc => "pc",
        },
    ])
    .args([
        "-accel",
        accel_arg,
        "-cpu",
        if o.accel == Accel::Kvm {
            &board.cpu_kvm
        } else {
            &board.cpu_tcg
        },
    ])
    .args(["-m", &format!("{}M", o.memory), "-smp"])
    .arg(match &o.topology {
        Some(t) => format!("{},{t}", o.smp),
        None => o.smp.to_string(),
    })
    .args(["-display", "none", "-monitor", "none"])
    .args(&board.machine_args)
    .args(["-serial", &format!("file:{}", com1.display())])
    .args(["-serial", &format!("file:{}", com2.display())])
    .args(nvme_args(o, work)?)
    .args(&o.qemu_args)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    if let Some(img) = &o.flash_image {
        // The flash image is the firmware: no BIOS, no -kernel; its config area holds the job.
        if o.pflash {
            cmd.arg("-drive").arg(format!(
                "if=pflash,format=raw,readonly=on,file={}",
                img.display()
            ));
        } else {
            cmd.arg("-bios").arg(img);
        }
        if let Some(line) = &o.fw_cfg_cmdline {
            cmd.arg("-fw_cfg")
                .arg(format!("name=opt/keel/cmdline,string={line}"));
        }
    } else {
        cmd.arg("-kernel").arg(fw).args(["-append", cmdline]);
        if !o.seabios {
            cmd.args(["-bios", "qboot.rom"]);
        }
    }
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", board.qemu))?;
    let mut dec = table.new_stream_decoder();
    let mut out = Outcome {
        status: None,
        timed_out: false,
        console: vec![],
        log: vec![],
        boot_time: None,
        wall: Duration::ZERO,
        accel: accel_name,
    };
    let (mut off1, mut off2) = (0u64, 0u64);
    let mut partial = String::new();
    let tty = std::io::stderr().is_terminal();
    let mut last_progress = Instant::now();
    let job = cmdline
        .split_whitespace()
        .next()
        .unwrap_or("boot")
        .to_string();
    let start_marker = format!("job {job}: start");
    loop {
        let exited = child.try_wait()?;
        // console
        if let Some(chunk) = read_new(&com1, &mut off1) {
            partial.push_str(&String::from_utf8_lossy(&chunk).replace('\r', ""));
            while let Some(i) = partial.find('\n') {
                let line: String = partial.drain(..=i).collect();
                let line = line.trim_end().to_string();
                if v == Verbosity::Stream {
                    clear_progress(tty);
                    println!("console │ {line}");
                }
                out.console.push(line);
            }
        }
        // defmt
        if let Some(chunk) = read_new(&com2, &mut off2) {
            dec.received(&chunk);
            loop {
                match dec.decode() {
                    Ok(frame) => {
                        let line = frame.display(false).to_string();
                        if out.boot_time.is_none() && line.contains(&start_marker) {
                            out.boot_time = Some(start.elapsed());
                        }
                        if v == Verbosity::Stream {
                            clear_progress(tty);
                            println!("defmt   │ {line}");
                        }
                        out.log.push(line);
                    }
                    Err(defmt_decoder::DecodeError::UnexpectedEof) => break,
                    Err(defmt_decoder::DecodeError::Malformed) => {
                        out.log.push("<malformed defmt frame>".into());
                        if !table.encoding().can_recover() {
                            break;
                        }
                    }
                }
            }
        }
        if let Some(st) = exited {
            out.status = st.code();
            break;
        }
        if start.elapsed() > Duration::from_secs(o.timeout) {
            let _ = child.kill();
            let _ = child.wait();
            out.timed_out = true;
            break;
        }
        if v == Verbosity::Stream
            && last_progress.elapsed() > Duration::from_millis(if tty { 200 } else { 5000 })
        {
            last_progress = Instant::now();
            progress(
                tty,
                &format!(
                    "… QEMU running '{job}' ({}) for {:.1}s",
                    out.accel,
                    start.elapsed().as_secs_f64()
                ),
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    clear_progress(tty && v == Verbosity::Stream);
    if !partial.is_empty() {
        out.console.push(partial.trim_end().to_string());
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    for l in err.lines().filter(|l| !l.trim().is_empty()) {
        out.console.push(format!("qemu: {l}"));
        if v == Verbosity::Stream {
            println!("qemu    │ {l}");
        }
    }
    out.wall = start.elapsed();
    let _ = fs::remove_file(&com1);
    let _ = fs::remove_file(&com2);
    Ok(out)
}

static RUN_ID: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn read_new(path: &Path, off: &mut u64) -> Option<Vec<u8>> {
    let mut f = fs::File::open(path).ok()?;
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(*off)).ok()?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).ok()?;
    if buf.is_empty() {
        return None;
    }
    *off += buf.len() as u64;
    Some(buf)
}

pub fn progress(tty: bool, msg: &str) {
    if tty {
        eprint!("\r\x1b[2K{msg}");
    } else {
        eprintln!("{msg}");
    }
    let _ = std::io::stderr().flush();
}

pub fn clear_progress(tty: bool) {
    if tty {
        eprint!("\r\x1b[2K");
    }
}
