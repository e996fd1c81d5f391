//! `xlb decap`: the backend-side decapsulator. Attach it to a backend host's NIC; tunnel packets
//! from the balancer addressed to this host are stripped and handed to the stack, where the VIP
//! (configured on loopback) takes them and the reply goes straight to the client.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use lb_userspace::loader::{Attached, Decapsulator};
use tokio::signal::unix::{SignalKind, signal};

use crate::agent::ModeArg;

/// Arguments of `xlb decap`.
#[derive(Debug, Args)]
pub struct DecapArgs {
    #[command(subcommand)]
    command: DecapCommand,
}

/// The `xlb decap` subcommands.
#[derive(Debug, Subcommand)]
enum DecapCommand {
    /// Attach the decapsulator and leave it attached (pinned under bpffs) after this command
    /// exits; attaching again replaces it atomically (e.g. with new addresses).
    Attach(AttachArgs),
    /// Detach the decapsulator `xlb decap attach` left on an interface.
    Detach(DetachArgs),
    /// Attach the decapsulator for as long as this command runs (until SIGTERM or SIGINT),
    /// logging its counters at exit.
    Run(AttachArgs),
}

/// Where `attach` pins by default.
const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/xlb-decap";

/// Arguments of `xlb decap attach` and `xlb decap run`.
#[derive(Debug, Args)]
struct AttachArgs {
    /// Network interface to attach the decapsulator to.
    #[arg(long, short = 'i', value_parser = interface_name)]
    interface: String,
    /// Tunnel address to accept (repeatable). Default: every address of the interface except
    /// IPv6 link-local ones.
    #[arg(long = "address", value_name = "ADDR")]
    addresses: Vec<IpAddr>,
    /// XDP attach mode: native (driver), generic (skb), or auto (native, else generic).
    #[arg(long, value_enum, default_value_t = ModeArg::Auto)]
    xdp_mode: ModeArg,
    /// bpffs directory of the pinned links (attach only): one `<interface>/link` per interface.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_BPFFS_DIR)]
    bpffs_dir: PathBuf,
}

/// Arguments of `xlb decap detach`.
#[derive(Debug, Args)]
struct DetachArgs {
    /// Network interface to detach from.
    #[arg(long, short = 'i', value_parser = interface_name)]
    interface: String,
    /// bpffs directory given to `xlb decap attach`.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_BPFFS_DIR)]
    bpffs_dir: PathBuf,
}

/// `--interface`: a Linux interface name. It also names the pin directory, so "..", "" or a
/// name with '/' would point outside it (`detach -i ../xlb` would remove the agent's pins).
fn interface_name(s: &str) -> Result<String, String> {
    lb_userspace::config::rules::interface(s).map_err(|v| v.message)
}

/// Runs `xlb decap attach|detach|run`.
pub fn run(args: DecapArgs) -> anyhow::Result<()> {
    match args.command {
        DecapCommand::Attach(a) => attach(&a),
        DecapCommand::Detach(d) => detach(&d),
        DecapCommand::Run(a) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(serve(a))
        }
    }
}

/// The pin directory of one interface.
fn pin_dir(bpffs_dir: &Path, interface: &str) -> PathBuf {
    bpffs_dir.join(interface)
}

/// `xlb decap attach`: load, fill the addresses, attach through a pinned link, exit.
fn attach(args: &AttachArgs) -> anyhow::Result<()> {
    let (mut decap, addresses) = load(args)?;
    let dir = pin_dir(&args.bpffs_dir, &args.interface);
    lb_userspace::pins::ensure_bpffs(&dir)?;
    let attached = decap.attach_pinned(&args.interface, args.xdp_mode.into(), &dir.join("link"))?;
    let list: Vec<String> = addresses.iter().map(ToString::to_string).collect();
    let how = match attached {
        Attached::Adopted => "replaced the attached decapsulator".to_string(),
        Attached::New(mode) => format!("attached in {mode} mode"),
    };
    tracing::info!(
        interface = %args.interface,
        addresses = %list.join(","),
        pin = %dir.join("link").display(),
        "xlb_decap {how}; it stays attached until `xlb decap detach --interface {}`",
        args.interface
    );
    Ok(())
}

