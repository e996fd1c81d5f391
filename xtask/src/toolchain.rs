//! Where the eBPF build tools live, shared by `cargo xtask setup` and `lb-userspace/build.rs`
//! (which includes this file by path), so both agree without keeping two copies in sync.
//!
//! bpf-linker must be linked against the very LLVM the nightly compiler emits bitcode for, so the
//! tools directory is keyed by the nightly's commit: a different nightly gets its own linker.
//! It lives under the user's cache directory so that every clone on one machine shares it.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

/// The bpf-linker release the set-up step installs.
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// The toolchain that builds the eBPF crate, as rustup names it.
pub const NIGHTLY: &str = "nightly";

/// The installed nightly toolchain, as far as the eBPF build cares.
#[derive(Debug, Clone)]
pub struct Nightly {
    /// `nightly-<commit date>-<short commit hash>`: names the tools directory.
    pub key: String,
    /// The toolchain's sysroot (holds `lib/libLLVM*.so` and, once added, `lib/rustlib/src`).
    pub sysroot: PathBuf,
}

impl Nightly {
    /// Asks rustup about the installed nightly.
    pub fn detect() -> Result<Nightly, String> {
        let verbose = rustc_output(&["-vV"])?;
        let field = |name: &str| {
            verbose
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .ok_or_else(|| format!("`rustc +{NIGHTLY} -vV` printed no `{name}` line"))
        };
        let date = field("commit-date:")?;
        let hash = field("commit-hash:")?;
        let short = hash.get(..9).unwrap_or(&hash);
        let sysroot = PathBuf::from(rustc_output(&["--print", "sysroot"])?.trim());
        Ok(Nightly {
            key: format!("nightly-{date}-{short}"),
            sysroot,
        })
    }

    /// Directory holding this nightly's bpf-linker (`bin/`) and LLVM links (`llvm/lib/`).
    pub fn tools_dir(&self) -> PathBuf {
        cache_root().join("toolchain").join(&self.key)
    }

    /// Path of the bpf-linker built for this nightly.
    pub fn bpf_linker(&self) -> PathBuf {
        self.tools_dir().join("bin").join("bpf-linker")
    }

    /// True when the nightly has the `rust-src` component (`-Z build-std=core` needs it).
    pub fn has_rust_src(&self) -> bool {
        self.sysroot
            .join("lib/rustlib/src/rust/library/core/Cargo.toml")
            .is_file()
    }

    /// The nightly's own libLLVM shared library (`libLLVM.so.<ver>-rust-<ver>`), found by name
    /// pattern rather than hard-coded, so a different nightly works unchanged.
    pub fn libllvm(&self) -> Option<PathBuf> {
        let lib = self.sysroot.join("lib");
        let mut found: Vec<PathBuf> = std::fs::read_dir(&lib)
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
            })
            .collect();
        found.sort();
        found.pop()
    }
}

/// Root of xlb's per-user cache: `$XLB_CACHE_DIR`, else `$XDG_CACHE_HOME/xlb`, else
/// `$HOME/.cache/xlb`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = env::var_os("XLB_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = env::var_os("XDG_CACHE_HOME") {
        return Path::new(&dir).join("xlb");
    }
    let home = env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache").join("xlb")
}

fn rustc_output(args: &[&str]) -> Result<String, String> {
    let out = Command::new("rustup")
        .args(["run", NIGHTLY, "rustc"])
        .args(args)
        // A build script runs with cargo's RUSTC/RUSTUP_TOOLCHAIN set for the stable toolchain;
        // they must not leak into the question about the nightly.
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .map_err(|e| format!("cannot run `rustup run {NIGHTLY} rustc`: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`rustup run {NIGHTLY} rustc {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    String::from_utf8(out.stdout).map_err(|e| format!("rustc printed non-UTF-8: {e}"))
}
