//! The reconciler: desired state (configuration + run-time changes + health) against what is
//! in the maps, as a plan of map operations. Planning is pure: it owns the id allocation and the
//! record of what was applied, and says exactly which writes bring the maps to the desired
//! state, so a change to one VIP touches only that VIP's entries. [`apply`] carries a plan out
//! through the typed map layer.
//!
//! Ids are never handed to a different backend or VIP while packets may still refer to them:
//! freed ids join the back of a FIFO free list and come round again only after every other id.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::IpAddr,
};

use lb_common::types::{
    BACKEND_F_REGION, BACKEND_F_UP, Backend, FAMILY_V4, FAMILY_V6, LbConfig, MAX_BACKENDS,
    MAX_VIP_REGIONS, MAX_VIPS, REGION_LOCAL, REGION_SCALE, VIP_F_DSR_L2, VIP_F_LAST_RESORT, VipKey,
};
use thiserror::Error;

use crate::{
    loader::{Balancer, LoaderError},
    maglev::{self, MaglevBackend, MaglevError},
    maps::{MapContents, RegionSplit},
};

/// One backend of a desired VIP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredBackend {
    /// Its address (the encapsulation destination, or for L2 DSR the host on the segment).
    pub address: IpAddr,
    /// Maglev weight; 0 = drained (keeps its established flows, gets no new ones).
    pub weight: u32,
    /// Passes its health checks (or has none).
    pub healthy: bool,
    /// MAC for L2 DSR VIPs.
    pub mac: Option<[u8; 6]>,
}

/// One desired VIP.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredVip {
    /// (address, port, protocol) as the data path matches it.
    pub key: VipKey,
    /// `VIP_F_*` flags (mode).
    pub flags: u32,
    /// Maglev table size (prime).
    pub table_size: u32,
    /// Share (0.0..=1.0) of the weighted backends that must be healthy; below it every
    /// weighted backend takes traffic, healthy or not (rather than overloading the few left).
    pub panic_threshold: f64,
    /// Its backends (of this host's region).
    pub backends: Vec<DesiredBackend>,
    /// Its regions and how new flows split over them (none: every flow from its table).
    pub regions: DesiredRegions,
}

/// One region level of a desired VIP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DesiredLevel {
    /// This host's own region: the VIP's Maglev table.
    Local,
    /// A remote region, reached by encapsulating new flows to its xlb host.
    Remote {
        /// The tunnel address of the region's xlb host.
        address: IpAddr,
        /// Whether it can take flows (its capacity probes pass). Flows pinned to a region that
        /// is down are re-selected, as for any backend that is down.
        up: bool,
    },
}

/// A desired VIP's regions, in priority order, and how its new flows split over them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DesiredRegions {
    /// The levels (at most [`MAX_VIP_REGIONS`]); empty: no regions.
    pub levels: Vec<DesiredLevel>,
    /// Per level, the cumulative upper bound of its share of new flows out of
    /// [`REGION_SCALE`] (non-decreasing, the last one `REGION_SCALE`).
    pub upto: Vec<u32>,
    /// Every region is down: new flows go to the last resort (this region's table with every
    /// backend in it, as in panic), counted by the data path.
    pub last_resort: bool,
}

impl DesiredRegions {
    /// Whether a level is a remote region (another region can take the VIP's flows).
    pub fn has_remote(&self) -> bool {
        self.levels
            .iter()
            .any(|l| matches!(l, DesiredLevel::Remote { .. }))
    }
}

/// Everything the maps should hold.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Desired {
    /// Balancer-wide settings.
    pub config: LbConfig,
    /// The VIPs.
    pub vips: Vec<DesiredVip>,
}

/// One map write.
#[derive(Debug, Clone, PartialEq)]
pub enum MapOp {
    /// Write the balancer-wide settings.
    SetConfig(LbConfig),
    /// Write backend `id` (an entry with family 0 frees it).
    SetBackend(u32, Backend),
    /// Publish a VIP with a new table (written beside the live one, then switched).
    PublishVip {
        /// The VIP.
        key: VipKey,
        /// Its id.
        vip_id: u32,
        /// `VIP_F_*`.
        flags: u32,
        /// The Maglev table of backend ids.
        table: Vec<u32>,
        /// Its region split.
        split: RegionSplit,
    },
    /// Change a live VIP's flags and region split, keeping its table.
    SetVipSplit {
        /// The VIP.
        key: VipKey,
        /// `VIP_F_*`.
        flags: u32,
        /// The new split.
        split: RegionSplit,
    },
    /// Remove a VIP.
    RemoveVip(VipKey),
}

/// Why a desired state cannot be planned. Nothing is applied when planning fails.
#[derive(Debug, Error, PartialEq)]
pub enum PlanError {
    /// More VIPs than the maps hold.
    #[error("{0} VIPs wanted; the balancer holds at most {MAX_VIPS}")]
    TooManyVips(usize),
    /// More backends (over all VIPs) than the maps hold.
    #[error("more than {MAX_BACKENDS} backends over all VIPs")]
    TooManyBackends,
    /// The same VIP twice.
    #[error("VIP {0:?} appears twice")]
    DuplicateVip(VipKey),
    /// A VIP's regions cannot be written.
    #[error("VIP {key:?}: {reason}")]
    Regions {
        /// The VIP.
        key: VipKey,
        /// What is wrong.
        reason: String,
    },
    /// A VIP's table cannot be built.
    #[error("VIP {key:?}: {source}")]
    Maglev {
        /// The VIP.
        key: VipKey,
        /// The builder's error.
        #[source]
        source: MaglevError,
    },
}

