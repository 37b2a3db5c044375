//! Rendered files are pinned by golden files in tests/golden/, and the copies checked in for
//! sysadmins (freebsd/profiles/, deploy/linux/) must equal them.
//!
//! After an intended change to the model or the templates:
//! `UPDATE_GOLDEN=1 cargo test -p hop-tune --test golden`, then review the diff.

use std::fs;
use std::path::{Path, PathBuf};

use hop_tune::model::{plan, Backend, Os, Role, Target};
use hop_tune::render::render;

const GIB: u64 = 1024 * 1024 * 1024;

struct Profile {
    name: &'static str,
    os: Os,
    connections: u64,
    /// Where the sysadmin copy lives, relative to the workspace root.
    deployed: &'static str,
}

const PROFILES: &[Profile] = &[
    Profile {
        name: "freebsd-1m",
        os: Os::FreeBsd,
        connections: 1_000_000,
        deployed: "freebsd/profiles/1m",
    },
    Profile {
        name: "freebsd-2m",
        os: Os::FreeBsd,
        connections: 2_000_000,
        deployed: "freebsd/profiles/2m",
    },
    Profile {
        name: "linux-2m",
        os: Os::Linux,
        connections: 2_000_000,
        deployed: "deploy/linux",
    },
];

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rendered(profile: &Profile) -> Vec<(String, String)> {
    let target = Target::new(
        profile.connections,
        64 * GIB,
        Role::Server,
        profile.os,
        16,
        // What hopd runs on that OS, as `hop-tune render` assumes without --backend.
        Backend::default_for(profile.os),
    )
    .expect("valid target");
    render(&plan(target))
        .into_iter()
        .map(|f| (f.path.to_string(), f.contents))
        .collect()
}

fn compare_or_update(dir: &Path, files: &[(String, String)]) {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for (path, contents) in files {
        let file = dir.join(path);
        if update {
            fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
            fs::write(&file, contents).expect("write golden");
            continue;
        }
        let expected = fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{}: {e}; run with UPDATE_GOLDEN=1", file.display()));
        assert_eq!(
            &expected,
            contents,
            "{} differs from the rendered output",
            file.display()
        );
    }
}

#[test]
fn rendered_files_match_the_golden_files() {
    for profile in PROFILES {
        compare_or_update(
            &crate_dir().join("tests/golden").join(profile.name),
            &rendered(profile),
        );
    }
}

#[test]
fn deployed_copies_match_the_rendered_files() {
    let root = crate_dir().parent().expect("workspace root").to_path_buf();
    for profile in PROFILES {
        compare_or_update(&root.join(profile.deployed), &rendered(profile));
    }
}

#[test]
fn rendering_is_deterministic() {
    for profile in PROFILES {
        assert_eq!(rendered(profile), rendered(profile));
    }
}

/// The famous published FreeBSD loader.conf for 2 million connections: every capacity
/// setting it made is carried, with a value from hop's model, and the rest are named with the
/// reason they are left at the defaults.
#[test]
fn freebsd_two_million_carries_whatsapps_loader_conf() {
    let files = rendered(&PROFILES[1]);
    let loader = &files
        .iter()
        .find(|(path, _)| path == "loader.conf")
        .expect("loader.conf")
        .1;
    let value = |key: &str| -> u64 {
        let line = loader
            .lines()
            .find(|l| l.starts_with(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key} missing from loader.conf"));
        line.split('"')
            .nth(1)
            .expect("quoted")
            .parse()
            .expect("number")
    };
    for key in [
        "kern.maxfiles",
        "kern.maxfilesperproc",
        "kern.ipc.maxsockets",
        "net.inet.tcp.tcbhashsize",
        "net.inet.tcp.hostcache.hashsize",
        "net.inet.tcp.hostcache.cachelimit",
        "net.inet.tcp.hostcache.bucketlimit",
    ] {
        assert!(value(key) > 0, "{key}");
    }
    for key in [
        "kern.maxproc",
        "kern.timecounter.smp_tsc",
        "kern.hwpmc.nbuffers",
        "kern.hwpmc.nsamples",
    ] {
        assert!(
            loader.contains(&format!("#   {key}")) || loader.contains(&format!(", {key}:")),
            "{key}"
        );
    }
    // Ordering rules the kernel enforces.
    assert!(value("kern.ipc.maxsockets") <= value("kern.maxfiles"));
    assert!(value("kern.maxfilesperproc") <= value("kern.maxfiles"));
    assert!(value("kern.maxfilesperproc") >= 2_000_000);
    assert!(value("net.inet.tcp.tcbhashsize").is_power_of_two());
    assert!(value("net.inet.tcp.hostcache.hashsize").is_power_of_two());
}
