//! Reading a live host: Linux through a `/proc` root (the real one, or a directory a test
//! made), FreeBSD through `sysctl(8)` and `procstat(1)` output. Parsing is OS-independent and
//! tested on every host; only choosing the FreeBSD commands at run time is FreeBSD-specific.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::ceiling::LiveLimits;
use crate::error::HostError;
use crate::model::Os;

/// What a live host says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveHost {
    /// Limits that bound connections.
    pub limits: LiveLimits,
    /// Raw values of the settings read, by their sysctl name; absent names are not present on
    /// the host (e.g. conntrack not loaded).
    pub values: BTreeMap<String, String>,
    /// RLIMIT_MEMLOCK (soft, hard) of the process, bytes; `u64::MAX` is unlimited.
    pub memlock: Option<(u64, u64)>,
    /// Whether an io_uring instance could be set up (Linux only; `None` if not probed).
    pub io_uring: Option<Result<(), String>>,
    /// The process whose limits were read (`None`: hop-tune itself).
    pub pid: Option<u32>,
}

/// A Linux `/proc` tree: `/proc` itself or a stand-in directory with the same layout.
#[derive(Clone, Debug)]
pub struct ProcRoot {
    root: PathBuf,
}

impl ProcRoot {
    /// A `/proc` tree at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of sysctl `key` (`fs.nr_open` is `sys/fs/nr_open`).
    pub fn sysctl_path(&self, key: &str) -> PathBuf {
        self.root.join("sys").join(key.replace('.', "/"))
    }

    /// Value of sysctl `key` with whitespace runs folded to one space; `None` if absent.
    pub fn read_sysctl(&self, key: &str) -> Result<Option<String>, HostError> {
        let path = self.sysctl_path(key);
        match fs::read_to_string(&path) {
            Ok(text) => Ok(Some(normalize(&text))),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(HostError::io(path, error)),
        }
    }

    /// Reads the limits of process `pid` (hop-tune itself if `None`), memory and the sysctls
    /// named in `keys`.
    pub fn read_live(&self, keys: &[&str], pid: Option<u32>) -> Result<LiveHost, HostError> {
        let mut values = BTreeMap::new();
        for key in keys {
            if let Some(value) = self.read_sysctl(key)? {
                values.insert((*key).to_string(), value);
            }
        }
        let process = pid.map_or_else(|| "self".to_string(), |p| p.to_string());
        let limits_path = self.root.join(&process).join("limits");
        let limits_text = read(&limits_path)?;
        let rlimits = parse_proc_limits(&limits_text)?;
        let (nofile_soft, nofile_hard) =
            *rlimits
                .get("Max open files")
                .ok_or_else(|| HostError::Parse {
                    what: limits_path.display().to_string(),
                    text: "no \"Max open files\" line".to_string(),
                })?;
        let meminfo_path = self.root.join("meminfo");
        let memory_bytes =
            parse_meminfo(&read(&meminfo_path)?).ok_or_else(|| HostError::Parse {
                what: meminfo_path.display().to_string(),
                text: "no MemTotal line".to_string(),
            })?;
        let int = |key: &str| values.get(key).and_then(|v| v.parse::<u64>().ok());
        let limits = LiveLimits {
            os: Os::Linux,
            nofile_soft,
            nofile_hard,
            files_per_process_max: int("fs.nr_open"),
            files_system_max: int("fs.file-max"),
            sockets_system_max: None,
            conntrack_max: int("net.netfilter.nf_conntrack_max"),
            memory_bytes,
        };
        Ok(LiveHost {
            limits,
            values,
            memlock: rlimits.get("Max locked memory").copied(),
            io_uring: None,
            pid,
        })
    }
}

/// Reads a FreeBSD host with `sysctl -i` and `procstat -l`. Runs commands; compiled on every
/// OS so that it type-checks here, called only on FreeBSD.
pub fn read_freebsd(keys: &[&str], pid: Option<u32>) -> Result<LiveHost, HostError> {
    let mut names: Vec<&str> = keys.to_vec();
    names.extend(["hw.physmem", "kern.openfiles", "kern.ipc.numopensockets"]);
    let sysctl_text = run("sysctl", &[&["-i"], names.as_slice()].concat())?;
    let values = parse_sysctl_output(&sysctl_text);
    let process = pid.unwrap_or_else(std::process::id).to_string();
    let procstat_text = run("procstat", &["-l", &process])?;
    let limits = freebsd_limits(&values, &procstat_text)?;
    Ok(LiveHost {
        limits,
        values,
        memlock: None,
        io_uring: None,
        pid,
    })
}

/// Builds FreeBSD limits from `sysctl` values and `procstat -l` output.
pub fn freebsd_limits(
    values: &BTreeMap<String, String>,
    procstat_text: &str,
) -> Result<LiveLimits, HostError> {
    let int = |key: &str| values.get(key).and_then(|v| v.parse::<u64>().ok());
    let (nofile_soft, nofile_hard) = parse_procstat_openfiles(procstat_text)?;
    let memory_bytes = int("hw.physmem").ok_or_else(|| HostError::Parse {
        what: "sysctl hw.physmem".to_string(),
        text: values.get("hw.physmem").cloned().unwrap_or_default(),
    })?;
    Ok(LiveLimits {
        os: Os::FreeBsd,
        nofile_soft,
        nofile_hard,
        files_per_process_max: int("kern.maxfilesperproc"),
        files_system_max: int("kern.maxfiles"),
        sockets_system_max: int("kern.ipc.maxsockets"),
        conntrack_max: None,
        memory_bytes,
    })
}

