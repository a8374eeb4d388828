//! Process figures from `/proc`: a process tree, its CPU time and its resident memory.
//!
//! CPU of a tree is the sum over its live processes of utime + stime + cutime + cstime: a child
//! that exited and was reaped is in its parent's cutime/cstime, a live one only in its own
//! utime/stime, so nothing is counted twice and short-lived session processes (Dovecot forks
//! one per login) are not lost.

use std::collections::HashMap;
use std::process::Command;

use anyhow::{Context as _, Result};

/// Clock ticks per second of the utime/stime fields (`getconf CLK_TCK`, almost always 100).
pub fn clock_ticks() -> Result<u64> {
    let out = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .context("getconf CLK_TCK")?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("getconf CLK_TCK: not a number")
}

/// The fields of `/proc/PID/stat` after the command name, which may hold spaces and parens.
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = text.get(text.rfind(')')? + 1..)?;
    // Field 3 (state) is a letter: numbered from field 4 (ppid) on, so index k is field k + 4.
    Some(
        rest.split_ascii_whitespace()
            .skip(1)
            .map(|f| f.parse::<i64>().map_or(0, |v| v.max(0) as u64))
            .collect(),
    )
}

/// `root` and every live descendant.
pub fn tree(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.filter_map(Result::ok) {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ppid) = stat_fields(pid).and_then(|f| f.first().copied()) {
                children.entry(ppid as u32).or_default().push(pid);
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while let Some(&pid) = out.get(i) {
        if let Some(kids) = children.get(&pid) {
            out.extend(kids);
        }
        i += 1;
    }
    out
}

/// CPU ticks (user + system, own + reaped children) of the tree under `root`.
pub fn cpu_ticks(root: u32) -> u64 {
    let (user, system) = cpu_ticks_split(root);
    user + system
}

/// CPU ticks of the tree under `root` as (user, system), own + reaped children each.
pub fn cpu_ticks_split(root: u32) -> (u64, u64) {
    tree(root)
        .into_iter()
        .filter_map(stat_fields)
        // utime, stime, cutime, cstime are fields 14..=17.
        .map(|f| match f.get(10..14) {
            Some(&[utime, stime, cutime, cstime]) => (utime + cutime, stime + cstime),
            _ => (0, 0),
        })
        .fold((0, 0), |(u, s), (fu, fs)| (u + fu, s + fs))
}

/// Resident memory (KiB, `VmRSS`) summed over the tree under `root`.
pub fn rss_kib(root: u32) -> u64 {
    tree(root)
        .into_iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_ascii_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

/// Whether a process with this pid exists.
pub fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_seen() {
        let me = std::process::id();
        assert!(tree(me).contains(&me));
        assert!(rss_kib(me) > 0);
        assert!(alive(me));
        let ticks = cpu_ticks(me);
        // Burn a little CPU: the figure only grows.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(cpu_ticks(me) >= ticks);
    }
}
