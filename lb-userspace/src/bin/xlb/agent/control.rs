//! The agent's side of the admin API: requests answered in the main loop, which owns the maps,
//! the configuration and the run-time overlay. A change is checked against the file's rules,
//! persisted, then reconciled; if the maps cannot take it, memory and disk are rolled back.

use std::{
    collections::{HashMap, VecDeque},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use lb_common::{counters::Counter, types::Stats};
use lb_userspace::{
    admin::{
        self, AgentInfo, BackendInfo, BackendStatus, ChangeResult, CounterValue, ErrorKind, Health,
        Pending, ReloadResult, Request, Response, VipInfo, VipStatus,
    },
    config::Config,
    desired,
    health::{HealthEvent, TargetId},
    runtime::{self, BackendRef, Change, Origin, Overlay},
};
use tokio::sync::mpsc;

use super::{ReloadError, Running, reload, targets};

/// Rates are measured over at least this long (a shorter window is mostly noise).
const MIN_RATE_WINDOW: Duration = Duration::from_secs(1);
/// Samples older than this are not used for rates.
const MAX_SAMPLE_AGE: Duration = Duration::from_secs(60);
/// How often the main loop samples the traffic counters, so `xlb status` right after a quiet
/// period still has a recent base to measure rates from.
pub(super) const SAMPLE_PERIOD: Duration = Duration::from_secs(5);

/// Per-VIP and per-backend traffic counters at one moment, by map id.
struct Sample {
    at: Instant,
    vips: HashMap<u32, Stats>,
    backends: HashMap<u32, Stats>,
}

/// What the admin API needs beyond what the agent already keeps: the file as loaded (the
/// overlay applies to it), the overlay and where it is kept, facts for `status`, and the
/// traffic samples rates are computed from.
pub(super) struct Control {
    /// The configuration file as last loaded, without run-time changes.
    pub file: Option<Config>,
    /// The run-time changes in force.
    pub overlay: Overlay,
    /// `state_dir/runtime.json`.
    pub state_path: Option<PathBuf>,
    config_path: Option<PathBuf>,
    /// The interface the balancer attaches to, once known.
    pub interface: String,
    /// How the balancer is attached, once it is.
    pub attach_mode: String,
    started: Instant,
    samples: VecDeque<Sample>,
}

impl Control {
    /// Loads the run-time changes kept for `file` and fits them to it. Returns the state and
    /// the effective configuration (the file with the changes that still apply).
    ///
    /// A state file that cannot be read or parsed stops the start: running without the drains
    /// it records would send traffic to backends an operator took out.
    pub fn load(
        config_path: Option<&Path>,
        file: Option<Config>,
    ) -> anyhow::Result<(Control, Option<Config>)> {
        let mut control = Control {
            file: None,
            overlay: Overlay::default(),
            state_path: None,
            config_path: config_path.map(Path::to_owned),
            interface: String::new(),
            attach_mode: String::new(),
            started: Instant::now(),
            samples: VecDeque::new(),
        };
        let Some(file) = file else {
            return Ok((control, None));
        };
        let path = runtime::state_path(&file.agent.state_dir);
        let stored = runtime::load(&path)?;
        let rebased = runtime::rebase(&file, &stored);
        for line in &rebased.dropped {
            tracing::warn!(state = %path.display(), "{line}");
        }
        if rebased.overlay != stored
            && let Err(e) = runtime::save(&path, &rebased.overlay)
        {
            // The entries that no longer apply are dropped again at every start (the fit is
            // the same each time), so a full or read-only state directory must not keep the
            // agent from starting; a run-time change is refused until it can be written.
            tracing::warn!(
                "keeping only the run-time changes that still apply: {e}; the file keeps the \
                 dropped entries until it can be written"
            );
        }
        if !rebased.overlay.is_empty() {
            tracing::info!(
                state = %path.display(),
                "run-time changes applied over the configuration file"
            );
        }
        control.overlay = rebased.overlay;
        control.state_path = Some(path);
        control.file = Some(file);
        Ok((control, Some(rebased.effective)))
    }
}

impl Running {
    /// Answers one admin request.
    pub(super) fn on_admin(
        &mut self,
        pending: Pending,
        config_path: Option<&PathBuf>,
        health_tx: &mpsc::Sender<HealthEvent>,
    ) {
        let response = self.answer(pending.request, config_path, health_tx);
        let _ = pending.reply.send(response);
    }

    fn answer(
        &mut self,
        request: Request,
        config_path: Option<&PathBuf>,
        health_tx: &mpsc::Sender<HealthEvent>,
    ) -> Response {
        let change = match request.change() {
            Ok(change) => change,
            Err(reason) => return Response::failure(ErrorKind::Refused, reason),
        };
        if let Some(change) = change {
            return self.change(change, health_tx);
        }
        match request {
            Request::VipList => self.vip_list(),
            Request::BackendList { vip } => self.backend_list(&vip),
            Request::Reload => {
                let interface = self.control.interface.clone();
                match reload(self, config_path, &interface, health_tx) {
                    Ok(done) => Response::success(done),
                    Err(ReloadError::Invalid(message)) => {
                        Response::failure(ErrorKind::InvalidConfig, message)
                    }
                    Err(ReloadError::Failed(message)) => {
                        Response::failure(ErrorKind::Failed, message)
                    }
                }
            }
            Request::Status => self.status(),
            Request::Stats => match self.balancer.counters() {
                Ok(c) => Response::success(admin::Stats {
                    counters: Counter::ALL
                        .iter()
                        .map(|&k| CounterValue {
                            name: k.name().to_owned(),
                            value: c.get(k),
                        })
                        .collect(),
                }),
                Err(e) => Response::failure(ErrorKind::Failed, format!("reading counters: {e}")),
            },
            // Every other request is a change, handled above.
            _ => Response::failure(ErrorKind::BadRequest, "unexpected request"),
        }
    }

    /// Checks, persists and applies one run-time change.
    fn change(&mut self, change: Change, health_tx: &mpsc::Sender<HealthEvent>) -> Response {
        let (Some(file), Some(state_path)) =
            (self.control.file.clone(), self.control.state_path.clone())
        else {
            return Response::failure(
                ErrorKind::Refused,
                "the agent runs without a configuration file; run-time changes need \
                 `xlb agent --config FILE`",
            );
        };
        let next = match runtime::apply(&file, &self.control.overlay, &change) {
            Ok(next) => next,
            Err(e) => return Response::failure(ErrorKind::Refused, e.to_string()),
        };
        if next == self.control.overlay {
            return Response::success(ChangeResult {
                message: already(&change),
                changed: false,
            });
        }
        let what = describe(&change, &file, &next);
        let effective = match runtime::effective(&file, &next) {
            Ok(cfg) => cfg,
            Err(errors) => return Response::failure(ErrorKind::Refused, errors.join("; ")),
        };
        // Kept on disk before the maps change: a change in force that a restart would undo
        // is worse than one refused.
        if let Err(e) = runtime::save(&state_path, &next) {
            return Response::failure(ErrorKind::Failed, format!("{e}; nothing was changed"));
        }
        let previous = (self.down.clone(), self.config.clone());
        let checks_change = self.config.as_ref().map(targets) != Some(targets(&effective));
        if checks_change {
            self.restart_checks(&effective, health_tx);
        }
        self.config = Some(effective.clone());
        let applied = self
            .apply_gateways(&effective)
            .map_err(|lines| anyhow::anyhow!("the l7 gateway refused it: {lines}"))
            .and_then(|()| self.reconcile(&effective));
        match applied {
            Ok(_) => {
                self.control.overlay = next;
                log_change(&change);
                Response::success(ChangeResult {
                    message: what,
                    changed: true,
                })
            }
            Err(e) => {
                let (down, old) = previous;
                if let Some(old) = old {
                    if checks_change {
                        self.restart_checks(&old, health_tx);
                    }
                    self.down = down;
                    if let Err(lines) = self.apply_gateways(&old) {
                        tracing::error!("restoring the previous gateway failed: {lines}");
                    }
                    self.config = Some(old);
                }
                let undo = match runtime::save(&state_path, &self.control.overlay) {
                    Ok(()) => String::new(),
                    Err(e) => format!("; restoring the state file also failed: {e}"),
                };
                tracing::error!("run-time change failed: {e:#}; rolled back{undo}");
                Response::failure(
                    ErrorKind::Failed,
                    format!("applying the change failed: {e:#}; it was rolled back{undo}"),
                )
            }
        }
    }

    fn vip_list(&self) -> Response {
        let vips: Vec<VipInfo> = self
            .config
            .iter()
            .flat_map(|c| &c.vips)
            .map(|v| VipInfo {
                name: v.name.clone(),
                address: v.address,
                port: v.port,
                protocol: v.protocol.to_string(),
                mode: v.mode.to_string(),
                table_size: v.table_size,
                panic_threshold: v.panic_threshold,
                backends: v.backends.len(),
                origin: self.control.overlay.vip_origin(&v.name),
            })
            .collect();
        Response::success(vips)
    }

    /// A backend's health: failing its checks, passing them, or not checked.
    fn health(&self, cfg: &Config, id: TargetId) -> Health {
        let checked = cfg.vips[id.vip].backends[id.backend].health_check.is_some();
        if self.down.contains(&id) {
            Health::Down
        } else if checked {
            Health::Up
        } else {
            Health::Unchecked
        }
    }

    fn backend_list(&self, vip: &str) -> Response {
        let Some(cfg) = &self.config else {
            return Response::failure(ErrorKind::Refused, format!("there is no VIP {vip:?}"));
        };
        let Some(vi) = cfg.vips.iter().position(|v| v.name == vip) else {
            let names: Vec<&str> = cfg.vips.iter().map(|v| v.name.as_str()).collect();
            return Response::failure(
                ErrorKind::Refused,
                format!("there is no VIP {vip:?}; VIPs: {}", names.join(", ")),
            );
        };
        let overlay = &self.control.overlay;
        let backends: Vec<BackendInfo> = cfg.vips[vi]
            .backends
            .iter()
            .enumerate()
            .map(|(bi, b)| {
                let r = BackendRef {
                    vip: vip.to_owned(),
                    address: b.address,
                    port: b.port,
                };
                let configured = self
                    .control
                    .file
                    .as_ref()
                    .and_then(|f| overlay.configured_weight(f, &r))
                    .unwrap_or(b.weight);
                BackendInfo {
                    address: b.address,
                    port: b.port,
                    weight: b.weight,
                    configured_weight: configured,
                    drained: overlay.is_drained(&r),
                    region: b.region.clone(),
                    mac: b.mac.map(|m| m.to_string()),
                    health: self.health(
                        cfg,
                        TargetId {
                            vip: vi,
                            backend: bi,
                        },
                    ),
                    origin: overlay.backend_origin(&r),
                }
            })
            .collect();
        Response::success(backends)
    }

    /// The traffic counters of every applied VIP and backend now.
    fn take_sample(&self) -> Sample {
        let mut sample = Sample {
            at: Instant::now(),
            vips: HashMap::new(),
            backends: HashMap::new(),
        };
        for (cfg, v) in self
            .config
            .iter()
            .flat_map(|c| c.vips.iter().map(move |v| (c, v)))
        {
            let key = desired::vip_key(v.address, v.port, v.protocol.number());
            if let Some(id) = self.reconciler.vip_id(&key)
                && let Ok(s) = self.balancer.vip_stats(id)
            {
                sample.vips.insert(id, s);
            }
            // Backends, and the entries of remote regions' xlb hosts.
            let tunnels = v
                .regions
                .iter()
                .filter_map(|r| cfg.region(r))
                .map(|r| r.tunnel);
            for address in v.backends.iter().map(|b| b.address).chain(tunnels) {
                if let Some(id) = self.reconciler.backend_id(&key, &address)
                    && let Ok(s) = self.balancer.backend_stats(id)
                {
                    sample.backends.insert(id, s);
                }
            }
        }
        sample
    }

    /// Keeps a recent traffic sample for rates (called every [`SAMPLE_PERIOD`]).
    pub(super) fn sample_traffic(&mut self) {
        let sample = self.take_sample();
        self.keep_sample(sample);
    }

    fn keep_sample(&mut self, sample: Sample) {
        let samples = &mut self.control.samples;
        samples.push_back(sample);
        let now = Instant::now();
        while samples.len() > 4
            || samples
                .front()
                .is_some_and(|s| now.duration_since(s.at) > MAX_SAMPLE_AGE)
        {
            samples.pop_front();
        }
    }

    fn status(&mut self) -> Response {
        let now = self.take_sample();
        // The newest sample at least MIN_RATE_WINDOW old, else the oldest one there is.
        let base = self
            .control
            .samples
            .iter()
            .rev()
            .find(|s| now.at.duration_since(s.at) >= MIN_RATE_WINDOW)
            .or(self.control.samples.front());
        let window = base.map(|b| now.at.duration_since(b.at).as_secs_f64());
        let rate = |cur: Option<&Stats>, old: Option<&Stats>| -> (f64, f64, f64) {
            match (cur, old, window) {
                (Some(c), Some(o), Some(w)) if w > 0.0 => (
                    c.packets.saturating_sub(o.packets) as f64 / w,
                    c.bytes.saturating_sub(o.bytes) as f64 / w,
                    c.new_flows.saturating_sub(o.new_flows) as f64 / w,
                ),
                _ => (0.0, 0.0, 0.0),
            }
        };
        let flows = match self.balancer.flows_per_backend() {
            Ok(f) => f,
            Err(e) => {
                return Response::failure(
                    ErrorKind::Failed,
                    format!("reading the connection table: {e}"),
                );
            }
        };
        let overlay = &self.control.overlay;
        let gateways = self.gateways.status();
        let mut vips = Vec::new();
        for (vi, v) in self.config.iter().flat_map(|c| c.vips.iter().enumerate()) {
            let cfg = self.config.as_ref().expect("iterating its VIPs");
            let key = desired::vip_key(v.address, v.port, v.protocol.number());
            let vip_id = self.reconciler.vip_id(&key);
            let cur = vip_id.and_then(|id| now.vips.get(&id));
            let old = vip_id.and_then(|id| base.and_then(|b| b.vips.get(&id)));
            let (pps, bps, fps) = rate(cur, old);
            let backends = v
                .backends
                .iter()
                .enumerate()
                .map(|(bi, b)| {
                    let id = self.reconciler.backend_id(&key, &b.address);
                    let cur = id.and_then(|id| now.backends.get(&id));
                    let old = id.and_then(|id| base.and_then(|s| s.backends.get(&id)));
                    let (pps, bps, _) = rate(cur, old);
                    let r = BackendRef {
                        vip: v.name.clone(),
                        address: b.address,
                        port: b.port,
                    };
                    BackendStatus {
                        address: b.address,
                        weight: b.weight,
                        drained: overlay.is_drained(&r),
                        region: b.region.clone(),
                        health: self.health(
                            cfg,
                            TargetId {
                                vip: vi,
                                backend: bi,
                            },
                        ),
                        active_flows: id.and_then(|id| flows.get(&id)).copied().unwrap_or(0),
                        packets_per_sec: pps,
                        bytes_per_sec: bps,
                        new_flows: cur.map_or(0, |s| s.new_flows),
                        origin: overlay.backend_origin(&r),
                    }
                })
                .collect();
            vips.push(VipStatus {
                name: v.name.clone(),
                address: v.address,
                port: v.port,
                protocol: v.protocol.to_string(),
                mode: v.mode.to_string(),
                packets_per_sec: pps,
                bytes_per_sec: bps,
                new_flows_per_sec: fps,
                new_flows: cur.map_or(0, |s| s.new_flows),
                origin: overlay.vip_origin(&v.name),
                backends,
                regions: self.regions.status(cfg, v, |tunnel| {
                    self.reconciler
                        .backend_id(&key, &tunnel)
                        .and_then(|id| now.backends.get(&id))
                        .map_or(0, |s| s.new_flows)
                }),
                gateway: gateways.iter().find(|g| g.vip == v.name).cloned(),
            });
        }
        let agent = AgentInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            interface: self.control.interface.clone(),
            attach_mode: self.control.attach_mode.clone(),
            uptime_secs: self.control.started.elapsed().as_secs_f64(),
            config_path: self.control.config_path.clone(),
            state_path: self.control.state_path.clone(),
            last_reconcile_ms: self.last_reconcile.map(|d| d.as_secs_f64() * 1000.0),
            reconciles: self.reconciles,
            reloads_refused: self.reloads_refused,
            rate_window_secs: window,
        };
        // This status's sample is the base of the next one.
        self.keep_sample(now);
        Response::success(admin::Status { agent, vips })
    }
}

