//! The figures of a run: samples per (metric, target, repetition), their medians and ratios,
//! the table, and the check against issue 5's targets.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::tls::Negotiated;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Mailgate,
    Nginx,
    Direct,
    /// A second mailgate build (`--mailgate-b`), measured beside the first for an A/B.
    MailgateB,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Mailgate, Kind::Nginx, Kind::Direct, Kind::MailgateB];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Mailgate => "mailgate",
            Kind::Nginx => "nginx",
            Kind::Direct => "direct",
            Kind::MailgateB => "mailgate-b",
        }
    }

    pub fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Metric {
    LoginsFirst,
    LoginsRepeat,
    /// The target's own processes (nginx: with its auth_http responder), ms per login.
    CpuFirst,
    CpuRepeat,
    /// The part of `CpuRepeat` spent in the kernel (system time), ms per login.
    SysCpuRepeat,
    /// nginx's auth_http responder alone, ms per login.
    AuthCpuRepeat,
    /// The Dovecot backend, ms per login.
    BackendCpuRepeat,
    /// Derived per repetition: `CpuRepeat` over `BackendCpuRepeat`. The machine's speed drifts
    /// by 20-30 % between repetitions here and every process's CPU per login moves with it;
    /// Dovecot does the same work per login behind every target, so it is the yardstick.
    CpuRepeatPerBackend,
    /// Repeat logins with every TLS handshake full (no resumption).
    LoginsFull,
    CpuFull,
    BackendCpuFull,
    /// Derived per repetition, as `CpuRepeatPerBackend`.
    CpuFullPerBackend,
    IdleKib,
    /// RSS grown by one login of each idle user right after a restart (MiB; one-off).
    WarmRssMib,
    BulkMibs,
    NoopMedianUs,
    NoopP99Us,
    /// Derived per repetition: this target's figure minus direct's.
    NoopMedianAddedUs,
    NoopP99AddedUs,
    /// Mixed workload: round trips per second over all sessions.
    MixedOps,
    /// Mixed workload: the target's own processes (as for logins), ms per 1,000 round trips.
    MixedCpu,
    /// Mixed workload: the Dovecot backend, ms per 1,000 round trips.
    MixedBackendCpu,
    ResumedPercent,
}

/// One row of the table.
struct Row {
    metric: Metric,
    label: &'static str,
    decimals: usize,
    /// Ratios make no sense for differences.
    ratios: bool,
}