/// What the reconciler remembers about one applied VIP.
#[derive(Debug, Clone, PartialEq)]
struct AppliedVip {
    vip_id: u32,
    flags: u32,
    /// A digest of the applied table, not the table: 100 VIPs of 65,537 slots would otherwise
    /// keep 26 MB alive just to notice that nothing changed.
    table_digest: u64,
    /// What the table was built from (its size and the Maglev input: id, address and weight of
    /// each backend in it, in order), so a plan where they are unchanged reuses the digest
    /// instead of rebuilding the table. `None` for a VIP adopted from pinned maps.
    table_input: Option<TableInput>,
    /// Its region split as written.
    split: RegionSplit,
    /// Its backends and remote regions' entries, by address.
    backends: BTreeMap<IpAddr, (u32, Backend)>,
}

/// The input of one Maglev table: its size and (id, address, weight) of each backend in it.
type TableInput = (u32, Vec<(u32, IpAddr, u32)>);

/// A digest of a table: the same function the map layer stores beside each table, so digests
/// adopted from pinned maps compare with fresh ones.
fn digest(table: &[u32]) -> u64 {
    maglev::table_digest(table)
}

/// The reconciler's memory of the maps, and its id allocators.
#[derive(Debug)]
pub struct Reconciler {
    config: Option<LbConfig>,
    vips: HashMap<VipKey, AppliedVip>,
    free_vip_ids: VecDeque<u32>,
    free_backend_ids: VecDeque<u32>,
    /// Backend ids found in adopted maps that no VIP owns (an agent killed between writing a
    /// backend and publishing its table): the next plan frees them.
    orphans: Vec<u32>,
}

impl Default for Reconciler {
    fn default() -> Self {
        Self::new()
    }
}

/// A plan and the reconciler state it leads to; [`Reconciler::commit`] adopts the state once
/// the plan has been applied.
#[derive(Debug)]
pub struct Plan {
    /// The map writes, in a safe order: backends first (a table never names a backend that is
    /// not written yet), then VIP publications, then removals, then freed backends.
    pub ops: Vec<MapOp>,
    /// Maglev tables built for this plan. Only VIPs whose table input (size, backends in the
    /// table, their weights) changed are rebuilt: a health change of one backend costs one
    /// table, not one per VIP.
    pub tables_built: usize,
    next: Reconciler,
}

impl Plan {
    /// True when the maps already hold the desired state.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

fn backend_entry(b: &DesiredBackend, up: bool, owner: u32) -> Backend {
    let mut entry = Backend {
        owner,
        ..Backend::default()
    };
    match b.address {
        IpAddr::V4(a) => {
            entry.addr[..4].copy_from_slice(&a.octets());
            entry.family = FAMILY_V4;
        }
        IpAddr::V6(a) => {
            entry.addr = a.octets();
            entry.family = FAMILY_V6;
        }
    }
    entry.flags = if up { BACKEND_F_UP } else { 0 };
    entry.mac = b.mac.unwrap_or_default();
    entry
}

/// Whether frames can be addressed to the backend at all: a dsr-l2 backend needs a MAC. One
/// without stays out of the table even in panic: panic bets that a backend failing its checks
/// may still answer, but a frame for 00:00:00:00:00:00 reaches nobody.
fn reachable(vip: &DesiredVip, b: &DesiredBackend) -> bool {
    vip.flags & VIP_F_DSR_L2 == 0 || b.mac.is_some()
}

/// Whether the VIP is in panic: fewer than `panic_threshold` of its weighted backends healthy.
/// In panic every weighted backend is used, as Envoy does, instead of piling all traffic onto
/// the few survivors (or dropping it all when none is left).
pub fn in_panic(vip: &DesiredVip) -> bool {
    let weighted: Vec<&DesiredBackend> = vip.backends.iter().filter(|b| b.weight > 0).collect();
    if weighted.is_empty() {
        return false;
    }
    let healthy = weighted.iter().filter(|b| b.healthy).count();
    (healthy as f64) < vip.panic_threshold * weighted.len() as f64
}

/// Whether every weighted backend of the VIP's table takes new flows, healthy or not: in panic
/// ([`in_panic`]) when no other region can take its load, and in the last resort (every region
/// down). With another region available a failing region sheds load instead.
pub fn panics(vip: &DesiredVip) -> bool {
    vip.regions.last_resort || (!vip.regions.has_remote() && in_panic(vip))
}

impl Reconciler {
    /// A reconciler for empty maps.
    pub fn new() -> Self {
        Self {
            config: None,
            vips: HashMap::new(),
            free_vip_ids: (0..MAX_VIPS).collect(),
            // Id 0 is never used: a zeroed entry must not look like a real backend.
            free_backend_ids: (1..MAX_BACKENDS).collect(),
            orphans: Vec::new(),
        }
    }

