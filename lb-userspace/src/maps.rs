//! The typed map layer: the only code that writes the balancer's maps. Everything else (the
//! agent's reconciler, the CLI through the agent, the tests) goes through these methods, so the
//! invariants the data path relies on live in one place:
//!
//! - a VIP's Maglev table is written completely into a spare slot of the outer map before the
//!   VIP entry is switched to it in one hash-map update, so packets never see a half-written
//!   table;
//! - a backend id is written before any table refers to it.

use std::collections::HashMap as HashMapStd;

use aya::maps::{Array, ArrayOfMaps, HashMap, MapData, MapError, PerCpuArray};
use lb_common::{
    flow::addr_hash,
    maps as names,
    types::{
        Backend, FlowKey, FlowValue, FragKey, FragValue, LbConfig, LocalAddr, MAX_BACKENDS,
        MAX_LOCAL_ADDRS, MAX_VIP_REGIONS, MAX_VIPS, REGION_LOCAL, REGION_SCALE, Stats, TABLE_FLAGS,
        VIP_ADDR_F_ANY_PORT, VIP_ADDR_F_L4, VIP_ADDR_F_L7, VIP_BLOOM_BITS, VIP_BLOOM_WORDS,
        VIP_F_L7, VIP_S_ACTIVE, VipKey, VipMeta, VipState,
    },
};

use crate::{
    loader::{Balancer, LoaderError},
    maglev::{EMPTY_SLOT, is_prime},
};

/// Largest Maglev table the map layer accepts (a prime near 2^20, 16 times the default).
pub const MAX_TABLE_SIZE: u32 = 1_048_573;

/// Creates a Maglev table map holding `table`: `BPF_MAP_CREATE` with [`TABLE_FLAGS`], then one
/// copy through a shared mapping of its memory (arrays of 4-byte values keep each slot in an
/// 8-byte cell). 65,537 slots cost one syscall and a memcpy instead of 65,537 updates.
fn create_table(table: &[u32]) -> std::io::Result<MapData> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let size = u32::try_from(table.len())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries,
    // map_flags, inner_map_fd, numa_node (u32 each), then map_name[16] at byte 28.
    let mut attr = [0u8; 128];
    for (i, v) in [BPF_MAP_TYPE_ARRAY, 4, 4, size, TABLE_FLAGS]
        .iter()
        .enumerate()
    {
        attr[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    attr[28..28 + 10].copy_from_slice(b"xlb_maglev");
    // SAFETY: the attr buffer outlives the call and is larger than the kernel reads.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            attr.as_mut_ptr(),
            attr.len() as u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just returned to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let len = (table.len() * 8).div_ceil(page) * page;
    // SAFETY: maps `len` bytes of the array's memory (the kernel rounds the array up to whole
    // pages); checked for failure below.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let cells = base.cast::<u8>();
    for (i, id) in table.iter().enumerate() {
        // SAFETY: i * 8 + 4 <= table.len() * 8 <= len: inside the mapping, 4-byte aligned (the
        // mapping is page-aligned); the first 4 bytes of a cell are the value, the other 4 are
        // padding, which stays zero.
        unsafe { cells.add(i * 8).cast::<u32>().write(*id) };
    }
    // SAFETY: unmaps exactly what was mapped above.
    unsafe { libc::munmap(base, len) };
    MapData::from_fd(fd).map_err(|e| std::io::Error::other(e.to_string()))
}

/// A VIP's region split of new flows (see [`VipMeta::region_upto`]): level `i` takes the flows
/// whose region point lies below `upto[i]` and not below `upto[i - 1]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RegionSplit {
    /// Levels in use (0: no regions, every flow from the VIP's table).
    pub count: u32,
    /// Cumulative upper bounds, out of [`REGION_SCALE`].
    pub upto: [u32; MAX_VIP_REGIONS],
    /// [`REGION_LOCAL`] or a remote region's backend id, per level.
    pub backend: [u32; MAX_VIP_REGIONS],
}

