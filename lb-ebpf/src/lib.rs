//! Host-side stub of the eBPF crate. The programs live in the `xlb-bpf` binary target, which is
//! built only for `bpfel-unknown-none` by `lb-userspace/build.rs`.
#![no_std]
