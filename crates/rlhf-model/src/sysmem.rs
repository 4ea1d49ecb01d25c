//! Memory this process can still get: the kernel's `MemAvailable`, or less where a cgroup
//! above the process (a container's, a job scheduler's) sets a lower limit. The training
//! stages plan gradient checkpointing from it (`rlhf_train::memory`); generation bounds the
//! weights it packs for decoding by it ([`crate::kernels::packed`]).

use std::path::{Path, PathBuf};

const GIB: f64 = (1u64 << 30) as f64;

/// Memory this process can still get, GiB: the kernel's `MemAvailable`, or less where a
/// cgroup above the process (a container's, a job scheduler's) sets a lower limit (its limit
/// less its usage, the leaf's inactive page cache counted as free), or less where
/// `RLHF_MEMORY_GIB` says so (a machine shared with jobs that will grow: plan as if at most
/// that much were free). `None` where none of them can be read.
pub fn available_memory_gib() -> Option<f64> {
    let cap = std::env::var("RLHF_MEMORY_GIB")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|g| *g > 0.0);
    match (measured_gib(), cap) {
        (Some(m), Some(c)) => Some(m.min(c)),
        (m, c) => m.or(c),
    }
}

/// [`available_memory_gib`] without the `RLHF_MEMORY_GIB` cap.
fn measured_gib() -> Option<f64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024.0)
    });
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| cgroup_headroom(Path::new("/sys/fs/cgroup"), &c));
    let bytes = match (meminfo, cgroup) {
        (Some(m), Some(c)) => m.min(c),
        (m, c) => m.or(c)?,
    };
    Some(bytes / GIB)
}

/// The least headroom (limit − usage, bytes) over the memory cgroup of `proc_cgroup` (the
/// contents of `/proc/self/cgroup`) and the cgroups above it, under the hierarchy mounted at
/// `root`: cgroup v2 (`memory.max`, `memory.current`) or v1 (`memory/memory.limit_in_bytes`,
/// `memory.usage_in_bytes`). The leaf's inactive file pages count as free (the kernel
/// reclaims them before it kills). `None` where no level sets a limit.
pub fn cgroup_headroom(root: &Path, proc_cgroup: &str) -> Option<f64> {
    // v1: "4:memory:/path" (the controllers may be a list); v2: "0::/path".
    let v1 = proc_cgroup.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then_some(path)
    });
    let (base, path, files) = match v1 {
        Some(p) => (
            root.join("memory"),
            p,
            (
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                "total_inactive_file",
            ),
        ),
        None => {
            let p = proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
            (
                root.to_path_buf(),
                p,
                ("memory.max", "memory.current", "inactive_file"),
            )
        }
    };
    // Inside a cgroup namespace the path may not exist under the mount: its root is then the
    // process's own cgroup.
    let mut dir: PathBuf = base.join(path.trim_start_matches('/'));
    if !dir.is_dir() {
        dir = base.clone();
    }
    let read = |d: &Path, f: &str| -> Option<f64> {
        let s = std::fs::read_to_string(d.join(f)).ok()?;
        s.trim().parse::<f64>().ok()
    };
    let mut least: Option<f64> = None;
    let mut leaf = true;
    loop {
        if let (Some(limit), Some(usage)) = (read(&dir, files.0), read(&dir, files.1)) {
            // v1 says "no limit" with a huge number (2⁶³ rounded to pages); v2 with "max",
            // which does not parse.
            if limit < 1e18 {
                let inactive = match leaf {
                    true => std::fs::read_to_string(dir.join("memory.stat"))
                        .ok()
                        .and_then(|s| {
                            s.lines().find_map(|l| {
                                let (k, v) = l.split_once(' ')?;
                                (k == files.2).then(|| v.trim().parse::<f64>().ok())?
                            })
                        })
                        .unwrap_or(0.0),
                    false => 0.0,
                };
                let room = (limit - usage + inactive).max(0.0);
                least = Some(least.map_or(room, |l: f64| l.min(room)));
            }
        }
        leaf = false;
        if dir == base || !dir.pop() || !dir.starts_with(&base) {
            break;
        }
    }
    least
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_headroom_takes_the_tightest_limit_above_the_process() {
        let root = std::env::temp_dir().join(format!("rlhf-cgroup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let write = |p: &Path, f: &str, s: &str| {
            std::fs::create_dir_all(p).unwrap();
            std::fs::write(p.join(f), s).unwrap();
        };
        // v2: a job limited to 8 GiB inside a container limited to 6 GiB; the job uses 3 of
        // which 1 is inactive page cache, the container 4 in all.
        let g = 1u64 << 30;
        let job = root.join("v2/box/job");
        write(&job, "memory.max", &format!("{}\n", 8 * g));
        write(&job, "memory.current", &format!("{}\n", 3 * g));
        write(&job, "memory.stat", &format!("anon 1\ninactive_file {g}\n"));
        let up = root.join("v2/box");
        write(&up, "memory.max", &format!("{}\n", 6 * g));
        write(&up, "memory.current", &format!("{}\n", 4 * g));
        write(&root.join("v2"), "memory.max", "max\n");
        let room = cgroup_headroom(&root.join("v2"), "0::/box/job\n").unwrap();
        assert_eq!(room, (2 * g) as f64); // the container's 6 − 4; the job has 8 − 3 + 1
        write(&up, "memory.max", "max\n");
        let room = cgroup_headroom(&root.join("v2"), "0::/box/job\n").unwrap();
        assert_eq!(room, (6 * g) as f64);
        // v1, as on this project's machines: no limit anywhere reads as none.
        let v1 = root.join("v1/memory/process_api/abc");
        write(&v1, "memory.limit_in_bytes", "9223372036854771712\n");
        write(&v1, "memory.usage_in_bytes", "2559991808\n");
        let lines = "9:name=systemd:/\n4:memory,hugetlb:/process_api/abc\n0::/\n";
        assert_eq!(cgroup_headroom(&root.join("v1"), lines), None);
        write(&v1, "memory.limit_in_bytes", &format!("{}\n", 4 * g));
        write(&v1, "memory.usage_in_bytes", &format!("{}\n", g));
        write(
            &v1,
            "memory.stat",
            &format!("cache 5\ntotal_inactive_file {g}\n"),
        );
        assert_eq!(
            cgroup_headroom(&root.join("v1"), lines),
            Some((4 * g) as f64)
        );
        // A namespaced path that does not exist under the mount: the mount's root is the
        // process's cgroup.
        assert_eq!(
            cgroup_headroom(&root.join("v1"), "4:memory:/elsewhere\n"),
            None
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
