//! Multi-region failover for one VIP, as a pure state machine: from each region level's healthy
//! share over time to the share of new flows each level takes (the data path's region split).
//!
//! Why this shape: Envoy's priority levels showed that a level should take its healthy share
//! times an overprovisioning factor (here `1 / min_healthy`) and pass the rest down, and the
//! split is over a flow's hash point, as Maglev spreads flows over backends, so a flow changes
//! region only when a bound moves past it. Bounds move down at once but back up only after a
//! hold-down, so a flapping region causes one failover and one failback, not one per flap.
//! No I/O: time is passed in.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::Instant;

use lb_common::types::{MAX_VIP_REGIONS, REGION_SCALE};

use crate::config::{Failover, FailoverMode};

/// Loads closer than this are equal (float noise from cumulative sums).
const EPSILON: f64 = 1e-9;
/// Most samples kept in the hold-down window. Beyond it the oldest two are merged into their
/// element-wise minimum, which can only make a failback wait longer, never happen sooner.
const MAX_HISTORY: usize = 1024;

/// The healthy share of this host's own region: healthy weight over the total weight of the
/// region's backends that are not drained, from `(weight, drained, healthy)` per backend.
/// 0.0 when that total is 0 (no backend, or every one drained or of weight 0).
pub fn local_share(backends: impl IntoIterator<Item = (u32, bool, bool)>) -> f64 {
    let (mut healthy, mut total) = (0u64, 0u64);
    for (weight, drained, up) in backends {
        if drained {
            continue;
        }
        total += u64::from(weight);
        if up {
            healthy += u64::from(weight);
        }
    }
    if total == 0 {
        0.0
    } else {
        healthy as f64 / total as f64
    }
}

/// The loads (shares of new flows, summing to 1) the levels would take now, from their healthy
/// `shares` alone, without hold-down; and whether that is the last resort (every share is 0:
/// all load to this host's level `local` if the VIP has one, else the first level).
///
/// Whole mode: all load to the first level whose share is at least `min_healthy`; if none is
/// but some share is above 0, to the level with the highest share (the first of equals).
/// Proportional mode: each level in priority order takes `min(rest, share / min_healthy)`; if
/// the levels together cannot carry everything, loads are proportional to the shares.
pub fn target_loads(policy: &Failover, local: Option<usize>, shares: &[f64]) -> (Vec<f64>, bool) {
    let n = shares.len();
    let mut loads = vec![0.0; n];
    if n == 0 {
        return (loads, false);
    }
    let shares: Vec<f64> = shares.iter().map(|&s| clean_share(s)).collect();
    if shares.iter().all(|&s| s <= 0.0) {
        loads[local.filter(|&l| l < n).unwrap_or(0)] = 1.0;
        return (loads, true);
    }
    let min_healthy = policy.min_healthy;
    match policy.mode {
        FailoverMode::Whole => {
            let chosen = shares
                .iter()
                .position(|&s| s >= min_healthy)
                .unwrap_or_else(|| {
                    // The highest share; the first of equals, as `max_by` keeps the last.
                    let mut best = 0;
                    for (i, &s) in shares.iter().enumerate() {
                        if s > shares[best] {
                            best = i;
                        }
                    }
                    best
                });
            loads[chosen] = 1.0;
        }
        FailoverMode::Proportional => {
            let mut rest: f64 = 1.0;
            for (load, &share) in loads.iter_mut().zip(&shares) {
                *load = rest.min(share / min_healthy);
                rest -= *load;
            }
            if rest > EPSILON {
                let total: f64 = shares.iter().sum();
                for (load, &share) in loads.iter_mut().zip(&shares) {
                    *load = share / total;
                }
            }
        }
    }
    (loads, false)
}

/// A share as the state machine takes it: within 0.0..=1.0, NaN as 0.
fn clean_share(share: f64) -> f64 {
    if share.is_nan() {
        0.0
    } else {
        share.clamp(0.0, 1.0)
    }
}

/// Cumulative sums of `loads`; the last is exactly 1.
fn cumulative(loads: &[f64]) -> Vec<f64> {
    let mut sum = 0.0;
    let mut out: Vec<f64> = loads
        .iter()
        .map(|l| {
            sum += l;
            sum.min(1.0)
        })
        .collect();
    if let Some(last) = out.last_mut() {
        *last = 1.0;
    }
    out
}

/// Per-level loads from cumulative ones.
fn per_level(cumulative: &[f64]) -> Vec<f64> {
    let mut before = 0.0;
    cumulative
        .iter()
        .map(|&c| {
            let load = (c - before).max(0.0);
            before = c;
            load
        })
        .collect()
}

