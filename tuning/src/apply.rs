//! `hop-tune apply`: raise the live run-time settings to the plan. A dry run unless told
//! `--yes`; never lowers a value; writes a rollback file (old values, sysctl.conf format)
//! before it changes anything.

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::path::Path;
use std::process::Command;

use crate::error::HostError;
use crate::live::ProcRoot;
use crate::model::{Os, Place, Plan, Rule, Setting};
use crate::render::command_line;

/// Reads and writes run-time sysctls.
pub trait SysctlStore {
    /// Current value, whitespace folded; `None` if the host has no such setting.
    fn read(&self, key: &str) -> Result<Option<String>, HostError>;
    /// Sets a value.
    fn write(&mut self, key: &str, value: &str) -> Result<(), HostError>;
}

impl SysctlStore for ProcRoot {
    fn read(&self, key: &str) -> Result<Option<String>, HostError> {
        self.read_sysctl(key)
    }

    fn write(&mut self, key: &str, value: &str) -> Result<(), HostError> {
        let path = self.sysctl_path(key);
        // /proc/sys files take tabs or spaces between the fields of a vector value.
        fs::write(&path, format!("{value}\n")).map_err(|error| HostError::io(path, error))
    }
}

/// FreeBSD run-time sysctls through sysctl(8).
#[derive(Debug, Default)]
pub struct FreeBsdSysctl;

impl SysctlStore for FreeBsdSysctl {
    fn read(&self, key: &str) -> Result<Option<String>, HostError> {
        let output = Command::new("sysctl")
            .args(["-n", key])
            .output()
            .map_err(|error| HostError::Command {
                command: format!("sysctl -n {key}"),
                detail: error.to_string(),
            })?;
        if !output.status.success() {
            return Ok(None);
        }
        let text = String::from_utf8_lossy(&output.stdout);
        Ok(Some(text.split_whitespace().collect::<Vec<_>>().join(" ")))
    }

    fn write(&mut self, key: &str, value: &str) -> Result<(), HostError> {
        let assignment = format!("{key}={value}");
        let output = Command::new("sysctl")
            .arg(&assignment)
            .output()
            .map_err(|error| HostError::Command {
                command: format!("sysctl {assignment}"),
                detail: error.to_string(),
            })?;
        if output.status.success() {
            Ok(())
        } else {
            Err(HostError::Command {
                command: format!("sysctl {assignment}"),
                detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            })
        }
    }
}

/// What apply does with one setting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Raise from the live value to a higher one.
    Raise {
        /// Live value.
        from: String,
        /// New value (never lower than `from`, element by element).
        to: String,
    },
    /// Leave as is.
    Keep {
        /// Live value.
        current: String,
        /// Why.
        why: &'static str,
    },
    /// The host has no such setting.
    Absent,
    /// Not a run-time sysctl: the sysadmin installs a rendered file.
    Manual {
        /// What to do.
        how: &'static str,
    },
}

/// One line of an apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// Setting name.
    pub key: &'static str,
    /// The action.
    pub action: Action,
}

/// Decides, for every setting of the plan, what apply would do on the host behind `store`.
pub fn plan_changes(plan: &Plan, store: &dyn SysctlStore) -> Result<Vec<Change>, HostError> {
    let runtime_place = match plan.target.os() {
        Os::Linux => Place::SysctlD,
        Os::FreeBsd => Place::SysctlConf,
    };
    let mut changes = Vec::new();
    for setting in &plan.settings {
        let action = if setting.place == runtime_place {
            match store.read(setting.key)? {
                None => Action::Absent,
                Some(current) => decide(setting, current),
            }
        } else {
            match setting.place {
                Place::SystemdUnit => Action::Manual {
                    how: "install the rendered hopd.service.d/10-hop-limits.conf",
                },
                Place::LoaderConf => Action::Manual {
                    how: "boot-time: install the rendered loader.conf, reboot",
                },
                Place::LoginConf => Action::Manual {
                    how: "install the rendered login.conf class, cap_mkdb /etc/login.conf",
                },
                _ => continue,
            }
        };
        changes.push(Change {
            key: setting.key,
            action,
        });
    }
    Ok(changes)
}