/// What a change did, in one line for the CLI.
fn describe(change: &Change, file: &Config, overlay: &Overlay) -> String {
    match change {
        Change::AddVip(v) if overlay.vip_origin(&v.name) == Origin::File => format!(
            "VIP {:?} restored as the configuration file defines it (its backends, mode and \
             table size are the file's)",
            v.name
        ),
        Change::AddVip(v) => format!(
            "VIP {:?} added: {} {} port {} ({})",
            v.name, v.protocol, v.address, v.port, v.mode
        ),
        Change::RemoveVip(name) => {
            let hidden = overlay.vips_removed.contains(name);
            if hidden {
                format!("VIP {name:?} removed (a file VIP: hidden until added again)")
            } else {
                format!("VIP {name:?} removed")
            }
        }
        Change::AddBackend(b) => format!("{} added with weight {}", b.backend_ref(), b.weight),
        Change::RemoveBackend(b) => format!("{b} removed"),
        Change::Drain(b) => format!("{b} drained (weight 0: established flows stay, no new ones)"),
        Change::Undrain(b) => format!(
            "{b} undrained (weight {})",
            overlay.configured_weight(file, b).unwrap_or_default()
        ),
        Change::SetWeight(b, w) if overlay.is_drained(b) => {
            format!("{b} weight set to {w} (drained: applies on undrain)")
        }
        Change::SetWeight(b, w) => format!("{b} weight set to {w}"),
    }
}