fn differ(a: &[f64], b: &[f64]) -> bool {
    a.len() != b.len() || a.iter().zip(b).any(|(x, y)| (x - y).abs() > EPSILON)
}

/// One sample of the inputs: the shares from `at` until the next sample, and the cumulative
/// target loads they gave.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    shares: Vec<f64>,
    target: Vec<f64>,
}

/// A change of the applied loads, as [`VipFailover::update`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// When it happened (the `now` of the update).
    pub at: Instant,
    /// The loads per level before.
    pub previous: Vec<f64>,
    /// The loads per level now.
    pub loads: Vec<f64>,
    /// Why, for logs and the status page, e.g. `region "a": healthy share 0.33 < min_healthy
    /// 0.70`.
    pub reason: String,
    /// Whether every level is down and the load went to the last resort.
    pub last_resort: bool,
}

/// The failover state of one VIP: its region levels in priority order, the loads applied to
/// them, and the history that decides when load may return to a higher-priority level.
///
/// Works on cumulative loads `C_i` (the load on levels `0..=i`). With `T` the target from the
/// current shares ([`target_loads`]) and `W_i` the least `T_i` over the last `hold_down`, the
/// applied `A_i = min(T_i, max(A_i before, W_i))`: a shift to lower priority (failover) applies
/// at once, a shift back (failback) only as far as the target has held for `hold_down`. One
/// exception: a level is never kept holding more than it can carry now (its share /
/// `min_healthy`, or any load in whole mode when no level reaches `min_healthy`); that excess
/// moves at once to the levels the target wants.
#[derive(Debug, Clone)]
pub struct VipFailover {
    levels: Vec<String>,
    local: Option<usize>,
    policy: Failover,
    shares: Vec<f64>,
    /// Cumulative target loads from the current shares.
    target: Vec<f64>,
    /// Cumulative applied loads.
    applied: Vec<f64>,
    last_resort: bool,
    history: VecDeque<Sample>,
    reason: String,
    since: Instant,
}

impl VipFailover {
    /// A VIP's failover state, with the loads applied at once to the target of `shares` (there
    /// is no history to hold back for). `levels` are the VIP's region names in priority order
    /// (at most [`MAX_VIP_REGIONS`]; any beyond are ignored), `local` the index of this host's
    /// own region among them, if the VIP lists it. `shares` has one healthy share (0.0..=1.0)
    /// per level; missing ones count as 0.
    pub fn new(
        mut levels: Vec<String>,
        local: Option<usize>,
        policy: Failover,
        now: Instant,
        shares: &[f64],
    ) -> Self {
        levels.truncate(MAX_VIP_REGIONS);
        let local = local.filter(|&l| l < levels.len());
        let shares = fit(shares, levels.len());
        let (loads, last_resort) = target_loads(&policy, local, &shares);
        let target = cumulative(&loads);
        let mut this = Self {
            levels,
            local,
            policy,
            shares: shares.clone(),
            target: target.clone(),
            applied: target.clone(),
            last_resort,
            history: VecDeque::from([Sample {
                at: now,
                shares,
                target,
            }]),
            reason: String::new(),
            since: now,
        };
        this.reason = if last_resort {
            this.last_resort_reason()
        } else {
            format!("start: region {:?} active", this.active())
        };
        this
    }

    /// Takes the levels' current healthy shares (one per level, 0.0..=1.0; missing ones count
    /// as 0) at `now`, which must not go backwards. Returns the transition when the applied
    /// loads changed, `None` otherwise (also when only the target changed and is held back;
    /// [`Self::next_deadline`] says when to look again).
    pub fn update(&mut self, now: Instant, shares: &[f64]) -> Option<Transition> {
        let shares = fit(shares, self.levels.len());
        let (loads, last_resort) = target_loads(&self.policy, self.local, &shares);
        self.target = cumulative(&loads);
        let changed = self
            .history
            .back()
            .is_none_or(|last| differ(&last.shares, &shares));
        if changed {
            self.history.push_back(Sample {
                at: now,
                shares: shares.clone(),
                target: self.target.clone(),
            });
        }
        self.shares = shares;
        self.prune(now);
        let applied = self.evaluate();
        self.apply(now, applied, last_resort)
    }

    /// Applies a new policy (a reloaded `[vip.failover]`), keeping the history: the held
    /// targets are recomputed from the recorded shares under the new policy.
    pub fn set_policy(&mut self, policy: Failover, now: Instant) -> Option<Transition> {
        self.replace_policy(policy);
        let shares = self.shares.clone();
        self.update(now, &shares)
    }

