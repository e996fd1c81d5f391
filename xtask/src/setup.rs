//! Idempotent set-up of everything the build and the tests need on a fresh machine.
//!
//! Each step first checks whether its result is already there and does nothing if so, so a
//! second run returns in seconds.

use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::toolchain::{BPF_LINKER_VERSION, NIGHTLY, Nightly};

/// Debian packages the test suites use: `ip` for namespaces and veth pairs, `ethtool` to turn
/// off veth checksum offload (see platform notes), `ping` for reachability checks.
/// The end-to-end tests, the demo and the benchmarks run real servers and clients: `nginx`
/// backends, `curl` and `wrk` clients, `haproxy` and `nftables` as the balancers xlb is measured
/// against.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "iputils-ping",
    "nginx",
    "curl",
    "wrk",
    "haproxy",
    "nftables",
];

/// Runs every set-up step.
pub fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut did: Vec<(String, Duration)> = Vec::new();

    let t = Instant::now();
    let missing = missing_debian_packages(DEBIAN_PACKAGES)?;
    if !missing.is_empty() {
        install_debian_packages(&missing)?;
        did.push((
            format!("apt-get install {}", missing.join(" ")),
            t.elapsed(),
        ));
    }

    let nightly = Nightly::detect().map_err(anyhow::Error::msg).with_context(|| {
        format!("no usable `{NIGHTLY}` toolchain; install one with `rustup toolchain install {NIGHTLY}`")
    })?;

    let t = Instant::now();
    if !nightly.has_rust_src() {
        run_cmd(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            NIGHTLY,
        ]))?;
        did.push(("rustup component add rust-src".into(), t.elapsed()));
    }

    let t = Instant::now();
    if !bpf_linker_ok(&nightly) {
        build_bpf_linker(&nightly)?;
        did.push((
            format!("build bpf-linker {BPF_LINKER_VERSION}"),
            t.elapsed(),
        ));
    }

    if did.is_empty() {
        eprintln!(
            "setup: everything present ({}; tools in {}) [{:.1}s]",
            nightly.key,
            nightly.tools_dir().display(),
            started.elapsed().as_secs_f64()
        );
    } else {
        for (what, took) in &did {
            eprintln!("setup: {what} [{:.1}s]", took.as_secs_f64());
        }
        eprintln!("setup: done [{:.1}s]", started.elapsed().as_secs_f64());
    }
    Ok(())
}

fn missing_debian_packages(packages: &[&str]) -> anyhow::Result<Vec<String>> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Status}\n"])
        .args(packages)
        .output()
        .context("running dpkg-query (is this a Debian machine?)")?;
    // dpkg-query exits non-zero when a package is unknown; the output still lists the known ones.
    let listed = String::from_utf8_lossy(&out.stdout);
    Ok(packages
        .iter()
        .filter(|p| {
            !listed.lines().any(|l| {
                l.split_once(' ')
                    .is_some_and(|(n, s)| n == **p && s == "installed")
            })
        })
        .map(|p| p.to_string())
        .collect())
}

fn install_debian_packages(packages: &[String]) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "Debian packages missing: {}; install them with `sudo apt-get install -y {}` or run as root",
            packages.join(" "),
            packages.join(" ")
        );
    }
    eprintln!("setup: installing Debian packages: {}", packages.join(" "));
    run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    // Server packages (nginx, haproxy) start their service on install; the tests run their own
    // instances in namespaces, so the install must not start one in the host's namespace. A
    // policy-rc.d that answers 101 ("action forbidden") is Debian's switch for that.
    let policy = std::path::Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists();
    if ours {
        std::fs::write(policy, "#!/bin/sh\nexit 101\n").context("writing policy-rc.d")?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755))?;
    }
    let result = run_cmd(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages),
    );
    if ours {
        let _ = std::fs::remove_file(policy);
    }
    result
}

fn bpf_linker_ok(nightly: &Nightly) -> bool {
    let Ok(out) = Command::new(nightly.bpf_linker()).arg("--version").output() else {
        return false;
    };
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
}

/// Builds bpf-linker against the nightly's own libLLVM (Debian's LLVM is too old, and prebuilt
/// linkers cannot be downloaded here). The build goes to a scratch root first and is moved into
/// place only when complete, so an interrupted build never leaves a broken linker behind.
fn build_bpf_linker(nightly: &Nightly) -> anyhow::Result<()> {
    let libllvm = nightly.libllvm().with_context(|| {
        format!(
            "no libLLVM.so.*-rust-* in {}/lib; the nightly toolchain looks incomplete",
            nightly.sysroot.display()
        )
    })?;
    let llvm_major = llvm_major_version(&libllvm)?;
    let tools = nightly.tools_dir();
    let llvm_lib = tools.join("llvm").join("lib");
    fs::create_dir_all(&llvm_lib).with_context(|| format!("creating {}", llvm_lib.display()))?;
    let file_name = libllvm
        .file_name()
        .context("libLLVM path has no file name")?;
    // bpf-linker's build links `-lLLVM`; the loader then looks for the versioned soname. Both
    // names point at the nightly's library.
    symlink_fresh(&libllvm, &llvm_lib.join("libLLVM.so"))?;
    symlink_fresh(&libllvm, &llvm_lib.join(file_name))?;

    let scratch = tools.join(format!("install.{}", std::process::id()));
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm_major} of {} (about 2 minutes)",
        nightly.key
    );
    let result = run_cmd(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--force", "--version"])
            .arg(format!("={BPF_LINKER_VERSION}"))
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{llvm_major}"))
            .arg("--root")
            .arg(&scratch)
            .env("LLVM_PREFIX", tools.join("llvm"))
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO_TARGET_DIR"),
    );
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&scratch);
        return Err(e.context("building bpf-linker"));
    }
    let bin = tools.join("bin");
    fs::create_dir_all(&bin)?;
    fs::rename(scratch.join("bin").join("bpf-linker"), nightly.bpf_linker())
        .context("moving bpf-linker into place")?;
    let _ = fs::remove_dir_all(&scratch);
    if !bpf_linker_ok(nightly) {
        bail!(
            "bpf-linker was built but `{} --version` fails",
            nightly.bpf_linker().display()
        );
    }
    Ok(())
}

/// `libLLVM.so.22.1-rust-...` -> 22.
fn llvm_major_version(lib: &Path) -> anyhow::Result<u32> {
    let name = lib.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    name.strip_prefix("libLLVM.so.")
        .and_then(|rest| rest.split(['.', '-']).next())
        .and_then(|major| major.parse().ok())
        .with_context(|| format!("cannot read the LLVM version from {name}"))
}

fn symlink_fresh(target: &Path, link: &Path) -> anyhow::Result<()> {
    let _ = fs::remove_file(link);
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} -> {}", link.display(), target.display()))
}

/// True when running as root (uid 0), read from /proc so no libc binding is needed.
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Runs a command with inherited output; an error names the command and its exit status.
pub fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_is_read_from_the_library_name() {
        let lib = Path::new("/x/libLLVM.so.22.1-rust-1.97.0-nightly");
        assert_eq!(llvm_major_version(lib).unwrap(), 22);
        assert!(llvm_major_version(Path::new("/x/libfoo.so")).is_err());
    }

    #[test]
    fn cache_root_honours_override() {
        // Only reads the environment; no set-up side effects.
        let root = crate::toolchain::cache_root();
        assert!(root.is_absolute());
    }
}
