//! Run-time changes: VIPs and backends added, removed, drained or re-weighted through the admin
//! API, kept as an [`Overlay`] on top of the configuration file rather than edits to it, so a
//! reload of the file keeps them and the file stays the operator's.
//!
//! Pure logic except [`load`] and [`save`] (the overlay persisted in `state_dir/runtime.json`).
//! [`effective`] is the file with the overlay applied, held to the file's own rules
//! ([`crate::config::rules`]); [`apply`] refuses a change that would break them, so a refused
//! change changes nothing.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
    fs::{self, File, OpenOptions},
    io::Write as _,
    net::IpAddr,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::{Backend, Config, MacAddr, Protocol, Vip, VipMode, rules};

/// Name of the state file in `agent.state_dir`.
pub const STATE_FILE: &str = "runtime.json";
/// Version of the state file's format; a file of another version is refused, not guessed at.
pub const STATE_VERSION: u32 = 1;

/// Why a change or the state file was refused.
#[derive(Debug, Error)]
pub enum RuntimeError {
    /// The change would break a rule (or names something that does not exist); nothing changed.
    #[error("{}", .0.join("; "))]
    Refused(Vec<String>),
    /// The state file exists but cannot be read.
    #[error("{}: cannot be read: {source}", path.display())]
    Read {
        /// The state file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The state file is not a run-time state file this version understands.
    #[error(
        "{}: not a valid run-time state file ({message}); fix it, or move it away to start \
         from the configuration file alone",
        path.display()
    )]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it (the JSON parser's message, with line and column).
        message: String,
    },
    /// The state file (or its directory) cannot be written.
    #[error("{}: cannot be written: {source}", path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl RuntimeError {
    fn refused(message: impl Into<String>) -> Self {
        RuntimeError::Refused(vec![message.into()])
    }
}

/// A backend of a VIP, by VIP name, backend address and, on `l7` VIPs, the server's port (one
/// host may run several upstream servers): its identity across reloads.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendRef {
    /// The VIP's name.
    pub vip: String,
    /// The backend's address.
    pub address: IpAddr,
    /// The server's port on an `l7` VIP; `None` on other VIPs. A change may leave it out when
    /// the address alone names one backend: [`apply`] fills it in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl BackendRef {
    /// Whether `backend` is the one this names.
    fn is(&self, backend: &Backend) -> bool {
        self.address == backend.address && self.port == backend.port
    }
}

impl fmt::Display for BackendRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(
                f,
                "backend {} of VIP {:?}",
                std::net::SocketAddr::new(self.address, port),
                self.vip
            ),
            None => write!(f, "backend {} of VIP {:?}", self.address, self.vip),
        }
    }
}

/// A VIP added at run time (no health check: its backends count as up).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipSpec {
    /// Unique among VIPs.
    pub name: String,
    /// The virtual IP.
    pub address: IpAddr,
    /// Destination port; 0 means every port.
    pub port: u16,
    /// `tcp` or `udp`.
    #[serde(with = "protocol_text")]
    pub protocol: Protocol,
    /// How traffic reaches the backends.
    #[serde(with = "mode_text")]
    pub mode: VipMode,
    /// Maglev table slots (a prime).
    pub table_size: u32,
    /// Healthy share of the pool below which every weighted backend takes traffic.
    pub panic_threshold: f64,
}

impl VipSpec {
    fn to_vip(&self) -> Vip {
        Vip {
            name: self.name.clone(),
            address: self.address,
            port: self.port,
            protocol: self.protocol,
            mode: self.mode,
            table_size: self.table_size,
            health_check: None,
            panic_threshold: self.panic_threshold,
            regions: Vec::new(),
            failover: Default::default(),
            backends: Vec::new(),
            gateway: (self.mode == VipMode::L7).then(crate::config::l7::Gateway::defaults),
        }
    }
}

/// A backend added at run time to a VIP (of the file or added at run time). It gets its VIP's
/// health check, as a backend without its own check in the file does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    /// The VIP's name.
    pub vip: String,
    /// The backend's address.
    pub address: IpAddr,
    /// Maglev weight.
    pub weight: u16,
    /// Region.
    pub region: String,
    /// MAC, for dsr-l2 VIPs.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "mac_text")]
    pub mac: Option<MacAddr>,
    /// The server's port, `l7` VIPs only (default: the VIP's port; [`apply`] fills it in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The upstream pool, `l7` VIPs only (default `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

impl BackendSpec {
    /// The backend this adds.
    pub fn backend_ref(&self) -> BackendRef {
        BackendRef {
            vip: self.vip.clone(),
            address: self.address,
            port: self.port,
        }
    }
}

/// One run-time change, as the admin API asks for it.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Add a VIP. Adding a hidden file VIP again at the same address, port and protocol brings
    /// the file's definition back.
    AddVip(VipSpec),
    /// Remove a VIP by name (a file VIP is hidden until re-added).
    RemoveVip(String),
    /// Add a backend.
    AddBackend(BackendSpec),
    /// Remove a backend (a file backend is hidden until re-added).
    RemoveBackend(BackendRef),
    /// Weight 0 without forgetting the weight: established flows stay, no new ones.
    Drain(BackendRef),
    /// Back to its weight.
    Undrain(BackendRef),
    /// Set the weight (kept while drained, applied on undrain).
    SetWeight(BackendRef, u16),
}

/// The run-time changes in force, as a state (not a log): what is added, hidden, drained and
/// re-weighted. Entries are keyed by VIP name and backend address, so a reload that moves
/// things in the file keeps them attached to the right VIP and backend.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overlay {
    /// VIPs added, in order (they follow the file's VIPs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vips_added: Vec<VipSpec>,
    /// File VIPs removed (hidden), by name.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub vips_removed: BTreeSet<String>,
    /// Backends added, in order (they follow their VIP's file backends).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends_added: Vec<BackendSpec>,
    /// File backends removed (hidden).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub backends_removed: BTreeSet<BackendRef>,
    /// Weights set at run time.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        with = "weight_list"
    )]
    pub weights: BTreeMap<BackendRef, u16>,
    /// Drained backends.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub drained: BTreeSet<BackendRef>,
}

/// Where a VIP or backend of the effective configuration comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// The configuration file.
    File,
    /// A run-time change.
    Runtime,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::File => "file",
            Origin::Runtime => "runtime",
        })
    }
}

