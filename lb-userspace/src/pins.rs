//! Pinning under bpffs, for restarts that drop nothing. The balancer's state maps and its XDP
//! link are pinned in `agent.bpffs_dir`; a new agent (a restart, an upgrade, a start after
//! kill -9) re-opens those maps instead of creating empty ones, and swaps its program into the
//! pinned link atomically (`BPF_LINK_UPDATE`), so the interface never runs without a program and
//! the connection table carries on.
//!
//! Layout of the directory:
//!
//! - `link`: the XDP link (layout-independent: any version of the program can take it over);
//! - `maps-v<LAYOUT_VERSION>/<map name>`: the maps. A new layout (a new key or value format)
//!   gets a new directory, so an upgrade that changes the layout starts with fresh maps while
//!   the old program keeps running on the old ones until the link switches, and the old
//!   directory is removed afterwards.
//!
//! The kernel facts (is this bpffs, which interface a link is on) come from raw syscalls that
//! aya does not expose.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use aya::maps::{MapInfo, MapType};
use lb_common::{
    counters::MAX_COUNTERS,
    maps as names,
    types::{
        Backend, FRAG_ENTRIES, FlowKey, FlowValue, FragKey, FragValue, LbConfig, LocalAddr,
        MAX_BACKENDS, MAX_LOCAL_ADDRS, MAX_TABLES, MAX_VIP_ADDRS, MAX_VIPS, Stats, VIP_BLOOM_WORDS,
        VipKey, VipMeta, VipState,
    },
};
use thiserror::Error;

/// Version of the pinned maps' layout. Bump it whenever a map's key or value changes meaning
/// (even at the same size) or the Maglev tables' flags change (the outer map only accepts
/// tables like its template): an agent never adopts maps of another layout version.
/// 2: mmapable Maglev tables. 3: region split in `VipMeta` (64 bytes), `XLB_REGION_ADDRS`.
pub const LAYOUT_VERSION: u32 = 3;

/// `statfs` magic number of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// What can go wrong with the pin directory.
#[derive(Debug, Error)]
pub enum PinError {
    /// The directory is not on a bpf filesystem and none could be mounted.
    #[error(
        "{path} is not on a bpf filesystem ({reason}); mount one with \
         `mount -t bpf bpf /sys/fs/bpf` or choose a directory below a bpffs mount"
    )]
    NotBpffs {
        /// The directory.
        path: PathBuf,
        /// Why it could not be used.
        reason: String,
    },
    /// Another agent holds the directory.
    #[error(
        "another xlb agent is using {path} (agent.bpffs_dir): two agents on one pin directory \
         would rewrite each other's maps; stop the other agent, or give this one its own \
         agent.bpffs_dir"
    )]
    Busy {
        /// The directory.
        path: PathBuf,
    },
    /// A file operation on the directory failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> PinError + '_ {
    move |source| PinError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One pinned map: its name and the layout the current program expects.
#[derive(Debug, Clone, Copy)]
struct Expected {
    name: &'static str,
    map_type: MapType,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
    /// Counters and statistics: replaced on their own when they do not fit (a reset counter is
    /// harmless); every other map carries state that must stay consistent with the rest.
    disposable: bool,
}