    /// A reconciler for maps a previous agent filled (pinned maps adopted after a restart): its
    /// memory is rebuilt from what the maps hold, so the first plan writes only what differs
    /// from the desired state and keeps every id (established flows refer to them).
    ///
    /// Free ids are queued starting after the highest id in use, so ids freed shortly before
    /// the restart (the highest in use are the most recent) come round last, as they would have.
    pub fn adopt(contents: &MapContents) -> Self {
        // An all-zero entry (never written) compares unequal to any real setting, so the
        // first plan writes it.
        let config = Some(contents.config);
        let mut vips: HashMap<VipKey, AppliedVip> = HashMap::new();
        let mut key_of: HashMap<u32, VipKey> = HashMap::new();
        for (key, meta) in &contents.vips {
            if meta.vip_id >= MAX_VIPS || key_of.contains_key(&meta.vip_id) {
                continue;
            }
            key_of.insert(meta.vip_id, *key);
            vips.insert(
                *key,
                AppliedVip {
                    vip_id: meta.vip_id,
                    flags: meta.flags,
                    table_digest: meta.table_digest,
                    table_input: None,
                    split: RegionSplit {
                        count: meta.region_count,
                        upto: meta.region_upto,
                        backend: meta.region_backend,
                    },
                    backends: BTreeMap::new(),
                },
            );
        }
        let mut orphans = Vec::new();
        let mut used_backends = std::collections::HashSet::new();
        for (id, b) in &contents.backends {
            if *id == 0 || *id >= MAX_BACKENDS {
                continue;
            }
            used_backends.insert(*id);
            let Some(address) = crate::loader::ip_of(&b.addr, b.family) else {
                orphans.push(*id);
                continue;
            };
            let owner = key_of.get(&b.owner).and_then(|k| vips.get_mut(k));
            match owner {
                Some(v) if !v.backends.contains_key(&address) => {
                    v.backends.insert(address, (*id, *b));
                }
                _ => orphans.push(*id),
            }
        }
        let rotate = |all: std::ops::Range<u32>, used: &dyn Fn(u32) -> bool| {
            let highest = all.clone().filter(|&i| used(i)).max();
            let mut free: Vec<u32> = all.filter(|&i| !used(i)).collect();
            if let Some(h) = highest {
                let split = free.partition_point(|&i| i < h);
                free.rotate_left(split);
            }
            free.into_iter().collect::<VecDeque<u32>>()
        };
        let free_vip_ids = rotate(0..MAX_VIPS, &|i| key_of.contains_key(&i));
        let free_backend_ids = rotate(1..MAX_BACKENDS, &|i| used_backends.contains(&i));
        orphans.sort_unstable();
        Self {
            config,
            vips,
            free_vip_ids,
            free_backend_ids,
            orphans,
        }
    }

    /// Number of VIPs this reconciler believes are in the maps.
    pub fn vip_count(&self) -> usize {
        self.vips.len()
    }

    /// The id of an applied VIP.
    pub fn vip_id(&self, key: &VipKey) -> Option<u32> {
        self.vips.get(key).map(|v| v.vip_id)
    }

    /// The id of an applied backend of a VIP.
    pub fn backend_id(&self, key: &VipKey, address: &IpAddr) -> Option<u32> {
        self.vips.get(key)?.backends.get(address).map(|(id, _)| *id)
    }

