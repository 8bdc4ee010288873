//! Guest images: the contract every builder meets, and the cache.
//!
//! An image is a directory holding a kernel (`vmlinux` or `bzImage`), an
//! optional `rootfs.ext4` (the shared, read-only base), an optional initrd,
//! and `manifest.json` ([`Manifest`]). Built images live in
//! `$XDG_CACHE_HOME/keystone/images/<content hash>/` (else
//! `~/.cache/keystone/images/...`), and `current` there names the newest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Name of the manifest file in an image directory.
pub const MANIFEST: &str = "manifest.json";
/// Manifest format understood by this CLI.
pub const FORMAT: u32 = 1;
/// Guest vsock port the guest connects to on the host (CID 2) once it is
/// ready: the VMM forwards it to `<vsock uds>_1024`.
pub const READY_PORT: u32 = 1024;
/// Guest vsock port for "a commit happened" notifications (auto-commit sync).
pub const NOTIFY_PORT: u32 = 1025;
/// Guest vsock port where sshd listens.
pub const SSH_PORT: u32 = 22;
/// Kernel command-line key carrying the host user's SSH public key
/// (base64 of the `authorized_keys` line).
pub const AUTHORIZED_KEY_PARAM: &str = "keystone.authorized_key";
/// Kernel command-line key carrying the sandbox name (the guest hostname).
pub const NAME_PARAM: &str = "keystone.name";

/// `manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// Which builder made it: `debian`, `nix` or `probe`.
    pub builder: String,
    /// Kernel file name inside the image directory.
    pub kernel: String,
    /// Base root filesystem (ext4, attached read-only as the first disk), if any.
    pub rootfs: Option<String>,
    /// Initrd file name, if any.
    pub initrd: Option<String>,
    /// Kernel command line; the CLI appends the sandbox's own parameters.
    pub cmdline: String,
    /// Component versions (kernel, distribution, systemd, openssh, git, ...).
    pub versions: BTreeMap<String, String>,
    /// Hash of every input of the build; names the cache directory.
    pub content_hash: String,
    /// The guest boots on a PVM host's KVM (the probe guest, the PVM test
    /// kernel). An ordinary Linux image does not.
    pub pvm_capable: bool,
    /// The guest runs sshd on vsock port 22 and sends the readiness line
    /// with its host key.
    pub ssh: bool,
    /// Which kernel a Debian image boots: `stock` (Debian's own, found its
    /// devices through ACPI) or `minimal` (compiled from linux-source);
    /// absent for other builders and older images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_variant: Option<KernelVariant>,
}