fn decide(setting: &Setting, current: String) -> Action {
    let live: Option<Vec<u64>> = current.split_whitespace().map(|w| w.parse().ok()).collect();
    let wanted = setting.value.ints();
    let Some(live) = live.filter(|l| l.len() == wanted.len()) else {
        return Action::Keep {
            current,
            why: "not in the expected form; left for a person",
        };
    };
    let raised: Vec<u64> = match setting.rule {
        Rule::AtMost => {
            let why = if live.last() <= wanted.last() {
                "already within hop's cap"
            } else {
                "above hop's cap; apply never lowers a value: install the rendered profile to cap it"
            };
            return Action::Keep { current, why };
        }
        Rule::AtLeast | Rule::Equals => live.iter().zip(&wanted).map(|(l, w)| *l.max(w)).collect(),
        Rule::Covers => match (live.as_slice(), wanted.as_slice()) {
            ([low, high], [want_low, want_high]) => vec![*low.min(want_low), *high.max(want_high)],
            // A single value is the lower end of a range (FreeBSD portrange.first).
            ([first], [want_first]) => vec![*first.min(want_first)],
            _ => live.clone(),
        },
    };
    if raised == live {
        return Action::Keep {
            current,
            why: "already at or above the profile",
        };
    }
    let to = raised
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    debug_assert!(setting.rule == Rule::Covers || raised.iter().zip(&live).all(|(r, l)| r >= l));
    Action::Raise { from: current, to }
}

/// The changes as a diff, with kept and manual settings listed below it.
pub fn render_diff(changes: &[Change]) -> String {
    let mut out = String::from("--- live\n+++ hop profile\n");
    for change in changes {
        if let Action::Raise { from, to } = &change.action {
            let _ = writeln!(out, "-{} = {from}\n+{} = {to}", change.key, change.key);
        }
    }
    for change in changes {
        match &change.action {
            Action::Raise { .. } => {}
            Action::Keep { current, why } => {
                let _ = writeln!(out, " {} = {current}    (kept: {why})", change.key);
            }
            Action::Absent => {
                let _ = writeln!(out, " {}    (not on this host; skipped)", change.key);
            }
            Action::Manual { how } => {
                let _ = writeln!(out, " {}    (not a run-time sysctl: {how})", change.key);
            }
        }
    }
    out
}

/// The rollback file: the old values of every setting apply raises, in sysctl.conf format.
pub fn rollback_text(plan: &Plan, changes: &[Change]) -> String {
    let restore = match plan.target.os() {
        Os::Linux => "sysctl -p FILE",
        Os::FreeBsd => "sysctl -f FILE",
    };
    let mut out = format!(
        "# hop-tune apply rollback: the values before applying `{}`.\n\
         # Restore with `{restore}`.\n",
        command_line(plan).replacen("render", "apply", 1)
    );
    for change in changes {
        if let Action::Raise { from, .. } = &change.action {
            let _ = writeln!(out, "{} = {from}", change.key);
        }
    }
    out
}

/// Writes the rollback file (refusing to overwrite one), then raises every setting. Returns
/// how many settings were changed.
pub fn apply_changes(
    plan: &Plan,
    changes: &[Change],
    store: &mut dyn SysctlStore,
    rollback_path: &Path,
) -> Result<usize, HostError> {
    let raises: Vec<(&str, &str)> = changes
        .iter()
        .filter_map(|c| match &c.action {
            Action::Raise { to, .. } => Some((c.key, to.as_str())),
            _ => None,
        })
        .collect();
    if raises.is_empty() {
        return Ok(0);
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(rollback_path)
        .map_err(|error| match error.kind() {
            io::ErrorKind::AlreadyExists => HostError::RollbackExists(rollback_path.to_path_buf()),
            _ => HostError::io(rollback_path, error),
        })?;
    file.write_all(rollback_text(plan, changes).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|error| HostError::io(rollback_path, error))?;
    for (key, value) in &raises {
        store.write(key, value)?;
    }
    Ok(raises.len())
}