/// Why a change changed nothing (only drains, undrains and weights can be already in force).
fn already(change: &Change) -> String {
    match change {
        Change::Drain(b) => format!("{b} is already drained; nothing changed"),
        Change::Undrain(b) => format!("{b} is not drained; nothing changed"),
        Change::SetWeight(b, w) => format!("{b} already has weight {w}; nothing changed"),
        _ => "nothing changed".to_owned(),
    }
}

/// One log line per change applied.
fn log_change(change: &Change) {
    match change {
        Change::AddVip(v) => tracing::info!(
            vip = %v.name,
            address = %v.address,
            port = v.port,
            protocol = %v.protocol,
            mode = %v.mode,
            "VIP added"
        ),
        Change::RemoveVip(name) => tracing::info!(vip = %name, "VIP removed"),
        Change::AddBackend(b) => tracing::info!(
            vip = %b.vip,
            backend = %b.address,
            weight = b.weight,
            "backend added"
        ),
        Change::RemoveBackend(b) => {
            tracing::info!(vip = %b.vip, backend = %b.address, "backend removed")
        }
        Change::Drain(b) => tracing::info!(vip = %b.vip, backend = %b.address, "backend drained"),
        Change::Undrain(b) => {
            tracing::info!(vip = %b.vip, backend = %b.address, "backend undrained")
        }
        Change::SetWeight(b, w) => {
            tracing::info!(vip = %b.vip, backend = %b.address, weight = w, "backend weight set")
        }
    }
}