    fn replace_policy(&mut self, policy: Failover) {
        self.policy = policy;
        for sample in &mut self.history {
            sample.target = cumulative(&target_loads(&policy, self.local, &sample.shares).0);
        }
    }

    /// Reconfigures after a reload: with the same levels and local level, as
    /// [`Self::set_policy`] (the history is kept); otherwise the state starts over as
    /// [`Self::new`] with `shares`, and a transition is returned if the loads differ (always
    /// when the number of levels changed).
    pub fn reconfigure(
        &mut self,
        levels: Vec<String>,
        local: Option<usize>,
        policy: Failover,
        now: Instant,
        shares: &[f64],
    ) -> Option<Transition> {
        if levels == self.levels && local == self.local {
            self.replace_policy(policy);
            return self.update(now, shares);
        }
        let previous = self.loads();
        *self = Self::new(levels, local, policy, now, shares);
        self.reason = format!("regions changed: {}", self.reason);
        let loads = self.loads();
        differ(&previous, &loads).then(|| Transition {
            at: now,
            previous,
            loads,
            reason: self.reason.clone(),
            last_resort: self.last_resort,
        })
    }

    /// The region levels, in priority order.
    pub fn levels(&self) -> &[String] {
        &self.levels
    }

    /// The levels' healthy shares as last given.
    pub fn shares(&self) -> &[f64] {
        &self.shares
    }

    /// The policy in force.
    pub fn policy(&self) -> &Failover {
        &self.policy
    }

    /// The applied loads per level: shares of new flows, each in 0.0..=1.0, summing to 1
    /// (empty when there are no levels).
    pub fn loads(&self) -> Vec<f64> {
        per_level(&self.applied)
    }

    /// The loads per level the current shares alone would give (what the applied loads move
    /// to once the hold-down allows).
    pub fn target(&self) -> Vec<f64> {
        per_level(&self.target)
    }

    /// The data path's region split (`VipMeta::region_upto`): level `i` takes new flows whose
    /// region point is below `upto[i]` and not below `upto[i - 1]`, out of [`REGION_SCALE`].
    /// Bounds never decrease, the last used one and every unused one is `REGION_SCALE`, so
    /// rounding never leaves a gap.
    pub fn upto(&self) -> [u32; MAX_VIP_REGIONS] {
        let mut upto = [REGION_SCALE; MAX_VIP_REGIONS];
        let scale = f64::from(REGION_SCALE);
        for (bound, &c) in upto.iter_mut().zip(&self.applied) {
            // `as` saturates, and C is within 0..=1, so the bound is within 0..=REGION_SCALE.
            *bound = (c * scale).round() as u32;
        }
        if let Some(last) = self.applied.len().checked_sub(1) {
            upto[last] = REGION_SCALE;
        }
        // Monotone by construction; enforced anyway against float noise.
        let mut floor = 0;
        for bound in &mut upto {
            floor = floor.max(*bound);
            *bound = floor;
        }
        upto
    }

    /// Number of levels (`VipMeta::region_count`).
    pub fn count(&self) -> u32 {
        self.levels.len() as u32
    }

    /// Whether every level is down and the load went to the last resort (this host's level if
    /// the VIP has one, else the first); the local table should then use every backend, as in
    /// panic.
    pub fn last_resort(&self) -> bool {
        self.last_resort
    }

    /// The highest-priority region that takes load ("" when there are no levels).
    pub fn active(&self) -> &str {
        let loads = self.loads();
        loads
            .iter()
            .position(|&l| l > EPSILON)
            .and_then(|i| self.levels.get(i))
            .map_or("", String::as_str)
    }

    /// When the applied loads last changed (or the state was created).
    pub fn since(&self) -> Instant {
        self.since
    }

    /// Why the applied loads are what they are: the reason of the last transition.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The earliest time at which a held-back failback could apply if the shares stay as they
    /// are: call [`Self::update`] then. `None` when nothing is held back.
    pub fn next_deadline(&self) -> Option<Instant> {
        let held: Vec<usize> = (0..self.applied.len())
            .filter(|&i| self.applied[i] < self.target[i] - EPSILON)
            .collect();
        if held.is_empty() {
            return None;
        }
        let hold = self.policy.hold_down;
        // Sample k - 1 leaves the window when sample k is `hold` old.
        for k in 1..self.history.len() {
            let rises = held.iter().any(|&i| {
                let least = self
                    .history
                    .iter()
                    .skip(k)
                    .map(|s| s.target[i])
                    .fold(f64::INFINITY, f64::min);
                least > self.applied[i] + EPSILON
            });
            if rises {
                return self.history[k].at.checked_add(hold);
            }
        }
        None
    }