const ROWS: &[Row] = &[
    Row {
        metric: Metric::LoginsFirst,
        label: "logins/s, first login of each user",
        decimals: 0,
        ratios: true,
    },
    Row {
        metric: Metric::LoginsRepeat,
        label: "logins/s, repeat logins",
        decimals: 0,
        ratios: true,
    },
    Row {
        metric: Metric::CpuFirst,
        label: "target CPU ms/login, first logins ¹",
        decimals: 2,
        ratios: true,
    },
    Row {
        metric: Metric::CpuRepeat,
        label: "target CPU ms/login, repeat logins ¹",
        decimals: 2,
        ratios: true,
    },
    Row {
        metric: Metric::SysCpuRepeat,
        label: "… of which in the kernel (system time)",
        decimals: 2,
        ratios: true,
    },
    Row {
        metric: Metric::AuthCpuRepeat,
        label: "… of which nginx's auth_http responder",
        decimals: 2,
        ratios: false,
    },
    Row {
        metric: Metric::BackendCpuRepeat,
        label: "Dovecot CPU ms/login, repeat logins",
        decimals: 2,
        ratios: true,
    },
    Row {
        metric: Metric::CpuRepeatPerBackend,
        label: "target CPU per repeat login ÷ Dovecot's, same repetition ⁵",
        decimals: 3,
        ratios: true,
    },
    Row {
        metric: Metric::LoginsFull,
        label: "logins/s, repeat logins, full TLS handshakes",
        decimals: 0,
        ratios: true,
    },
    Row {
        metric: Metric::CpuFull,
        label: "target CPU ms/login, full TLS handshakes ¹",
        decimals: 2,
        ratios: true,
    },
    Row {
        metric: Metric::BackendCpuFull,
        label: "Dovecot CPU ms/login, full TLS handshakes",
        decimals: 2,
        ratios: true,
    },
    Row {
        metric: Metric::CpuFullPerBackend,
        label: "target CPU per full-handshake login ÷ Dovecot's ⁵",
        decimals: 3,
        ratios: true,
    },
    Row {
        metric: Metric::IdleKib,
        label: "RSS per idle TLS session (LOGIN+SELECT+IDLE), KiB ²",
        decimals: 1,
        ratios: true,
    },
    Row {
        metric: Metric::WarmRssMib,
        label: "RSS kept after one first login of each idle user, MiB ³",
        decimals: 1,
        ratios: true,
    },
    Row {
        metric: Metric::BulkMibs,
        label: "bulk FETCH of 10 MiB message, MiB/s",
        decimals: 0,
        ratios: true,
    },
    Row {
        metric: Metric::NoopMedianUs,
        label: "NOOP round trip, median µs",
        decimals: 0,
        ratios: true,
    },
    Row {
        metric: Metric::NoopP99Us,
        label: "NOOP round trip, p99 µs",
        decimals: 0,
        ratios: true,
    },
    Row {
        metric: Metric::NoopMedianAddedUs,
        label: "NOOP median added over direct, µs",
        decimals: 0,
        ratios: false,
    },
    Row {
        metric: Metric::NoopP99AddedUs,
        label: "NOOP p99 added over direct, µs",
        decimals: 0,
        ratios: false,
    },
    Row {
        metric: Metric::MixedOps,
        label: "ops/s, mixed workload ⁴",
        decimals: 0,
        ratios: true,
    },
    Row {
        metric: Metric::MixedCpu,
        label: "target CPU ms per 1,000 mixed ops ¹",
        decimals: 1,
        ratios: true,
    },
    Row {
        metric: Metric::MixedBackendCpu,
        label: "Dovecot CPU ms per 1,000 mixed ops",
        decimals: 1,
        ratios: true,
    },
    Row {
        metric: Metric::ResumedPercent,
        label: "TLS handshakes resumed (login phases), %",
        decimals: 0,
        ratios: false,
    },
];

#[derive(Debug, Default)]
pub struct Results {
    samples: BTreeMap<(Metric, Kind), BTreeMap<usize, f64>>,
    pub negotiated: BTreeMap<Kind, Negotiated>,
    /// Everything that went wrong on the way (failed logins, a phase that errored).
    pub problems: Vec<String>,
}

pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => v.get(n / 2).copied(),
        _ => Some((v.get(n / 2 - 1)? + v.get(n / 2)?) / 2.0),
    }
}

/// The value at quantile `q` (0..=1) of sorted `values`, nearest rank.
pub fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted.get(rank - 1).copied()
}

impl Results {
    pub fn record(&mut self, metric: Metric, kind: Kind, rep: usize, value: f64) {
        self.samples
            .entry((metric, kind))
            .or_default()
            .insert(rep, value);
    }

    /// Adds the per-repetition differences to direct's NOOP figures and the target's CPU per
    /// login relative to its backend's.
    pub fn derive(&mut self) {
        for (cpu, backend, to) in [
            (
                Metric::CpuRepeat,
                Metric::BackendCpuRepeat,
                Metric::CpuRepeatPerBackend,
            ),
            (
                Metric::CpuFull,
                Metric::BackendCpuFull,
                Metric::CpuFullPerBackend,
            ),
        ] {
            // Direct's "target" is its backend: the quotient would say nothing.
            for kind in Kind::ALL.into_iter().filter(|&k| k != Kind::Direct) {
                let (Some(own), Some(backend)) = (
                    self.samples.get(&(cpu, kind)).cloned(),
                    self.samples.get(&(backend, kind)).cloned(),
                ) else {
                    continue;
                };
                for (rep, value) in own {
                    if let Some(&b) = backend.get(&rep).filter(|b| **b > 0.0) {
                        self.record(to, kind, rep, value / b);
                    }
                }
            }
        }
        for (from, to) in [
            (Metric::NoopMedianUs, Metric::NoopMedianAddedUs),
            (Metric::NoopP99Us, Metric::NoopP99AddedUs),
        ] {
            let Some(direct) = self.samples.get(&(from, Kind::Direct)).cloned() else {
                continue;
            };
            for kind in Kind::ALL {
                let Some(own) = self.samples.get(&(from, kind)).cloned() else {
                    continue;
                };
                for (rep, value) in own {
                    if let Some(d) = direct.get(&rep) {
                        self.record(to, kind, rep, value - d);
                    }
                }
            }
        }
    }

