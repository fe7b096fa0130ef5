//! `install`: puts the binary, the systemd unit, a commented default config, the man pages and
//! shell completions in place. `--root` installs into a staging tree for packaging.

use std::{
    fs,
    io::ErrorKind,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use clap::CommandFactory as _;
use clap_complete::Shell;

use crate::{
    cli::{Cli, DEFAULT_RUNTIME_DIR, InstallArgs},
    error::{Error, usage},
};

/// The systemd unit shipped in `deploy/systemd/`.
pub const UNIT: &str = include_str!("../../deploy/systemd/keepalive-agent.service");
/// The commented default config shipped in `deploy/`.
pub const DEFAULT_CONFIG_TEXT: &str = include_str!("../../deploy/config.toml");
/// Where the unit expects the binary.
const UNIT_BINARY: &str = "/usr/local/sbin/keepalive-agent";

/// Why the agent would refuse the config file kept at `config`: on the host, as `run` judges
/// it; below a staging root, by its mode alone, as the owners there are the package's to set.
fn staged_reason(root: &Path, config: &Path) -> Option<String> {
    // A root that leads to `/` (`/tmp/..`) is the host, as xtask takes it.
    if let Some(reason) = crate::config::refused_kind(config) {
        return Some(reason);
    }
    let root = fs::canonicalize(root).unwrap_or_else(|_| root.to_owned());
    if root.components().eq(Path::new("/").components()) {
        crate::config::refused_owner(config)
    } else {
        crate::config::refused_mode(config)
    }
}

fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn write(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|err| fs_error(dir, err))?;
    }
    let tmp = path.with_extension("keepalive-new");
    fs::write(&tmp, contents).map_err(|err| fs_error(&tmp, err))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
        .with_context(|| format!("failed to set permissions on {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("failed to install {}", path.display()))
}

/// Writes `contents` to `path` unless it holds them already (then only its mode is set);
/// returns whether it wrote, and the line that says which: `installed` (new), `replaced`
/// (other contents) or `unchanged`.
fn put(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<(bool, String)> {
    let verb = match fs::read(path) {
        Ok(old) if old == contents => {
            fs::set_permissions(path, fs::Permissions::from_mode(mode))
                .with_context(|| format!("failed to set permissions on {}", path.display()))?;
            return Ok((false, format!("unchanged {}", path.display())));
        }
        Ok(_) => "replaced",
        Err(_) => "installed",
    };
    write(path, contents, mode)?;
    Ok((true, format!("{verb} {}", path.display())))
}

fn fs_error(path: &Path, err: std::io::Error) -> anyhow::Error {
    if err.kind() == ErrorKind::PermissionDenied {
        Error::Permission(format!(
            "permission denied writing {}; install as root or pass --root DIR",
            path.display()
        ))
        .into()
    } else {
        anyhow::Error::new(err).context(format!("failed to write {}", path.display()))
    }
}

/// Keeps the config that `--force-config` is about to replace as `config.toml.bak` beside it,
/// so a config with policies is not lost to the flag: one copy, the latest (as dpkg's
/// `.dpkg-old`), a hard link, so it keeps the owner and mode. A config that is missing or is
/// the default already needs none.
fn save_replaced(config: &Path) -> anyhow::Result<Option<PathBuf>> {
    match fs::read(config) {
        Ok(old) if old != DEFAULT_CONFIG_TEXT.as_bytes() => {}
        Ok(_) => return Ok(None),
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(fs_error(config, err)),
    }
    let mut name = config.as_os_str().to_owned();
    name.push(".bak");
    let saved = PathBuf::from(name);
    match fs::remove_file(&saved) {
        Err(err) if err.kind() != ErrorKind::NotFound => return Err(fs_error(&saved, err)),
        _ => {}
    }
    fs::hard_link(config, &saved).map_err(|err| fs_error(&saved, err))?;
    Ok(Some(saved))
}

/// The unit text with `ExecStart` and `ExecReload` pointing at `binary`.
pub fn unit_for(binary: &Path) -> String {
    UNIT.replace(UNIT_BINARY, &binary.display().to_string())
}

/// Writes one man page per (sub)command into `dir`, which must exist.
pub fn write_man_pages(dir: &Path) -> anyhow::Result<()> {
    // As clap_mangen's generate_to, but each page written as the other files are: readable by
    // everyone, also over a page an older install left with a narrower mode.
    fn pages(cmd: clap::Command, dir: &Path) -> anyhow::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
            pages(sub, dir)?;
        }
        let man = clap_mangen::Man::new(cmd);
        let mut page = Vec::new();
        man.render(&mut page)?;
        put(&dir.join(man.get_filename()), &page, 0o644).map(drop)
    }
    let mut cmd = crate::cli::finish(Cli::command().disable_help_subcommand(true));
    cmd.build();
    pages(cmd, dir).with_context(|| format!("failed to write man pages to {}", dir.display()))
}