impl Overlay {
    /// No run-time changes.
    pub fn is_empty(&self) -> bool {
        self == &Overlay::default()
    }

    /// Whether the backend is drained.
    pub fn is_drained(&self, backend: &BackendRef) -> bool {
        self.drained.contains(backend)
    }

    /// Where the effective VIP `name` comes from.
    pub fn vip_origin(&self, name: &str) -> Origin {
        if self.vips_added.iter().any(|v| v.name == name) {
            Origin::Runtime
        } else {
            Origin::File
        }
    }

    /// Where the effective backend comes from.
    pub fn backend_origin(&self, backend: &BackendRef) -> Origin {
        let added = self
            .backends_added
            .iter()
            .any(|b| b.backend_ref() == *backend);
        if added { Origin::Runtime } else { Origin::File }
    }

    /// The weight a backend has when not drained: set at run time, else as added or in the
    /// file. `None` when there is no such backend.
    pub fn configured_weight(&self, file: &Config, backend: &BackendRef) -> Option<u16> {
        if let Some(w) = self.weights.get(backend) {
            return Some(*w);
        }
        if let Some(b) = self
            .backends_added
            .iter()
            .find(|b| b.backend_ref() == *backend)
        {
            return Some(b.weight);
        }
        if self.vips_removed.contains(&backend.vip) || self.backends_removed.contains(backend) {
            return None;
        }
        file.vips
            .iter()
            .find(|v| v.name == backend.vip)?
            .backends
            .iter()
            .find(|b| backend.is(b))
            .map(|b| b.weight)
    }

    /// Drops every entry about the VIP `name` (it is gone, so they no longer apply).
    fn forget_vip(&mut self, name: &str) {
        self.backends_added.retain(|b| b.vip != name);
        self.backends_removed.retain(|b| b.vip != name);
        self.weights.retain(|b, _| b.vip != name);
        self.drained.retain(|b| b.vip != name);
    }

    /// Drops the per-backend entries of a backend that is gone.
    fn forget_backend(&mut self, backend: &BackendRef) {
        self.weights.remove(backend);
        self.drained.remove(backend);
    }

    /// Every entry, in the order they apply: removals before additions (a VIP re-added under a
    /// hidden file VIP's name), VIPs before their backends, weights before drains.
    fn entries(&self) -> Vec<Entry> {
        let mut out: Vec<Entry> = Vec::new();
        out.extend(self.vips_removed.iter().cloned().map(Entry::RemoveVip));
        out.extend(self.vips_added.iter().cloned().map(Entry::AddVip));
        out.extend(
            self.backends_removed
                .iter()
                .cloned()
                .map(Entry::RemoveBackend),
        );
        out.extend(self.backends_added.iter().cloned().map(Entry::AddBackend));
        out.extend(
            self.weights
                .iter()
                .map(|(b, w)| Entry::Weight(b.clone(), *w)),
        );
        out.extend(self.drained.iter().cloned().map(Entry::Drain));
        out
    }

    fn insert(&mut self, entry: Entry) {
        match entry {
            Entry::RemoveVip(name) => {
                self.vips_removed.insert(name);
            }
            Entry::AddVip(spec) => self.vips_added.push(spec),
            Entry::RemoveBackend(b) => {
                self.backends_removed.insert(b);
            }
            Entry::AddBackend(spec) => self.backends_added.push(spec),
            Entry::Weight(b, w) => {
                self.weights.insert(b, w);
            }
            Entry::Drain(b) => {
                self.drained.insert(b);
            }
        }
    }
}

/// One entry of an overlay, for replaying it over a changed file.
#[derive(Debug, Clone, PartialEq)]
enum Entry {
    RemoveVip(String),
    AddVip(VipSpec),
    RemoveBackend(BackendRef),
    AddBackend(BackendSpec),
    Weight(BackendRef, u16),
    Drain(BackendRef),
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Entry::RemoveVip(name) => write!(f, "the run-time removal of VIP {name:?}"),
            Entry::AddVip(spec) => write!(f, "VIP {:?} added at run time", spec.name),
            Entry::RemoveBackend(b) => write!(f, "the run-time removal of {b}"),
            Entry::AddBackend(spec) => write!(f, "{} added at run time", spec.backend_ref()),
            Entry::Weight(b, w) => write!(f, "weight {w} set at run time on {b}"),
            Entry::Drain(b) => write!(f, "the drain of {b}"),
        }
    }
}

/// The file's configuration with the overlay applied: file VIPs not removed, then VIPs
/// added; in each, file backends not removed, then backends added; run-time weights; drained
/// backends at weight 0. Checked with the file's rules.
///
/// # Errors
///
/// Every reason the result is invalid, or an entry that names something not there (an overlay
/// from [`apply`] or [`rebase`] never does).
pub fn effective(file: &Config, overlay: &Overlay) -> Result<Config, Vec<String>> {
    let mut errors = Vec::new();
    let mut cfg = file.clone();
    for name in &overlay.vips_removed {
        if !file.vips.iter().any(|v| &v.name == name) {
            errors.push(format!("the file has no VIP {name:?} to remove"));
        }
    }
    cfg.vips.retain(|v| !overlay.vips_removed.contains(&v.name));
    let file_vips = cfg.vips.len();
    cfg.vips
        .extend(overlay.vips_added.iter().map(VipSpec::to_vip));
    // Last of each name: a duplicate name is reported by the rules below.
    let index: HashMap<String, usize> = cfg
        .vips
        .iter()
        .enumerate()
        .map(|(i, v)| (v.name.clone(), i))
        .collect();

    for b in &overlay.backends_removed {
        let vip = index.get(&b.vip).filter(|&&i| i < file_vips);
        let Some(&vi) = vip else {
            errors.push(format!("{b} cannot be removed: the file has no such VIP"));
            continue;
        };
        let backends = &mut cfg.vips[vi].backends;
        let before = backends.len();
        backends.retain(|x| !b.is(x));
        if backends.len() == before {
            errors.push(format!(
                "{b} cannot be removed: the file has no such backend"
            ));
        }
    }
    for spec in &overlay.backends_added {
        let Some(&vi) = index.get(&spec.vip) else {
            errors.push(format!(
                "{} cannot be added: there is no such VIP",
                spec.backend_ref()
            ));
            continue;
        };
        let vip = &mut cfg.vips[vi];
        vip.backends.push(Backend {
            address: spec.address,
            weight: spec.weight,
            region: spec.region.clone(),
            mac: spec.mac,
            port: (vip.mode == VipMode::L7).then(|| spec.port.unwrap_or(vip.port)),
            pool: spec
                .pool
                .clone()
                .unwrap_or_else(|| crate::config::l7::DEFAULT_POOL.to_owned()),
            health_check: vip.health_check.clone(),
        });
    }
    let mut set = |b: &BackendRef, weight: u16, what: &str| {
        let backend = index
            .get(&b.vip)
            .and_then(|&vi| cfg.vips[vi].backends.iter_mut().find(|x| b.is(x)));
        match backend {
            Some(backend) => backend.weight = weight,
            None => errors.push(format!("{b} cannot be {what}: there is no such backend")),
        }
    };
    for (b, w) in &overlay.weights {
        set(b, *w, "re-weighted");
    }
    for b in &overlay.drained {
        set(b, 0, "drained");
    }
    errors.extend(rules::check(&cfg));
    if errors.is_empty() {
        Ok(cfg)
    } else {
        Err(errors)
    }
}

