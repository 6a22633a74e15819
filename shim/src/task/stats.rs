//! The agent's cgroup v2 statistics as containerd's `io.containerd.cgroups.v2.Metrics` (what `ctr task
//! metrics` and the CRI stats read).

use containerd_shim::protos::cgroups_v2::metrics::{
    CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, NetworkStat, PidsStat,
};
use husk_proto::v1::StatsContainerResponse;

/// Type URL containerd decodes the Stats reply with.
pub const METRICS_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

pub fn to_metrics(s: &StatsContainerResponse) -> Metrics {
    let mut m = Metrics::new();
    if let Some(c) = &s.cpu {
        m.cpu = Some(CPUStat {
            usage_usec: c.usage_usec,
            user_usec: c.user_usec,
            system_usec: c.system_usec,
            nr_periods: c.nr_periods,
            nr_throttled: c.nr_throttled,
            throttled_usec: c.throttled_usec,
            ..Default::default()
        })
        .into();
    }
    if let Some(p) = &s.pids {
        m.pids = Some(PidsStat {
            current: p.current,
            limit: p.limit,
            ..Default::default()
        })
        .into();
    }
    if let Some(mem) = &s.memory {
        let mut ms = MemoryStat {
            usage: mem.usage_bytes,
            usage_limit: mem.limit_bytes,
            swap_usage: mem.swap_usage_bytes,
            ..Default::default()
        };
        for (k, v) in &mem.stat {
            let v = *v;
            match k.as_str() {
                "anon" => ms.anon = v,
                "file" => ms.file = v,
                "kernel_stack" => ms.kernel_stack = v,
                "slab" => ms.slab = v,
                "sock" => ms.sock = v,
                "shmem" => ms.shmem = v,
                "file_mapped" => ms.file_mapped = v,
                "file_dirty" => ms.file_dirty = v,
                "file_writeback" => ms.file_writeback = v,
                "anon_thp" => ms.anon_thp = v,
                "inactive_anon" => ms.inactive_anon = v,
                "active_anon" => ms.active_anon = v,
                "inactive_file" => ms.inactive_file = v,
                "active_file" => ms.active_file = v,
                "unevictable" => ms.unevictable = v,
                "slab_reclaimable" => ms.slab_reclaimable = v,
                "slab_unreclaimable" => ms.slab_unreclaimable = v,
                "pgfault" => ms.pgfault = v,
                "pgmajfault" => ms.pgmajfault = v,
                _ => {}
            }
        }
        m.memory = Some(ms).into();
        m.memory_events = Some(MemoryEvents {
            oom_kill: mem.oom_kills,
            ..Default::default()
        })
        .into();
    }
    if !s.io.is_empty() {
        m.io = Some(IOStat {
            usage: s
                .io
                .iter()
                .map(|d| IOEntry {
                    major: d.major.into(),
                    minor: d.minor.into(),
                    rbytes: d.rbytes,
                    wbytes: d.wbytes,
                    rios: d.rios,
                    wios: d.wios,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .into();
    }
    // The pod's interfaces (the guest's network namespace), as runc reports the container's netns ones.
    m.network = s
        .network
        .iter()
        .map(|n| NetworkStat {
            name: n.name.clone(),
            rx_bytes: n.rx_bytes,
            rx_packets: n.rx_packets,
            rx_errors: n.rx_errors,
            rx_dropped: n.rx_dropped,
            tx_bytes: n.tx_bytes,
            tx_packets: n.tx_packets,
            tx_errors: n.tx_errors,
            tx_dropped: n.tx_dropped,
            ..Default::default()
        })
        .collect();
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_proto::v1::{
        ContainerCpuStats, ContainerMemoryStats, ContainerPidsStats, NetworkInterfaceStats,
    };

    #[test]
    fn converts_every_section() {
        let s = StatsContainerResponse {
            container_id: "c".into(),
            cpu: Some(ContainerCpuStats {
                usage_usec: 5,
                ..Default::default()
            }),
            memory: Some(ContainerMemoryStats {
                usage_bytes: 4096,
                limit_bytes: 1 << 20,
                oom_kills: 1,
                stat: [("anon".to_string(), 7u64), ("unknown".to_string(), 9)]
                    .into_iter()
                    .collect(),
                ..Default::default()
            }),
            pids: Some(ContainerPidsStats {
                current: 3,
                limit: 0,
            }),
            io: vec![],
            network: vec![NetworkInterfaceStats {
                name: "eth0".into(),
                rx_bytes: 10,
                tx_packets: 2,
                ..Default::default()
            }],
        };
        let m = to_metrics(&s);
        assert_eq!(m.cpu.usage_usec, 5);
        assert_eq!(
            (m.memory.usage, m.memory.usage_limit, m.memory.anon),
            (4096, 1 << 20, 7)
        );
        assert_eq!(m.memory_events.oom_kill, 1);
        assert_eq!(m.pids.current, 3);
        assert!(m.io.is_none());
        assert_eq!(m.network.len(), 1);
        assert_eq!(
            (
                m.network[0].name.as_str(),
                m.network[0].rx_bytes,
                m.network[0].tx_packets
            ),
            ("eth0", 10, 2)
        );
    }
}