/// The completion script for `shell`.
pub fn completion_script(shell: Shell) -> Vec<u8> {
    let mut script = Vec::new();
    let mut cmd = crate::cli::for_completions(Cli::command());
    clap_complete::generate(shell, &mut cmd, "keepalive-agent", &mut script);
    script
}

/// Refuses `--state-dir` and a `--runtime-dir` other than the default for `install`, before
/// anything is written: the unit it installs runs the agent with neither, so taking them
/// silently would install a service that keeps its state elsewhere than the operator said.
pub fn refuse_directories(state_dir: Option<&Path>, runtime_dir: &Path) -> anyhow::Result<()> {
    if let Some(dir) = state_dir {
        return Err(usage(format!(
            "install does not take --state-dir (or KEEPALIVE_STATE_DIR, here {}): the installed \
             service reads its state directory from {}; set state_dir there, where status, \
             detach and check find it too",
            dir.display(),
            crate::config::DEFAULT_CONFIG
        )));
    }
    if runtime_dir != Path::new(DEFAULT_RUNTIME_DIR) {
        return Err(usage(format!(
            "install does not take --runtime-dir (or KEEPALIVE_RUNTIME_DIR, here {}): the \
             installed unit gives the agent {DEFAULT_RUNTIME_DIR} (RuntimeDirectory=), where the \
             other commands look by default",
            runtime_dir.display()
        )));
    }
    Ok(())
}

/// Directories the unit's sandbox hides from the agent (`ProtectHome=`, `PrivateTmp=`,
/// `PrivateDevices=`, which leaves it a `/dev` of its own, with an empty `/dev/shm`): a binary
/// there would fail to start with 203/EXEC.
const HIDDEN_FROM_THE_UNIT: [&str; 6] = ["/home", "/root", "/run/user", "/tmp", "/var/tmp", "/dev"];

/// Kernel filesystems, which hold no binary.
const KERNEL_FILESYSTEMS: [&str; 2] = ["/proc", "/sys"];

/// Refuses a `--bindir` the unit could not run the binary from: one its sandbox hides, or one
/// whose path `ExecStart=` would split or expand (white space, `%`, quotes, backslashes).
fn refuse_bindir(bindir: &Path) -> anyhow::Result<()> {
    let text = bindir.to_str().ok_or_else(|| {
        usage(format!(
            "--bindir {} is not valid UTF-8; the unit's ExecStart= cannot name it",
            bindir.display()
        ))
    })?;
    if let Some(c) = text
        .chars()
        .find(|c| c.is_whitespace() || matches!(c, '%' | '"' | '\'' | '\\' | '$' | ';'))
    {
        let what = match c {
            '\\' => "a backslash".to_owned(),
            '"' | '\'' => "a quote".to_owned(),
            c if c.is_whitespace() => "white space".to_owned(),
            c => format!("`{c}`"),
        };
        return Err(usage(format!(
            "--bindir {} holds {what}, which the unit's ExecStart= would take apart or expand; \
             choose a directory without it (default /usr/local/sbin)",
            text.escape_debug()
        )));
    }
    if let Some(hidden) = HIDDEN_FROM_THE_UNIT
        .iter()
        .find(|hidden| bindir.starts_with(hidden))
    {
        return Err(usage(format!(
            "--bindir {text} is below {hidden}, which the unit's sandbox (ProtectHome=, \
             PrivateTmp=, PrivateDevices=) hides from the agent: the service would fail to \
             start; choose another directory (default /usr/local/sbin)"
        )));
    }
    if let Some(kernel) = KERNEL_FILESYSTEMS
        .iter()
        .find(|kernel| bindir.starts_with(kernel))
    {
        return Err(usage(format!(
            "--bindir {text} is below {kernel}, a kernel filesystem, which holds no binary; \
             choose another directory (default /usr/local/sbin)"
        )));
    }
    Ok(())
}

/// Refuses to replace a unit file that is a symbolic link: `systemctl mask` makes one to
/// /dev/null, which a new file in its place would undo (starting the agent at the next boot if
/// it was enabled before), and a link to a packaged unit is the package's.
fn refuse_linked_unit(unit: &Path) -> anyhow::Result<()> {
    let Ok(target) = fs::read_link(unit) else {
        return Ok(());
    };
    let reason = if target == Path::new("/dev/null") {
        "the unit is masked; `systemctl unmask keepalive-agent`, then install again".to_owned()
    } else {
        "it is not this install's to replace; remove the link (or install through what made \
         it), then install again"
            .to_owned()
    };
    Err(usage(format!(
        "{} is a symbolic link to {}: {reason}; nothing was installed",
        unit.display(),
        target.display()
    )))
}

