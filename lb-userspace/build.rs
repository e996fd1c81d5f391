//! Builds the XDP object from `lb-ebpf` with aya-build, for embedding in the `xlb` binary.
//!
//! The eBPF build needs two things a plain Rust install lacks: the nightly's `rust-src` (for
//! `-Z build-std=core`) and a bpf-linker built against that nightly's LLVM. When either is missing
//! the build stops with one line naming the command that installs it.

#[path = "../xtask/src/toolchain.rs"]
#[expect(dead_code, reason = "shared with xtask, which uses more of it")]
mod toolchain;

use std::{env, path::PathBuf};

use anyhow::{Context as _, anyhow};

const SETUP_HINT: &str = "run `cargo xtask setup` (adds rust-src to the nightly and builds bpf-linker into the xlb tool cache)";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=XLB_CACHE_DIR");
    let nightly = toolchain::Nightly::detect()
        .map_err(|e| anyhow!("the eBPF build needs the nightly toolchain: {e}; {SETUP_HINT}"))?;
    if !nightly.has_rust_src() {
        return Err(anyhow!(
            "the nightly toolchain lacks rust-src, needed to build the XDP object; {SETUP_HINT}"
        ));
    }
    let linker = nightly.bpf_linker();
    if !linker.is_file() {
        return Err(anyhow!(
            "bpf-linker for {} not found at {}; run `cargo xtask setup` (it builds it there)",
            nightly.key,
            linker.display()
        ));
    }
    println!("cargo:rerun-if-changed={}", linker.display());

    // aya-build runs `cargo build` for the BPF target, which finds bpf-linker on PATH.
    let tool_bin = linker.parent().context("bpf-linker path has no parent")?;
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![PathBuf::from(tool_bin)];
    dirs.extend(env::split_paths(&path));
    let joined = env::join_paths(dirs).context("joining PATH")?;
    // SAFETY: build scripts are single-threaded at this point; nothing else reads the
    // environment concurrently.
    unsafe {
        env::set_var("PATH", joined);
        // aya-build turns every line the inner cargo prints into a build warning; keep it to
        // real diagnostics rather than one "Compiling ..." warning per crate.
        env::set_var("CARGO_TERM_QUIET", "true");
    }

    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "lb-ebpf")
        .context("lb-ebpf package not in the workspace")?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .context("lb-ebpf manifest has no parent")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(toolchain::NIGHTLY),
    )
}