impl RegionSplit {
    /// No regions: every new flow is chosen from the VIP's own table.
    pub const NONE: RegionSplit = RegionSplit {
        count: 0,
        upto: [0; MAX_VIP_REGIONS],
        backend: [0; MAX_VIP_REGIONS],
    };

    /// Refuses splits the data path could misread: too many levels, bounds that decrease or do
    /// not end at [`REGION_SCALE`], backend ids out of range.
    pub fn check(&self) -> Result<(), String> {
        let n = self.count as usize;
        if n > MAX_VIP_REGIONS {
            return Err(format!("{n} region levels; at most {MAX_VIP_REGIONS}"));
        }
        if n == 0 {
            return Ok(());
        }
        let used = &self.upto[..n];
        if used.windows(2).any(|w| w[0] > w[1]) || used[n - 1] != REGION_SCALE {
            return Err(format!(
                "region bounds {used:?} must not decrease and must end at {REGION_SCALE}"
            ));
        }
        if let Some(bad) = self.backend[..n]
            .iter()
            .find(|&&id| id != REGION_LOCAL && (id == 0 || id >= MAX_BACKENDS))
        {
            return Err(format!("region backend id {bad} out of range"));
        }
        Ok(())
    }

    fn write(&self, meta: &mut VipMeta) {
        meta.region_count = self.count;
        meta.region_upto = self.upto;
        meta.region_backend = self.backend;
    }
}