    /// Drops the samples that left the window `[now - hold_down, now]`, keeping the one in force
    /// at its start, and merges the oldest when there are too many.
    fn prune(&mut self, now: Instant) {
        if let Some(start) = now.checked_sub(self.policy.hold_down) {
            while self.history.len() >= 2 && self.history[1].at <= start {
                self.history.pop_front();
            }
        }
        while self.history.len() > MAX_HISTORY {
            let first = self.history.pop_front().expect("more than one sample");
            let second = &mut self.history[0];
            second.at = first.at;
            for (a, b) in second.shares.iter_mut().zip(&first.shares) {
                *a = a.min(*b);
            }
            for (a, b) in second.target.iter_mut().zip(&first.target) {
                *a = a.min(*b);
            }
        }
    }

    /// The cumulative loads to apply now.
    fn evaluate(&self) -> Vec<f64> {
        let n = self.levels.len();
        let held: Vec<f64> = (0..n)
            .map(|i| {
                self.history
                    .iter()
                    .map(|s| s.target[i])
                    .fold(f64::INFINITY, f64::min)
            })
            .collect();
        let candidate: Vec<f64> = (0..n)
            .map(|i| self.target[i].min(self.applied[i].max(held[i])))
            .collect();

        // Never keep a level holding more than it can carry now.
        let mut loads = per_level(&candidate);
        let target = per_level(&self.target);
        let capacity = self.capacity(&target);
        let excess: Vec<f64> = loads
            .iter()
            .zip(&capacity)
            .map(|(load, cap)| (load - cap).max(0.0))
            .collect();
        let deficit: Vec<f64> = target
            .iter()
            .zip(&loads)
            .map(|(want, load)| (want - load).max(0.0))
            .collect();
        let (moved, wanted): (f64, f64) = (excess.iter().sum(), deficit.iter().sum());
        if moved > EPSILON && wanted > EPSILON {
            for ((load, gain), loss) in loads.iter_mut().zip(&deficit).zip(&excess) {
                *load += moved * gain / wanted - loss;
            }
        }
        let mut applied: Vec<f64> = cumulative(&loads)
            .iter()
            .zip(&self.target)
            .map(|(a, t)| a.min(*t).max(0.0))
            .collect();
        if let Some(last) = applied.last_mut() {
            *last = 1.0;
        }
        applied
    }

    /// The load each level can carry with its current share: at least what the target gives
    /// it; in proportional mode `share / min_healthy`; in whole mode everything if its share
    /// reaches `min_healthy`, or if none does and its share is above 0.
    fn capacity(&self, target: &[f64]) -> Vec<f64> {
        let min_healthy = self.policy.min_healthy;
        let any_qualifies = self.shares.iter().any(|&s| s >= min_healthy);
        self.shares
            .iter()
            .zip(target)
            .map(|(&share, &t)| {
                let nominal = match self.policy.mode {
                    FailoverMode::Proportional => (share / min_healthy).min(1.0),
                    FailoverMode::Whole => {
                        let carries = share >= min_healthy || (!any_qualifies && share > 0.0);
                        if carries { 1.0 } else { 0.0 }
                    }
                };
                nominal.max(t)
            })
            .collect()
    }

    /// Records `applied` as the applied loads; a transition if they changed.
    fn apply(&mut self, now: Instant, applied: Vec<f64>, last_resort: bool) -> Option<Transition> {
        if !differ(&applied, &self.applied) && last_resort == self.last_resort {
            return None;
        }
        let previous = self.loads();
        self.applied = applied;
        self.last_resort = last_resort;
        let loads = self.loads();
        self.reason = self.explain(&previous, &loads);
        self.since = now;
        Some(Transition {
            at: now,
            previous,
            loads,
            reason: self.reason.clone(),
            last_resort,
        })
    }

    fn last_resort_reason(&self) -> String {
        format!(
            "every region is down: last resort (region {:?})",
            self.active()
        )
    }