/// The maps pinned for restarts, with the layout this build expects (`flow_entries` is the
/// configured connection-table size). The log ring buffer, its rate limits and the per-CPU
/// scratch space belong to one load and are not pinned.
fn expected(flow_entries: u32) -> Vec<Expected> {
    use std::mem::size_of;
    let e = |name, map_type, key_size, value_size, max_entries, disposable| Expected {
        name,
        map_type,
        key_size,
        value_size,
        max_entries,
        disposable,
    };
    vec![
        e(
            names::VIPS,
            MapType::Hash,
            size_of::<VipKey>(),
            size_of::<VipMeta>(),
            MAX_VIPS,
            false,
        ),
        e(
            names::BACKENDS,
            MapType::Array,
            4,
            size_of::<Backend>(),
            MAX_BACKENDS,
            false,
        ),
        e(names::MAGLEV, MapType::ArrayOfMaps, 4, 4, MAX_TABLES, false),
        e(
            names::FLOWS,
            MapType::LruHash,
            size_of::<FlowKey>(),
            size_of::<FlowValue>(),
            flow_entries,
            false,
        ),
        e(
            names::CONFIG,
            MapType::Array,
            4,
            size_of::<LbConfig>(),
            1,
            false,
        ),
        e(
            names::VIP_ADDRS,
            MapType::Hash,
            size_of::<LocalAddr>(),
            4,
            MAX_VIP_ADDRS,
            false,
        ),
        e(
            names::VIP_STATE,
            MapType::Array,
            4,
            size_of::<VipState>(),
            MAX_VIPS,
            false,
        ),
        e(
            names::VIP_BLOOM,
            MapType::Array,
            4,
            8,
            VIP_BLOOM_WORDS,
            false,
        ),
        e(
            names::FRAGS,
            MapType::LruHash,
            size_of::<FragKey>(),
            size_of::<FragValue>(),
            FRAG_ENTRIES,
            false,
        ),
        e(
            names::REGION_ADDRS,
            MapType::Hash,
            size_of::<LocalAddr>(),
            1,
            MAX_LOCAL_ADDRS,
            false,
        ),
        e(
            names::VIP_STATS,
            MapType::PerCpuArray,
            4,
            size_of::<Stats>(),
            MAX_VIPS,
            true,
        ),
        e(
            names::BACKEND_STATS,
            MapType::PerCpuArray,
            4,
            size_of::<Stats>(),
            MAX_BACKENDS,
            true,
        ),
        e(
            names::COUNTERS,
            MapType::PerCpuArray,
            4,
            8,
            MAX_COUNTERS,
            true,
        ),
    ]
}

/// The names of every pinned map.
pub fn pinned_map_names() -> Vec<&'static str> {
    expected(1).into_iter().map(|e| e.name).collect()
}

/// The pin directory of one balancer.
#[derive(Debug, Clone)]
pub struct PinDir {
    root: PathBuf,
}

/// The exclusive use of a pin directory (see [`PinDir::lock`]); released when dropped.
#[derive(Debug)]
pub struct PinLock {
    _fd: OwnedFd,
}

/// What was found in the pin directory before loading.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// Maps of the current layout were already pinned and will be adopted.
    pub maps_adopted: bool,
    /// Why pinned maps could not be adopted (then the maps start empty), if they existed.
    pub reset_reason: Option<String>,
}

impl PinDir {
    /// The pin directory at `root` (`agent.bpffs_dir`).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the XDP link is pinned.
    pub fn link_path(&self) -> PathBuf {
        self.root.join("link")
    }

    /// The directory of the current layout's maps.
    pub fn maps_dir(&self) -> PathBuf {
        self.root.join(format!("maps-v{LAYOUT_VERSION}"))
    }

