//! Task metrics: one `runc events --stats` sample converted to containerd's
//! cgroup v1 `Metrics` (what `ctr task metrics` decodes). Only the fields runc
//! reports on this machine's hybrid cgroups are filled: pids, cpu usage and
//! throttling, memory usage/swap/kernel and the raw memory counters.

use containerd_shim_protos::cgroups::metrics::{
    CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat, Throttle,
};
use containerd_shim_protos::protobuf::MessageField;
use serde_json::Value;

/// The type url containerd's runc shim gives cgroup v1 metrics.
pub const METRICS_TYPE_URL: &str = "io.containerd.cgroups.v1.Metrics";

fn u(v: &Value, path: &[&str]) -> u64 {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

fn entry(v: &Value) -> MemoryEntry {
    MemoryEntry {
        usage: u(v, &["usage"]),
        max: u(v, &["max"]),
        failcnt: u(v, &["failcnt"]),
        limit: u(v, &["limit"]),
        ..Default::default()
    }
}

/// `raw` is runc's `{"type":"stats","id":..,"data":{..}}` object.
pub fn metrics_from_runc(raw: &Value) -> Metrics {
    let d = raw.get("data").unwrap_or(&Value::Null);
    let mut m = Metrics::new();
    m.pids = MessageField::some(PidsStat {
        current: u(d, &["pids", "current"]),
        limit: u(d, &["pids", "limit"]),
        ..Default::default()
    });
    let per_cpu = d
        .pointer("/cpu/usage/percpu")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    m.cpu = MessageField::some(CPUStat {
        usage: MessageField::some(CPUUsage {
            total: u(d, &["cpu", "usage", "total"]),
            kernel: u(d, &["cpu", "usage", "kernel"]),
            user: u(d, &["cpu", "usage", "user"]),
            per_cpu,
            ..Default::default()
        }),
        throttling: MessageField::some(Throttle {
            periods: u(d, &["cpu", "throttling", "periods"]),
            throttled_periods: u(d, &["cpu", "throttling", "throttledPeriods"]),
            throttled_time: u(d, &["cpu", "throttling", "throttledTime"]),
            ..Default::default()
        }),
        ..Default::default()
    });
    let mem = d.get("memory").unwrap_or(&Value::Null);
    let r = |k: &str| u(mem, &["raw", k]);
    m.memory = MessageField::some(MemoryStat {
        cache: r("cache"),
        rss: r("rss"),
        rss_huge: r("rss_huge"),
        mapped_file: r("mapped_file"),
        dirty: r("dirty"),
        writeback: r("writeback"),
        pg_fault: r("pgfault"),
        pg_maj_fault: r("pgmajfault"),
        inactive_anon: r("inactive_anon"),
        active_anon: r("active_anon"),
        inactive_file: r("inactive_file"),
        active_file: r("active_file"),
        unevictable: r("unevictable"),
        total_cache: r("total_cache"),
        total_rss: r("total_rss"),
        usage: MessageField::some(entry(mem.get("usage").unwrap_or(&Value::Null))),
        swap: MessageField::some(entry(mem.get("swap").unwrap_or(&Value::Null))),
        kernel: MessageField::some(entry(mem.get("kernel").unwrap_or(&Value::Null))),
        ..Default::default()
    });
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runc_stats_json_maps_to_metrics() {
        let raw: Value = serde_json::from_str(
            r#"{"type":"stats","id":"c1","data":{
                "cpu":{"usage":{"percpu":[5,7],"total":12,"kernel":3,"user":9},
                       "throttling":{"periods":4,"throttledPeriods":1,"throttledTime":99}},
                "memory":{"usage":{"usage":4096,"max":8192,"failcnt":0,"limit":1048576},
                          "raw":{"cache":100,"rss":200,"pgfault":7}},
                "pids":{"current":3,"limit":0}}}"#,
        )
        .unwrap();
        let m = metrics_from_runc(&raw);
        assert_eq!(m.pids.current, 3);
        assert_eq!(m.cpu.usage.total, 12);
        assert_eq!(m.cpu.usage.per_cpu, vec![5, 7]);
        assert_eq!(m.cpu.throttling.throttled_time, 99);
        assert_eq!(m.memory.usage.usage, 4096);
        assert_eq!(m.memory.usage.limit, 1048576);
        assert_eq!(
            (m.memory.cache, m.memory.rss, m.memory.pg_fault),
            (100, 200, 7)
        );
    }

    #[test]
    fn missing_sections_are_zero() {
        let m = metrics_from_runc(&serde_json::json!({"type":"stats","data":{}}));
        assert_eq!(m.pids.current, 0);
        assert_eq!(m.memory.usage.usage, 0);
    }
}