/// Whether a map error says the key is not there. aya reports a failed lookup as
/// [`MapError::KeyNotFound`] but a failed delete as the syscall's `ENOENT`; both mean the same.
pub fn is_missing(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// The address-level key of a VIP's address.
fn local(key: &VipKey) -> LocalAddr {
    LocalAddr {
        addr: key.addr,
        family: key.family,
        _pad: [0; 3],
    }
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> LoaderError {
    move |source| LoaderError::Map { name, source }
}

impl Balancer {
    fn map_mut_checked(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, LoaderError> {
        self.ebpf_mut()
            .map_mut(name)
            .ok_or(LoaderError::Missing { kind: "map", name })
    }

    fn map_checked(&self, name: &'static str) -> Result<&aya::maps::Map, LoaderError> {
        self.ebpf()
            .map(name)
            .ok_or(LoaderError::Missing { kind: "map", name })
    }

    /// Writes the balancer-wide settings.
    pub fn set_config(&mut self, cfg: &LbConfig) -> Result<(), LoaderError> {
        let name = names::CONFIG;
        let mut map: Array<&mut MapData, LbConfig> =
            Array::try_from(self.map_mut_checked(name)?).map_err(map_err(name))?;
        map.set(0, cfg, 0).map_err(map_err(name))
    }

    /// Writes backend `id`. Writing a backend with `family == 0` frees the id.
    pub fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), LoaderError> {
        if id >= MAX_BACKENDS {
            return Err(LoaderError::OutOfRange {
                what: "backend id",
                value: id,
                max: MAX_BACKENDS - 1,
            });
        }
        let name = names::BACKENDS;
        let mut map: Array<&mut MapData, Backend> =
            Array::try_from(self.map_mut_checked(name)?).map_err(map_err(name))?;
        map.set(id, backend, 0).map_err(map_err(name))
    }

    /// Publishes a VIP without regions: [`Balancer::publish_vip_split`] with
    /// [`RegionSplit::NONE`].
    pub fn publish_vip(
        &mut self,
        key: &VipKey,
        vip_id: u32,
        flags: u32,
        table: &[u32],
    ) -> Result<VipMeta, LoaderError> {
        self.publish_vip_split(key, vip_id, flags, table, &RegionSplit::NONE)
    }

    /// Publishes a VIP with a new Maglev table (backend ids, prime length) and region split.
    /// The table goes into the VIP's spare outer-map slot first; then the VIP entry switches to
    /// it (and to the split) in one update. Returns the VIP entry now live.
    pub fn publish_vip_split(
        &mut self,
        key: &VipKey,
        vip_id: u32,
        flags: u32,
        table: &[u32],
        split: &RegionSplit,
    ) -> Result<VipMeta, LoaderError> {
        if vip_id >= MAX_VIPS {
            return Err(LoaderError::OutOfRange {
                what: "VIP id",
                value: vip_id,
                max: MAX_VIPS - 1,
            });
        }
        // Validate everything before writing anything: a refused publish changes nothing.
        let size = table.len() as u32;
        if table.is_empty() || table.len() > MAX_TABLE_SIZE as usize || !is_prime(size) {
            return Err(LoaderError::BadTable {
                reason: format!(
                    "size {} is not a prime in 2..={MAX_TABLE_SIZE}",
                    table.len()
                ),
            });
        }
        if let Some(bad) = table
            .iter()
            .find(|&&id| id != EMPTY_SLOT && id >= MAX_BACKENDS)
        {
            return Err(LoaderError::BadTable {
                reason: format!("slot holds backend id {bad}, beyond {}", MAX_BACKENDS - 1),
            });
        }
        split
            .check()
            .map_err(|reason| LoaderError::BadTable { reason })?;
        let current = self.vip(key)?;
        let first = 2 * vip_id;
        let table_index = match current {
            Some(meta) if meta.table_index == first => first + 1,
            _ => first,
        };

        // A fresh inner map per publish: nothing else holds it, so filling it is invisible to
        // packets until the outer map points at it.
        let inner = create_table(table).map_err(|io_error| LoaderError::Map {
            name: "maglev table",
            source: MapError::IoError(io_error),
        })?;
        let name = names::MAGLEV;
        let mut outer: ArrayOfMaps<&mut MapData, aya::maps::MapFd> =
            ArrayOfMaps::try_from(self.map_mut_checked(name)?).map_err(map_err(name))?;
        outer
            .set(table_index, inner.fd(), 0)
            .map_err(map_err(name))?;

        // The same VIP keeps its generation (its established flows stay on the fast path); an id
        // given to a VIP anew gets the next one, so older flows under that id are stale.
        let generation = match current {
            Some(meta) if meta.vip_id == vip_id => meta.generation,
            _ => self.vip_state(vip_id)?.generation.wrapping_add(1),
        };
        let mut meta = VipMeta {
            vip_id,
            flags,
            table_index,
            table_size: size,
            generation,
            table_digest: crate::maglev::table_digest(table),
            ..VipMeta::default()
        };
        split.write(&mut meta);
        self.write_vip(key, &meta)?;
        // The key moved to another id: flows pinned under the old id must not take the fast
        // path any more.
        if let Some(old) = current
            && old.vip_id != vip_id
        {
            self.deactivate_vip_id(old.vip_id)?;
        }
        // A new port-specific VIP takes that port's traffic from an every-port VIP of the same
        // address: the latter's pinned flows must go through the full lookup again.
        if current.is_none() && key.port_be != 0 {
            let any_port = VipKey { port_be: 0, ..*key };
            if self.vip(&any_port)?.is_some() {
                self.bump_generation(&any_port)?;
            }
        }
        self.refresh_vip_addr(key)?;
        Ok(meta)
    }

    /// Changes a live VIP's flags and region split, keeping its table (one hash-map update, no
    /// table written): a region failing over or back costs no Maglev build. Returns the VIP
    /// entry now live.
    pub fn set_vip_split(
        &mut self,
        key: &VipKey,
        flags: u32,
        split: &RegionSplit,
    ) -> Result<VipMeta, LoaderError> {
        split
            .check()
            .map_err(|reason| LoaderError::BadTable { reason })?;
        let Some(mut meta) = self.vip(key)? else {
            return Err(LoaderError::BadTable {
                reason: format!("no VIP {key:?} to change the region split of"),
            });
        };
        meta.flags = flags;
        split.write(&mut meta);
        self.write_vip(key, &meta)?;
        Ok(meta)
    }

    /// Makes `addrs` this balancer's region tunnel addresses (tunnel packets to them are
    /// stripped and balanced, or passed to the agent when they are capacity probes), removing
    /// any other. At most [`MAX_LOCAL_ADDRS`].
    pub fn set_region_addrs(&mut self, addrs: &[std::net::IpAddr]) -> Result<(), LoaderError> {
        if addrs.len() > MAX_LOCAL_ADDRS as usize {
            return Err(LoaderError::OutOfRange {
                what: "region tunnel addresses",
                value: addrs.len() as u32,
                max: MAX_LOCAL_ADDRS,
            });
        }
        let want: Vec<LocalAddr> = addrs
            .iter()
            .map(|a| crate::loader::local_addr(*a))
            .collect();
        let name = names::REGION_ADDRS;
        let mut map: HashMap<&mut MapData, LocalAddr, u8> =
            HashMap::try_from(self.map_mut_checked(name)?).map_err(map_err(name))?;
        // New addresses first, then stale ones out: an address kept in both sets never blinks.
        for a in &want {
            map.insert(a, 1, 0).map_err(map_err(name))?;
        }
        let have: Vec<LocalAddr> = map.keys().filter_map(Result::ok).collect();
        for a in have.iter().filter(|a| !want.contains(a)) {
            match map.remove(a) {
                Ok(()) => {}
                Err(e) if is_missing(&e) => {}
                Err(e) => return Err(map_err(name)(e)),
            }
        }
        Ok(())
    }

    /// This balancer's region tunnel addresses, as the map holds them.
    pub fn region_addrs(&self) -> Result<Vec<std::net::IpAddr>, LoaderError> {
        let name = names::REGION_ADDRS;
        let map: HashMap<&MapData, LocalAddr, u8> =
            HashMap::try_from(self.map_checked(name)?).map_err(map_err(name))?;
        let mut out: Vec<std::net::IpAddr> = map
            .keys()
            .filter_map(Result::ok)
            .filter_map(|a| crate::loader::ip_of(&a.addr, a.family))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Gives a VIP a new generation: its pinned flows leave the fast path until the full path
    /// re-pins them.
    fn bump_generation(&mut self, key: &VipKey) -> Result<(), LoaderError> {
        let Some(mut meta) = self.vip(key)? else {
            return Ok(());
        };
        meta.generation = meta.generation.wrapping_add(1);
        self.write_vip(key, &meta)
    }

    /// Writes a VIP entry and then its id's state (active, its flags and generation), the
    /// fast path's view of it.
    fn write_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<(), LoaderError> {
        let name = names::VIPS;
        let mut vips: HashMap<&mut MapData, VipKey, VipMeta> =
            HashMap::try_from(self.map_mut_checked(name)?).map_err(map_err(name))?;
        vips.insert(key, meta, 0).map_err(map_err(name))?;
        self.set_vip_state(
            meta.vip_id,
            VipState {
                flags: meta.flags | VIP_S_ACTIVE,
                generation: meta.generation,
            },
        )
    }

    /// Takes a VIP id off the fast path (its generation is kept, so a later reuse bumps it).
    fn deactivate_vip_id(&mut self, vip_id: u32) -> Result<(), LoaderError> {
        let generation = self.vip_state(vip_id)?.generation;
        self.set_vip_state(
            vip_id,
            VipState {
                flags: 0,
                generation,
            },
        )
    }

    fn vip_state(&self, vip_id: u32) -> Result<VipState, LoaderError> {
        let name = names::VIP_STATE;
        let map: Array<&MapData, VipState> =
            Array::try_from(self.map_checked(name)?).map_err(map_err(name))?;
        map.get(&vip_id, 0).map_err(map_err(name))
    }

    fn set_vip_state(&mut self, vip_id: u32, state: VipState) -> Result<(), LoaderError> {
        let name = names::VIP_STATE;
        let mut map: Array<&mut MapData, VipState> =
            Array::try_from(self.map_mut_checked(name)?).map_err(map_err(name))?;
        map.set(vip_id, state, 0).map_err(map_err(name))
    }

    /// What the VIP entries imply for the address-level maps: the bloom filter's words and the
    /// `VIP_ADDR_F_*` flags of every VIP address.
    fn vip_addr_view(&self) -> Result<(Vec<u64>, HashMapStd<LocalAddr, u32>), LoaderError> {
        let name = names::VIPS;
        let vips: HashMap<&MapData, VipKey, VipMeta> =
            HashMap::try_from(self.map_checked(name)?).map_err(map_err(name))?;
        let mut bloom = vec![0u64; VIP_BLOOM_WORDS as usize];
        let mut addrs: HashMapStd<LocalAddr, u32> = HashMapStd::new();
        for entry in vips.iter() {
            let (k, meta) = match entry {
                Ok(e) => e,
                // Removed between listing and reading it.
                Err(e) if is_missing(&e) => continue,
                Err(e) => return Err(map_err(name)(e)),
            };
            let bit = addr_hash(&k.addr, k.family) % VIP_BLOOM_BITS;
            bloom[(bit / 64) as usize] |= 1 << (bit % 64);
            let flags = addrs.entry(local(&k)).or_insert(0);
            *flags |= if meta.flags & VIP_F_L7 != 0 {
                VIP_ADDR_F_L7
            } else {
                VIP_ADDR_F_L4
            };
            if k.port_be == 0 {
                *flags |= VIP_ADDR_F_ANY_PORT;
            }
        }
        Ok((bloom, addrs))
    }

    /// Writes the bloom filter's words that differ from `want` (with `union`, only the bits to
    /// set: new addresses become visible before their entries appear). Returns the words
    /// written.
    fn write_bloom(&mut self, want: &[u64], union: bool) -> Result<usize, LoaderError> {
        let name = names::VIP_BLOOM;
        let mut words: Array<&mut MapData, u64> =
            Array::try_from(self.map_mut_checked(name)?).map_err(map_err(name))?;
        let mut written = 0;
        for (i, want) in want.iter().enumerate() {
            let have = words.get(&(i as u32), 0).map_err(map_err(name))?;
            let next = if union { have | want } else { *want };
            if next != have {
                words.set(i as u32, next, 0).map_err(map_err(name))?;
                written += 1;
            }
        }
        Ok(written)
    }

    /// Sets (or, with 0, removes) the address-level entry of one address. Returns whether
    /// anything changed.
    fn set_vip_addr(&mut self, addr: &LocalAddr, flags: u32) -> Result<bool, LoaderError> {
        let name = names::VIP_ADDRS;
        let mut addrs: HashMap<&mut MapData, LocalAddr, u32> =
            HashMap::try_from(self.map_mut_checked(name)?).map_err(map_err(name))?;
        let have = match addrs.get(addr, 0) {
            Ok(f) => f,
            Err(e) if is_missing(&e) => 0,
            Err(e) => return Err(map_err(name)(e)),
        };
        if have == flags {
            return Ok(false);
        }
        if flags == 0 {
            match addrs.remove(addr) {
                Ok(()) => {}
                Err(e) if is_missing(&e) => {}
                Err(e) => return Err(map_err(name)(e)),
            }
        } else {
            addrs.insert(addr, flags, 0).map_err(map_err(name))?;
        }
        Ok(true)
    }

    /// Rewrites the address-level entry of `key`'s address from every VIP on that address:
    /// ICMP and later fragments (which carry no ports) are matched by it.
    fn refresh_vip_addr(&mut self, key: &VipKey) -> Result<(), LoaderError> {
        let (bloom, addrs) = self.vip_addr_view()?;
        let addr = local(key);
        // Set new bits before the address entry appears, clear stale ones after it is gone;
        // only changed words are written.
        self.write_bloom(&bloom, true)?;
        self.set_vip_addr(&addr, addrs.get(&addr).copied().unwrap_or(0))?;
        self.write_bloom(&bloom, false)?;
        Ok(())
    }

    /// Brings everything the maps derive from the VIP entries back in line with them: each
    /// VIP's id active with its flags and generation (every other id inactive), the address
    /// entries and the bloom filter. A publish or removal is several map writes; an agent killed
    /// between them (kill -9, a crash, a power cut with the pins kept) leaves, for example, a VIP
    /// entry whose address is missing from the bloom filter, so its packets would be passed to
    /// the host as if it were no VIP. An agent that adopts pinned maps runs this once before
    /// planning: the reconciler only compares VIP entries, tables and backends, so nothing else
    /// would ever notice. Returns the number of entries rewritten (0 for consistent maps).
    pub fn repair_derived(&mut self) -> Result<usize, LoaderError> {
        let name = names::VIPS;
        let mut by_id: HashMapStd<u32, VipMeta> = HashMapStd::new();
        {
            let vips: HashMap<&MapData, VipKey, VipMeta> =
                HashMap::try_from(self.map_checked(name)?).map_err(map_err(name))?;
            for entry in vips.iter() {
                match entry {
                    Ok((_, meta)) if meta.vip_id < MAX_VIPS => {
                        by_id.entry(meta.vip_id).or_insert(meta);
                    }
                    Ok(_) => {}
                    Err(e) if is_missing(&e) => {}
                    Err(e) => return Err(map_err(name)(e)),
                }
            }
        }
        let mut fixed = 0;
        // Activate first, so no address entry written below points at an inactive id.
        for id in 0..MAX_VIPS {
            let have = self.vip_state(id)?;
            let want = match by_id.get(&id) {
                Some(meta) => VipState {
                    flags: meta.flags | VIP_S_ACTIVE,
                    generation: meta.generation,
                },
                None if have.flags & VIP_S_ACTIVE == 0 => continue,
                None => VipState {
                    flags: 0,
                    generation: have.generation,
                },
            };
            if have != want {
                self.set_vip_state(id, want)?;
                fixed += 1;
            }
        }
        let (bloom, want) = self.vip_addr_view()?;
        fixed += self.write_bloom(&bloom, true)?;
        let name = names::VIP_ADDRS;
        let present: Vec<LocalAddr> = {
            let addrs: HashMap<&MapData, LocalAddr, u32> =
                HashMap::try_from(self.map_checked(name)?).map_err(map_err(name))?;
            addrs.keys().filter_map(Result::ok).collect()
        };
        for (addr, flags) in &want {
            fixed += usize::from(self.set_vip_addr(addr, *flags)?);
        }
        for addr in present.iter().filter(|a| !want.contains_key(a)) {
            fixed += usize::from(self.set_vip_addr(addr, 0)?);
        }
        fixed += self.write_bloom(&bloom, false)?;
        Ok(fixed)
    }

    /// The live entry of a VIP, if any.
    pub fn vip(&self, key: &VipKey) -> Result<Option<VipMeta>, LoaderError> {
        let name = names::VIPS;
        let vips: HashMap<&MapData, VipKey, VipMeta> =
            HashMap::try_from(self.map_checked(name)?).map_err(map_err(name))?;
        match vips.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(name)(e)),
        }
    }

    /// Removes a VIP: its packets are passed to the host stack from then on.
    pub fn remove_vip(&mut self, key: &VipKey) -> Result<(), LoaderError> {
        if let Some(meta) = self.vip(key)? {
            // First take the id off the fast path, so no established flow is forwarded after
            // the VIP is gone.
            self.deactivate_vip_id(meta.vip_id)?;
        }
        let name = names::VIPS;
        let mut vips: HashMap<&mut MapData, VipKey, VipMeta> =
            HashMap::try_from(self.map_mut_checked(name)?).map_err(map_err(name))?;
        match vips.remove(key) {
            Ok(()) => {}
            Err(e) if is_missing(&e) => {}
            Err(e) => return Err(map_err(name)(e)),
        }
        self.refresh_vip_addr(key)
    }

    /// A VIP's traffic counters, summed over CPUs.
    pub fn vip_stats(&self, vip_id: u32) -> Result<Stats, LoaderError> {
        self.stats(names::VIP_STATS, vip_id)
    }

    /// A backend's traffic counters, summed over CPUs.
    pub fn backend_stats(&self, backend_id: u32) -> Result<Stats, LoaderError> {
        self.stats(names::BACKEND_STATS, backend_id)
    }

    fn stats(&self, name: &'static str, index: u32) -> Result<Stats, LoaderError> {
        let map: PerCpuArray<&MapData, Stats> =
            PerCpuArray::try_from(self.map_checked(name)?).map_err(map_err(name))?;
        let per_cpu = map.get(&index, 0).map_err(map_err(name))?;
        Ok(per_cpu.iter().fold(Stats::default(), |acc, s| Stats {
            packets: acc.packets + s.packets,
            bytes: acc.bytes + s.bytes,
            new_flows: acc.new_flows + s.new_flows,
        }))
    }

    /// Empties the connection table (every flow is re-selected on its next packet). For tests
    /// and for an operator's explicit reset, never part of a reconcile.
    pub fn clear_flows(&mut self) -> Result<(), LoaderError> {
        let name = names::FLOWS;
        let mut map: HashMap<&mut MapData, FlowKey, FlowValue> =
            HashMap::try_from(self.map_mut_checked(name)?).map_err(map_err(name))?;
        let keys: Vec<FlowKey> = map.keys().filter_map(Result::ok).collect();
        for key in keys {
            match map.remove(&key) {
                Ok(()) => {}
                // Evicted by the LRU since it was listed.
                Err(e) if is_missing(&e) => {}
                Err(e) => return Err(map_err(name)(e)),
            }
        }
        Ok(())
    }

    /// Empties the fragment table (later fragments of datagrams in flight are then dropped).
    /// For tests and explicit resets only.
    pub fn clear_fragments(&mut self) -> Result<(), LoaderError> {
        let name = names::FRAGS;
        let mut map: HashMap<&mut MapData, FragKey, FragValue> =
            HashMap::try_from(self.map_mut_checked(name)?).map_err(map_err(name))?;
        let keys: Vec<FragKey> = map.keys().filter_map(Result::ok).collect();
        for key in keys {
            match map.remove(&key) {
                Ok(()) => {}
                // Evicted by the LRU since it was listed.
                Err(e) if is_missing(&e) => {}
                Err(e) => return Err(map_err(name)(e)),
            }
        }
        Ok(())
    }

    /// The backend a flow is pinned to in the connection table, if any.
    pub fn flow_backend(&self, key: &FlowKey) -> Result<Option<u32>, LoaderError> {
        let name = names::FLOWS;
        let map: HashMap<&MapData, FlowKey, FlowValue> =
            HashMap::try_from(self.map_checked(name)?).map_err(map_err(name))?;
        match map.get(key, 0) {
            Ok(value) => Ok(Some(value.backend_id)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(name)(e)),
        }
    }

    /// Connection-table entries per backend id, in one pass over the table (for `xlb status`:
    /// a full table of a million flows takes about a second). Entries that expire while the
    /// walk runs are skipped, not counted.
    pub fn flows_per_backend(&self) -> Result<std::collections::HashMap<u32, u64>, LoaderError> {
        let name = names::FLOWS;
        let fd = match self.map_checked(name)? {
            aya::maps::Map::LruHashMap(m) | aya::maps::Map::HashMap(m) => {
                use std::os::fd::{AsFd as _, AsRawFd as _};
                m.fd().as_fd().as_raw_fd()
            }
            _ => {
                return Err(LoaderError::Missing {
                    kind: "LRU hash map",
                    name,
                });
            }
        };
        let mut counts = std::collections::HashMap::new();
        batch_values::<FlowKey, FlowValue>(fd, |value| {
            *counts.entry(value.backend_id).or_insert(0) += 1;
        })
        .map_err(|io_error| LoaderError::Map {
            name,
            source: MapError::IoError(io_error),
        })?;
        Ok(counts)
    }
}

/// Visits every value of a hash map with `BPF_MAP_LOOKUP_BATCH`, thousands of entries per
/// syscall: a million-entry connection table is read in a few hundred calls instead of two
/// million (one to list each key, one to read it).
fn batch_values<K: Copy + Default, V: Copy + Default>(
    fd: std::os::fd::RawFd,
    mut visit: impl FnMut(&V),
) -> std::io::Result<()> {
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    const CHUNK: usize = 8192;
    let mut keys = vec![K::default(); CHUNK];
    let mut values = vec![V::default(); CHUNK];
    // The batch cursor is opaque to us (a bucket index for hash maps).
    let mut cursor_in = [0u64; 1];
    let mut cursor_out = [0u64; 1];
    let mut first = true;
    loop {
        // union bpf_attr, `batch`: in_batch, out_batch, keys, values (u64 each), count and
        // map_fd (u32 each), elem_flags, flags (u64 each).
        let mut attr = [0u64; 8];
        attr[0] = if first {
            0
        } else {
            cursor_in.as_mut_ptr() as u64
        };
        attr[1] = cursor_out.as_mut_ptr() as u64;
        attr[2] = keys.as_mut_ptr() as u64;
        attr[3] = values.as_mut_ptr() as u64;
        attr[4] = (CHUNK as u64) | ((fd as u32 as u64) << 32);
        // SAFETY: every pointer in attr refers to a buffer that outlives the call and holds
        // CHUNK elements; the kernel writes at most `count` (= CHUNK) keys and values.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                attr.as_mut_ptr(),
                std::mem::size_of_val(&attr) as u32,
            )
        };
        let err = (rc < 0).then(std::io::Error::last_os_error);
        let got = (attr[4] & 0xffff_ffff) as usize;
        for v in &values[..got.min(CHUNK)] {
            visit(v);
        }
        match err {
            None => {}
            // ENOENT: the last batch (possibly empty).
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Some(e) => return Err(e),
        }
        cursor_in = cursor_out;
        first = false;
    }
}