    /// Plans the writes that bring the maps from what this reconciler applied to `desired`.
    pub fn plan(&self, desired: &Desired) -> Result<Plan, PlanError> {
        if desired.vips.len() > MAX_VIPS as usize {
            return Err(PlanError::TooManyVips(desired.vips.len()));
        }
        let mut next = Reconciler {
            config: Some(desired.config),
            vips: HashMap::new(),
            free_vip_ids: self.free_vip_ids.clone(),
            free_backend_ids: self.free_backend_ids.clone(),
            orphans: Vec::new(),
        };
        let mut set_backends = Vec::new();
        let mut publish = Vec::new();
        let mut removals = Vec::new();
        let mut freed_backends = self.orphans.clone();
        let mut tables_built = 0;

        if self.config != Some(desired.config) {
            set_backends.push(MapOp::SetConfig(desired.config));
        }

        // VIPs that go away free their ids (at the back of the queues) after the new ones were
        // taken, so an id is never reused within one plan.
        let wanted: HashMap<VipKey, &DesiredVip> =
            desired.vips.iter().map(|v| (v.key, v)).collect();
        if wanted.len() != desired.vips.len() {
            let mut seen = std::collections::HashSet::new();
            let dup = desired
                .vips
                .iter()
                .find(|v| !seen.insert(v.key))
                .map(|v| v.key)
                .unwrap_or_default();
            return Err(PlanError::DuplicateVip(dup));
        }

        for vip in &desired.vips {
            let old = self.vips.get(&vip.key);
            let vip_id = match old {
                Some(o) => o.vip_id,
                None => next
                    .free_vip_ids
                    .pop_front()
                    .ok_or(PlanError::TooManyVips(desired.vips.len()))?,
            };
            let panic = panics(vip);
            let flags = if vip.regions.last_resort {
                vip.flags | VIP_F_LAST_RESORT
            } else {
                vip.flags
            };
            let mut backends = BTreeMap::new();
            let mut maglev_input = Vec::new();
            let mut input_key = Vec::new();
            for b in &vip.backends {
                let id = match old.and_then(|o| o.backends.get(&b.address)) {
                    Some((id, _)) => *id,
                    None => next
                        .free_backend_ids
                        .pop_front()
                        .ok_or(PlanError::TooManyBackends)?,
                };
                let up = reachable(vip, b) && (b.healthy || panic);
                let entry = backend_entry(b, up, vip_id);
                if old.and_then(|o| o.backends.get(&b.address)) != Some(&(id, entry)) {
                    set_backends.push(MapOp::SetBackend(id, entry));
                }
                if up {
                    maglev_input.push(MaglevBackend {
                        id,
                        key: key_bytes(&b.address),
                        weight: b.weight,
                    });
                    input_key.push((id, b.address, b.weight));
                }
                backends.insert(b.address, (id, entry));
            }
            let split = plan_regions(
                vip,
                vip_id,
                old,
                &mut backends,
                &mut next.free_backend_ids,
                &mut set_backends,
            )?;
            let table_input: TableInput = (vip.table_size, input_key);
            let build = |tables_built: &mut usize| {
                *tables_built += 1;
                maglev::build(&maglev_input, vip.table_size).map_err(|source| PlanError::Maglev {
                    key: vip.key,
                    source,
                })
            };
            // The same input builds the same table: its digest is known without building it.
            let (table_digest, mut table) = match old {
                Some(o) if o.table_input.as_ref() == Some(&table_input) => (o.table_digest, None),
                _ => {
                    let table = build(&mut tables_built)?;
                    (digest(&table), Some(table))
                }
            };
            let changed = match old {
                Some(o) => o.flags != flags || o.table_digest != table_digest,
                None => true,
            };
            if changed {
                let table = match table.take() {
                    Some(t) => t,
                    None => build(&mut tables_built)?,
                };
                publish.push(MapOp::PublishVip {
                    key: vip.key,
                    vip_id,
                    flags,
                    table,
                    split,
                });
            } else if old.map(|o| o.split) != Some(split) {
                // Only the split moved (a region failed over or back): no table is built.
                publish.push(MapOp::SetVipSplit {
                    key: vip.key,
                    flags,
                    split,
                });
            }
            // Backends dropped from a VIP that stays: free their entries after the new table.
            if let Some(o) = old {
                for (addr, (id, _)) in &o.backends {
                    if !backends.contains_key(addr) {
                        freed_backends.push(*id);
                    }
                }
            }
            next.vips.insert(
                vip.key,
                AppliedVip {
                    vip_id,
                    flags,
                    table_digest,
                    table_input: Some(table_input),
                    split,
                    backends,
                },
            );
        }
        let mut gone: Vec<(&VipKey, &AppliedVip)> = self
            .vips
            .iter()
            .filter(|(k, _)| !wanted.contains_key(k))
            .collect();
        gone.sort_by_key(|(_, v)| v.vip_id);
        for (key, applied) in gone {
            removals.push(MapOp::RemoveVip(*key));
            next.free_vip_ids.push_back(applied.vip_id);
            freed_backends.extend(applied.backends.values().map(|(id, _)| *id));
        }
        freed_backends.sort_unstable();
        let mut ops = set_backends;
        ops.extend(publish);
        ops.extend(removals);
        for id in freed_backends {
            ops.push(MapOp::SetBackend(id, Backend::default()));
            next.free_backend_ids.push_back(id);
        }
        Ok(Plan {
            ops,
            tables_built,
            next,
        })
    }