    /// Where map `name` is pinned.
    pub fn map_path(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    /// Takes the directory for this process: an exclusive, non-blocking `flock` on it, held
    /// until the returned lock is dropped (or the process dies, kill -9 included: the kernel
    /// releases it with the descriptor). Creates the directory on bpffs first.
    ///
    /// # Errors
    ///
    /// [`PinError::Busy`] when another process holds it, or why the directory is unusable.
    pub fn lock(&self) -> Result<PinLock, PinError> {
        ensure_bpffs(&self.root)?;
        let c = CString::new(self.root.as_os_str().as_bytes()).map_err(|e| PinError::Io {
            path: self.root.clone(),
            source: io::Error::new(io::ErrorKind::InvalidInput, e),
        })?;
        // SAFETY: a NUL-terminated path; the result is checked.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io_err(&self.root)(io::Error::last_os_error()));
        }
        // SAFETY: a descriptor the kernel just returned to us; OwnedFd closes it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                PinError::Busy {
                    path: self.root.clone(),
                }
            } else {
                io_err(&self.root)(e)
            });
        }
        Ok(PinLock { _fd: fd })
    }

    /// Makes sure the directory exists on bpffs (mounting bpffs at /sys/fs/bpf when the
    /// directory is below it and nothing is mounted there, as systemd does at boot), and checks
    /// the pinned maps against the layout this build expects. Maps that do not fit are unpinned
    /// (the running program keeps its references, so traffic is not affected until the link
    /// switches to the new program); `Prepared` says what will be adopted.
    pub fn prepare(&self, flow_entries: u32) -> Result<Prepared, PinError> {
        ensure_bpffs(&self.root)?;
        let maps = self.maps_dir();
        std::fs::create_dir_all(&maps).map_err(io_err(&maps))?;
        let mut out = Prepared::default();
        let mut stateful_present = 0;
        let mut mismatch: Vec<String> = Vec::new();
        let mut disposable_mismatch: Vec<&'static str> = Vec::new();
        let expected = expected(flow_entries);
        for want in &expected {
            let path = self.map_path(want.name);
            if !path.exists() {
                continue;
            }
            let problem = match MapInfo::from_pin(&path) {
                Err(e) => Some(format!("{}: {e}", want.name)),
                Ok(info) => describe_mismatch(want, &info),
            };
            match (problem, want.disposable) {
                (None, false) => stateful_present += 1,
                (None, true) => {}
                (Some(_), true) => disposable_mismatch.push(want.name),
                (Some(p), false) => mismatch.push(p),
            }
        }
        let stateful = expected.iter().filter(|e| !e.disposable).count();
        if stateful_present > 0 && (stateful_present < stateful || !mismatch.is_empty()) {
            if mismatch.is_empty() {
                mismatch.push(format!(
                    "only {stateful_present} of the {stateful} state maps are pinned"
                ));
            }
            out.reset_reason = Some(mismatch.join("; "));
            for want in &expected {
                remove_if_present(&self.map_path(want.name))?;
            }
        } else {
            out.maps_adopted = stateful_present == stateful;
            for name in disposable_mismatch {
                remove_if_present(&self.map_path(name))?;
            }
        }
        Ok(out)
    }

    /// Removes the maps of other layout versions (after the link has switched to the current
    /// program, nothing uses them any more).
    pub fn remove_other_layouts(&self) -> Result<Vec<PathBuf>, PinError> {
        let current = self.maps_dir();
        let mut removed = Vec::new();
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
            Err(e) => return Err(io_err(&self.root)(e)),
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let is_maps = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("maps-v"));
            if is_maps && path != current {
                remove_tree(&path)?;
                removed.push(path);
            }
        }
        Ok(removed)
    }

    /// Removes every pin (link and maps): once the agent's own descriptors close, the program
    /// is detached and the maps are freed. The explicit way to take xlb off an interface.
    pub fn remove_all(&self) -> Result<(), PinError> {
        if self.root.exists() {
            remove_tree(&self.root)?;
        }
        Ok(())
    }
}

fn describe_mismatch(want: &Expected, info: &MapInfo) -> Option<String> {
    let map_type = info.map_type().ok();
    let have = (
        map_type,
        info.key_size() as usize,
        info.value_size() as usize,
        info.max_entries(),
    );
    let expect = (
        Some(want.map_type),
        want.key_size,
        want.value_size,
        want.max_entries,
    );
    (have != expect).then(|| {
        format!(
            "{} is {:?} key {} value {} entries {} (this build: {:?} key {} value {} entries {})",
            want.name,
            have.0,
            have.1,
            have.2,
            have.3,
            want.map_type,
            want.key_size,
            want.value_size,
            want.max_entries
        )
    })
}

fn remove_if_present(path: &Path) -> Result<(), PinError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Removes a directory of pins. bpffs has no `rm -r` of its own, but unlinking pins and
/// removing empty directories works.
fn remove_tree(path: &Path) -> Result<(), PinError> {
    let entries = match std::fs::read_dir(path) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path)(e)),
    };
    for entry in entries.flatten() {
        let p = entry.path();
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_tree(&p)?;
        } else {
            remove_if_present(&p)?;
        }
    }
    match std::fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Whether `path` (an existing directory) is on bpffs.
fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs writes into a zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Creates `dir` on bpffs, mounting bpffs at /sys/fs/bpf first when `dir` is below it and the
/// mount is missing.
pub fn ensure_bpffs(dir: &Path) -> Result<(), PinError> {
    let not_bpffs = |reason: String| PinError::NotBpffs {
        path: dir.to_path_buf(),
        reason,
    };
    let default_mount = Path::new("/sys/fs/bpf");
    if dir.starts_with(default_mount) && !is_bpffs(default_mount).unwrap_or(false) {
        std::fs::create_dir_all(default_mount).map_err(io_err(default_mount))?;
        let src = c"bpf";
        let target = c"/sys/fs/bpf";
        // SAFETY: NUL-terminated strings; no data argument.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(not_bpffs(format!(
                "mounting bpffs at /sys/fs/bpf: {}",
                io::Error::last_os_error()
            )));
        }
        tracing::info!("mounted bpffs at /sys/fs/bpf");
    }
    // Nothing is created on another filesystem: the nearest existing ancestor must already be
    // on bpffs (a directory made on the wrong filesystem would be left behind by the refusal).
    if let Some(existing) = dir.ancestors().find(|a| a.exists())
        && existing != dir
    {
        match is_bpffs(existing) {
            Ok(true) => {}
            Ok(false) => return Err(not_bpffs("another filesystem".into())),
            Err(e) => return Err(not_bpffs(e.to_string())),
        }
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    match is_bpffs(dir) {
        Ok(true) => Ok(()),
        Ok(false) => Err(not_bpffs("another filesystem".into())),
        Err(e) => Err(not_bpffs(e.to_string())),
    }
}

/// What the kernel says about a pinned XDP link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkFacts {
    /// Interface index the link is attached to; 0 when its interface is gone.
    pub ifindex: u32,
    /// Id of the program the link runs.
    pub prog_id: u32,
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_TYPE_XDP: u32 = 6;

/// The kind of BPF object behind a descriptor, from the name of its anonymous inode
/// (`anon_inode:bpf-link`, `anon_inode:bpf-map`, `anon_inode:bpf-prog`).
fn bpf_object_kind(fd: &OwnedFd) -> io::Result<String> {
    let target = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    Ok(target.to_string_lossy().into_owned())
}

/// Reads the facts of the XDP link pinned at `path`: `None` when nothing is pinned there or the
/// pin is not an XDP link (a map or a program: their info structures start like a link's, so
/// the object's kind is checked first, or a per-CPU array would read as an XDP link).
pub fn link_facts(path: &Path) -> io::Result<Option<LinkFacts>> {
    if !path.exists() {
        return Ok(None);
    }
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // union bpf_attr for BPF_OBJ_GET: pathname (u64), bpf_fd (u32), file_flags (u32).
    let mut attr = [0u64; 8];
    attr[0] = c.as_ptr() as u64;
    // SAFETY: the attr buffer outlives the call and is larger than the kernel reads.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr) as u32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just returned to us; OwnedFd closes it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    if bpf_object_kind(&fd)? != "anon_inode:bpf-link" {
        return Ok(None);
    }
    // struct bpf_link_info: type, id, prog_id (u32 each), then (8-aligned) the per-type union;
    // for XDP its first field is the ifindex.
    let mut info = [0u8; 256];
    let mut attr = [0u64; 8];
    attr[0] = (fd.as_raw_fd() as u64) | ((info.len() as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    // SAFETY: both buffers outlive the call; info_len bounds what the kernel writes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr) as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let u32_at = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().expect("4 bytes"));
    if u32_at(0) != BPF_LINK_TYPE_XDP {
        return Ok(None);
    }
    Ok(Some(LinkFacts {
        ifindex: u32_at(16),
        prog_id: u32_at(8),
    }))
}

/// Where a pinned XDP link is attached, as seen from this network namespace. A link only knows
/// its interface's index, and indexes are per namespace while a bpffs is shared by every
/// namespace of the host: `eth0` is index 2 in many of them. The link is this namespace's when
/// the interface of that index here runs the link's program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkPlace {
    /// Its interface is gone (the kernel detached it): the pin is a dead end.
    Gone,
    /// On the interface of this index in this namespace.
    Here(u32),
    /// On an interface of another namespace.
    Elsewhere,
}