fn find_vip<'c>(cfg: &'c Config, name: &str) -> Result<&'c Vip, RuntimeError> {
    cfg.vips.iter().find(|v| v.name == name).ok_or_else(|| {
        let names: Vec<&str> = cfg.vips.iter().map(|v| v.name.as_str()).collect();
        RuntimeError::refused(if names.is_empty() {
            format!("there is no VIP {name:?} (there are no VIPs)")
        } else {
            format!("there is no VIP {name:?}; VIPs: {}", names.join(", "))
        })
    })
}

/// The backend `b` names, and `b` with its port filled in: on an `l7` VIP a change may give
/// the address alone when only one of the VIP's servers has it.
fn find_backend(cfg: &Config, b: &BackendRef) -> Result<BackendRef, RuntimeError> {
    let vip = find_vip(cfg, &b.vip)?;
    let mut found = vip
        .backends
        .iter()
        .filter(|x| x.address == b.address && (b.port.is_none() || x.port == b.port));
    match (found.next(), found.next()) {
        (Some(x), None) => Ok(BackendRef {
            port: x.port,
            ..b.clone()
        }),
        (Some(_), Some(_)) => {
            let ports: Vec<String> = vip
                .backends
                .iter()
                .filter(|x| x.address == b.address)
                .filter_map(|x| x.port.map(|p| p.to_string()))
                .collect();
            Err(RuntimeError::refused(format!(
                "VIP {:?} has several backends at {} (ports {}); give the port",
                b.vip,
                b.address,
                ports.join(", ")
            )))
        }
        (None, _) => Err(RuntimeError::refused(format!("VIP {:?} has no {b}", b.vip))),
    }
}

/// The overlay after `change`, checked: the effective configuration it gives must satisfy
/// every rule of the file. Returns the same overlay when the change is already in force
/// (draining a drained backend).
///
/// # Errors
///
/// [`RuntimeError::Refused`] with the reasons: an unknown VIP or backend, a name or backend
/// that already exists, or the rules the result would break. Nothing is changed then.
pub fn apply(file: &Config, overlay: &Overlay, change: &Change) -> Result<Overlay, RuntimeError> {
    let current = effective(file, overlay).map_err(RuntimeError::Refused)?;
    let mut next = overlay.clone();
    match change {
        Change::AddVip(spec) => {
            if current.vips.iter().any(|v| v.name == spec.name) {
                return Err(RuntimeError::refused(format!(
                    "VIP {:?} already exists; remove it first or choose another name",
                    spec.name
                )));
            }
            // Re-adding a hidden file VIP at the same address, port and protocol brings the
            // file's definition back (with its backends and check): the way back from a remove.
            let hidden = next
                .vips_removed
                .contains(&spec.name)
                .then(|| file.vips.iter().find(|v| v.name == spec.name))
                .flatten();
            match hidden {
                Some(v)
                    if (v.address, v.port, v.protocol)
                        == (spec.address, spec.port, spec.protocol) =>
                {
                    next.vips_removed.remove(&spec.name);
                }
                _ => next.vips_added.push(spec.clone()),
            }
        }
        Change::RemoveVip(name) => {
            find_vip(&current, name)?;
            if let Some(i) = next.vips_added.iter().position(|v| &v.name == name) {
                next.vips_added.remove(i);
            } else {
                next.vips_removed.insert(name.clone());
            }
            next.forget_vip(name);
        }
        Change::AddBackend(spec) => {
            let vip = find_vip(&current, &spec.vip)?;
            let mut spec = spec.clone();
            if vip.mode == VipMode::L7 {
                spec.port = Some(spec.port.unwrap_or(vip.port));
                let pools: Vec<&str> = vip
                    .gateway
                    .iter()
                    .flat_map(|g| g.pools.iter().map(|p| p.name.as_str()))
                    .chain([crate::config::l7::DEFAULT_POOL])
                    .collect();
                if let Some(pool) = &spec.pool
                    && !pools.contains(&pool.as_str())
                {
                    return Err(RuntimeError::refused(format!(
                        "VIP {:?} has no pool {pool:?}; pools: {}",
                        spec.vip,
                        pools.join(", ")
                    )));
                }
            } else if spec.port.is_some() || spec.pool.is_some() {
                return Err(RuntimeError::refused(format!(
                    "a backend's port and pool apply to l7 VIPs only; VIP {:?} is {}",
                    spec.vip, vip.mode
                )));
            }
            let added = spec.backend_ref();
            if vip.backends.iter().any(|b| added.is(b)) {
                return Err(RuntimeError::refused(format!("{added} already exists")));
            }
            next.forget_backend(&added);
            next.backends_added.push(spec);
        }
        Change::RemoveBackend(b) => {
            let b = &find_backend(&current, b)?;
            let added = next
                .backends_added
                .iter()
                .position(|x| x.backend_ref() == *b);
            match added {
                Some(i) => {
                    next.backends_added.remove(i);
                }
                None => {
                    next.backends_removed.insert(b.clone());
                }
            }
            next.forget_backend(b);
        }
        Change::Drain(b) => {
            next.drained.insert(find_backend(&current, b)?);
        }
        Change::Undrain(b) => {
            next.drained.remove(&find_backend(&current, b)?);
        }
        Change::SetWeight(b, weight) => {
            next.weights.insert(find_backend(&current, b)?, *weight);
        }
    }
    effective(file, &next).map_err(RuntimeError::Refused)?;
    Ok(next)
}