    fn values(&self, metric: Metric, kind: Kind) -> Vec<f64> {
        self.samples
            .get(&(metric, kind))
            .map(|m| m.values().copied().collect())
            .unwrap_or_default()
    }

    pub fn median(&self, metric: Metric, kind: Kind) -> Option<f64> {
        median(&self.values(metric, kind))
    }

    fn ratio(&self, metric: Metric, over: Kind) -> Option<f64> {
        let a = self.median(metric, Kind::Mailgate)?;
        let b = self.median(metric, over)?;
        (b != 0.0).then(|| a / b)
    }

    /// The table of medians and ratios (Markdown).
    pub fn table(&self, kinds: &[Kind]) -> String {
        let mut out = String::new();
        let _ = write!(out, "| figure (median of repetitions) |");
        for k in kinds {
            let _ = write!(out, " {} |", k.name());
        }
        let ratio_cols: Vec<Kind> = kinds
            .iter()
            .copied()
            .filter(|&k| k != Kind::Mailgate && kinds.contains(&Kind::Mailgate))
            .collect();
        for k in &ratio_cols {
            let _ = write!(out, " mailgate/{} |", k.name());
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "|---|{}",
            "---:|".repeat(kinds.len() + ratio_cols.len())
        );
        for row in ROWS {
            if kinds.iter().all(|&k| self.median(row.metric, k).is_none()) {
                continue;
            }
            let _ = write!(out, "| {} |", row.label);
            for &k in kinds {
                let cell = self
                    .median(row.metric, k)
                    .map_or_else(|| "–".to_owned(), |v| format!("{v:.*}", row.decimals));
                let _ = write!(out, " {cell} |");
            }
            for &k in &ratio_cols {
                let cell = if row.ratios {
                    self.ratio(row.metric, k)
                        .map_or_else(|| "–".to_owned(), |r| format!("{r:.2}×"))
                } else {
                    "–".to_owned()
                };
                let _ = write!(out, " {cell} |");
            }
            let _ = writeln!(out);
        }
        let _ = write!(out, "| TLS negotiated |");
        for k in kinds {
            let cell = self
                .negotiated
                .get(k)
                .map_or_else(|| "–".to_owned(), ToString::to_string);
            let _ = write!(out, " {cell} |");
        }
        for _ in &ratio_cols {
            let _ = write!(out, " |");
        }
        let _ = writeln!(out);
        out
    }

    /// Every repetition's value, for the record.
    pub fn raw(&self, kinds: &[Kind]) -> String {
        let mut out = String::new();
        let _ = write!(out, "| figure |");
        for k in kinds {
            let _ = write!(out, " {} |", k.name());
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "|---|{}", "---|".repeat(kinds.len()));
        for row in ROWS {
            if kinds.iter().all(|&k| self.values(row.metric, k).is_empty()) {
                continue;
            }
            let _ = write!(out, "| {} |", row.label);
            for &k in kinds {
                let cells: Vec<String> = self
                    .values(row.metric, k)
                    .iter()
                    .map(|v| format!("{v:.*}", row.decimals.max(1)))
                    .collect();
                let _ = write!(
                    out,
                    " {} |",
                    if cells.is_empty() {
                        "–".to_owned()
                    } else {
                        cells.join(" / ")
                    }
                );
            }
            let _ = writeln!(out);
        }
        out
    }