/// `xlb decap detach`: remove the pinned link, which detaches the program. Only a directory
/// that `attach` made is removed: one holding nothing but an XDP link of this network
/// namespace (a mistaken `--bpffs-dir` must not take the balancer's pins, or another
/// namespace's decapsulator, with it).
fn detach(args: &DetachArgs) -> anyhow::Result<()> {
    let dir = pin_dir(&args.bpffs_dir, &args.interface);
    let link = dir.join("link");
    anyhow::ensure!(
        link.exists(),
        "no decapsulator attached by `xlb decap attach` on {} (nothing pinned at {})",
        args.interface,
        link.display()
    );
    let others: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "link")
        .collect();
    anyhow::ensure!(
        others.is_empty(),
        "{} holds more than a decapsulator's link ({}); it is not what `xlb decap attach` \
         pins, so it is left alone (check --bpffs-dir)",
        dir.display(),
        others.join(", ")
    );
    let facts = lb_userspace::pins::link_facts(&link)
        .with_context(|| format!("reading {}", link.display()))?
        .with_context(|| {
            format!(
                "{} is not an XDP link; it is not what `xlb decap attach` pins, so it is left \
                 alone",
                link.display()
            )
        })?;
    if facts.place()? == lb_userspace::pins::LinkPlace::Elsewhere {
        anyhow::bail!(
            "the decapsulator pinned at {} is attached in another network namespace (interface \
             index {} there); run the detach in that namespace",
            link.display(),
            facts.ifindex
        );
    }
    lb_userspace::pins::PinDir::new(&dir)
        .remove_all()
        .with_context(|| format!("removing {}", dir.display()))?;
    tracing::info!(interface = %args.interface, "xlb_decap detached");
    Ok(())
}

/// Checks the interface and addresses and loads the decapsulator with them.
fn load(args: &AttachArgs) -> anyhow::Result<(Decapsulator, Vec<IpAddr>)> {
    anyhow::ensure!(
        lb_userspace::host::interface_exists(&args.interface),
        "no network interface {:?} here (see `ip link`)",
        args.interface
    );
    let mut addresses = if args.addresses.is_empty() {
        interface_addresses(&args.interface)?
    } else {
        args.addresses.clone()
    };
    addresses.sort();
    addresses.dedup();
    if let Some(bad) = addresses
        .iter()
        .find(|a| a.is_unspecified() || a.is_multicast() || a.is_loopback())
    {
        anyhow::bail!(
            "{bad} cannot be a tunnel destination; give the backend's own unicast address"
        );
    }
    let on_interface = interface_addresses(&args.interface).unwrap_or_default();
    for a in addresses.iter().filter(|a| !on_interface.contains(a)) {
        tracing::warn!(
            address = %a,
            interface = %args.interface,
            "address is not on the interface; tunnel packets for it arrive only if routed here"
        );
    }
    anyhow::ensure!(
        !addresses.is_empty(),
        "interface {} has no addresses; give the tunnel address with --address",
        args.interface
    );
    let mut decap = Decapsulator::load().context("loading the XDP decapsulator (are you root?)")?;
    for addr in &addresses {
        decap.add_local_addr(*addr)?;
    }
    Ok((decap, addresses))
}

/// `xlb decap run`: attached while this process runs.
async fn serve(args: AttachArgs) -> anyhow::Result<()> {
    let (mut decap, addresses) = load(&args)?;
    let (mode, _link) = decap.attach(&args.interface, args.xdp_mode.into())?;
    let list: Vec<String> = addresses.iter().map(ToString::to_string).collect();
    tracing::info!(interface = %args.interface, %mode, addresses = %list.join(","), "xlb_decap attached");

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    let totals = decap.counters()?;
    tracing::info!(counters = %totals, "stopping; detaching xlb_decap");
    Ok(())
}

/// Every IPv4 and IPv6 address of `interface` (link-local IPv6 excluded: tunnels never use it).
fn interface_addresses(interface: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error()).context("listing interface addresses");
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned; it lives until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a NUL-terminated name owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if name.to_bytes() != interface.as_bytes() {
            continue;
        }
        // SAFETY: the family field is valid for every sockaddr; the casts match the family.
        unsafe {
            match (*ifa.ifa_addr).sa_family as i32 {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    out.push(IpAddr::from(
                        u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                    ));
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    let a = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                    if a.segments()[0] & 0xffc0 != 0xfe80 {
                        out.push(IpAddr::V6(a));
                    }
                }
                _ => {}
            }
        }
    }
    // SAFETY: frees the list from getifaddrs exactly once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}