/// A backend within its VIP: address, and port on `l7` VIPs.
type ServerKey = (IpAddr, Option<u16>);

/// An overlay fitted to a (new) file, with the effective configuration it gives.
#[derive(Debug, Clone, PartialEq)]
pub struct Rebased {
    /// The entries that still apply.
    pub overlay: Overlay,
    /// The file with them applied (valid).
    pub effective: Config,
    /// One line per entry dropped, saying why.
    pub dropped: Vec<String>,
}

/// Fits an overlay to a file that may have changed since the overlay was made (agent start,
/// reload): entries that no longer apply (a drain of a backend the file no longer has, a VIP
/// added at run time whose name the file now uses, ...) are dropped, one line each, and the
/// rest kept. Never fails: at worst every entry is dropped and the file applies alone.
pub fn rebase(file: &Config, overlay: &Overlay) -> Rebased {
    let mut dropped = Vec::new();
    // A cheap pass first, over names and addresses only: what is left over after a file edit
    // is usually an entry about something the file no longer has.
    let mut kept = Overlay::default();
    let mut vips: HashMap<String, (Origin, HashSet<ServerKey>)> = file
        .vips
        .iter()
        .map(|v| {
            let addresses = v.backends.iter().map(|b| (b.address, b.port)).collect();
            (v.name.clone(), (Origin::File, addresses))
        })
        .collect();
    let has = |vips: &HashMap<String, (Origin, HashSet<ServerKey>)>, b: &BackendRef| {
        vips.get(&b.vip)
            .is_some_and(|(_, a)| a.contains(&(b.address, b.port)))
    };
    // VIPs added at run time that were dropped: what was added to them goes too, even when
    // the file now has a VIP of that name (it is another VIP).
    let mut dropped_vips: HashSet<String> = HashSet::new();
    for entry in overlay.entries() {
        let of_dropped_vip = match &entry {
            Entry::AddBackend(spec) => dropped_vips.contains(&spec.vip),
            Entry::RemoveBackend(b) | Entry::Weight(b, _) | Entry::Drain(b) => {
                dropped_vips.contains(&b.vip)
            }
            Entry::RemoveVip(_) | Entry::AddVip(_) => false,
        };
        let why = match &entry {
            _ if of_dropped_vip => Some("its VIP was dropped".to_owned()),
            Entry::RemoveVip(name) => match vips.remove(name) {
                Some(_) => None,
                None => Some("the file no longer has that VIP".to_owned()),
            },
            Entry::AddVip(spec) => {
                if vips.contains_key(&spec.name) {
                    dropped_vips.insert(spec.name.clone());
                    Some("the file now has a VIP of that name".to_owned())
                } else {
                    vips.insert(spec.name.clone(), (Origin::Runtime, HashSet::new()));
                    None
                }
            }
            Entry::RemoveBackend(b) => match vips.get_mut(&b.vip) {
                Some((Origin::File, addresses)) => (!addresses.remove(&(b.address, b.port)))
                    .then(|| "the file no longer has that backend".to_owned()),
                _ => Some("the file no longer has that VIP".to_owned()),
            },
            Entry::AddBackend(spec) => match vips.get_mut(&spec.vip) {
                None => Some("its VIP is gone".to_owned()),
                Some((_, addresses)) => (!addresses.insert((spec.address, spec.port)))
                    .then(|| "the file now has that backend".to_owned()),
            },
            Entry::Weight(b, _) | Entry::Drain(b) => {
                (!has(&vips, b)).then(|| "the backend is gone".to_owned())
            }
        };
        match why {
            None => kept.insert(entry),
            Some(why) => dropped.push(format!("{entry} no longer applies ({why}); dropped")),
        }
    }
    if let Ok(effective) = effective(file, &kept) {
        return Rebased {
            overlay: kept,
            effective,
            dropped,
        };
    }
    // Still invalid (a VIP added at run time now clashes with the file's address and port, a
    // table too small for the file's new backends, ...): replay entry by entry, keeping each
    // that leaves the result valid.
    let mut replayed = Overlay::default();
    let mut current = file.clone();
    for entry in kept.entries() {
        let mut next = replayed.clone();
        next.insert(entry.clone());
        match effective(file, &next) {
            Ok(cfg) => {
                replayed = next;
                current = cfg;
            }
            Err(errors) => dropped.push(format!(
                "{entry} no longer applies ({}); dropped",
                errors.join("; ")
            )),
        }
    }
    Rebased {
        overlay: replayed,
        effective: current,
        dropped,
    }
}

// ---------------------------------------------------------------------------------------------
// Persistence
// ---------------------------------------------------------------------------------------------

/// The state file as written: a version, then the overlay.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    changes: Overlay,
}

/// Where the overlay is kept: `state_dir/runtime.json`.
pub fn state_path(state_dir: &Path) -> PathBuf {
    state_dir.join(STATE_FILE)
}

/// Reads the overlay from `path`; no file means no run-time changes.
///
/// # Errors
///
/// [`RuntimeError::Read`] when the file exists but cannot be read, [`RuntimeError::Corrupt`]
/// when it is not a state file of this version (the message names the file, the line and the
/// column).
pub fn load(path: &Path) -> Result<Overlay, RuntimeError> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Overlay::default()),
        Err(source) => {
            return Err(RuntimeError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let corrupt = |message: String| RuntimeError::Corrupt {
        path: path.to_owned(),
        message,
    };
    let file: StateFile = serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
    if file.version != STATE_VERSION {
        return Err(corrupt(format!(
            "version {} is not the version this agent writes, {STATE_VERSION}",
            file.version
        )));
    }
    Ok(file.changes)
}

/// The temporary file [`save`] writes before renaming it over the state file.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| STATE_FILE.into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.tmp"))
}

/// Writes the overlay to `path` atomically: a temporary file in the same directory, fsynced,
/// renamed over the old one, then the directory fsynced. A crash at any point leaves either
/// the old file or the new one, never a mix. Creates the directory (0755) if missing.
///
/// # Errors
///
/// [`RuntimeError::Write`] naming the file or directory that could not be written; the old
/// state file is then untouched.
pub fn save(path: &Path, overlay: &Overlay) -> Result<(), RuntimeError> {
    let temp = write_temp(path, overlay)?;
    commit_temp(&temp, path)
}

