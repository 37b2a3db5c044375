//! A stand-in `/proc` tree for tests: never the real one.

use std::fs;
use std::path::Path;

/// Values of the project's development machine (hard RLIMIT_NOFILE 20,000, 24 GiB).
pub const THIS_MACHINE: &[(&str, &str)] = &[
    ("fs.nr_open", "1048576"),
    ("fs.file-max", "2466170"),
    ("net.core.somaxconn", "4096"),
    ("net.ipv4.tcp_max_syn_backlog", "2048"),
    ("net.ipv4.tcp_rmem", "4096\t131072\t33554432"),
    ("net.ipv4.tcp_wmem", "4096\t16384\t4194304"),
    ("net.ipv4.tcp_mem", "287898\t383867\t575796"),
    ("net.netfilter.nf_conntrack_max", "262144"),
    ("net.netfilter.nf_conntrack_buckets", "262144"),
    ("kernel.io_uring_disabled", "0"),
    ("net.ipv4.ip_local_port_range", "32768\t60999"),
    ("net.ipv4.tcp_tw_reuse", "2"),
];

/// Writes a `/proc` stand-in under `root` with `sysctls`, the given RLIMIT_NOFILE and 24 GiB.
pub fn fake_proc(root: &Path, sysctls: &[(&str, &str)], nofile_soft: u64, nofile_hard: u64) {
    for (key, value) in sysctls {
        let path = root.join("sys").join(key.replace('.', "/"));
        fs::create_dir_all(path.parent().expect("has parent")).expect("mkdir");
        fs::write(&path, format!("{value}\n")).expect("write sysctl");
    }
    fs::create_dir_all(root.join("self")).expect("mkdir self");
    fs::write(
        root.join("self/limits"),
        format!(
            "Limit                     Soft Limit           Hard Limit           Units     \n\
             Max open files            {nofile_soft:<20} {nofile_hard:<20} files     \n\
             Max locked memory         8388608              8388608              bytes     \n"
        ),
    )
    .expect("write limits");
    fs::write(
        root.join("meminfo"),
        "MemTotal:       25165824 kB\nMemFree:        1 kB\n",
    )
    .expect("write meminfo");
}

/// A sysctl's value in the stand-in, whitespace folded.
pub fn sysctl(root: &Path, key: &str) -> String {
    let text = fs::read_to_string(root.join("sys").join(key.replace('.', "/"))).expect("read");
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