/// Errors reading an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The manifest is missing or unreadable.
    #[error("{path}: {source}")]
    Read {
        /// The manifest path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The manifest is not valid JSON for this format.
    #[error("{path}: not a keystone image manifest: {source}")]
    Parse {
        /// The manifest path.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// A newer or older manifest format.
    #[error("{path}: manifest format {found}, this keystone reads {FORMAT}")]
    Format {
        /// The manifest path.
        path: PathBuf,
        /// Its format.
        found: u32,
    },
    /// A file the manifest names is missing, or a name leaves the directory.
    #[error("{path}: {what}")]
    Invalid {
        /// The image directory.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Writing an image failed.
    #[error("{path}: {source}")]
    Write {
        /// What was being written.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A loaded image: its directory and manifest, with resolved paths.
#[derive(Clone, Debug)]
pub struct Image {
    /// The image directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

impl Image {
    /// Read and check `dir/manifest.json`: the format, and that every file it
    /// names is a plain name inside `dir` that exists.
    pub fn load(dir: &Path) -> Result<Image, ImageError> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|source| ImageError::Read {
            path: path.clone(),
            source,
        })?;
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|source| ImageError::Parse {
                path: path.clone(),
                source,
            })?;
        if manifest.format != FORMAT {
            return Err(ImageError::Format {
                path,
                found: manifest.format,
            });
        }
        let names = std::iter::once(Some(&manifest.kernel))
            .chain([manifest.rootfs.as_ref(), manifest.initrd.as_ref()]);
        for name in names.flatten() {
            let plain = !name.is_empty()
                && !name.contains('/')
                && name != "."
                && name != ".."
                && !name.starts_with('.');
            if !plain {
                return Err(ImageError::Invalid {
                    path: dir.to_path_buf(),
                    what: format!("manifest names '{name}', which is not a file name"),
                });
            }
            if !dir.join(name).is_file() {
                return Err(ImageError::Invalid {
                    path: dir.to_path_buf(),
                    what: format!("{name} is missing"),
                });
            }
        }
        Ok(Image {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    /// The kernel's path.
    pub fn kernel(&self) -> PathBuf {
        self.dir.join(&self.manifest.kernel)
    }

    /// The base root filesystem's path, if the image has one.
    pub fn rootfs(&self) -> Option<PathBuf> {
        self.manifest.rootfs.as_ref().map(|r| self.dir.join(r))
    }

    /// The initrd's path, if the image has one.
    pub fn initrd(&self) -> Option<PathBuf> {
        self.manifest.initrd.as_ref().map(|r| self.dir.join(r))
    }
}

/// Root of the image cache: `$XDG_CACHE_HOME/keystone/images`, else
/// `$HOME/.cache/keystone/images`.
pub fn cache_root() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("keystone").join("images")
}

/// Write `bytes` to `path` atomically (a temporary file in the same
/// directory, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    use std::io::Write;
    let err = |source| ImageError::Write {
        path: path.to_path_buf(),
        source,
    };
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = path.with_file_name(format!(
        ".{}.tmp.{}.{}",
        file_name.unwrap_or_default(),
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(err)
}

/// Write a probe-guest image into `dir` (created if needed): the probe ELF
/// as the kernel, no root filesystem, `probe=ready` on the command line (the
/// guest sends the readiness line to host port [`READY_PORT`] and then
/// serves vsock until it is stopped). PVM-capable, no SSH. The agent tests
/// on PVM hosts boot this image through `keystone agent start`.
pub fn write_probe_image(dir: &Path) -> Result<Image, ImageError> {
    let werr = |source| ImageError::Write {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(werr)?;
    let elf = keystone_probe::ELF;
    write_atomic(&dir.join("probe.elf"), elf)?;
    let mut versions = BTreeMap::new();
    versions.insert("probe".into(), env!("CARGO_PKG_VERSION").into());
    let manifest = Manifest {
        format: FORMAT,
        builder: "probe".into(),
        kernel: "probe.elf".into(),
        rootfs: None,
        initrd: None,
        cmdline: "probe=ready".into(),
        versions,
        content_hash: content_hash([elf]),
        pvm_capable: true,
        ssh: false,
        kernel_variant: None,
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| ImageError::Write {
        path: dir.join(MANIFEST),
        source: std::io::Error::other(e),
    })?;
    write_atomic(&dir.join(MANIFEST), &json)?;
    Image::load(dir)
}

/// Hex SHA-256 over the given byte strings, each prefixed by its length (so
/// moving bytes between inputs changes the hash).
pub fn content_hash<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

mod sources {
    include!(concat!(env!("OUT_DIR"), "/guest_sources.rs"));
}

/// Which builder makes the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Builder {
    /// debootstrap + Debian packages + our kernel from `linux-source-6.1`.
    Debian,
    /// `nix build guest-image#image` (NixOS).
    Nix,
}

impl Builder {
    /// The builder used when none is asked for: Nix where a working Nix
    /// store exists, else Debian.
    pub fn auto() -> Builder {
        let store_populated = std::fs::read_dir("/nix/store")
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        if store_populated && crate::binaries::find_binary("nix").is_some() {
            Builder::Nix
        } else {
            Builder::Debian
        }
    }

    fn name(self) -> &'static str {
        match self {
            Builder::Debian => "debian",
            Builder::Nix => "nix",
        }
    }
}

/// Which kernel the Debian builder puts in the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KernelVariant {
    /// Debian's `linux-image-amd64` from the mirror with an initramfs of
    /// the modules the sandbox needs: nothing is compiled, the devices are
    /// found through the VMM's ACPI tables.
    #[default]
    Stock,
    /// Our own kernel from `linux-source-6.1` (`kernel/sandbox.config`):
    /// everything built in, devices on the command line; the fastest boot,
    /// a ~9 min first build on 2 cores and the kernel toolchain.
    Minimal,
}

impl KernelVariant {
    /// Its name in manifests and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            KernelVariant::Stock => "stock",
            KernelVariant::Minimal => "minimal",
        }
    }
}

/// Debian's kernel source tarball, the minimal kernel's one input from
/// outside.
pub const LINUX_SOURCE: &str = "/usr/src/linux-source-6.1.tar.xz";

/// Errors building an image.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A prerequisite is missing.
    #[error("{0}")]
    Missing(String),
    /// A build step failed.
    #[error("{step} failed ({status}); see the output above")]
    Step {
        /// The step.
        step: &'static str,
        /// Its exit status.
        status: std::process::ExitStatus,
    },
    /// A step could not be started.
    #[error("{step}: {source}")]
    Spawn {
        /// The step.
        step: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// Reading or writing files.
    #[error(transparent)]
    Image(#[from] ImageError),
}

/// What `keystone image build` does.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// The builder.
    pub builder: Builder,
    /// Rebuild even on a cache hit.
    pub force: bool,
    /// Cache root (images in `<root>/<hash>`, kernels in `<root>/../kernel`).
    pub cache: PathBuf,
    /// The Debian builder's kernel.
    pub kernel: KernelVariant,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            builder: Builder::auto(),
            force: false,
            cache: cache_root(),
            kernel: KernelVariant::default(),
        }
    }
}