/// The first half of [`save`]: the new contents in the temporary file, on disk.
fn write_temp(path: &Path, overlay: &Overlay) -> Result<PathBuf, RuntimeError> {
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| RuntimeError::Write { path, source }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(write_err(dir))?;
    let file = StateFile {
        version: STATE_VERSION,
        changes: overlay.clone(),
    };
    let mut text = serde_json::to_string_pretty(&file).expect("the overlay serializes");
    text.push('\n');
    let temp = temp_path(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&temp)
        .map_err(write_err(&temp))?;
    f.write_all(text.as_bytes()).map_err(write_err(&temp))?;
    f.sync_all().map_err(write_err(&temp))?;
    Ok(temp)
}

/// The second half of [`save`]: the rename, made durable by syncing the directory.
fn commit_temp(temp: &Path, path: &Path) -> Result<(), RuntimeError> {
    fs::rename(temp, path).map_err(|source| RuntimeError::Write {
        path: path.to_owned(),
        source,
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| RuntimeError::Write {
            path: dir.to_owned(),
            source,
        })
}

// ---------------------------------------------------------------------------------------------
// Serde helpers: the configuration's enums and MACs as the file writes them
// ---------------------------------------------------------------------------------------------

mod protocol_text {
    use serde::{Deserialize as _, Deserializer, Serializer, de::Error as _};

    use crate::config::{Protocol, rules};

    pub fn serialize<S: Serializer>(p: &Protocol, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(p)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Protocol, D::Error> {
        let text = String::deserialize(d)?;
        rules::protocol(&text).map_err(|v| D::Error::custom(v.message))
    }
}

mod mode_text {
    use serde::{Deserialize as _, Deserializer, Serializer, de::Error as _};

    use crate::config::{VipMode, rules};

    pub fn serialize<S: Serializer>(m: &VipMode, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(m)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<VipMode, D::Error> {
        let text = String::deserialize(d)?;
        rules::mode(&text).map_err(|v| D::Error::custom(v.message))
    }
}

mod mac_text {
    use serde::{Deserialize as _, Deserializer, Serializer, de::Error as _};

    use crate::config::{MacAddr, rules};

    pub fn serialize<S: Serializer>(m: &Option<MacAddr>, s: S) -> Result<S::Ok, S::Error> {
        match m {
            Some(m) => s.collect_str(m),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<MacAddr>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| rules::mac(&text).map_err(|v| D::Error::custom(v.message)))
            .transpose()
    }
}

/// Weights as a list of `{vip, address, weight}` (JSON object keys must be strings).
mod weight_list {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::BackendRef;

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Item {
        vip: String,
        address: std::net::IpAddr,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
        weight: u16,
    }

    pub fn serialize<S: Serializer>(
        m: &BTreeMap<BackendRef, u16>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let items: Vec<Item> = m
            .iter()
            .map(|(b, w)| Item {
                vip: b.vip.clone(),
                address: b.address,
                port: b.port,
                weight: *w,
            })
            .collect();
        items.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<BackendRef, u16>, D::Error> {
        Ok(Vec::<Item>::deserialize(d)?
            .into_iter()
            .map(|i| {
                (
                    BackendRef {
                        vip: i.vip,
                        address: i.address,
                        port: i.port,
                    },
                    i.weight,
                )
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    const FILE: &str = r#"
[agent]
interface = "eth0"
encap_source_v4 = "10.255.0.0/16"

[[vip]]
name = "web"
address = "192.0.2.10"
port = 80
protocol = "tcp"
table_size = 7

[vip.health_check]
type = "tcp"

[[vip.backend]]
address = "10.0.0.1"

[[vip.backend]]
address = "10.0.0.2"
weight = 50

[[vip]]
name = "dns"
address = "192.0.2.53"
port = 53
protocol = "udp"

[[vip.backend]]
address = "10.0.1.1"
"#;

    fn file() -> Config {
        config::parse("xlb.toml", FILE).expect("valid")
    }

    fn b(vip: &str, address: &str) -> BackendRef {
        BackendRef {
            vip: vip.into(),
            address: address.parse().unwrap(),
            port: None,
        }
    }

    fn spec(vip: &str, address: &str) -> BackendSpec {
        BackendSpec {
            vip: vip.into(),
            address: address.parse().unwrap(),
            weight: 100,
            region: "local".into(),
            mac: None,
            port: None,
            pool: None,
        }
    }

    fn vip_spec(name: &str, address: &str, port: u16) -> VipSpec {
        VipSpec {
            name: name.into(),
            address: address.parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
            mode: VipMode::DsrIpip,
            table_size: 65537,
            panic_threshold: 0.5,
        }
    }

    /// Applies changes in order, panicking on a refusal.
    fn after(changes: &[Change]) -> (Overlay, Config) {
        let file = file();
        let mut o = Overlay::default();
        for c in changes {
            o = apply(&file, &o, c).unwrap_or_else(|e| panic!("{c:?} refused: {e}"));
        }
        let eff = effective(&file, &o).expect("valid");
        (o, eff)
    }

    #[track_caller]
    fn refused(o: &Overlay, change: Change, needle: &str) {
        match apply(&file(), o, &change) {
            Ok(_) => panic!("{change:?} was accepted"),
            Err(e) => assert!(e.to_string().contains(needle), "{e}"),
        }
    }

    fn weights(cfg: &Config, vip: &str) -> Vec<(String, u16)> {
        cfg.vips
            .iter()
            .find(|v| v.name == vip)
            .unwrap()
            .backends
            .iter()
            .map(|b| (b.address.to_string(), b.weight))
            .collect()
    }

    /// An l7 VIP whose upstream servers share an address on different ports.
    const L7_FILE: &str = r#"
[agent]
interface = "eth0"

[[vip]]
name = "api"
address = "192.0.2.30"
port = 80
protocol = "tcp"
mode = "l7"

[[vip.backend]]
address = "10.0.2.1"
port = 8080

[[vip.backend]]
address = "10.0.2.1"
port = 8081

[[vip.backend]]
address = "10.0.2.2"
"#;

    #[test]
    fn l7_servers_sharing_an_address_are_told_apart_by_port() {
        let file = config::parse("xlb.toml", L7_FILE).expect("valid");
        let at = |port: Option<u16>, address: &str| BackendRef {
            port,
            ..b("api", address)
        };
        let weights = |cfg: &Config| -> Vec<(String, u16)> {
            cfg.vips[0]
                .backends
                .iter()
                .map(|b| (format!("{}:{}", b.address, b.port.unwrap()), b.weight))
                .collect()
        };
        let none = Overlay::default();
        // The address alone is ambiguous: refused, naming the ports.
        let e = apply(&file, &none, &Change::Drain(at(None, "10.0.2.1"))).unwrap_err();
        assert!(
            e.to_string()
                .contains("several backends at 10.0.2.1 (ports 8080, 8081); give the port"),
            "{e}"
        );
        // With the port, only that server.
        let o = apply(&file, &none, &Change::Drain(at(Some(8081), "10.0.2.1"))).unwrap();
        assert_eq!(
            weights(&effective(&file, &o).unwrap()),
            [
                ("10.0.2.1:8080".to_owned(), 100),
                ("10.0.2.1:8081".to_owned(), 0),
                ("10.0.2.2:80".to_owned(), 100)
            ]
        );
        // A unique address needs no port; the entry is kept with it.
        let o = apply(&file, &o, &Change::SetWeight(at(None, "10.0.2.2"), 5)).unwrap();
        assert_eq!(o.weights.keys().next(), Some(&at(Some(80), "10.0.2.2")));
        let e = apply(&file, &o, &Change::Drain(at(Some(9999), "10.0.2.1"))).unwrap_err();
        assert!(
            e.to_string().contains("has no backend 10.0.2.1:9999"),
            "{e}"
        );
        // Another server on the same host, into a named pool... that must exist.
        let mut add = BackendSpec {
            port: Some(8082),
            pool: Some("nope".into()),
            ..spec("api", "10.0.2.1")
        };
        let e = apply(&file, &o, &Change::AddBackend(add.clone())).unwrap_err();
        assert!(
            e.to_string()
                .contains("has no pool \"nope\"; pools: default"),
            "{e}"
        );
        add.pool = None;
        let o = apply(&file, &o, &Change::AddBackend(add.clone())).unwrap();
        let e = apply(&file, &o, &Change::AddBackend(add)).unwrap_err();
        assert!(
            e.to_string()
                .contains("10.0.2.1:8082 of VIP \"api\" already exists"),
            "{e}"
        );
        // Port 80 (the VIP's) by default: that one exists already on 10.0.2.2.
        let e = apply(&file, &o, &Change::AddBackend(spec("api", "10.0.2.2"))).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        // Removing one server of the host keeps the other.
        let o = apply(
            &file,
            &o,
            &Change::RemoveBackend(at(Some(8080), "10.0.2.1")),
        )
        .unwrap();
        let eff = effective(&file, &o).unwrap();
        assert_eq!(
            weights(&eff),
            [
                ("10.0.2.1:8081".to_owned(), 0),
                ("10.0.2.2:80".to_owned(), 5),
                ("10.0.2.1:8082".to_owned(), 100)
            ]
        );
        // Kept across a reload of the same file and through runtime.json.
        let rebased = rebase(&file, &o);
        assert!(rebased.dropped.is_empty(), "{:?}", rebased.dropped);
        assert_eq!(rebased.effective, eff);
        let json = serde_json::to_string(&o).unwrap();
        assert_eq!(serde_json::from_str::<Overlay>(&json).unwrap(), o);
        // Port and pool are for l7 VIPs only.
        let l4 = BackendSpec {
            port: Some(8080),
            ..spec("web", "10.0.0.9")
        };
        let e = apply(&super::tests::file(), &none, &Change::AddBackend(l4)).unwrap_err();
        assert!(e.to_string().contains("apply to l7 VIPs only"), "{e}");
    }

    #[test]
    fn no_overlay_is_the_file() {
        assert_eq!(effective(&file(), &Overlay::default()).unwrap(), file());
    }

    #[test]
    fn a_vip_is_added_after_the_files_and_removed_again() {
        let add = Change::AddVip(vip_spec("api", "192.0.2.20", 443));
        let (o, eff) = after(std::slice::from_ref(&add));
        assert_eq!(eff.vips.len(), 3);
        let api = &eff.vips[2];
        assert_eq!((api.name.as_str(), api.port), ("api", 443));
        assert!(api.health_check.is_none() && api.backends.is_empty());
        assert_eq!(o.vip_origin("api"), Origin::Runtime);
        assert_eq!(o.vip_origin("web"), Origin::File);

        let (o, eff) = after(&[
            add,
            Change::AddBackend(spec("api", "10.0.2.1")),
            Change::RemoveVip("api".into()),
        ]);
        assert_eq!(eff, file());
        assert!(
            o.is_empty(),
            "removing an added VIP forgets it and its backends: {o:?}"
        );
    }

    #[test]
    fn a_file_vip_removed_is_hidden_until_re_added() {
        let (o, eff) = after(&[
            Change::Drain(b("web", "10.0.0.1")),
            Change::RemoveVip("web".into()),
        ]);
        assert_eq!(
            eff.vips.iter().map(|v| &v.name).collect::<Vec<_>>(),
            ["dns"]
        );
        assert!(o.drained.is_empty(), "entries about the VIP went with it");
        assert_eq!(o.vips_removed, BTreeSet::from(["web".to_owned()]));
        // Re-added at the same address, port and protocol: the file's VIP is back, backends and
        // all (the other values are the file's).
        let (o, eff) = after(&[
            Change::RemoveVip("web".into()),
            Change::AddVip(VipSpec {
                table_size: 65537,
                ..vip_spec("web", "192.0.2.10", 80)
            }),
        ]);
        assert_eq!(eff, file());
        assert!(o.is_empty(), "{o:?}");
        // Re-added elsewhere under the same name: the run-time definition replaces it.
        let (_, eff) = after(&[
            Change::RemoveVip("web".into()),
            Change::AddVip(vip_spec("web", "192.0.2.11", 80)),
        ]);
        let web = eff.vips.iter().find(|v| v.name == "web").unwrap();
        assert_eq!(web.address.to_string(), "192.0.2.11");
        assert!(web.backends.is_empty());
    }

    #[test]
    fn backends_are_added_removed_drained_and_reweighted() {
        let (o, eff) = after(&[Change::AddBackend(BackendSpec {
            weight: 7,
            ..spec("web", "10.0.0.3")
        })]);
        assert_eq!(
            weights(&eff, "web"),
            [
                ("10.0.0.1".into(), 100),
                ("10.0.0.2".into(), 50),
                ("10.0.0.3".into(), 7)
            ]
        );
        let added = &eff.vips[0].backends[2];
        assert_eq!(
            added.health_check, eff.vips[0].health_check,
            "an added backend gets its VIP's check"
        );
        assert_eq!(o.backend_origin(&b("web", "10.0.0.3")), Origin::Runtime);

        let (o, eff) = after(&[
            Change::Drain(b("web", "10.0.0.2")),
            Change::SetWeight(b("web", "10.0.0.1"), 30),
        ]);
        assert_eq!(
            weights(&eff, "web"),
            [("10.0.0.1".into(), 30), ("10.0.0.2".into(), 0)]
        );
        assert!(o.is_drained(&b("web", "10.0.0.2")));
        assert_eq!(
            o.configured_weight(&file(), &b("web", "10.0.0.2")),
            Some(50)
        );

        // A weight set while drained applies on undrain.
        let (_, eff) = after(&[
            Change::Drain(b("web", "10.0.0.2")),
            Change::SetWeight(b("web", "10.0.0.2"), 80),
        ]);
        assert_eq!(weights(&eff, "web")[1].1, 0);
        let (o, eff) = after(&[
            Change::Drain(b("web", "10.0.0.2")),
            Change::SetWeight(b("web", "10.0.0.2"), 80),
            Change::Undrain(b("web", "10.0.0.2")),
        ]);
        assert_eq!(weights(&eff, "web")[1].1, 80);
        assert!(o.drained.is_empty());

        // A file backend removed is hidden, with its run-time weight and drain.
        let (o, eff) = after(&[
            Change::Drain(b("web", "10.0.0.1")),
            Change::RemoveBackend(b("web", "10.0.0.1")),
        ]);
        assert_eq!(weights(&eff, "web"), [("10.0.0.2".into(), 50)]);
        assert!(o.drained.is_empty());
        // ... and comes back fresh when re-added.
        let (_, eff) = after(&[
            Change::RemoveBackend(b("web", "10.0.0.1")),
            Change::AddBackend(BackendSpec {
                weight: 5,
                ..spec("web", "10.0.0.1")
            }),
        ]);
        assert_eq!(
            weights(&eff, "web"),
            [("10.0.0.2".into(), 50), ("10.0.0.1".into(), 5)]
        );
        // An added backend removed is simply forgotten.
        let (o, _) = after(&[
            Change::AddBackend(spec("dns", "10.0.1.2")),
            Change::SetWeight(b("dns", "10.0.1.2"), 9),
            Change::RemoveBackend(b("dns", "10.0.1.2")),
        ]);
        assert!(o.is_empty(), "{o:?}");
    }

    #[test]
    fn draining_twice_changes_nothing() {
        let (o, _) = after(&[Change::Drain(b("web", "10.0.0.1"))]);
        let again = apply(&file(), &o, &Change::Drain(b("web", "10.0.0.1"))).unwrap();
        assert_eq!(again, o);
    }

    #[test]
    fn changes_that_break_a_rule_are_refused_with_the_reason() {
        let o = Overlay::default();
        refused(
            &o,
            Change::Drain(b("nope", "10.0.0.1")),
            "there is no VIP \"nope\"; VIPs: web, dns",
        );
        refused(
            &o,
            Change::Drain(b("web", "10.0.0.9")),
            "VIP \"web\" has no backend 10.0.0.9",
        );
        refused(
            &o,
            Change::RemoveVip("nope".into()),
            "there is no VIP \"nope\"",
        );
        refused(
            &o,
            Change::AddBackend(spec("web", "10.0.0.1")),
            "backend 10.0.0.1 of VIP \"web\" already exists",
        );
        refused(
            &o,
            Change::AddVip(vip_spec("web", "192.0.2.99", 80)),
            "VIP \"web\" already exists",
        );
        // The file's rules: address, port and protocol unique ...
        refused(
            &o,
            Change::AddVip(vip_spec("web2", "192.0.2.10", 80)),
            "tcp 192.0.2.10 port 80 is already served by VIP \"web\"",
        );
        // ... the tunnel source for the backend's family ...
        refused(
            &o,
            Change::AddBackend(spec("web", "2001:db8::5")),
            "agent.encap_source_v6: required key is missing",
        );
        // ... the table size against the weighted backends (7 slots) ...
        let mut o7 = o.clone();
        for i in 3..=7 {
            o7 = apply(
                &file(),
                &o7,
                &Change::AddBackend(spec("web", &format!("10.0.0.{i}"))),
            )
            .unwrap();
        }
        refused(
            &o7,
            Change::AddBackend(spec("web", "10.0.0.8")),
            "7 slots are too few for 8 backends",
        );
        // A drained backend does not count, as in the file.
        let drained = apply(&file(), &o7, &Change::Drain(b("web", "10.0.0.7"))).unwrap();
        apply(
            &file(),
            &drained,
            &Change::AddBackend(spec("web", "10.0.0.8")),
        )
        .unwrap();
        // ... names, addresses, MACs, modes and values.
        refused(
            &o,
            Change::AddVip(vip_spec("Bad Name", "192.0.2.30", 80)),
            "\"Bad Name\" contains 'B'",
        );
        refused(
            &o,
            Change::AddVip(VipSpec {
                mode: VipMode::L7,
                protocol: Protocol::Udp,
                ..vip_spec("x", "192.0.2.30", 80)
            }),
            "an l7 VIP is served by the HTTP gateway",
        );
        refused(
            &o,
            Change::AddVip(VipSpec {
                table_size: 100,
                ..vip_spec("x", "192.0.2.30", 80)
            }),
            "100 is not prime",
        );
        refused(
            &o,
            Change::AddVip(VipSpec {
                panic_threshold: 2.0,
                ..vip_spec("x", "192.0.2.30", 80)
            }),
            "2 is out of range; expected 0.0..=1.0",
        );
        refused(
            &o,
            Change::AddBackend(BackendSpec {
                mac: Some(MacAddr([2, 0, 0, 0, 0, 1])),
                ..spec("web", "10.0.0.9")
            }),
            "a backend MAC only applies to dsr-l2 VIPs",
        );
        refused(
            &o,
            Change::AddBackend(spec("web", "127.0.0.1")),
            "loopback address",
        );
    }

    #[test]
    fn rebase_keeps_what_applies_and_drops_the_rest_one_line_each() {
        let (o, _) = after(&[
            Change::Drain(b("web", "10.0.0.2")),
            Change::SetWeight(b("web", "10.0.0.1"), 10),
            Change::RemoveVip("dns".into()),
            Change::AddVip(vip_spec("api", "192.0.2.20", 443)),
            Change::AddBackend(spec("api", "10.0.2.1")),
            Change::AddBackend(spec("web", "10.0.0.3")),
        ]);
        // Same file: everything applies.
        let same = rebase(&file(), &o);
        assert_eq!((same.overlay.clone(), same.dropped.len()), (o.clone(), 0));
        // The file loses 10.0.0.2 and dns, gains 10.0.0.3 and a VIP "api" of its own.
        let changed = FILE
            .replace("[[vip.backend]]\naddress = \"10.0.0.2\"\nweight = 50\n", "")
            .replace(
                "[[vip]]\nname = \"dns\"",
                "[[vip.backend]]\naddress = \"10.0.0.3\"\n\n[[vip]]\nname = \"api\"\naddress = \"192.0.2.21\"\nport = 443\nprotocol = \"tcp\"\n\n[[vip]]\nname = \"dns2\"",
            );
        let new_file = config::parse("xlb.toml", &changed).expect("changed file valid");
        let r = rebase(&new_file, &o);
        assert_eq!(r.dropped.len(), 5, "{:#?}", r.dropped);
        for needle in [
            "the drain of backend 10.0.0.2 of VIP \"web\" no longer applies (the backend is gone)",
            "the run-time removal of VIP \"dns\" no longer applies",
            "VIP \"api\" added at run time no longer applies (the file now has a VIP of that name)",
            "backend 10.0.2.1 of VIP \"api\" added at run time no longer applies (its VIP was",
            "backend 10.0.0.3 of VIP \"web\" added at run time no longer applies (the file now has",
        ] {
            assert!(
                r.dropped.iter().any(|d| d.starts_with(needle)),
                "{needle}: {:#?}",
                r.dropped
            );
        }
        assert_eq!(r.overlay.weights.len(), 1, "the weight of 10.0.0.1 stays");
        assert_eq!(effective(&new_file, &r.overlay).unwrap(), r.effective);
    }

    #[test]
    fn rebase_replays_entries_when_the_rules_break() {
        // A VIP added at run time whose address and port the file now serves under another
        // name: dropped with the rule's reason, the rest kept.
        let (o, _) = after(&[
            Change::AddVip(vip_spec("api", "192.0.2.20", 443)),
            Change::Drain(b("web", "10.0.0.1")),
        ]);
        let changed = format!(
            "{FILE}\n[[vip]]\nname = \"api2\"\naddress = \"192.0.2.20\"\nport = 443\nprotocol = \"tcp\"\n"
        );
        let new_file = config::parse("xlb.toml", &changed).unwrap();
        let r = rebase(&new_file, &o);
        assert_eq!(r.dropped.len(), 1, "{:#?}", r.dropped);
        assert!(r.dropped[0].contains("already served"), "{}", r.dropped[0]);
        assert!(r.overlay.vips_added.is_empty());
        assert!(r.overlay.is_drained(&b("web", "10.0.0.1")));
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xlb-runtime-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn the_overlay_round_trips_through_the_state_file() {
        let dir = temp_dir("roundtrip");
        let path = state_path(&dir.join("nested"));
        assert_eq!(
            load(&path).unwrap(),
            Overlay::default(),
            "no file: no changes"
        );
        let (o, _) = after(&[
            Change::AddVip(VipSpec {
                mode: VipMode::DsrL2,
                protocol: Protocol::Udp,
                ..vip_spec("l2", "192.0.2.40", 0)
            }),
            Change::AddBackend(BackendSpec {
                mac: Some(MacAddr([2, 0, 0, 0, 0, 0x41])),
                region: "local".into(),
                ..spec("l2", "192.0.2.41")
            }),
            Change::RemoveBackend(b("web", "10.0.0.1")),
            Change::SetWeight(b("web", "10.0.0.2"), 9),
            Change::Drain(b("dns", "10.0.1.1")),
            Change::RemoveVip("dns".into()),
        ]);
        save(&path, &o).unwrap();
        assert_eq!(load(&path).unwrap(), o);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"mode\": \"dsr-l2\""), "{text}");
        assert!(text.contains("\"mac\": \"02:00:00:00:00:41\""), "{text}");
        let mode = fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o644
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_interrupted_save_leaves_the_old_file() {
        let dir = temp_dir("interrupted");
        let path = state_path(&dir);
        let (old, _) = after(&[Change::Drain(b("web", "10.0.0.1"))]);
        save(&path, &old).unwrap();
        // The new contents reach the temporary file, then the process dies before the rename.
        let (new, _) = after(&[Change::Drain(b("web", "10.0.0.2"))]);
        let temp = write_temp(&path, &new).unwrap();
        assert!(temp.exists());
        assert_eq!(
            load(&path).unwrap(),
            old,
            "the state file is still the old one"
        );
        // A half-written temporary file is as harmless, and the next save replaces it.
        fs::write(&temp, "{\"version\": 1, \"chan").unwrap();
        assert_eq!(load(&path).unwrap(), old);
        save(&path, &new).unwrap();
        assert_eq!(load(&path).unwrap(), new);
        assert!(!temp.exists(), "the rename consumed the temporary file");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_corrupt_state_file_is_refused_naming_the_file() {
        let dir = temp_dir("corrupt");
        fs::create_dir_all(&dir).unwrap();
        let path = state_path(&dir);
        fs::write(
            &path,
            "{\"version\": 1,\n \"changes\": {\"drained\": [oops]}}",
        )
        .unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "{}: not a valid run-time state file (",
                path.display()
            )),
            "{e}"
        );
        assert!(e.contains("line 2"), "{e}");
        fs::write(&path, "{\"version\": 7, \"changes\": {}}").unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("version 7"), "{e}");
        fs::write(&path, "{\"version\": 1, \"changes\": {\"drianed\": []}}").unwrap();
        assert!(
            load(&path)
                .unwrap_err()
                .to_string()
                .contains("unknown field `drianed`")
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