/// Reload's answer for the API.
pub(super) fn reloaded(cfg: &Config, dropped: Vec<String>) -> ReloadResult {
    ReloadResult {
        message: format!(
            "configuration reloaded: {} VIPs, {} backends",
            cfg.vips.len(),
            cfg.backend_count()
        ),
        vips: cfg.vips.len(),
        backends: cfg.backend_count(),
        dropped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run-time state file with an entry that no longer applies is rewritten at start; when
    /// the state directory cannot be written (full, read-only; here the temporary file's name
    /// is taken by a directory) the agent still starts, with the entries that apply, as the
    /// README promises ("never failing the start"). It used to stop with the write error.
    #[test]
    fn an_unwritable_state_dir_does_not_stop_the_start() {
        let dir = std::env::temp_dir().join(format!("xlb-control-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let state_dir = dir.join("state");
        std::fs::create_dir_all(state_dir.join(".runtime.json.tmp")).unwrap();
        let text = format!(
            "[agent]\ninterface = \"eth0\"\nencap_source_v4 = \"10.255.0.1\"\nstate_dir = \"{}\"\n\n\
             [[vip]]\nname = \"web\"\n\
             address = \"192.0.2.10\"\nport = 80\nprotocol = \"tcp\"\n\n[[vip.backend]]\n\
             address = \"10.0.0.1\"\n\n[[vip.backend]]\naddress = \"10.0.0.2\"\n",
            state_dir.display()
        );
        let file = lb_userspace::config::parse("xlb.toml", &text).expect("valid");
        let stored = Overlay {
            drained: [
                BackendRef {
                    vip: "web".into(),
                    address: "10.0.0.2".parse().unwrap(),
                    port: None,
                },
                BackendRef {
                    vip: "gone".into(),
                    address: "10.0.0.9".parse().unwrap(),
                    port: None,
                },
            ]
            .into(),
            ..Overlay::default()
        };
        let path = runtime::state_path(&state_dir);
        std::fs::write(
            &path,
            serde_json::json!({ "version": runtime::STATE_VERSION, "changes": stored }).to_string(),
        )
        .unwrap();
        assert!(runtime::save(&path, &stored).is_err(), "the premise");

        let result = Control::load(Some(Path::new("xlb.toml")), Some(file));
        let _ = std::fs::remove_dir_all(&dir);
        let (control, effective) = result.expect("the agent starts");
        let effective = effective.expect("a configuration");
        assert_eq!(
            control.overlay.drained.len(),
            1,
            "the drain that applies is kept"
        );
        assert_eq!(effective.vips[0].backends[1].weight, 0, "and in force");
    }
}