    /// Why the loads went from `previous` to `loads`.
    fn explain(&self, previous: &[f64], loads: &[f64]) -> String {
        if self.last_resort {
            return self.last_resort_reason();
        }
        let min_healthy = self.policy.min_healthy;
        let lost = |j: &usize| loads[*j] < previous[*j] - EPSILON;
        let blame = |j: usize| {
            let share = self.shares[j];
            let mut reason = format!("region {:?}: healthy share {share:.2}", self.levels[j]);
            if share < min_healthy {
                let _ = write!(reason, " < min_healthy {min_healthy:.2}");
            }
            reason
        };
        let failover = cumulative(loads)
            .iter()
            .zip(cumulative(previous))
            .any(|(now, before)| *now < before - EPSILON);
        let target = per_level(&self.target);
        let capacity = self.capacity(&target);
        let forced = (0..loads.len())
            .filter(lost)
            .find(|&j| previous[j] > capacity[j] + EPSILON);
        if failover && let Some(j) = (0..loads.len()).find(lost) {
            return blame(j);
        }
        if let Some(j) = forced {
            return blame(j);
        }
        match (0..loads.len()).find(|&i| loads[i] > previous[i] + EPSILON) {
            Some(i) if self.policy.hold_down.is_zero() => {
                format!("region {:?} healthy again", self.levels[i])
            }
            Some(i) => format!(
                "region {:?} healthy for {:.1} s (hold-down)",
                self.levels[i],
                self.policy.hold_down.as_secs_f64()
            ),
            None => "region loads changed".to_owned(),
        }
    }
}

