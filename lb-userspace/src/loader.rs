//! Loads the embedded XDP object into the kernel and attaches it. The agent and the fixture
//! tests use this same loader, so the tests exercise exactly what ships.

use std::fmt;

use aya::{
    Ebpf, EbpfError,
    maps::{MapData, MapError, PerCpuArray},
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use aya_log::EbpfLogger;
use lb_common::{counters::Counter, types::LocalAddr};
use thiserror::Error;

use crate::{
    counters::CounterSnapshot,
    pins::{LinkPlace, PinDir, PinLock, Prepared},
};

/// The balancer object built from `lb-ebpf` by this crate's build script.
pub static BALANCER_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb-bpf"));

/// What can go wrong while loading, attaching or reading the balancer.
#[derive(Debug, Error)]
pub enum LoaderError {
    /// The kernel rejected the object or one of its maps.
    #[error("loading the XDP object: {0}")]
    Load(#[from] EbpfError),
    /// The object lacks a program or map the agent expects (a build mismatch).
    #[error("the XDP object has no {kind} named {name}")]
    Missing {
        /// "program" or "map".
        kind: &'static str,
        /// The name looked up.
        name: &'static str,
    },
    /// The verifier or the kernel refused the program.
    #[error("loading program {name}: {source}")]
    Program {
        /// The program's name.
        name: &'static str,
        /// The kernel's answer.
        #[source]
        source: ProgramError,
    },
    /// Attaching failed in every mode that was tried.
    #[error("attaching to {interface} in {mode} mode: {source}{hint}")]
    Attach {
        /// Interface name.
        interface: String,
        /// The mode of the last attempt.
        mode: AttachMode,
        /// The kernel's answer.
        #[source]
        source: ProgramError,
        /// What to try next, if anything.
        hint: &'static str,
    },
    /// A map operation failed.
    #[error("map {name}: {source}")]
    Map {
        /// The map's name.
        name: &'static str,
        /// The failure.
        #[source]
        source: MapError,
    },
    /// A value is outside what the maps can hold.
    #[error("{what} {value} is out of range (0..={max})")]
    OutOfRange {
        /// What the value is.
        what: &'static str,
        /// The value given.
        value: u32,
        /// The largest valid value.
        max: u32,
    },
    /// A Maglev table the maps cannot take (refused before anything was written).
    #[error("Maglev table refused: {reason}")]
    BadTable {
        /// What is wrong with it.
        reason: String,
    },
    /// The log ring buffer could not be opened.
    #[error("opening the eBPF log buffer: {0}")]
    Log(#[from] aya_log::Error),
    /// The pin directory cannot be used.
    #[error(transparent)]
    Pin(#[from] crate::pins::PinError),
    /// Pinning or adopting the XDP link failed.
    #[error("XDP link pinned at {path}: {reason}")]
    Link {
        /// The pin path.
        path: std::path::PathBuf,
        /// What failed.
        reason: String,
    },
}

/// How the balancer came to be attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// Attached anew, in this mode.
    New(AttachMode),
    /// Took over the pinned link of a previous agent: the new program replaced the old one in
    /// one atomic update, so no packet met an interface without a program.
    Adopted,
}

impl fmt::Display for Attached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attached::New(mode) => write!(f, "{mode}"),
            Attached::Adopted => f.write_str("adopted (pinned link, mode unchanged)"),
        }
    }
}

/// How the program is attached to an interface, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic with a warning when the driver refuses.
    #[default]
    Auto,
    /// Native (driver) mode only: runs before the kernel allocates an skb.
    Native,
    /// Generic (skb) mode: works on every device, at a fraction of native speed.
    Generic,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachMode::Auto => "auto",
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
        })
    }
}

/// The loaded balancer: the object, its XDP program (verified and in the kernel) and its maps.
pub struct Balancer {
    ebpf: Ebpf,
    /// With pinned maps: the pin directory's lock, held as long as the maps are in use here.
    _pin_lock: Option<PinLock>,
}

/// Sizes chosen at load time.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// Entries of the connection table (all CPUs together).
    pub flow_entries: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            flow_entries: lb_common::types::DEFAULT_FLOW_ENTRIES,
        }
    }
}

impl Balancer {
    /// Loads the embedded object and its balancer program into the kernel (not yet attached),
    /// with default sizes.
    pub fn load() -> Result<Self, LoaderError> {
        Self::load_with(LoadOptions::default())
    }