/// The embedded guest-image sources: (path under `guest-image/`,
/// executable, bytes).
pub fn sources() -> &'static [(&'static str, bool, &'static [u8])] {
    sources::SOURCES
}

/// The content hash of a build: the builder, every embedded source (path,
/// mode, bytes) that builder reads, and the digest of external inputs (the
/// Debian builder: the kernel source tarball).
pub fn inputs_hash(builder: Builder, files: &[(&str, bool, &[u8])], external: &[u8]) -> String {
    let mut parts: Vec<&[u8]> = vec![b"keystone-image-v1", builder.name().as_bytes(), external];
    for (path, exec, bytes) in files {
        let used = match builder {
            Builder::Debian => !path.starts_with("flake"),
            Builder::Nix => path.starts_with("flake") || path.starts_with("rootfs/"),
        };
        if used {
            parts.push(path.as_bytes());
            parts.push(if *exec { b"x" } else { b"-" });
            parts.push(bytes);
        }
    }
    content_hash(parts)
}

fn sha256_file(path: &Path) -> Result<Vec<u8>, std::io::Error> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(h.finalize().to_vec())
}

/// SHA-256 of the kernel source tarball, remembered next to the image
/// cache by (size, mtime) so each `agent start` does not rehash 140 MB.
fn source_digest(path: &Path) -> Result<Vec<u8>, std::io::Error> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    let stamp = format!("{} {} {}", path.display(), m.len(), m.mtime());
    let memo = cache_root().join(".source-digest");
    if let Ok(text) = std::fs::read_to_string(&memo) {
        if let Some((s, hex)) = text.trim().rsplit_once(' ') {
            if s == stamp && hex.len() == 64 {
                let bytes: Option<Vec<u8>> = (0..32)
                    .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
                    .collect();
                if let Some(b) = bytes {
                    return Ok(b);
                }
            }
        }
    }
    let digest = sha256_file(path)?;
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let _ = std::fs::create_dir_all(cache_root());
    let _ = write_atomic(&memo, format!("{stamp} {hex}\n").as_bytes());
    Ok(digest)
}

