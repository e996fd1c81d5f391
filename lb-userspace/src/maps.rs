//! The typed map layer: the only code that writes the balancer's maps. Everything else (the
//! agent's reconciler, the CLI through the agent, the tests) goes through these methods, so the
//! invariants the data path relies on live in one place:
//!
//! - a VIP's Maglev table is written completely into a spare slot of the outer map before the
//!   VIP entry is switched to it in one hash-map update, so packets never see a half-written
//!   table;
//! - a backend id is written before any table refers to it.

use aya::maps::{Array, ArrayOfMaps, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap};
use lb_common::{
    maps as names,
    types::{
        BPF_F_INNER_MAP, Backend, FlowKey, FlowValue, FragKey, FragValue, LbConfig, LocalAddr,
        MAX_BACKENDS, MAX_VIPS, Stats, VIP_ADDR_F_L4, VIP_ADDR_F_L7, VIP_F_L7, VipKey, VipMeta,
    },
};

use crate::loader::{Balancer, LoaderError};

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

    /// Publishes a VIP with a new Maglev table (backend ids, prime length). The table goes into
    /// the VIP's spare outer-map slot first; then the VIP entry switches to it in one update.
    /// Returns the VIP entry now live.
    pub fn publish_vip(
        &mut self,
        key: &VipKey,
        vip_id: u32,
        flags: u32,
        table: &[u32],
    ) -> Result<VipMeta, LoaderError> {
        if vip_id >= MAX_VIPS {
            return Err(LoaderError::OutOfRange {
                what: "VIP id",
                value: vip_id,
                max: MAX_VIPS - 1,
            });
        }
        let current = self.vip(key)?;
        let first = 2 * vip_id;
        let table_index = match current {
            Some(meta) if meta.table_index == first => first + 1,
            _ => first,
        };

        // A fresh inner map per publish: nothing else holds it, so filling it is invisible to
        // packets until the outer map points at it.
        let size = table.len() as u32;
        let mut inner: Array<MapData, u32> =
            Array::create(size, BPF_F_INNER_MAP).map_err(map_err("maglev table"))?;
        for (slot, id) in table.iter().enumerate() {
            inner
                .set(slot as u32, id, 0)
                .map_err(map_err("maglev table"))?;
        }
        let name = names::MAGLEV;
        let mut outer: ArrayOfMaps<&mut MapData, Array<MapData, u32>> =
            ArrayOfMaps::try_from(self.map_mut_checked(name)?).map_err(map_err(name))?;
        outer.set(table_index, &inner, 0).map_err(map_err(name))?;

        let meta = VipMeta {
            vip_id,
            flags,
            table_index,
            table_size: size,
        };
        let name = names::VIPS;
        let mut vips: HashMap<&mut MapData, VipKey, VipMeta> =
            HashMap::try_from(self.map_mut_checked(name)?).map_err(map_err(name))?;
        vips.insert(key, meta, 0).map_err(map_err(name))?;
        self.refresh_vip_addr(key)?;
        Ok(meta)
    }

    /// Rewrites the address-level entry of `key`'s address from every VIP on that address:
    /// ICMP and later fragments (which carry no ports) are matched by it.
    fn refresh_vip_addr(&mut self, key: &VipKey) -> Result<(), LoaderError> {
        let name = names::VIPS;
        let vips: HashMap<&MapData, VipKey, VipMeta> =
            HashMap::try_from(self.map_checked(name)?).map_err(map_err(name))?;
        let mut flags = 0;
        for entry in vips.iter() {
            let (k, meta) = entry.map_err(map_err(name))?;
            if k.addr == key.addr && k.family == key.family {
                flags |= if meta.flags & VIP_F_L7 != 0 {
                    VIP_ADDR_F_L7
                } else {
                    VIP_ADDR_F_L4
                };
            }
        }
        let addr = LocalAddr {
            addr: key.addr,
            family: key.family,
            _pad: [0; 3],
        };
        let name = names::VIP_ADDRS;
        let mut addrs: HashMap<&mut MapData, LocalAddr, u32> =
            HashMap::try_from(self.map_mut_checked(name)?).map_err(map_err(name))?;
        if flags == 0 {
            match addrs.remove(&addr) {
                Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(map_err(name)(e)),
            }
        } else {
            addrs.insert(addr, flags, 0).map_err(map_err(name))
        }
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
        let name = names::VIPS;
        let mut vips: HashMap<&mut MapData, VipKey, VipMeta> =
            HashMap::try_from(self.map_mut_checked(name)?).map_err(map_err(name))?;
        match vips.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
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
        let mut map: PerCpuHashMap<&mut MapData, FlowKey, FlowValue> =
            PerCpuHashMap::try_from(self.map_mut_checked(name)?).map_err(map_err(name))?;
        let keys: Vec<FlowKey> = map.keys().filter_map(Result::ok).collect();
        for key in keys {
            match map.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
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
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(name)(e)),
            }
        }
        Ok(())
    }

    /// The backend a flow is pinned to in the connection table (on any CPU), if any.
    pub fn flow_backend(&self, key: &FlowKey) -> Result<Option<u32>, LoaderError> {
        let name = names::FLOWS;
        let map: PerCpuHashMap<&MapData, FlowKey, FlowValue> =
            PerCpuHashMap::try_from(self.map_checked(name)?).map_err(map_err(name))?;
        match map.get(key, 0) {
            Ok(values) => Ok(values
                .iter()
                .find(|v| **v != FlowValue::default())
                .map(|v| v.backend_id)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(name)(e)),
        }
    }
}