    /// Loads the embedded object with the given sizes.
    pub fn load_with(options: LoadOptions) -> Result<Self, LoaderError> {
        let mut ebpf = aya::EbpfLoader::new()
            .map_max_entries(lb_common::maps::FLOWS, options.flow_entries)
            .load(BALANCER_OBJECT)?;
        load_xdp(&mut ebpf, lb_common::programs::BALANCER)?;
        Ok(Self {
            ebpf,
            _pin_lock: None,
        })
    }

    /// Loads the embedded object with its state maps pinned in `pins`: maps a previous agent
    /// pinned there (same layout) are adopted with their contents, missing ones are created and
    /// pinned. The program is not attached yet (see [`Balancer::attach_pinned`]).
    pub fn load_pinned(
        options: LoadOptions,
        pins: &PinDir,
    ) -> Result<(Self, Prepared), LoaderError> {
        // Before anything is looked at: a second agent on the same directory would adopt the
        // first one's live maps and rewrite them to its own configuration.
        let lock = pins.lock()?;
        let prepared = pins.prepare(options.flow_entries)?;
        let paths: Vec<(&'static str, std::path::PathBuf)> = crate::pins::pinned_map_names()
            .into_iter()
            .map(|name| (name, pins.map_path(name)))
            .collect();
        let mut loader = aya::EbpfLoader::new();
        loader.map_max_entries(lb_common::maps::FLOWS, options.flow_entries);
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(BALANCER_OBJECT)?;
        load_xdp(&mut ebpf, lb_common::programs::BALANCER)?;
        Ok((
            Self {
                ebpf,
                _pin_lock: Some(lock),
            },
            prepared,
        ))
    }

    /// Attaches to `interface` through the link pinned in `pins`: when a previous agent's link
    /// is pinned there for the same interface, this program replaces its program atomically;
    /// otherwise the program is attached in `mode` and its link pinned. Either way the program
    /// stays attached after this process exits, until [`PinDir::remove_all`].
    pub fn attach_pinned(
        &mut self,
        interface: &str,
        mode: AttachMode,
        pins: &PinDir,
    ) -> Result<Attached, LoaderError> {
        attach_pinned(
            xdp_mut(&mut self.ebpf, lb_common::programs::BALANCER)?,
            interface,
            mode,
            &pins.link_path(),
        )
    }

    pub(crate) fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    pub(crate) fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The balancer program, for attaching or for `BPF_PROG_TEST_RUN`.
    pub fn program(&self) -> &Xdp {
        let name = lb_common::programs::BALANCER;
        let program = self
            .ebpf
            .program(name)
            .expect("checked at load: the object has the balancer program");
        program
            .try_into()
            .expect("checked at load: the balancer is an XDP program")
    }

    /// Attaches the balancer to `interface`. In [`AttachMode::Auto`], native mode is tried first
    /// and generic mode used when the driver refuses, with a warning naming the reason. Returns
    /// the mode actually used; the program stays attached until this `Balancer` is dropped.
    pub fn attach(
        &mut self,
        interface: &str,
        mode: AttachMode,
    ) -> Result<(AttachMode, XdpLinkId), LoaderError> {
        attach_xdp(
            xdp_mut(&mut self.ebpf, lb_common::programs::BALANCER)?,
            interface,
            mode,
        )
    }

    /// Every counter summed over all CPUs.
    pub fn counters(&self) -> Result<CounterSnapshot, LoaderError> {
        read_counters(&self.ebpf)
    }

    /// Opens the ring buffer the programs log into; records are handed to `logger` on each
    /// [`EbpfLogger::flush`]. Can be taken once per load.
    pub fn take_logger<T: log::Log>(&mut self, logger: T) -> Result<EbpfLogger<T>, LoaderError> {
        Ok(EbpfLogger::init_with_logger(&mut self.ebpf, logger)?)
    }
}

/// Loads (verifies) the XDP program `name` of an object into the kernel.
pub(crate) fn load_xdp(ebpf: &mut Ebpf, name: &'static str) -> Result<(), LoaderError> {
    xdp_mut(ebpf, name)?
        .load()
        .map_err(|source| LoaderError::Program { name, source })
}

/// The XDP program `name` of an object.
pub(crate) fn xdp_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut Xdp, LoaderError> {
    let program = ebpf.program_mut(name).ok_or(LoaderError::Missing {
        kind: "program",
        name,
    })?;
    program
        .try_into()
        .map_err(|source| LoaderError::Program { name, source })
}

/// Attaches `program` in `mode` (see [`Balancer::attach`]).
fn attach_xdp(
    program: &mut Xdp,
    interface: &str,
    mode: AttachMode,
) -> Result<(AttachMode, XdpLinkId), LoaderError> {
    let attach_err = |mode, source, hint| LoaderError::Attach {
        interface: interface.to_string(),
        mode,
        source,
        hint,
    };
    match mode {
        AttachMode::Native => program
            .attach(interface, XdpMode::Driver)
            .map(|id| (AttachMode::Native, id))
            .map_err(|e| {
                let hint = if already_attached(&e) {
                    "; another XDP program is already attached (see `ip link show`)"
                } else {
                    "; try `--xdp-mode generic`"
                };
                attach_err(mode, e, hint)
            }),
        AttachMode::Generic => program
            .attach(interface, XdpMode::Skb)
            .map(|id| (AttachMode::Generic, id))
            .map_err(|e| attach_err(mode, e, "")),
        AttachMode::Auto => match program.attach(interface, XdpMode::Driver) {
            Ok(id) => Ok((AttachMode::Native, id)),
            // Another XDP program holds the interface: generic mode would fail the same way,
            // and blaming the driver would mislead.
            Err(native) if already_attached(&native) => Err(attach_err(
                AttachMode::Native,
                native,
                "; another XDP program is already attached (see `ip link show`); detach it or \
                 stop the other xlb first",
            )),
            Err(native) => {
                tracing::warn!(
                    interface,
                    error = %native,
                    "native XDP attach refused by the driver; falling back to generic mode \
                     (correct, but much slower)"
                );
                program
                    .attach(interface, XdpMode::Skb)
                    .map(|id| (AttachMode::Generic, id))
                    .map_err(|e| attach_err(AttachMode::Generic, e, ""))
            }
        },
    }
}

/// Attaches `program` through the link pinned at `path` (see [`Balancer::attach_pinned`]).
fn attach_pinned(
    program: &mut Xdp,
    interface: &str,
    mode: AttachMode,
    path: &std::path::Path,
) -> Result<Attached, LoaderError> {
    let link_err = |reason: String| LoaderError::Link {
        path: path.to_path_buf(),
        reason,
    };
    let facts = crate::pins::link_facts(path).map_err(|e| link_err(e.to_string()))?;
    let want = crate::pins::ifindex(interface);
    let place = match &facts {
        Some(f) => Some(f.place().map_err(|e| link_err(e.to_string()))?),
        None => None,
    };
    match (facts, place) {
        (Some(_), Some(LinkPlace::Here(index))) if Some(index) == want => {
            let pinned = PinnedLink::from_pin(path).map_err(|e| link_err(e.to_string()))?;
            let link =
                XdpLink::try_from(FdLink::from(pinned)).map_err(|e| link_err(e.to_string()))?;
            program
                .attach_to_link(link)
                .map_err(|e| link_err(format!("replacing the program: {e}")))?;
            return Ok(Attached::Adopted);
        }
        (Some(f), Some(LinkPlace::Elsewhere)) => {
            // Another network namespace's live link (a bpffs is shared by all of them, and
            // interface indexes repeat across them): taking it over would move that
            // namespace's program, unpinning it would detach it.
            return Err(link_err(format!(
                "it is attached to interface index {} of another network namespace (program \
                 id {}), not to {interface} here; give each network namespace its own pin \
                 directory",
                f.ifindex, f.prog_id
            )));
        }
        (Some(f), _) => {
            // The pinned link is on another interface of this namespace (the configuration
            // moved) or its interface is gone: unpinning it detaches the old program once its
            // last descriptor closes.
            tracing::warn!(
                path = %path.display(),
                pinned_ifindex = f.ifindex,
                %interface,
                "the pinned XDP link is not on this interface; replacing it"
            );
            std::fs::remove_file(path).map_err(|e| link_err(e.to_string()))?;
        }
        (None, _) if path.exists() => {
            return Err(link_err(
                "something other than an XDP link is pinned there; remove it".into(),
            ));
        }
        (None, _) => {}
    }
    let (mode, id) = attach_xdp(program, interface, mode)?;
    let link = program.take_link(id).map_err(|e| link_err(e.to_string()))?;
    let fd_link = FdLink::try_from(link).map_err(|e| {
        link_err(format!(
            "the kernel attached XDP without a BPF link ({e}); pinning needs one"
        ))
    })?;
    // Our descriptor closes when `pinned` drops: the pin keeps the link (and the program).
    let _pinned = fd_link
        .pin(path)
        .map_err(|e| link_err(format!("pinning: {e}")))?;
    Ok(Attached::New(mode))
}

/// True when the kernel refused an attach because the interface already has an XDP program
/// (EEXIST / EBUSY somewhere in the error's chain).
fn already_attached(e: &ProgramError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EEXIST | libc::EBUSY))
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// Sums every counter of an object's counter map over all CPUs.
fn read_counters(ebpf: &Ebpf) -> Result<CounterSnapshot, LoaderError> {
    let name = lb_common::maps::COUNTERS;
    let map = ebpf
        .map(name)
        .ok_or(LoaderError::Missing { kind: "map", name })?;
    let array: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(map).map_err(|source| LoaderError::Map { name, source })?;
    let mut pairs = Vec::with_capacity(Counter::ALL.len());
    for &counter in Counter::ALL {
        let per_cpu = array
            .get(&counter.index(), 0)
            .map_err(|source| LoaderError::Map { name, source })?;
        pairs.push((counter, per_cpu.iter().sum()));
    }
    Ok(CounterSnapshot::from_pairs(pairs))
}