/// Write the embedded sources under `dir` (files 0644, scripts 0755).
pub fn materialize(dir: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    for (rel, exec, bytes) in sources() {
        let path = dir.join(rel);
        let werr = |source| ImageError::Write {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(werr)?;
        }
        std::fs::write(&path, bytes).map_err(werr)?;
        let mode = if *exec { 0o755 } else { 0o644 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(werr)?;
    }
    Ok(())
}

fn run_step(step: &'static str, cmd: &mut std::process::Command) -> Result<String, BuildError> {
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|source| BuildError::Spawn { step, source })?;
    if !out.status.success() {
        return Err(BuildError::Step {
            step,
            status: out.status,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A command that runs as root: itself when we are root, else through sudo.
fn as_root(program: &Path) -> std::process::Command {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        std::process::Command::new(program)
    } else {
        let mut c = std::process::Command::new("sudo");
        c.arg("--").arg(program);
        c
    }
}

fn read_versions(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The image the current sources would build, from the cache, if present.
pub fn cached(opts: &BuildOptions) -> Result<Option<Image>, BuildError> {
    let hash = hash_for(opts.builder, opts.kernel)?;
    let dir = opts.cache.join(&hash);
    Ok(Image::load(&dir).ok())
}

fn hash_for(builder: Builder, kernel: KernelVariant) -> Result<String, BuildError> {
    let external = match (builder, kernel) {
        (Builder::Debian, KernelVariant::Minimal) => source_digest(Path::new(LINUX_SOURCE)).map_err(|e| {
            BuildError::Missing(format!(
                "{LINUX_SOURCE}: {e} (apt-get install linux-source-6.1 flex bison bc libelf-dev libssl-dev debootstrap e2fsprogs gcc, or use the stock kernel)"
            ))
        })?,
        // The mirror's current kernel package, as the rootfs's packages.
        (Builder::Debian, KernelVariant::Stock) => b"stock-kernel".to_vec(),
        (Builder::Nix, _) => Vec::new(),
    };
    Ok(inputs_hash(builder, sources(), &external))
}

/// Build the image (or find it in the cache) and point `<cache>/current` at
/// it. Progress goes to stderr, stage by stage with elapsed times.
pub fn build(opts: &BuildOptions) -> Result<Image, BuildError> {
    let t0 = std::time::Instant::now();
    let hash = hash_for(opts.builder, opts.kernel)?;
    let dest = opts.cache.join(&hash);
    std::fs::create_dir_all(&opts.cache).map_err(|source| ImageError::Write {
        path: opts.cache.clone(),
        source,
    })?;
    // One build at a time per cache: a second `keystone` waits, then finds
    // the first one's image.
    let _lock = lock(&opts.cache.join(".lock"))?;
    if !opts.force {
        if let Ok(img) = Image::load(&dest) {
            set_current(&opts.cache, &hash)?;
            eprintln!(
                "image: {} (cached, {}{})",
                dest.display(),
                opts.builder.name(),
                img.manifest
                    .kernel_variant
                    .map(|k| format!(", {} kernel", k.name()))
                    .unwrap_or_default()
            );
            return Ok(img);
        }
    }
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImageError::Write { path, source }
    };
    std::fs::create_dir_all(&opts.cache).map_err(werr(&opts.cache))?;
    let work = opts
        .cache
        .join(format!(".build-{hash}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let src = work.join("src");
    let stage = work.join("image");
    std::fs::create_dir_all(&stage).map_err(werr(&stage))?;
    let result = (|| {
        materialize(&src)?;
        eprintln!(
            "image: building {} with the {} builder into {}",
            &hash[..16],
            opts.builder.name(),
            dest.display()
        );
        let manifest = match opts.builder {
            Builder::Debian => match opts.kernel {
                KernelVariant::Minimal => build_debian(&src, &stage, &opts.cache, &hash)?,
                KernelVariant::Stock => build_debian_stock(&src, &stage, &hash)?,
            },
            Builder::Nix => build_nix(&src, &stage, &hash)?,
        };
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| ImageError::Write {
            path: stage.join(MANIFEST),
            source: std::io::Error::other(e),
        })?;
        write_atomic(&stage.join(MANIFEST), &json)?;
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::rename(&stage, &dest).map_err(werr(&dest))?;
        set_current(&opts.cache, &hash)?;
        Ok::<_, BuildError>(())
    })();
    let _ = std::fs::remove_dir_all(&work);
    result?;
    eprintln!(
        "image: built {} in {:.0} s",
        dest.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(Image::load(&dest)?)
}

/// Hold an exclusive `flock` on `path` (created if needed) until dropped.
fn lock(path: &Path) -> Result<std::fs::File, ImageError> {
    crate::flock::lock(path, true).map_err(|source| ImageError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn set_current(cache: &Path, hash: &str) -> Result<(), ImageError> {
    let link = cache.join("current");
    let tmp = cache.join(format!(".current.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(hash, &tmp).map_err(|source| ImageError::Write {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, &link).map_err(|source| ImageError::Write { path: link, source })
}

/// Kernel command line of the Debian image (the CLI appends the sandbox's
/// own parameters).
pub const DEBIAN_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off acpi=off nomodule i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd root=/dev/vda ro rootfstype=ext4 init=/usr/lib/keystone/init quiet";

/// Kernel command line of the Debian image with the stock kernel: ACPI on
/// (it finds the devices there), modules from the initramfs.
pub const DEBIAN_STOCK_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda ro rootfstype=ext4 init=/usr/lib/keystone/init quiet";

fn build_debian_stock(src: &Path, stage: &Path, hash: &str) -> Result<Manifest, BuildError> {
    run_step(
        "root filesystem and stock kernel (debootstrap, linux-image-amd64)",
        as_root(&src.join("debian/build-rootfs.sh"))
            .arg("--stock-kernel")
            .arg(stage),
    )?;
    let versions = read_versions(&stage.join("versions"));
    let _ = std::fs::remove_file(stage.join("versions"));
    Ok(Manifest {
        format: FORMAT,
        builder: Builder::Debian.name().into(),
        kernel: "vmlinuz".into(),
        rootfs: Some("rootfs.ext4".into()),
        initrd: Some("initrd.img".into()),
        cmdline: DEBIAN_STOCK_CMDLINE.into(),
        versions,
        content_hash: hash.to_string(),
        pvm_capable: false,
        ssh: true,
        kernel_variant: Some(KernelVariant::Stock),
    })
}

fn build_debian(
    src: &Path,
    stage: &Path,
    cache: &Path,
    hash: &str,
) -> Result<Manifest, BuildError> {
    let kernel_cache = cache
        .parent()
        .map(|p| p.join("kernel"))
        .unwrap_or_else(|| cache.join("kernel"));
    let kdir = run_step(
        "kernel build",
        std::process::Command::new(src.join("kernel/build-kernel.sh"))
            .args(["--variant", "sandbox"])
            .arg(&kernel_cache),
    )?;
    let kdir = PathBuf::from(kdir.lines().last().unwrap_or_default());
    for (from, to) in [("vmlinux", "vmlinux"), (".config", "kernel.config")] {
        let (a, b) = (kdir.join(from), stage.join(to));
        std::fs::copy(&a, &b).map_err(|source| ImageError::Write { path: b, source })?;
    }
    let kernel_release = std::fs::read_to_string(kdir.join("kernelrelease")).unwrap_or_default();
    run_step(
        "root filesystem build (debootstrap)",
        as_root(&src.join("debian/build-rootfs.sh")).arg(stage),
    )?;
    let mut versions = read_versions(&stage.join("versions"));
    let _ = std::fs::remove_file(stage.join("versions"));
    versions.insert("kernel".into(), kernel_release.trim().to_string());
    Ok(Manifest {
        format: FORMAT,
        builder: Builder::Debian.name().into(),
        kernel: "vmlinux".into(),
        rootfs: Some("rootfs.ext4".into()),
        initrd: None,
        cmdline: DEBIAN_CMDLINE.into(),
        versions,
        content_hash: hash.to_string(),
        pvm_capable: false,
        ssh: true,
        kernel_variant: Some(KernelVariant::Minimal),
    })
}

fn build_nix(src: &Path, stage: &Path, hash: &str) -> Result<Manifest, BuildError> {
    let out = run_step(
        "nix build",
        std::process::Command::new("nix")
            .args([
                "--extra-experimental-features",
                "nix-command flakes",
                "build",
                "--no-link",
                "--print-out-paths",
            ])
            .arg(format!("path:{}#image", src.display())),
    )?;
    let out = PathBuf::from(out.lines().last().unwrap_or_default());
    for name in ["bzImage", "initrd", "rootfs.ext4"] {
        let (a, b) = (out.join(name), stage.join(name));
        std::fs::copy(&a, &b).map_err(|source| ImageError::Write { path: b, source })?;
    }
    let cmdline = std::fs::read_to_string(out.join("cmdline"))
        .map_err(|source| ImageError::Read {
            path: out.join("cmdline"),
            source,
        })?
        .trim()
        .to_string();
    Ok(Manifest {
        format: FORMAT,
        builder: Builder::Nix.name().into(),
        kernel: "bzImage".into(),
        rootfs: Some("rootfs.ext4".into()),
        initrd: Some("initrd".into()),
        cmdline,
        versions: read_versions(&out.join("versions")),
        content_hash: hash.to_string(),
        pvm_capable: false,
        ssh: true,
        kernel_variant: None,
    })
}

/// The image `keystone agent start` boots: `KEYSTONE_GUEST_IMAGE` if set,
/// else the cached build of the current sources, built now if missing.
pub fn resolve() -> Result<Image, BuildError> {
    if let Some(dir) = std::env::var_os("KEYSTONE_GUEST_IMAGE").filter(|v| !v.is_empty()) {
        return Ok(Image::load(Path::new(&dir))?);
    }
    let opts = BuildOptions::default();
    match build(&opts) {
        // No way to hash the inputs here (e.g. no kernel source): the last
        // image built on this machine still boots.
        Err(BuildError::Missing(why)) => {
            Image::load(&opts.cache.join("current")).map_err(|_| BuildError::Missing(why))
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_and_follows_every_input() {
        let files: Vec<(&str, bool, &[u8])> = vec![
            ("kernel/sandbox.config", false, b"CONFIG_A=y\n"),
            ("rootfs/usr/lib/keystone/init", true, b"#!/bin/sh\n"),
            ("flake.nix", false, b"{ }"),
        ];
        let h = inputs_hash(Builder::Debian, &files, b"tarball");
        assert_eq!(h, inputs_hash(Builder::Debian, &files, b"tarball"));
        assert_eq!(h.len(), 64);
        let mut changed = files.clone();
        changed[0].2 = b"CONFIG_A=n\n";
        assert_ne!(h, inputs_hash(Builder::Debian, &changed, b"tarball"));
        let mut mode = files.clone();
        mode[1].1 = false;
        assert_ne!(h, inputs_hash(Builder::Debian, &mode, b"tarball"));
        assert_ne!(h, inputs_hash(Builder::Debian, &files, b"other tarball"));
        // The flake is not a Debian input; rootfs files are Nix inputs.
        let mut flake = files.clone();
        flake[2].2 = b"{ x = 1; }";
        assert_eq!(h, inputs_hash(Builder::Debian, &flake, b"tarball"));
        assert_ne!(
            inputs_hash(Builder::Nix, &files, b""),
            inputs_hash(Builder::Nix, &flake, b"")
        );
        assert_ne!(
            inputs_hash(Builder::Nix, &files, b""),
            inputs_hash(Builder::Nix, &changed[..2], b"")
        );
    }

    #[test]
    fn the_kernel_variant_is_recorded_and_older_manifests_read_without_it() {
        let m = Manifest {
            format: FORMAT,
            builder: "debian".into(),
            kernel: "vmlinuz".into(),
            rootfs: Some("rootfs.ext4".into()),
            initrd: Some("initrd.img".into()),
            cmdline: DEBIAN_STOCK_CMDLINE.into(),
            versions: BTreeMap::new(),
            content_hash: "h".into(),
            pvm_capable: false,
            ssh: true,
            kernel_variant: Some(KernelVariant::Stock),
        };
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains(r#""kernel_variant":"stock""#), "{json}");
        assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap(), m);
        let old = json.replace(r#","kernel_variant":"stock""#, "");
        let m_old: Manifest = serde_json::from_str(&old).unwrap();
        assert_eq!(m_old.kernel_variant, None);
        // The stock kernel's command line lets it use ACPI and modules.
        assert!(!DEBIAN_STOCK_CMDLINE.contains("acpi=off"));
        assert!(!DEBIAN_STOCK_CMDLINE.contains("nomodule"));
        assert!(DEBIAN_CMDLINE.contains("acpi=off"));
    }

    /// build-initramfs.sh on this machine's own Debian kernel (the lane's
    /// `linux-image-amd64`): the contract's modules, dependencies first,
    /// a console node and the init, in a cpio the kernel can unpack.
    #[test]
    fn the_stock_initramfs_holds_the_contract_modules_in_dependency_order() {
        let kver = std::fs::read_dir("/lib/modules")
            .expect("/lib/modules: this test needs a Debian kernel installed (apt-get install linux-image-amd64)")
            .flatten()
            .map(|e| e.path())
            .find(|p| p.join("modules.dep").exists() && p.join("kernel/drivers/virtio/virtio_mmio.ko").exists())
            .expect("a kernel in /lib/modules with virtio_mmio as a module (linux-image-amd64)");
        let kver = kver.file_name().unwrap().to_string_lossy().into_owned();
        let busybox = Path::new("/bin/busybox");
        assert!(busybox.exists(), "this test needs busybox-static");
        let out = std::env::temp_dir().join(format!("ks-initrd-{}.img", std::process::id()));
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-image/debian/build-initramfs.sh");
        let st = std::process::Command::new(&script)
            .args(["/", &kver])
            .arg(busybox)
            .arg(&out)
            .status()
            .unwrap();
        assert!(st.success(), "build-initramfs.sh failed");
        let list = std::process::Command::new(busybox)
            .args(["cpio", "-t"])
            .stdin(std::fs::File::open(&out).unwrap())
            .output()
            .unwrap();
        let names = String::from_utf8_lossy(&list.stdout).into_owned();
        for want in [
            "init",
            "dev/console",
            "bin/busybox",
            "modules.order",
            "lib/modules/virtio_mmio.ko",
            "lib/modules/ext4.ko",
            "lib/modules/vmw_vsock_virtio_transport.ko",
            "lib/modules/overlay.ko",
        ] {
            assert!(
                names.lines().any(|l| l == want),
                "{want} missing from the initramfs: {names}"
            );
        }
        let dir = std::env::temp_dir().join(format!("ks-initrd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let st = std::process::Command::new(busybox)
            .args(["cpio", "-i", "modules.order"])
            .current_dir(&dir)
            .stdin(std::fs::File::open(&out).unwrap())
            .output()
            .unwrap();
        assert!(st.status.success());
        let order = std::fs::read_to_string(dir.join("modules.order")).unwrap();
        let pos = |m: &str| {
            order
                .lines()
                .position(|l| l == m)
                .unwrap_or_else(|| panic!("{m} not in modules.order: {order}"))
        };
        assert!(
            pos("virtio_ring.ko") < pos("virtio_mmio.ko")
                && pos("virtio.ko") < pos("virtio_mmio.ko")
        );
        assert!(pos("jbd2.ko") < pos("ext4.ko") && pos("mbcache.ko") < pos("ext4.ko"));
        assert!(pos("vsock.ko") < pos("vmw_vsock_virtio_transport.ko"));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(&out);
    }

    #[test]
    fn embedded_sources_cover_both_builders() {
        let names: Vec<&str> = sources().iter().map(|s| s.0).collect();
        for needed in [
            "kernel/build-kernel.sh",
            "kernel/sandbox.config",
            "debian/build-rootfs.sh",
            "debian/packages.txt",
            "rootfs/usr/lib/keystone/init",
            "rootfs/etc/systemd/system/keystone-sshd.socket",
            "rootfs-src/boot-timer.c",
            "flake.nix",
            "debian/build-initramfs.sh",
            "debian/initramfs/init",
        ] {
            assert!(names.contains(&needed), "{needed} not embedded: {names:?}");
        }
        let init = sources()
            .iter()
            .find(|s| s.0 == "rootfs/usr/lib/keystone/init");
        assert!(init.is_some_and(|s| s.1), "init must be executable");
    }

    #[test]
    fn manifest_with_path_tricks_is_refused() {
        let dir = std::env::temp_dir().join(format!("ks-img-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let img = write_probe_image(&dir).unwrap();
        assert!(img.manifest.pvm_capable);
        assert_eq!(img.kernel(), dir.join("probe.elf"));
        let mut m = img.manifest.clone();
        m.kernel = "../etc/passwd".into();
        std::fs::write(dir.join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
        let err = Image::load(&dir).unwrap_err().to_string();
        assert!(err.contains("not a file name"), "{err}");
        m.kernel = "missing.elf".into();
        std::fs::write(dir.join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
        assert!(Image::load(&dir)
            .unwrap_err()
            .to_string()
            .contains("missing"));
        m.kernel = "probe.elf".into();
        m.format = 99;
        std::fs::write(dir.join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
        assert!(matches!(
            Image::load(&dir),
            Err(ImageError::Format { found: 99, .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