    /// Issue 5's targets against this run's medians.
    pub fn checks(&self) -> String {
        let m = |metric| self.median(metric, Kind::Mailgate);
        let n = |metric| self.median(metric, Kind::Nginx);
        let mut rows = Vec::new();
        // CPU per repeat login.
        let cpu = m(Metric::CpuRepeat).zip(n(Metric::CpuRepeat));
        rows.push((
            "CPU per repeat login",
            "≤ 0.45 × nginx + auth service".to_owned(),
            cpu.map(|(a, b)| format!("{a:.2} ms vs {b:.2} ms = {:.2}×", a / b)),
            cpu.map(|(a, b)| a <= 0.45 * b),
        ));
        let per = m(Metric::CpuRepeatPerBackend).zip(n(Metric::CpuRepeatPerBackend));
        rows.push((
            "… each ÷ Dovecot's CPU per login ⁵",
            "≤ 0.45 × nginx's".to_owned(),
            per.map(|(a, b)| format!("{a:.3} vs {b:.3} = {:.2}×", a / b)),
            per.map(|(a, b)| a <= 0.45 * b),
        ));
        let idle = m(Metric::IdleKib);
        rows.push((
            "RSS per idle TLS session",
            "≤ 8 KiB".to_owned(),
            idle.map(|a| {
                format!(
                    "{a:.1} KiB (nginx {})",
                    n(Metric::IdleKib).map_or("–".into(), |b| format!("{b:.1} KiB"))
                )
            }),
            idle.map(|a| a <= 8.0),
        ));
        let bulk = m(Metric::BulkMibs).zip(n(Metric::BulkMibs));
        rows.push((
            "bulk FETCH throughput",
            "≥ 3 × nginx".to_owned(),
            bulk.map(|(a, b)| format!("{a:.0} vs {b:.0} MiB/s = {:.2}×", a / b)),
            bulk.map(|(a, b)| a >= 3.0 * b),
        ));
        for (metric, what) in [
            (Metric::LoginsFirst, "logins/s, first logins"),
            (Metric::LoginsRepeat, "logins/s, repeat logins"),
            (Metric::MixedOps, "ops/s, mixed workload"),
        ] {
            let pair = m(metric).zip(n(metric));
            rows.push((
                what,
                "≥ nginx (floor; noise 10–30 %)".to_owned(),
                pair.map(|(a, b)| format!("{a:.0} vs {b:.0} = {:.2}×", a / b)),
                pair.map(|(a, b)| a >= b),
            ));
            if let Some((a, b)) = pair.filter(|(a, b)| a < b && *a >= 0.9 * b) {
                rows.push((
                    "… (difference within run-to-run noise)",
                    String::new(),
                    Some(format!("{:.0} % below", (1.0 - a / b) * 100.0)),
                    None,
                ));
            }
        }
        let p99 = m(Metric::NoopP99AddedUs).zip(n(Metric::NoopP99AddedUs));
        rows.push((
            "NOOP p99 added over direct",
            "≤ nginx's (differences < 20 µs are noise)".to_owned(),
            p99.map(|(a, b)| format!("{a:+.0} µs vs {b:+.0} µs")),
            p99.map(|(a, b)| a <= b + 20.0),
        ));
        let mut table = String::from("| issue 5 target | goal | this run | |\n|---|---|---|---|\n");
        for (what, goal, got, met) in rows {
            let verdict = match (met, goal.is_empty()) {
                (Some(true), _) => "met",
                (Some(false), _) => "**missed**",
                (None, true) => "",
                (None, false) => "not measured",
            };
            let _ = writeln!(
                table,
                "| {what} | {goal} | {} | {verdict} |",
                got.unwrap_or_else(|| "–".to_owned())
            );
        }
        table
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_quantiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&sorted, 0.99), Some(99.0));
        assert_eq!(quantile(&sorted, 0.5), Some(50.0));
        assert_eq!(quantile(&sorted, 1.0), Some(100.0));
    }

    #[test]
    fn added_latency_is_per_repetition() {
        let mut r = Results::default();
        r.record(Metric::NoopP99Us, Kind::Direct, 0, 100.0);
        r.record(Metric::NoopP99Us, Kind::Direct, 1, 200.0);
        r.record(Metric::NoopP99Us, Kind::Mailgate, 0, 110.0);
        r.record(Metric::NoopP99Us, Kind::Mailgate, 1, 230.0);
        r.derive();
        assert_eq!(r.median(Metric::NoopP99AddedUs, Kind::Mailgate), Some(20.0));
        assert_eq!(r.median(Metric::NoopP99AddedUs, Kind::Direct), Some(0.0));
    }

    #[test]
    fn cpu_relative_to_the_backend_is_per_repetition() {
        let mut r = Results::default();
        // The machine slows down in repetition 1: every figure grows, the quotient does not.
        for (kind, own) in [
            (Kind::Mailgate, 0.5),
            (Kind::Nginx, 1.0),
            (Kind::MailgateB, 0.4),
        ] {
            r.record(Metric::CpuRepeat, kind, 0, own);
            r.record(Metric::BackendCpuRepeat, kind, 0, 4.0);
            r.record(Metric::CpuRepeat, kind, 1, own * 1.5);
            r.record(Metric::BackendCpuRepeat, kind, 1, 6.0);
        }
        r.derive();
        assert_eq!(
            r.median(Metric::CpuRepeatPerBackend, Kind::Mailgate),
            Some(0.125)
        );
        assert_eq!(
            r.median(Metric::CpuRepeatPerBackend, Kind::Nginx),
            Some(0.25)
        );
        let table = r.table(&[Kind::Mailgate, Kind::MailgateB, Kind::Nginx]);
        assert!(
            table.contains(
                "| target CPU per repeat login ÷ Dovecot's, same repetition ⁵ | 0.125 | 0.100 | 0.250 | 1.25× | 0.50× |"
            ),
            "{table}"
        );
        assert!(
            r.checks().contains(
                "| … each ÷ Dovecot's CPU per login ⁵ | ≤ 0.45 × nginx's | 0.125 vs 0.250 = 0.50× | **missed** |"
            ),
            "{}",
            r.checks()
        );
    }

    #[test]
    fn table_has_ratio_columns_and_checks() {
        let mut r = Results::default();
        r.record(Metric::BulkMibs, Kind::Mailgate, 0, 600.0);
        r.record(Metric::BulkMibs, Kind::Nginx, 0, 200.0);
        r.record(Metric::BulkMibs, Kind::Direct, 0, 800.0);
        let table = r.table(&[Kind::Mailgate, Kind::Nginx, Kind::Direct]);
        assert!(
            table.contains(
                "| bulk FETCH of 10 MiB message, MiB/s | 600 | 200 | 800 | 3.00× | 0.75× |"
            ),
            "{table}"
        );
        assert!(r
            .checks()
            .contains("| bulk FETCH throughput | ≥ 3 × nginx | 600 vs 200 MiB/s = 3.00× | met |"));
    }

    #[test]
    fn mixed_workload_row_and_check() {
        let mut r = Results::default();
        r.record(Metric::MixedOps, Kind::Mailgate, 0, 2850.0);
        r.record(Metric::MixedOps, Kind::Nginx, 0, 3000.0);
        r.record(Metric::MixedOps, Kind::Direct, 0, 3100.0);
        let table = r.table(&[Kind::Mailgate, Kind::Nginx, Kind::Direct]);
        assert!(
            table.contains("| ops/s, mixed workload ⁴ | 2850 | 3000 | 3100 | 0.95× | 0.92× |"),
            "{table}"
        );
        let checks = r.checks();
        assert!(
            checks.contains(
                "| ops/s, mixed workload | ≥ nginx (floor; noise 10–30 %) | 2850 vs 3000 = 0.95× | **missed** |"
            ),
            "{checks}"
        );
        assert!(
            checks.contains("| … (difference within run-to-run noise) |  | 5 % below |  |"),
            "{checks}"
        );
        r.record(Metric::MixedOps, Kind::Mailgate, 1, 3300.0);
        r.record(Metric::MixedOps, Kind::Mailgate, 2, 3200.0);
        assert!(r.checks().contains("| 3200 vs 3000 = 1.07× | met |"));
    }
}