/// What an agent finds in adopted (pinned) maps: the reconciler rebuilds its memory from this.
#[derive(Debug, Clone, Default)]
pub struct MapContents {
    /// The balancer-wide settings (all zero when never written).
    pub config: LbConfig,
    /// Every VIP entry.
    pub vips: Vec<(VipKey, VipMeta)>,
    /// Every backend id in use (family set), with its entry.
    pub backends: Vec<(u32, Backend)>,
}

impl Balancer {
    /// Reads the VIPs, backends and settings back from the maps (for adopting pinned maps after
    /// a restart; one pass, tables are not read: their digests are in the VIP entries).
    pub fn read_contents(&self) -> Result<MapContents, LoaderError> {
        let name = names::CONFIG;
        let config: Array<&MapData, LbConfig> =
            Array::try_from(self.map_checked(name)?).map_err(map_err(name))?;
        let config = config.get(&0, 0).map_err(map_err(name))?;
        let name = names::VIPS;
        let map: HashMap<&MapData, VipKey, VipMeta> =
            HashMap::try_from(self.map_checked(name)?).map_err(map_err(name))?;
        let mut vips = Vec::new();
        for entry in map.iter() {
            vips.push(entry.map_err(map_err(name))?);
        }
        let name = names::BACKENDS;
        let map: Array<&MapData, Backend> =
            Array::try_from(self.map_checked(name)?).map_err(map_err(name))?;
        let mut backends = Vec::new();
        for id in 0..MAX_BACKENDS {
            let b = map.get(&id, 0).map_err(map_err(name))?;
            if b.family != 0 {
                backends.push((id, b));
            }
        }
        Ok(MapContents {
            config,
            vips,
            backends,
        })
    }
}