/// Installs, telling `report` one line per file as it is written or kept (so a failure midway
/// leaves the lines of what was done before it), and last what to run next. `report` cannot
/// stop it: an install that went on to write files has to finish.
pub fn install(args: &InstallArgs, report: &mut dyn FnMut(String)) -> anyhow::Result<()> {
    // What is installed is for every user to read (man pages, completions, the directories
    // made for them), also when the caller's umask is 077, as on hardened hosts and under
    // some sudo setups.
    // SAFETY: no preconditions; this command runs no other threads that create files.
    unsafe { libc::umask(0o022) };
    refuse_bindir(&args.bindir)?;
    let unit = under(
        &args.root,
        Path::new("/etc/systemd/system/keepalive-agent.service"),
    );
    refuse_linked_unit(&unit)?;
    // The config is decided first, so a path that cannot take one fails before anything is
    // written. A symbolic link whose target is missing now (on a file system mounted later,
    // say) is the operator's config, not a missing one: the agent refuses to start until the
    // target is back, and replacing the link would drop its policies.
    let config = under(&args.root, Path::new(crate::config::DEFAULT_CONFIG));
    // A link in the config's place is the operator's way of keeping the file elsewhere:
    // `--force-config` would cut it (or, writing through it, overwrite what it leads to).
    if args.force_config
        && let Ok(target) = fs::read_link(&config)
    {
        return Err(usage(format!(
            "{} is a symbolic link to {}: --force-config would replace the link, not the file \
             it leads to; remove the link to install the default config in its place, or edit \
             {} yourself; nothing was installed",
            config.display(),
            target.display(),
            target.display()
        )));
    }
    // Nor does it replace a directory (or a FIFO) in the config's place: that is no config
    // file the flag was meant for, and it would fail midway, after the binary and the unit.
    if args.force_config
        && let Some(reason) = crate::config::refused_kind(&config)
    {
        return Err(usage(format!(
            "{}: {reason}; --force-config replaces a config file only: move it away, then \
             install again; nothing was installed",
            config.display()
        )));
    }
    let dangling = crate::config::dangling_link(&config);
    let keep_config =
        !args.force_config && (config.symlink_metadata().is_ok() || dangling.is_some());
    if let Some((link, target)) = &dangling
        && !keep_config
        && *link != config
    {
        return Err(usage(format!(
            "cannot write {}: {} is a symbolic link to {}, which does not exist; nothing was \
             installed",
            config.display(),
            link.display(),
            target.display()
        )));
    }

    // Before anything is written, so a config that cannot be kept fails the install whole.
    let saved = if keep_config {
        None
    } else {
        save_replaced(&config)?
    };

    let binary = args.bindir.join("keepalive-agent");
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let bytes = fs::read(&exe).with_context(|| format!("failed to read {}", exe.display()))?;
    let target = under(&args.root, &binary);
    let (new_binary, line) = put(&target, &bytes, 0o755)?;
    report(line);

    let upgrade = unit.exists();
    let (new_unit, line) = put(&unit, unit_for(&binary).as_bytes(), 0o644)?;
    report(line);

    match (&dangling, keep_config) {
        (Some((link, target)), true) => report(format!(
            "kept existing {}: {} is a symbolic link to {}, which does not exist now; the \
             agent does not start until it does",
            config.display(),
            link.display(),
            target.display()
        )),
        (None, true) => report(match staged_reason(&args.root, &config) {
            Some(reason) => format!(
                "kept existing {}, which the agent refuses as it is: {reason}",
                config.display()
            ),
            None => format!("kept existing {}", config.display()),
        }),
        (_, false) => {
            report(put(&config, DEFAULT_CONFIG_TEXT.as_bytes(), 0o644)?.1);
            if let Some(saved) = saved {
                report(format!(
                    "kept the config it replaced as {}; the agent does not read it",
                    saved.display()
                ));
            }
        }
    }

    let man = under(&args.root, Path::new("/usr/local/share/man/man1"));
    fs::create_dir_all(&man).map_err(|err| fs_error(&man, err))?;
    write_man_pages(&man)?;
    report(format!("installed man pages in {}", man.display()));

    let completions = under(
        &args.root,
        Path::new("/usr/local/share/bash-completion/completions/keepalive-agent"),
    );
    report(put(&completions, &completion_script(Shell::Bash), 0o644)?.1);

    // A tree staged for a package or an image is not this host's: what follows is for the
    // system it is installed on.
    let next = if args.root == Path::new("/") {
        "next"
    } else {
        "next, on the system this tree is for"
    };
    report(if upgrade && !new_binary && !new_unit {
        // A running agent already runs this binary under this unit.
        format!(
            "{next}: nothing to restart, the binary and the unit were installed already (if the \
             agent is not enabled yet: systemctl enable --now keepalive-agent)"
        )
    } else if upgrade {
        // A running agent keeps running the old binary until it restarts; enforcement stays
        // attached across the restart.
        format!(
            "{next}: systemctl daemon-reload && systemctl try-restart keepalive-agent (or, if it \
             is not enabled yet, systemctl enable --now keepalive-agent)"
        )
    } else {
        format!("{next}: systemctl daemon-reload && systemctl enable --now keepalive-agent")
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::cgroup::Cgroup2;

    #[test]
    fn the_shipped_default_config_parses_to_the_builtin_default() {
        let config = crate::config::parse(
            DEFAULT_CONFIG_TEXT,
            Path::new(crate::config::DEFAULT_CONFIG),
            &Cgroup2::at("/sys/fs/cgroup"),
        )
        .expect("the shipped config is valid");
        assert_eq!(config.policies.default, crate::policy::BUILTIN_DEFAULT);
        assert!(config.policies.rules.is_empty());
    }

    #[test]
    fn the_unit_points_at_the_installed_binary() {
        let unit = unit_for(Path::new("/opt/bin/keepalive-agent"));
        assert!(
            unit.contains("ExecStart=/opt/bin/keepalive-agent run"),
            "{unit}"
        );
        assert!(!unit.contains(UNIT_BINARY));
    }

    #[test]
    fn completions_offer_the_directory_flags_only_where_they_are_taken() {
        let script = String::from_utf8(completion_script(Shell::Bash)).unwrap();
        // The words bash offers after the command path `case` names.
        let offered = |case: &str| -> Vec<&str> {
            let at = script
                .find(&format!("        {case})\n"))
                .unwrap_or_else(|| panic!("no {case} in\n{script}"));
            let opts = script[at..].lines().find(|l| l.contains("opts=")).unwrap();
            opts.trim()
                .trim_start_matches("opts=\"")
                .trim_end_matches('"')
                .split(' ')
                .collect()
        };
        let cmd = "keepalive__subcmd__agent";
        for (case, takes) in [
            ("keepalive__agent".to_owned(), true),
            (format!("{cmd}__subcmd__run"), true),
            (format!("{cmd}__subcmd__status"), true),
            (format!("{cmd}__subcmd__policy"), true),
            (format!("{cmd}__subcmd__policy__subcmd__set"), true),
            (format!("{cmd}__subcmd__install"), false),
            (format!("{cmd}__subcmd__completions"), false),
            (format!("{cmd}__subcmd__man"), false),
        ] {
            let words = offered(&case);
            for flag in ["--state-dir", "--runtime-dir"] {
                assert_eq!(words.contains(&flag), takes, "{case} {flag}: {words:?}");
            }
        }
        // Every shell's script is made from the same definition without clap's checks failing.
        for shell in [Shell::Zsh, Shell::Fish, Shell::Elvish, Shell::PowerShell] {
            assert!(!completion_script(shell).is_empty());
        }
    }

    #[test]
    fn a_bindir_the_unit_cannot_run_from_is_refused() {
        let refusal = |dir: &str| {
            refuse_bindir(Path::new(dir))
                .map_err(|err| format!("{err:#}"))
                .err()
        };
        for fine in [
            "/usr/local/sbin",
            "/opt/keepalive/bin",
            "/usr/sbin",
            "/devices",
        ] {
            assert_eq!(refusal(fine), None, "{fine}");
        }
        for (dir, says) in [
            ("/home/ops/bin", "below /home, which the unit's sandbox"),
            ("/root/bin", "below /root"),
            ("/tmp/bin", "below /tmp"),
            ("/var/tmp", "below /var/tmp"),
            (
                "/dev/shm/bin",
                "below /dev, which the unit's sandbox (ProtectHome=, \
              PrivateTmp=, PrivateDevices=) hides",
            ),
            ("/proc/bin", "below /proc, a kernel filesystem"),
            ("/sys/fs/bpf/bin", "below /sys, a kernel filesystem"),
            ("/opt/my bin", "holds white space"),
            ("/opt/a\nb", "--bindir /opt/a\\nb holds white space"),
            ("/opt/a\\b", "holds a backslash,"),
            ("/opt/'b'", "holds a quote"),
            ("/opt/%h", "holds `%`"),
            ("/opt/$b", "holds `$`"),
        ] {
            let refusal = refusal(dir).unwrap_or_else(|| panic!("{dir} was accepted"));
            assert!(refusal.contains(says), "{dir}: {refusal}");
        }
    }
}