/// `shares` cut or padded with 0 to `n` levels.
fn fit(shares: &[f64], n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| shares.get(i).copied().map_or(0.0, clean_share))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const HOLD: Duration = Duration::from_secs(30);

    fn policy(mode: FailoverMode) -> Failover {
        Failover {
            mode,
            min_healthy: 0.7,
            hold_down: HOLD,
        }
    }

    fn levels(n: usize) -> Vec<String> {
        ["a", "b", "c", "d"][..n]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    fn secs(t0: Instant, s: f64) -> Instant {
        t0 + Duration::from_secs_f64(s)
    }

    #[track_caller]
    fn assert_loads(actual: &[f64], expected: &[f64]) {
        assert_eq!(actual.len(), expected.len(), "{actual:?} vs {expected:?}");
        for (a, e) in actual.iter().zip(expected) {
            assert!((a - e).abs() < 1e-9, "{actual:?} vs {expected:?}");
        }
    }

    /// Two levels "a" (this host) and "b", both healthy at t0, in `mode`.
    fn two(mode: FailoverMode, t0: Instant) -> VipFailover {
        VipFailover::new(levels(2), Some(0), policy(mode), t0, &[1.0, 1.0])
    }

    #[test]
    fn local_share_is_healthy_weight_over_undrained_weight() {
        assert_eq!(local_share([]), 0.0);
        assert_eq!(local_share([(0, false, true), (100, true, true)]), 0.0);
        let share = local_share([
            (100, false, true),
            (200, false, false),
            (300, true, true),
            (100, false, true),
        ]);
        assert!((share - 0.5).abs() < 1e-12, "{share}");
    }

    #[test]
    fn a_new_state_applies_its_target_at_once() {
        let t0 = Instant::now();
        let f = VipFailover::new(
            levels(2),
            Some(1),
            policy(FailoverMode::Whole),
            t0,
            &[0.2, 1.0],
        );
        assert_loads(&f.loads(), &[0.0, 1.0]);
        assert_eq!(f.active(), "b");
        assert_eq!(f.upto(), [0, REGION_SCALE, REGION_SCALE, REGION_SCALE]);
        assert_eq!(f.count(), 2);
        assert_eq!(f.since(), t0);
        assert_eq!(f.next_deadline(), None);
    }

    #[test]
    fn failover_is_immediate() {
        let t0 = Instant::now();
        let mut f = two(FailoverMode::Whole, t0);
        assert_eq!(f.active(), "a");
        assert_eq!(f.update(secs(t0, 1.0), &[1.0, 1.0]), None);
        let t = f
            .update(secs(t0, 2.0), &[1.0 / 3.0, 1.0])
            .expect("failover");
        assert_loads(&t.previous, &[1.0, 0.0]);
        assert_loads(&t.loads, &[0.0, 1.0]);
        assert_eq!(
            t.reason,
            "region \"a\": healthy share 0.33 < min_healthy 0.70"
        );
        assert!(!t.last_resort);
        assert_eq!(f.active(), "b");
        assert_eq!(f.reason(), t.reason);
        assert_eq!(f.since(), secs(t0, 2.0));
        assert_eq!(f.upto()[0], 0);
    }

    #[test]
    fn failback_waits_for_the_hold_down() {
        let t0 = Instant::now();
        let mut f = two(FailoverMode::Whole, t0);
        f.update(secs(t0, 1.0), &[0.0, 1.0]).expect("failover");
        assert_eq!(f.update(secs(t0, 10.0), &[1.0, 1.0]), None, "held back");
        assert_loads(&f.target(), &[1.0, 0.0]);
        assert_eq!(f.next_deadline(), Some(secs(t0, 40.0)));
        assert_eq!(f.update(secs(t0, 39.999), &[1.0, 1.0]), None);
        assert_loads(&f.loads(), &[0.0, 1.0]);
        let t = f.update(secs(t0, 40.0), &[1.0, 1.0]).expect("failback");
        assert_loads(&t.loads, &[1.0, 0.0]);
        assert_eq!(t.reason, "region \"a\" healthy for 30.0 s (hold-down)");
        assert_eq!(f.active(), "a");
        assert_eq!(f.next_deadline(), None);
    }

    #[test]
    fn without_hold_down_failback_is_immediate() {
        let t0 = Instant::now();
        let mut p = policy(FailoverMode::Whole);
        p.hold_down = Duration::ZERO;
        let mut f = VipFailover::new(levels(2), Some(0), p, t0, &[1.0, 1.0]);
        f.update(secs(t0, 1.0), &[0.0, 1.0]).expect("failover");
        let t = f.update(secs(t0, 2.0), &[1.0, 1.0]).expect("failback");
        assert_eq!(t.reason, "region \"a\" healthy again");
    }

    #[test]
    fn a_region_flapping_every_second_fails_over_once_and_back_once() {
        let t0 = Instant::now();
        let mut f = two(FailoverMode::Whole, t0);
        let mut transitions = Vec::new();
        // Down at 1 s, up at 2 s, ... up for good at 30 s.
        for k in 0..30 {
            let share = if k % 2 == 0 { 0.0 } else { 1.0 };
            transitions.extend(f.update(secs(t0, 1.0 + f64::from(k)), &[share, 1.0]));
        }
        assert_eq!(transitions.len(), 1, "{transitions:#?}");
        assert_loads(&transitions[0].loads, &[0.0, 1.0]);
        for s in 31..60 {
            assert_eq!(
                f.update(secs(t0, f64::from(s)), &[1.0, 1.0]),
                None,
                "at {s} s"
            );
        }
        assert_eq!(f.next_deadline(), Some(secs(t0, 60.0)));
        let back = f.update(secs(t0, 60.0), &[1.0, 1.0]).expect("failback");
        assert_loads(&back.loads, &[1.0, 0.0]);
    }

    #[test]
    fn proportional_sheds_what_the_healthy_share_cannot_carry() {
        let t0 = Instant::now();
        let mut f = two(FailoverMode::Proportional, t0);
        let t = f
            .update(secs(t0, 1.0), &[0.5, 1.0])
            .expect("partial failover");
        let a = 0.5 / 0.7;
        assert_loads(&t.loads, &[a, 1.0 - a]);
        assert!((a - 0.714).abs() < 1e-3);
        let upto = f.upto();
        let expected = a * f64::from(REGION_SCALE);
        assert!((f64::from(upto[0]) - expected).abs() <= 1.0, "{upto:?}");
        assert_eq!(upto[1..], [REGION_SCALE; 3]);
        assert_eq!(
            t.reason,
            "region \"a\": healthy share 0.50 < min_healthy 0.70"
        );
    }

    #[test]
    fn proportional_recovery_is_held_but_further_loss_is_not() {
        let t0 = Instant::now();
        let mut f = two(FailoverMode::Proportional, t0);
        f.update(secs(t0, 1.0), &[0.5, 1.0]).expect("failover");
        assert_eq!(f.update(secs(t0, 5.0), &[0.6, 1.0]), None, "increase held");
        assert_loads(&f.loads(), &[0.5 / 0.7, 1.0 - 0.5 / 0.7]);
        let t = f
            .update(secs(t0, 8.0), &[0.4, 1.0])
            .expect("decrease at once");
        assert_loads(&t.loads, &[0.4 / 0.7, 1.0 - 0.4 / 0.7]);
        assert_eq!(f.update(secs(t0, 10.0), &[0.6, 1.0]), None);
        assert_eq!(f.next_deadline(), Some(secs(t0, 40.0)));
        assert_eq!(f.update(secs(t0, 39.9), &[0.6, 1.0]), None);
        let t = f
            .update(secs(t0, 40.0), &[0.6, 1.0])
            .expect("held increase applies");
        assert_loads(&t.loads, &[0.6 / 0.7, 1.0 - 0.6 / 0.7]);
    }

    #[test]
    fn proportional_without_enough_capacity_follows_the_shares() {
        let (loads, last_resort) =
            target_loads(&policy(FailoverMode::Proportional), None, &[0.35, 0.14]);
        assert!(!last_resort);
        assert_loads(&loads, &[0.35 / 0.49, 0.14 / 0.49]);
    }

    #[test]
    fn whole_mode_skips_a_down_middle_level() {
        let t0 = Instant::now();
        let mut f = VipFailover::new(
            levels(3),
            Some(0),
            policy(FailoverMode::Whole),
            t0,
            &[1.0, 1.0, 1.0],
        );
        let t = f.update(secs(t0, 1.0), &[0.2, 0.1, 1.0]).expect("failover");
        assert_loads(&t.loads, &[0.0, 0.0, 1.0]);
        assert_eq!(f.active(), "c");
        assert_eq!(f.upto(), [0, 0, REGION_SCALE, REGION_SCALE]);
    }

    #[test]
    fn whole_mode_with_no_level_healthy_enough_takes_the_best() {
        let (loads, _) = target_loads(&policy(FailoverMode::Whole), None, &[0.3, 0.5, 0.5]);
        assert_loads(&loads, &[0.0, 1.0, 0.0]);
    }

    #[test]
    fn jitter_between_two_degraded_levels_moves_load_once() {
        let t0 = Instant::now();
        let mut f = VipFailover::new(
            levels(2),
            Some(0),
            policy(FailoverMode::Whole),
            t0,
            &[0.5, 0.45],
        );
        let mut transitions = 0;
        for s in 1..20 {
            let shares = if s % 2 == 1 { [0.45, 0.5] } else { [0.5, 0.45] };
            transitions += usize::from(f.update(secs(t0, f64::from(s)), &shares).is_some());
        }
        assert_eq!(transitions, 1);
        assert_eq!(f.active(), "b");
    }

    #[test]
    fn every_region_down_is_the_last_resort() {
        let t0 = Instant::now();
        let mut f = VipFailover::new(
            levels(3),
            Some(1),
            policy(FailoverMode::Whole),
            t0,
            &[1.0, 1.0, 1.0],
        );
        let t = f
            .update(secs(t0, 1.0), &[0.0, 0.0, 0.0])
            .expect("last resort");
        assert!(t.last_resort && f.last_resort());
        assert_loads(&t.loads, &[0.0, 1.0, 0.0]);
        assert_eq!(t.reason, "every region is down: last resort (region \"b\")");
        // Without a local level: the first.
        let f = VipFailover::new(
            levels(2),
            None,
            policy(FailoverMode::Whole),
            t0,
            &[0.0, 0.0],
        );
        assert!(f.last_resort());
        assert_loads(&f.loads(), &[1.0, 0.0]);
        // Leaving the last resort for a lower level is a failover: at once.
        let mut f = VipFailover::new(
            levels(3),
            Some(0),
            policy(FailoverMode::Whole),
            t0,
            &[0.0, 0.0, 0.0],
        );
        let t = f
            .update(secs(t0, 1.0), &[0.0, 0.0, 1.0])
            .expect("out of last resort");
        assert!(!t.last_resort);
        assert_loads(&t.loads, &[0.0, 0.0, 1.0]);
    }

    #[test]
    fn a_level_that_dies_does_not_keep_load_held_back_for_another() {
        let t0 = Instant::now();
        // "a" recovers while "b" carries the load; then "b" dies: "a" takes it at once.
        let mut f = two(FailoverMode::Whole, t0);
        f.update(secs(t0, 1.0), &[0.0, 1.0]).expect("failover");
        assert_eq!(f.update(secs(t0, 5.0), &[1.0, 1.0]), None);
        let t = f.update(secs(t0, 6.0), &[1.0, 0.0]).expect("forced");
        assert_loads(&t.loads, &[1.0, 0.0]);
        assert_eq!(
            t.reason,
            "region \"b\": healthy share 0.00 < min_healthy 0.70"
        );
        // With a third, stable level, the load goes where the target wants (the first).
        let mut f = VipFailover::new(
            levels(3),
            Some(0),
            policy(FailoverMode::Whole),
            t0,
            &[1.0, 1.0, 1.0],
        );
        f.update(secs(t0, 1.0), &[0.0, 1.0, 1.0]).expect("failover");
        assert_eq!(f.update(secs(t0, 5.0), &[1.0, 1.0, 1.0]), None);
        let t = f.update(secs(t0, 6.0), &[1.0, 0.0, 1.0]).expect("forced");
        assert_loads(&t.loads, &[1.0, 0.0, 0.0]);
    }

    #[test]
    fn a_new_policy_keeps_the_history() {
        let t0 = Instant::now();
        let mut f = two(FailoverMode::Whole, t0);
        f.update(secs(t0, 1.0), &[0.5, 1.0]).expect("failover");
        assert_eq!(f.update(secs(t0, 10.0), &[1.0, 1.0]), None);
        let mut p = policy(FailoverMode::Whole);
        p.min_healthy = 0.9;
        assert_eq!(f.set_policy(p, secs(t0, 11.0)), None, "still held");
        assert_eq!(f.next_deadline(), Some(secs(t0, 40.0)));
        // With min_healthy 0.4, "a" at 0.5 was never down: nothing to hold back.
        p.min_healthy = 0.4;
        let t = f.set_policy(p, secs(t0, 12.0)).expect("back");
        assert_loads(&t.loads, &[1.0, 0.0]);
        // Same levels: kept; other levels: starts over.
        assert_eq!(
            f.reconfigure(levels(2), Some(0), p, secs(t0, 13.0), &[1.0, 1.0]),
            None
        );
        let t = f
            .reconfigure(levels(3), Some(2), p, secs(t0, 14.0), &[0.0, 0.0, 1.0])
            .expect("new levels");
        assert_loads(&t.loads, &[0.0, 0.0, 1.0]);
        assert!(t.reason.starts_with("regions changed"), "{}", t.reason);
    }

    /// A small deterministic generator (xorshift64*), so the property test needs no crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn share(&mut self) -> f64 {
            const PICKS: [f64; 7] = [0.0, 0.0, 0.3, 0.5, 0.69, 0.7, 1.0];
            match self.below(9) {
                i @ 0..=6 => PICKS[i as usize],
                _ => (self.next() >> 11) as f64 / (1u64 << 53) as f64,
            }
        }
    }

    #[test]
    fn random_share_sequences_keep_every_invariant() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for case in 0..300 {
            let n = 1 + rng.below(4) as usize;
            let mode = if rng.below(2) == 0 {
                FailoverMode::Whole
            } else {
                FailoverMode::Proportional
            };
            let p = Failover {
                mode,
                min_healthy: [0.1, 0.5, 0.7, 1.0][rng.below(4) as usize],
                hold_down: Duration::from_millis(rng.below(10_000)),
            };
            let local = [None, Some(0), Some(n - 1)][rng.below(3) as usize];
            let t0 = Instant::now();
            let mut now = t0;
            let shares: Vec<f64> = (0..n).map(|_| rng.share()).collect();
            let mut f = VipFailover::new(levels(n), local, p, now, &shares);
            for step in 0..200 {
                now += Duration::from_millis(rng.below(3000));
                let shares: Vec<f64> = (0..n).map(|_| rng.share()).collect();
                let (before, was_last_resort) = (f.loads(), f.last_resort());
                let transition = f.update(now, &shares);
                let loads = f.loads();
                let at = format!("case {case} step {step} {p:?} shares {shares:?}");
                let changed = differ(&before, &loads) || was_last_resort != f.last_resort();
                assert_eq!(transition.is_some(), changed, "{at}");
                let sum: f64 = loads.iter().sum();
                assert!((sum - 1.0).abs() < 1e-9, "{at}: sum {sum}");
                assert!(
                    loads.iter().all(|l| (0.0..=1.0).contains(l)),
                    "{at}: {loads:?}"
                );
                let (applied, target) = (cumulative(&loads), f.target.clone());
                for i in 0..n {
                    assert!(
                        applied[i] <= target[i] + 1e-9,
                        "{at}: {applied:?} > {target:?}"
                    );
                }
                assert_eq!(f.last_resort(), shares.iter().all(|&s| s == 0.0), "{at}");
                if p.hold_down.is_zero() {
                    assert_loads(&loads, &f.target());
                }
                let upto = f.upto();
                assert!(upto.windows(2).all(|w| w[0] <= w[1]), "{at}: {upto:?}");
                assert_eq!(upto[n - 1], REGION_SCALE, "{at}: {upto:?}");
                assert!(upto[n..].iter().all(|&u| u == REGION_SCALE), "{at}");
                if let Some(deadline) = f.next_deadline() {
                    assert!(deadline > now, "{at}: deadline in the past");
                }
            }
        }
    }
}
