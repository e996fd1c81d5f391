//! Summed views of the XDP program's per-CPU counters.

use std::{collections::BTreeMap, fmt};

use lb_common::counters::Counter;

/// Every counter summed over all CPUs at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    values: BTreeMap<Counter, u64>,
}

impl CounterSnapshot {
    /// Builds a snapshot from `(counter, value)` pairs; counters not given read as zero.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (Counter, u64)>) -> Self {
        Self {
            values: pairs.into_iter().collect(),
        }
    }

    /// The value of one counter.
    pub fn get(&self, counter: Counter) -> u64 {
        self.values.get(&counter).copied().unwrap_or(0)
    }

    /// What happened between `earlier` and `self`, counter by counter. Counters only grow, so a
    /// smaller value means the map was replaced; the difference then saturates at zero.
    pub fn since(&self, earlier: &CounterSnapshot) -> CounterSnapshot {
        CounterSnapshot::from_pairs(
            Counter::ALL
                .iter()
                .map(|&c| (c, self.get(c).saturating_sub(earlier.get(c)))),
        )
    }

    /// The counters that are not zero, in slot order.
    pub fn nonzero(&self) -> impl Iterator<Item = (Counter, u64)> + '_ {
        Counter::ALL
            .iter()
            .map(|&c| (c, self.get(c)))
            .filter(|&(_, v)| v != 0)
    }
}

impl fmt::Display for CounterSnapshot {
    /// `name=value` for every non-zero counter, space separated (one log line).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (counter, value) in self.nonzero() {
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            write!(f, "{}={}", counter.name(), value)?;
        }
        if first {
            f.write_str("(all zero)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_subtracts_per_counter_and_saturates() {
        let before = CounterSnapshot::from_pairs([(Counter::RxPackets, 10), (Counter::L4Tcp, 5)]);
        let after = CounterSnapshot::from_pairs([(Counter::RxPackets, 13), (Counter::L4Tcp, 2)]);
        let delta = after.since(&before);
        assert_eq!(delta.get(Counter::RxPackets), 3);
        assert_eq!(
            delta.get(Counter::L4Tcp),
            0,
            "a reset map must not underflow"
        );
        assert_eq!(delta.get(Counter::L4Udp), 0);
    }

    #[test]
    fn display_lists_nonzero_counters_by_name() {
        let snap = CounterSnapshot::from_pairs([(Counter::L3Ipv4, 2), (Counter::RxPackets, 2)]);
        assert_eq!(snap.to_string(), "rx_packets=2 l3_ipv4=2");
        assert_eq!(CounterSnapshot::default().to_string(), "(all zero)");
    }

    #[test]
    fn counter_names_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for &c in Counter::ALL {
            assert_eq!(Counter::from_name(c.name()), Some(c));
            assert!(seen.insert(c.name()), "duplicate counter name {}", c.name());
            assert!(c.index() < lb_common::counters::MAX_COUNTERS);
        }
    }
}