impl LinkFacts {
    /// Where this link is attached (see [`LinkPlace`]).
    pub fn place(&self) -> io::Result<LinkPlace> {
        if self.ifindex == 0 {
            return Ok(LinkPlace::Gone);
        }
        Ok(if xdp_prog_ids(self.ifindex)?.contains(&self.prog_id) {
            LinkPlace::Here(self.ifindex)
        } else {
            LinkPlace::Elsewhere
        })
    }
}

/// The ids of the XDP programs attached to the interface of index `ifindex` in this network
/// namespace (rtnetlink `RTM_GETLINK`, `IFLA_XDP_*PROG_ID`; one per attach mode in use): empty
/// when it has none or there is no such interface here.
pub fn xdp_prog_ids(ifindex: u32) -> io::Result<Vec<u32>> {
    use netlink_packet_route::{
        RouteNetlinkMessage,
        link::{LinkAttribute, LinkMessage, LinkXdp},
    };
    use rtnetlink::{
        packet_core::{NLM_F_REQUEST, NetlinkMessage, NetlinkPayload},
        sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE},
    };
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut link = LinkMessage::default();
    link.header.index = ifindex;
    let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetLink(link));
    request.header.flags = NLM_F_REQUEST;
    request.header.sequence_number = 1;
    request.finalize();
    let mut buf = vec![0u8; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;
    loop {
        let (reply, _) = socket.recv_from_full()?;
        let mut offset = 0;
        while offset < reply.len() {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply[offset..])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m))
                    if m.header.index == ifindex =>
                {
                    let mut ids = Vec::new();
                    for attr in &m.attributes {
                        if let LinkAttribute::Xdp(xdp) = attr {
                            // One program: its id; programs in several modes: one id each.
                            ids.extend(xdp.iter().filter_map(|x| match x {
                                LinkXdp::ProgId(id)
                                | LinkXdp::DrvProgId(id)
                                | LinkXdp::SkbProgId(id)
                                | LinkXdp::HwProgId(id) => (*id != 0).then_some(*id),
                                _ => None,
                            }));
                        }
                    }
                    return Ok(ids);
                }
                NetlinkPayload::Error(e) => {
                    let code = e.raw_code();
                    if code == -libc::ENODEV {
                        return Ok(Vec::new());
                    }
                    return Err(io::Error::from_raw_os_error(-code));
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

/// The index of a network interface, or `None` when it does not exist.
pub fn ifindex(interface: &str) -> Option<u32> {
    let c = CString::new(interface).ok()?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pinned_map_has_a_distinct_name_and_the_layout_names_its_directory() {
        let names = pinned_map_names();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
        let dir = PinDir::new("/sys/fs/bpf/xlb");
        assert_eq!(
            dir.map_path(names::FLOWS),
            PathBuf::from(format!("/sys/fs/bpf/xlb/maps-v{LAYOUT_VERSION}/XLB_FLOWS"))
        );
        assert_eq!(dir.link_path(), PathBuf::from("/sys/fs/bpf/xlb/link"));
    }

    #[test]
    fn a_directory_on_another_filesystem_is_refused_with_the_mount_command() {
        let dir = std::env::temp_dir().join(format!("xlb-pins-test-{}", std::process::id()));
        let err = PinDir::new(&dir).prepare(1024).unwrap_err();
        let _ = std::fs::remove_dir_all(&dir);
        let text = err.to_string();
        assert!(text.contains("not on a bpf filesystem"), "{text}");
        assert!(text.contains("mount -t bpf bpf /sys/fs/bpf"), "{text}");
    }
}