    /// Adopts the state a plan leads to (call once the plan is applied).
    pub fn commit(&mut self, plan: Plan) {
        *self = plan.next;
    }
}

/// The region split of a VIP, with an entry per remote region (allocated like a backend, owned
/// by the VIP, flagged [`BACKEND_F_REGION`], up when the region is) written before any split
/// names it.
fn plan_regions(
    vip: &DesiredVip,
    vip_id: u32,
    old: Option<&AppliedVip>,
    backends: &mut BTreeMap<IpAddr, (u32, Backend)>,
    free_backend_ids: &mut VecDeque<u32>,
    set_backends: &mut Vec<MapOp>,
) -> Result<RegionSplit, PlanError> {
    let r = &vip.regions;
    if r.levels.is_empty() {
        return Ok(RegionSplit::NONE);
    }
    let bad = |reason: String| PlanError::Regions {
        key: vip.key,
        reason,
    };
    if r.levels.len() > MAX_VIP_REGIONS || r.upto.len() != r.levels.len() {
        return Err(bad(format!(
            "{} region levels with {} bounds; at most {MAX_VIP_REGIONS}, one bound each",
            r.levels.len(),
            r.upto.len()
        )));
    }
    let mut split = RegionSplit {
        count: r.levels.len() as u32,
        ..RegionSplit::NONE
    };
    for (i, level) in r.levels.iter().enumerate() {
        split.upto[i] = r.upto[i];
        split.backend[i] = match level {
            DesiredLevel::Local => REGION_LOCAL,
            DesiredLevel::Remote { address, up } => {
                if backends.contains_key(address) {
                    return Err(bad(format!(
                        "region tunnel address {address} is also a backend or another region"
                    )));
                }
                let id = match old.and_then(|o| o.backends.get(address)) {
                    Some((id, _)) => *id,
                    None => free_backend_ids
                        .pop_front()
                        .ok_or(PlanError::TooManyBackends)?,
                };
                let mut entry = backend_entry(
                    &DesiredBackend {
                        address: *address,
                        weight: 0,
                        healthy: *up,
                        mac: None,
                    },
                    *up,
                    vip_id,
                );
                entry.flags |= BACKEND_F_REGION;
                if old.and_then(|o| o.backends.get(address)) != Some(&(id, entry)) {
                    set_backends.push(MapOp::SetBackend(id, entry));
                }
                backends.insert(*address, (id, entry));
                id
            }
        };
    }
    split.check().map_err(bad)?;
    debug_assert_eq!(split.upto[split.count as usize - 1], REGION_SCALE);
    Ok(split)
}

/// A backend's Maglev key: its address bytes, so every xlb host builds the same table.
fn key_bytes(addr: &IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Applies a plan through the typed map layer, in order. On an error the maps may hold part
/// of the plan; the caller keeps its old reconciler state and re-plans, which rewrites whatever
/// differs.
pub fn apply(balancer: &mut Balancer, plan: &Plan) -> Result<(), LoaderError> {
    for op in &plan.ops {
        match op {
            MapOp::SetConfig(cfg) => balancer.set_config(cfg)?,
            MapOp::SetBackend(id, b) => balancer.set_backend(*id, b)?,
            MapOp::PublishVip {
                key,
                vip_id,
                flags,
                table,
                split,
            } => {
                balancer.publish_vip_split(key, *vip_id, *flags, table, split)?;
            }
            MapOp::SetVipSplit { key, flags, split } => {
                balancer.set_vip_split(key, *flags, split)?;
            }
            MapOp::RemoveVip(key) => balancer.remove_vip(key)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use lb_common::types::proto;

    use super::*;

    fn vip(last: u8, backends: &[(&str, u32, bool)]) -> DesiredVip {
        let mut key = VipKey {
            port_be: 80u16.to_be(),
            proto: proto::TCP,
            family: FAMILY_V4,
            ..Default::default()
        };
        key.addr[..4].copy_from_slice(&[203, 0, 113, last]);
        DesiredVip {
            key,
            flags: 0,
            table_size: 251,
            panic_threshold: 0.5,
            backends: backends
                .iter()
                .map(|(a, w, h)| DesiredBackend {
                    address: a.parse().unwrap(),
                    weight: *w,
                    healthy: *h,
                    mac: None,
                })
                .collect(),
            regions: DesiredRegions::default(),
        }
    }

    fn desired(vips: Vec<DesiredVip>) -> Desired {
        Desired {
            config: LbConfig::default(),
            vips,
        }
    }

    fn applied(r: &mut Reconciler, d: &Desired) -> Vec<MapOp> {
        let plan = r.plan(d).unwrap();
        let ops = plan.ops.clone();
        r.commit(plan);
        ops
    }

    fn publishes(ops: &[MapOp]) -> Vec<VipKey> {
        ops.iter()
            .filter_map(|o| match o {
                MapOp::PublishVip { key, .. } => Some(*key),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn first_plan_writes_everything_and_a_second_writes_nothing() {
        let mut r = Reconciler::new();
        let d = desired(vec![
            vip(10, &[("10.0.0.1", 1, true), ("10.0.0.2", 1, true)]),
            vip(11, &[("10.0.0.3", 1, true)]),
        ]);
        let ops = applied(&mut r, &d);
        assert_eq!(publishes(&ops).len(), 2);
        assert_eq!(
            ops.iter()
                .filter(|o| matches!(o, MapOp::SetBackend(..)))
                .count(),
            3
        );
        assert!(matches!(ops[0], MapOp::SetConfig(_)));
        assert!(
            r.plan(&d).unwrap().is_empty(),
            "reconciling twice must be a no-op"
        );
    }

    #[test]
    fn only_tables_whose_input_changed_are_rebuilt() {
        // 50 VIPs sharing one backend host: its checks fail one VIP at a time, and each health
        // event used to rebuild all 50 tables (27 s from the first VIP's failover to the last
        // in a debug build, about 6 s in release).
        let mut r = Reconciler::new();
        let mut d = desired(
            (0..50)
                .map(|i| vip(i, &[("10.0.0.1", 1, true), ("10.0.0.2", 1, true)]))
                .collect(),
        );
        let plan = r.plan(&d).unwrap();
        assert_eq!(plan.tables_built, 50, "a first plan builds every table");
        r.commit(plan);
        let plan = r.plan(&d).unwrap();
        assert_eq!((plan.tables_built, plan.ops.len()), (0, 0));

        d.vips[7].backends[1].healthy = false;
        let plan = r.plan(&d).unwrap();
        assert_eq!(plan.tables_built, 1, "one VIP's table changed");
        assert_eq!(publishes(&plan.ops), vec![d.vips[7].key]);
        r.commit(plan);

        // A weight change of a backend that is down changes no table input.
        d.vips[7].backends[1].weight = 5;
        assert_eq!(r.plan(&d).unwrap().tables_built, 0);
        // Back up, with its new weight: rebuilt, and the table equals a fresh reconciler's.
        d.vips[7].backends[1].healthy = true;
        let plan = r.plan(&d).unwrap();
        assert_eq!(plan.tables_built, 1);
        let fresh = Reconciler::new().plan(&d).unwrap();
        let table_of = |ops: &[MapOp], key: VipKey| {
            ops.iter().find_map(|o| match o {
                MapOp::PublishVip { key: k, table, .. } if *k == key => Some(table.clone()),
                _ => None,
            })
        };
        assert_eq!(
            table_of(&plan.ops, d.vips[7].key),
            table_of(&fresh.ops, d.vips[7].key)
        );
        r.commit(plan);

        // A mode change with the same backends republishes with the (rebuilt) table.
        d.vips[3].flags = 1;
        let plan = r.plan(&d).unwrap();
        assert_eq!(publishes(&plan.ops), vec![d.vips[3].key]);
        assert_eq!(plan.tables_built, 1);
    }

    #[test]
    fn a_change_to_one_vip_touches_only_that_vip() {
        let mut r = Reconciler::new();
        let mut d = desired(vec![
            vip(10, &[("10.0.0.1", 1, true), ("10.0.0.2", 1, true)]),
            vip(11, &[("10.0.0.3", 1, true), ("10.0.0.4", 1, true)]),
        ]);
        applied(&mut r, &d);
        d.vips[1].backends[1].weight = 3;
        let ops = applied(&mut r, &d);
        assert_eq!(publishes(&ops), vec![d.vips[1].key]);
        assert!(
            !ops.iter().any(|o| matches!(o, MapOp::SetBackend(..))),
            "a weight change rewrites the table only: {ops:?}"
        );
    }

    #[test]
    fn backends_are_written_before_the_table_that_names_them() {
        let mut r = Reconciler::new();
        let mut d = desired(vec![vip(10, &[("10.0.0.1", 1, true)])]);
        applied(&mut r, &d);
        d.vips[0].backends.push(DesiredBackend {
            address: "10.0.0.9".parse().unwrap(),
            weight: 1,
            healthy: true,
            mac: None,
        });
        let ops = applied(&mut r, &d);
        let set = ops
            .iter()
            .position(|o| matches!(o, MapOp::SetBackend(..)))
            .unwrap();
        let publish = ops
            .iter()
            .position(|o| matches!(o, MapOp::PublishVip { .. }))
            .unwrap();
        assert!(set < publish, "{ops:?}");
    }

    #[test]
    fn an_unhealthy_backend_is_marked_down_and_leaves_the_table() {
        let mut r = Reconciler::new();
        let mut d = desired(vec![vip(
            10,
            &[
                ("10.0.0.1", 1, true),
                ("10.0.0.2", 1, true),
                ("10.0.0.3", 1, true),
            ],
        )]);
        applied(&mut r, &d);
        let down_addr: IpAddr = "10.0.0.2".parse().unwrap();
        let down_id = r.backend_id(&d.vips[0].key, &down_addr).unwrap();
        d.vips[0].backends[1].healthy = false;
        let ops = applied(&mut r, &d);
        let entry = ops
            .iter()
            .find_map(|o| match o {
                MapOp::SetBackend(id, b) if *id == down_id => Some(*b),
                _ => None,
            })
            .expect("the backend entry is rewritten");
        assert_eq!(entry.flags & BACKEND_F_UP, 0);
        let table = ops
            .iter()
            .find_map(|o| match o {
                MapOp::PublishVip { table, .. } => Some(table.clone()),
                _ => None,
            })
            .unwrap();
        assert!(!table.contains(&down_id));
    }

    #[test]
    fn a_drained_backend_stays_up_but_leaves_the_table() {
        let mut r = Reconciler::new();
        let mut d = desired(vec![vip(
            10,
            &[("10.0.0.1", 1, true), ("10.0.0.2", 1, true)],
        )]);
        applied(&mut r, &d);
        let addr: IpAddr = "10.0.0.2".parse().unwrap();
        let id = r.backend_id(&d.vips[0].key, &addr).unwrap();
        d.vips[0].backends[1].weight = 0;
        let ops = applied(&mut r, &d);
        assert!(
            !ops.iter()
                .any(|o| matches!(o, MapOp::SetBackend(i, _) if *i == id)),
            "draining must not touch the backend entry (its flows stay): {ops:?}"
        );
        match &ops[0] {
            MapOp::PublishVip { table, .. } => assert!(!table.contains(&id)),
            other => panic!("expected a publish, got {other:?}"),
        }
    }

    #[test]
    fn below_the_panic_threshold_every_weighted_backend_takes_traffic() {
        let mut r = Reconciler::new();
        let d = desired(vec![vip(
            10,
            &[
                ("10.0.0.1", 1, true),
                ("10.0.0.2", 1, false),
                ("10.0.0.3", 1, false),
                ("10.0.0.4", 0, false),
            ],
        )]);
        assert!(in_panic(&d.vips[0]));
        let ops = applied(&mut r, &d);
        let table = ops
            .iter()
            .find_map(|o| match o {
                MapOp::PublishVip { table, .. } => Some(table.clone()),
                _ => None,
            })
            .unwrap();
        for a in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
            let id = r.backend_id(&d.vips[0].key, &a.parse().unwrap()).unwrap();
            assert!(table.contains(&id), "{a} must serve in panic");
        }
        let drained = r
            .backend_id(&d.vips[0].key, &"10.0.0.4".parse().unwrap())
            .unwrap();
        assert!(!table.contains(&drained), "drained stays drained in panic");
    }

    #[test]
    fn dsr_l2_backends_without_a_mac_stay_out_of_the_table_even_in_panic() {
        let mut r = Reconciler::new();
        let mut d = desired(vec![vip(
            10,
            &[
                ("10.0.0.1", 1, true),
                ("10.0.0.2", 1, false),
                ("10.0.0.3", 1, false),
                ("10.0.0.4", 1, false),
            ],
        )]);
        d.vips[0].flags = VIP_F_DSR_L2;
        // .1 resolved and passing; .2 resolved and failing its checks; .3 and .4 without a
        // MAC (what `desired` marks unhealthy).
        for (b, mac) in d.vips[0]
            .backends
            .iter_mut()
            .zip([Some(1), Some(2), None, None])
        {
            b.mac = mac.map(|m| [2, 0, 0, 0, 0, m]);
        }
        assert!(in_panic(&d.vips[0]));
        let ops = applied(&mut r, &d);
        let table = ops
            .iter()
            .find_map(|o| match o {
                MapOp::PublishVip { table, .. } => Some(table.clone()),
                _ => None,
            })
            .unwrap();
        let id = |a: &str| r.backend_id(&d.vips[0].key, &a.parse().unwrap()).unwrap();
        for a in ["10.0.0.1", "10.0.0.2"] {
            assert!(table.contains(&id(a)), "{a} has a MAC: it serves in panic");
        }
        for a in ["10.0.0.3", "10.0.0.4"] {
            assert!(
                !table.contains(&id(a)),
                "{a} has no MAC: never in the table"
            );
            let entry = ops.iter().find_map(|o| match o {
                MapOp::SetBackend(i, b) if *i == id(a) => Some(*b),
                _ => None,
            });
            assert_eq!(entry.expect("written").flags & BACKEND_F_UP, 0, "{a}");
        }
        // Encapsulating VIPs need no MAC: the same pool in dsr-ipip mode serves everyone.
        let mut r = Reconciler::new();
        d.vips[0].flags = 0;
        let ops = applied(&mut r, &d);
        let table = ops
            .iter()
            .find_map(|o| match o {
                MapOp::PublishVip { table, .. } => Some(table.clone()),
                _ => None,
            })
            .unwrap();
        for a in ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"] {
            let id = r.backend_id(&d.vips[0].key, &a.parse().unwrap()).unwrap();
            assert!(table.contains(&id), "{a} serves a dsr-ipip VIP in panic");
        }
    }

    #[test]
    fn removed_vips_and_backends_free_their_ids_without_immediate_reuse() {
        let mut r = Reconciler::new();
        let mut d = desired(vec![
            vip(10, &[("10.0.0.1", 1, true)]),
            vip(11, &[("10.0.0.2", 1, true)]),
        ]);
        applied(&mut r, &d);
        let gone_vip = r.vip_id(&d.vips[1].key).unwrap();
        let gone_backend = r
            .backend_id(&d.vips[1].key, &"10.0.0.2".parse().unwrap())
            .unwrap();
        let removed = d.vips.pop().unwrap();
        let ops = applied(&mut r, &d);
        assert!(ops.contains(&MapOp::RemoveVip(removed.key)));
        assert!(ops.contains(&MapOp::SetBackend(gone_backend, Backend::default())));
        // A new VIP and backend right after get fresh ids, not the ones just freed.
        d.vips.push(vip(12, &[("10.0.0.5", 1, true)]));
        applied(&mut r, &d);
        assert_ne!(r.vip_id(&d.vips[1].key), Some(gone_vip));
        assert_ne!(
            r.backend_id(&d.vips[1].key, &"10.0.0.5".parse().unwrap()),
            Some(gone_backend)
        );
    }

    #[test]
    fn invalid_desired_states_are_refused_whole() {
        let r = Reconciler::new();
        let dup = desired(vec![vip(10, &[]), vip(10, &[])]);
        assert!(matches!(r.plan(&dup), Err(PlanError::DuplicateVip(_))));
        let mut bad = desired(vec![vip(10, &[("10.0.0.1", 1, true)])]);
        bad.vips[0].table_size = 250;
        assert!(matches!(r.plan(&bad), Err(PlanError::Maglev { .. })));
    }

    /// The maps as a model: what a sequence of applied plans leaves in them.
    fn written(ops_seq: &[Vec<MapOp>]) -> MapContents {
        let mut vips: HashMap<VipKey, lb_common::types::VipMeta> = HashMap::new();
        let mut backends: BTreeMap<u32, Backend> = BTreeMap::new();
        let mut config = LbConfig::default();
        for ops in ops_seq {
            for op in ops {
                match op {
                    MapOp::SetConfig(c) => config = *c,
                    MapOp::SetBackend(id, b) if b.family == 0 => {
                        backends.remove(id);
                    }
                    MapOp::SetBackend(id, b) => {
                        backends.insert(*id, *b);
                    }
                    MapOp::PublishVip {
                        key,
                        vip_id,
                        flags,
                        table,
                        split,
                    } => {
                        vips.insert(
                            *key,
                            lb_common::types::VipMeta {
                                vip_id: *vip_id,
                                flags: *flags,
                                table_size: table.len() as u32,
                                table_digest: maglev::table_digest(table),
                                region_count: split.count,
                                region_upto: split.upto,
                                region_backend: split.backend,
                                ..Default::default()
                            },
                        );
                    }
                    MapOp::SetVipSplit { key, flags, split } => {
                        let meta = vips.get_mut(key).expect("split of a published VIP");
                        meta.flags = *flags;
                        meta.region_count = split.count;
                        meta.region_upto = split.upto;
                        meta.region_backend = split.backend;
                    }
                    MapOp::RemoveVip(key) => {
                        vips.remove(key);
                    }
                }
            }
        }
        MapContents {
            config,
            vips: vips.into_iter().collect(),
            backends: backends.into_iter().collect(),
        }
    }

    #[test]
    fn an_adopting_reconciler_writes_nothing_when_the_maps_already_hold_the_desired_state() {
        let mut r = Reconciler::new();
        let d = desired(vec![
            vip(10, &[("10.0.0.1", 1, true), ("10.0.0.2", 2, false)]),
            vip(11, &[("10.0.1.1", 1, true), ("2001:db8::1", 1, true)]),
        ]);
        let first = applied(&mut r, &d);
        let mut adopted = Reconciler::adopt(&written(&[first]));
        assert_eq!(adopted.vip_count(), 2);
        let plan = adopted.plan(&d).unwrap();
        assert!(plan.is_empty(), "{:?}", plan.ops);
        // Ids are kept: the same backend keeps the id flows refer to.
        for v in &d.vips {
            assert_eq!(adopted.vip_id(&v.key), r.vip_id(&v.key));
            for b in &v.backends {
                assert_eq!(
                    adopted.backend_id(&v.key, &b.address),
                    r.backend_id(&v.key, &b.address)
                );
            }
        }
        adopted.commit(plan);
    }

    #[test]
    fn regions_survive_adoption_and_a_tunnel_address_may_not_be_a_backend() {
        let mut r = Reconciler::new();
        let mut v = vip(10, &[("10.0.0.1", 1, false), ("10.0.0.2", 1, false)]);
        v.regions = DesiredRegions {
            levels: vec![
                DesiredLevel::Local,
                DesiredLevel::Remote {
                    address: "198.18.0.2".parse().unwrap(),
                    up: true,
                },
            ],
            upto: vec![0, REGION_SCALE],
            last_resort: false,
        };
        let d = desired(vec![v.clone()]);
        let first = applied(&mut r, &d);
        // With a remote region to take the flows, the local backends that are down stay out
        // (no panic), and the region's entry is flagged.
        let table = first
            .iter()
            .find_map(|op| match op {
                MapOp::PublishVip { table, split, .. } => Some((table.clone(), *split)),
                _ => None,
            })
            .expect("published");
        assert!(table.0.iter().all(|&id| id == crate::maglev::EMPTY_SLOT));
        assert_eq!(table.1.count, 2);
        assert_eq!(table.1.backend[0], REGION_LOCAL);
        let region_id = table.1.backend[1];
        assert!(first.iter().any(|op| matches!(op,
            MapOp::SetBackend(id, e) if *id == region_id && e.flags == BACKEND_F_REGION | BACKEND_F_UP)));
        let mut adopted = Reconciler::adopt(&written(&[first]));
        let plan = adopted.plan(&d).unwrap();
        assert!(plan.is_empty(), "{:?}", plan.ops);
        adopted.commit(plan);

        let mut clash = v;
        clash.regions.levels[1] = DesiredLevel::Remote {
            address: "10.0.0.2".parse().unwrap(),
            up: true,
        };
        assert!(matches!(
            adopted.plan(&desired(vec![clash])),
            Err(PlanError::Regions { .. })
        ));
    }

    #[test]
    fn an_adopting_reconciler_rewrites_only_what_changed_while_it_was_away() {
        let mut r = Reconciler::new();
        let d = desired(vec![
            vip(10, &[("10.0.0.1", 1, true), ("10.0.0.2", 1, true)]),
            vip(11, &[("10.0.1.1", 1, true)]),
        ]);
        let first = applied(&mut r, &d);
        let adopted = Reconciler::adopt(&written(&[first]));
        let mut changed = d.clone();
        changed.vips[0].backends[1].healthy = false;
        let ops = adopted.plan(&changed).unwrap().ops;
        assert_eq!(publishes(&ops), vec![d.vips[0].key]);
        // The down backend keeps its id and is rewritten with the flag cleared.
        let id = r.backend_id(&d.vips[0].key, &"10.0.0.2".parse().unwrap());
        assert!(ops.iter().any(|op| matches!(op,
            MapOp::SetBackend(i, b) if Some(*i) == id && b.flags & BACKEND_F_UP == 0)));
    }

    #[test]
    fn backends_no_vip_owns_are_freed_by_the_first_plan_after_adoption() {
        let mut r = Reconciler::new();
        let d = desired(vec![vip(10, &[("10.0.0.1", 1, true)])]);
        let first = applied(&mut r, &d);
        let mut contents = written(&[first]);
        // An agent killed after writing a backend of a VIP it never published.
        contents.backends.push((
            4000,
            Backend {
                family: FAMILY_V4,
                owner: 77,
                ..Backend::default()
            },
        ));
        let adopted = Reconciler::adopt(&contents);
        let ops = adopted.plan(&d).unwrap().ops;
        assert_eq!(ops, vec![MapOp::SetBackend(4000, Backend::default())]);
    }

    #[test]
    fn ids_freed_before_a_restart_are_not_the_first_handed_out_after_it() {
        let mut r = Reconciler::new();
        let three = desired(vec![vip(
            10,
            &[
                ("10.0.0.1", 1, true),
                ("10.0.0.2", 1, true),
                ("10.0.0.3", 1, true),
            ],
        )]);
        let a = applied(&mut r, &three);
        let freed = r.backend_id(&three.vips[0].key, &"10.0.0.2".parse().unwrap());
        let two = desired(vec![vip(
            10,
            &[("10.0.0.1", 1, true), ("10.0.0.3", 1, true)],
        )]);
        let b = applied(&mut r, &two);
        let adopted = Reconciler::adopt(&written(&[a, b]));
        let mut more = two.clone();
        more.vips[0].backends.push(DesiredBackend {
            address: "10.0.0.9".parse().unwrap(),
            weight: 1,
            healthy: true,
            mac: None,
        });
        let plan = adopted.plan(&more).unwrap();
        let new_id = plan
            .next
            .backend_id(&more.vips[0].key, &"10.0.0.9".parse().unwrap());
        assert_ne!(new_id, freed);
        assert!(new_id > r.backend_id(&two.vips[0].key, &"10.0.0.3".parse().unwrap()));
    }
}