/// Probes whether this process can set up an io_uring instance (seccomp filters and
/// `kernel.io_uring_disabled` both show up here).
#[cfg(target_os = "linux")]
pub fn probe_io_uring() -> Result<(), String> {
    io_uring::IoUring::new(2)
        .map(drop)
        .map_err(|error| error.to_string())
}

/// Parses `/proc/<pid>/limits` into `name -> (soft, hard)`; `unlimited` is `u64::MAX`.
pub fn parse_proc_limits(text: &str) -> Result<BTreeMap<String, (u64, u64)>, HostError> {
    let mut limits = BTreeMap::new();
    for line in text.lines().skip(1) {
        // Columns are aligned: the name is everything before the first run of two spaces.
        let Some(split) = line.find("  ") else {
            continue;
        };
        let name = line[..split].trim();
        let mut fields = line[split..].split_whitespace();
        let (Some(soft), Some(hard)) = (fields.next(), fields.next()) else {
            continue;
        };
        let number = |text: &str| -> Result<u64, HostError> {
            if text == "unlimited" {
                return Ok(u64::MAX);
            }
            text.parse().map_err(|_| HostError::Parse {
                what: format!("limits line {name:?}"),
                text: line.to_string(),
            })
        };
        limits.insert(name.to_string(), (number(soft)?, number(hard)?));
    }
    Ok(limits)
}

/// `MemTotal` of `/proc/meminfo`, bytes.
pub fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut fields = line.split_whitespace().skip(1);
    let kib: u64 = fields.next()?.parse().ok()?;
    (fields.next() == Some("kB")).then_some(kib * 1024)
}

/// Parses `sysctl` output (`name: value` lines, as `sysctl -a` prints them). Lines that do not
/// start a new name continue the previous value (e.g. `kern.version`); `#` lines are comments.
pub fn parse_sysctl_output(text: &str) -> BTreeMap<String, String> {
    let mut values = BTreeMap::new();
    let mut last: Option<String> = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        match line.split_once(": ") {
            Some((name, value)) if is_sysctl_name(name) => {
                values.insert(name.to_string(), normalize(value));
                last = Some(name.to_string());
            }
            _ => {
                if let Some(entry) = last.as_ref().and_then(|name| values.get_mut(name)) {
                    let more = normalize(line);
                    if !more.is_empty() {
                        entry.push(' ');
                        entry.push_str(&more);
                    }
                }
            }
        }
    }
    values
}

/// The `openfiles` soft and hard limit from `procstat -l` output.
pub fn parse_procstat_openfiles(text: &str) -> Result<(u64, u64), HostError> {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().any(|w| w == "openfiles"))
        .ok_or_else(|| HostError::Parse {
            what: "procstat -l".to_string(),
            text: "no openfiles line".to_string(),
        })?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let number = |text: &str| -> Result<u64, HostError> {
        if text == "infinity" {
            return Ok(u64::MAX);
        }
        text.parse().map_err(|_| HostError::Parse {
            what: "procstat -l openfiles".to_string(),
            text: line.to_string(),
        })
    };
    match fields.as_slice() {
        [.., soft, hard] => Ok((number(soft)?, number(hard)?)),
        _ => Err(HostError::Parse {
            what: "procstat -l".to_string(),
            text: line.to_string(),
        }),
    }
}

fn is_sysctl_name(name: &str) -> bool {
    name.contains('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '%'))
}

fn normalize(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn read(path: &Path) -> Result<String, HostError> {
    fs::read_to_string(path).map_err(|error| HostError::io(path, error))
}

fn run(program: &str, args: &[&str]) -> Result<String, HostError> {
    let command = format!("{program} {}", args.join(" "));
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|error| HostError::Command {
            command: command.clone(),
            detail: error.to_string(),
        })?;
    if !output.status.success() {
        return Err(HostError::Command {
            command,
            detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: &str = "\
Limit                     Soft Limit           Hard Limit           Units     
Max cpu time              unlimited            unlimited            seconds   
Max open files            20000                20000                files     
Max locked memory         8388608              8388608              bytes     
";

    #[test]
    fn parses_proc_limits() {
        let limits = parse_proc_limits(LIMITS).expect("parses");
        assert_eq!(limits["Max open files"], (20_000, 20_000));
        assert_eq!(limits["Max cpu time"], (u64::MAX, u64::MAX));
        assert_eq!(limits["Max locked memory"], (8_388_608, 8_388_608));
    }

    #[test]
    fn parses_meminfo() {
        let text = "MemTotal:       24684084 kB\nMemFree:        1 kB\n";
        assert_eq!(parse_meminfo(text), Some(24_684_084 * 1024));
        assert_eq!(parse_meminfo("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn parses_multiline_sysctl_values() {
        let text = "kern.version: FreeBSD 14.1-RELEASE\n  GENERIC\n\nkern.maxfiles: 12345\n";
        let values = parse_sysctl_output(text);
        assert_eq!(values["kern.version"], "FreeBSD 14.1-RELEASE GENERIC");
        assert_eq!(values["kern.maxfiles"], "12345");
    }

    #[test]
    fn parses_procstat_openfiles() {
        let text = "  PID COMM             RLIMIT                  SOFT             HARD\n\
                    \x20 812 sh               openfiles              58311            58311\n";
        assert_eq!(
            parse_procstat_openfiles(text).expect("parses"),
            (58_311, 58_311)
        );
        assert!(parse_procstat_openfiles("nothing\n").is_err());
    }
}