/// The backend-side decapsulator object, built from `lb-ebpf`'s `xlb-decap` target.
pub static DECAP_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb-decap"));

/// The loaded decapsulator: strips IPIP / IPv6-in-IP headers addressed to this host's tunnel
/// addresses and passes the inner packet to the stack.
pub struct Decapsulator {
    ebpf: Ebpf,
}

impl Decapsulator {
    /// Loads the embedded decapsulator into the kernel (not yet attached).
    pub fn load() -> Result<Self, LoaderError> {
        let mut ebpf = Ebpf::load(DECAP_OBJECT)?;
        load_xdp(&mut ebpf, lb_common::programs::DECAP)?;
        Ok(Self { ebpf })
    }

    /// The program, for attaching or for `BPF_PROG_TEST_RUN`.
    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(lb_common::programs::DECAP)
            .expect("checked at load: the object has the decap program")
            .try_into()
            .expect("checked at load: the decap program is an XDP program")
    }

    /// Attaches to `interface` (see [`Balancer::attach`] for the modes).
    pub fn attach(
        &mut self,
        interface: &str,
        mode: AttachMode,
    ) -> Result<(AttachMode, XdpLinkId), LoaderError> {
        attach_xdp(
            xdp_mut(&mut self.ebpf, lb_common::programs::DECAP)?,
            interface,
            mode,
        )
    }

    /// Attaches to `interface` through a link pinned at `link_path` (see
    /// [`Balancer::attach_pinned`]): the program stays attached after this process exits, and
    /// a later attach replaces it atomically; removing the pin detaches it.
    pub fn attach_pinned(
        &mut self,
        interface: &str,
        mode: AttachMode,
        link_path: &std::path::Path,
    ) -> Result<Attached, LoaderError> {
        attach_pinned(
            xdp_mut(&mut self.ebpf, lb_common::programs::DECAP)?,
            interface,
            mode,
            link_path,
        )
    }

    /// Accepts tunnel packets addressed to `addr` from now on.
    pub fn add_local_addr(&mut self, addr: std::net::IpAddr) -> Result<(), LoaderError> {
        let name = lb_common::maps::DECAP_ADDRS;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(LoaderError::Missing { kind: "map", name })?;
        let mut set: aya::maps::HashMap<&mut MapData, LocalAddr, u8> =
            aya::maps::HashMap::try_from(map)
                .map_err(|source| LoaderError::Map { name, source })?;
        set.insert(local_addr(addr), 1, 0)
            .map_err(|source| LoaderError::Map { name, source })
    }

    /// Every counter summed over all CPUs.
    pub fn counters(&self) -> Result<CounterSnapshot, LoaderError> {
        read_counters(&self.ebpf)
    }
}

/// The address of the map form `addr`/`family` (of a [`LocalAddr`], a backend entry, ...):
/// `None` for a family that is neither IPv4 nor IPv6 (an unused entry).
pub fn ip_of(addr: &[u8; 16], family: lb_common::types::Family) -> Option<std::net::IpAddr> {
    match family {
        lb_common::types::FAMILY_V4 => {
            Some(std::net::IpAddr::from([addr[0], addr[1], addr[2], addr[3]]))
        }
        lb_common::types::FAMILY_V6 => Some(std::net::IpAddr::from(*addr)),
        _ => None,
    }
}

/// The map form of an address.
pub fn local_addr(addr: std::net::IpAddr) -> LocalAddr {
    let mut out = LocalAddr::default();
    match addr {
        std::net::IpAddr::V4(a) => {
            out.addr[..4].copy_from_slice(&a.octets());
            out.family = lb_common::types::FAMILY_V4;
        }
        std::net::IpAddr::V6(a) => {
            out.addr = a.octets();
            out.family = lb_common::types::FAMILY_V6;
        }
    }
    out
}
