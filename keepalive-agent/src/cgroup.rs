//! cgroup v2: finding the mount, naming cgroups relative to it, their ids, and walking the tree.
//!
//! A cgroup's id is its kernfs node id, which is also the inode number of its directory on the
//! cgroup2 filesystem; the BPF program reads the same id from `sk->sk_cgrp_data`.

use std::{
    collections::{HashMap, HashSet},
    fmt, fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Component, Path, PathBuf},
};

use anyhow::Context as _;

use crate::error::{Error, usage};

/// The mounted cgroup v2 hierarchy.
#[derive(Debug, Clone)]
pub struct Cgroup2 {
    mount: PathBuf,
}

/// Unescapes the octal escapes (`\040` for a space) that /proc/self/mounts uses.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(digits) = bytes.get(i + 1..i + 4)
            && digits.iter().all(|d| (b'0'..=b'7').contains(d))
            && let Ok(v) = u8::from_str_radix(std::str::from_utf8(digits).unwrap_or(""), 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Finds the cgroup2 mount point in the text of /proc/self/mounts. With several, the one at
/// `/sys/fs/cgroup` wins, then the first.
pub fn cgroup2_mount_in(mounts: &str) -> Option<PathBuf> {
    let found: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _source = fields.next()?;
            let target = fields.next()?;
            let fstype = fields.next()?;
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_field(target)))
        })
        .collect();
    found
        .iter()
        .find(|p| p.as_path() == Path::new("/sys/fs/cgroup"))
        .or_else(|| found.first())
        .cloned()
}

impl Cgroup2 {
    /// Finds the cgroup2 mount from /proc/self/mounts.
    pub fn find() -> anyhow::Result<Self> {
        let mounts =
            fs::read_to_string("/proc/self/mounts").context("failed to read /proc/self/mounts")?;
        let mount = cgroup2_mount_in(&mounts).ok_or(Error::NoCgroup2)?;
        Ok(Self { mount })
    }

    /// Uses a known mount point (tests, `check`).
    pub fn at(mount: impl Into<PathBuf>) -> Self {
        Self {
            mount: mount.into(),
        }
    }

    /// The mount point.
    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// Parses a cgroup given as an absolute path under the mount, as a path relative to it, or
    /// as a cgroup path the way `status`, systemd and `/proc/PID/cgroup` print it
    /// (`/system.slice/a.service`). An absolute path that starts like the mount but is not
    /// under it (`/sys/...` on a mount at `/sys/fs/cgroup/unified`) is a file path elsewhere,
    /// and rejected, and so is an empty one (an unset template variable would otherwise mean
    /// the root). Only checks the spelling; the cgroup need not exist.
    pub fn parse(&self, spec: &str) -> anyhow::Result<CgroupPath> {
        if spec.is_empty() {
            return Err(usage(
                "cgroup \"\" is empty; write \"/\" for the root cgroup",
            ));
        }
        // No file name holds one, and the kernel would read the path only up to it.
        if spec.contains('\0') {
            return Err(usage(format!(
                "cgroup {spec:?} contains a NUL character, which no cgroup name can hold"
            )));
        }
        // The kernel refuses to make a cgroup whose name has one (it would break the lines
        // of /proc/PID/cgroup), so a policy for it could never apply.
        if spec.contains('\n') {
            return Err(usage(format!(
                "cgroup {spec:?} contains a line break, which the kernel refuses in cgroup names"
            )));
        }
        let path = Path::new(spec);
        let relative = match path.strip_prefix(&self.mount) {
            Ok(below) => below,
            // A path that starts like the mount without its leading `/`: a typo that names a
            // cgroup `sys/fs/cgroup/…` below the mount, which would never appear. With the `/`
            // it is either under the mount, or beside it (`sys/fs/cgroup/a.service` where the
            // mount is `/sys/fs/cgroup/unified`) and refused as below.
            Err(_) if path.is_relative() && first_name(path) == first_name(&self.mount) => {
                let absolute = Path::new("/").join(path);
                let fix = if absolute.starts_with(&self.mount) {
                    format!("write /{spec}")
                } else {
                    "and with it, it is not under the mount either; give a path below it, one \
                     relative to it, or a cgroup path such as /system.slice/a.service"
                        .to_owned()
                };
                return Err(usage(format!(
                    "cgroup {spec} lacks its leading `/`: relative paths are taken from the cgroup2 \
                     mount, so this names {}/{spec}; {fix}",
                    self.mount.display()
                )));
            }
            Err(_) if path.is_absolute() && first_name(path) == first_name(&self.mount) => {
                return Err(usage(format!(
                    "cgroup {spec} is not under the cgroup2 mount {}; give a path below it, \
                     one relative to it, or a cgroup path such as /system.slice/a.service",
                    self.mount.display()
                )));
            }
            Err(_) => path,
        };
        let mut parts = Vec::new();
        for component in relative.components() {
            match component {
                Component::Normal(part) => {
                    let part = part
                        .to_str()
                        .ok_or_else(|| usage(format!("cgroup {spec} is not valid UTF-8")))?;
                    // No file name is longer (NAME_MAX), so a policy for one would wait for a
                    // cgroup that can never appear. A pattern may be longer than what it matches.
                    if part.len() > 255 && !crate::policy::is_glob(part) {
                        return Err(usage(format!(
                            "cgroup {spec} has a name of {} bytes; no cgroup name is longer than \
                             255",
                            part.len()
                        )));
                    }
                    parts.push(part.to_owned());
                }
                Component::CurDir | Component::RootDir => {}
                Component::ParentDir | Component::Prefix(_) => {
                    return Err(usage(format!("cgroup {spec} must not contain `..`")));
                }
            }
        }
        Ok(CgroupPath(parts.join("/")))
    }

    /// Absolute filesystem path of a cgroup.
    pub fn abs(&self, cgroup: &CgroupPath) -> PathBuf {
        if cgroup.0.is_empty() {
            self.mount.clone()
        } else {
            self.mount.join(&cgroup.0)
        }
    }

    /// The id of an existing cgroup.
    pub fn id(&self, cgroup: &CgroupPath) -> io::Result<u64> {
        fs::metadata(self.abs(cgroup)).map(|meta| meta.ino())
    }

    /// The id of a cgroup that must exist; a missing one is [`Error::CgroupNotFound`].
    pub fn existing_id(&self, cgroup: &CgroupPath) -> anyhow::Result<u64> {
        let path = self.abs(cgroup);
        match fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => Ok(meta.ino()),
            Ok(_) => Err(usage(format!(
                "{} is not a cgroup directory",
                path.display()
            ))),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                Err(Error::CgroupNotFound(path).into())
            }
            Err(err) if err.kind() == io::ErrorKind::PermissionDenied => Err(denied(&path, &err)),
            Err(err) => Err(err).with_context(|| format!("failed to stat {}", path.display())),
        }
    }

    /// [`Cgroup2::existing_id`], with the cgroup's directory opened: what is attached through
    /// it is attached to the cgroup of that id, even if one of the same name replaces it.
    pub fn open_existing(&self, cgroup: &CgroupPath) -> anyhow::Result<(fs::File, u64)> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = self.abs(cgroup);
        let opened = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(&path)
            .and_then(|dir| Ok((dir.metadata()?.ino(), dir)));
        match opened {
            Ok((id, dir)) => Ok((dir, id)),
            Err(err) if err.raw_os_error() == Some(libc::ENOTDIR) => Err(usage(format!(
                "{} is not a cgroup directory",
                path.display()
            ))),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                Err(Error::CgroupNotFound(path).into())
            }
            Err(err) if err.kind() == io::ErrorKind::PermissionDenied => Err(denied(&path, &err)),
            Err(err) => Err(err).with_context(|| format!("failed to open {}", path.display())),
        }
    }

    /// Direct child cgroups of `cgroup`, by name. A cgroup removed meanwhile, or one that
    /// cannot be read, yields none.
    pub fn children(&self, cgroup: &CgroupPath) -> Vec<String> {
        self.read_children(cgroup).unwrap_or_default()
    }

    /// [`Cgroup2::children`], with the error of a cgroup that exists but cannot be read (the
    /// agent runs without CAP_DAC_READ_SEARCH, so a directory root may not read is one).
    pub fn read_children(&self, cgroup: &CgroupPath) -> io::Result<Vec<String>> {
        let entries = match fs::read_dir(self.abs(cgroup)) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(err),
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        Ok(names)
    }

    /// Every cgroup at or below `root`, with its id, parents before children, as the walk
    /// goes. Cgroups that vanish during the walk are skipped, and so are the children of one
    /// that cannot be read (see [`Cgroup2::read_children`]); [`Cgroup2::ids`] tells when the
    /// walk missed some.
    pub fn walk(&self, root: &CgroupPath) -> impl Iterator<Item = (CgroupPath, u64)> + '_ {
        self.try_walk(root).filter_map(Result::ok)
    }

    /// [`Cgroup2::walk`], with, after each cgroup whose children could not be listed, the
    /// error, naming the directory.
    fn try_walk(
        &self,
        root: &CgroupPath,
    ) -> impl Iterator<Item = io::Result<(CgroupPath, u64)>> + '_ {
        let mut stack = vec![root.clone()];
        let mut failed = None;
        std::iter::from_fn(move || {
            if let Some(err) = failed.take() {
                return Some(Err(err));
            }
            while let Some(cgroup) = stack.pop() {
                let Ok(id) = self.id(&cgroup) else {
                    continue;
                };
                match self.read_children(&cgroup) {
                    Ok(children) => {
                        stack.extend(children.iter().rev().map(|child| cgroup.join(child)));
                    }
                    Err(err) => {
                        let path = self.abs(&cgroup);
                        failed = Some(io::Error::new(
                            err.kind(),
                            format!("failed to list the cgroups in {}: {err}", path.display()),
                        ));
                    }
                }
                return Some(Ok((cgroup, id)));
            }
            None
        })
    }

    /// The ids of every cgroup at or below `root`; an error when a listing failed, a refused
    /// permission included, instead of a set without the cgroups below it. Walked by
    /// directory rather than by [`CgroupPath`]: a name that is not UTF-8, which a
    /// `CgroupPath` cannot hold, is a cgroup all the same, and what is kept for the cgroups
    /// here (their counters) must not be dropped as a removed cgroup's.
    pub fn ids(&self, root: &CgroupPath) -> io::Result<HashSet<u64>> {
        let mut ids = HashSet::new();
        self.each_dir(root, true, |id, _, _| {
            ids.insert(id);
        })?;
        Ok(ids)
    }

    /// Calls `each` with the id of every cgroup at or below `root`, its parent's (`None` for
    /// `root`), and its path with U+FFFD for what in its name is not UTF-8 (to show, not to
    /// open: two such names can read the same). Walked by directory, so such
    /// a cgroup is reached, and those below it. A cgroup removed meanwhile is skipped; one that
    /// cannot be listed is an error when `strict`, else its children are skipped.
    fn each_dir(
        &self,
        root: &CgroupPath,
        strict: bool,
        mut each: impl FnMut(u64, Option<u64>, &CgroupPath),
    ) -> io::Result<()> {
        let mut stack = vec![(self.abs(root), root.clone(), None)];
        while let Some((dir, path, parent)) = stack.pop() {
            // Removed meanwhile.
            let Ok(meta) = fs::metadata(&dir) else {
                continue;
            };
            let id = meta.ino();
            each(id, parent, &path);
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(err) if err.kind() == io::ErrorKind::NotFound || !strict => continue,
                Err(err) => {
                    return Err(io::Error::new(
                        err.kind(),
                        format!("failed to list the cgroups in {}: {err}", dir.display()),
                    ));
                }
            };
            stack.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| {
                        let name = path.join(&e.file_name().to_string_lossy());
                        (e.path(), name, Some(id))
                    }),
            );
        }
        Ok(())
    }

    /// [`Cgroup2::ids`], without the cgroups below directories root may not read: the agent
    /// warns about those when it resolves the policy (see `policy::Resolution::unreadable`).
    pub fn readable_ids(&self, root: &CgroupPath) -> io::Result<HashSet<u64>> {
        self.try_walk(root)
            .filter(
                |item| !matches!(item, Err(err) if err.kind() == io::ErrorKind::PermissionDenied),
            )
            .map(|item| item.map(|(_, id)| id))
            .collect()
    }

    /// Names for cgroup ids, to show: every cgroup below `root`, by id, those whose names are
    /// not UTF-8 included (see [`Cgroup2::each_dir`]).
    pub fn names(&self, root: &CgroupPath) -> HashMap<u64, CgroupPath> {
        self.tree(root).0
    }

    /// [`Cgroup2::names`], and the parent of each cgroup below `root` (by id), found by the
    /// walk rather than by name, which is lossy.
    pub fn tree(&self, root: &CgroupPath) -> (HashMap<u64, CgroupPath>, HashMap<u64, u64>) {
        let (mut names, mut parents) = (HashMap::new(), HashMap::new());
        let _ = self.each_dir(root, false, |id, parent, path| {
            names.insert(id, path.clone());
            if let Some(parent) = parent {
                parents.insert(id, parent);
            }
        });
        (names, parents)
    }

    /// The cgroup whose id is `id`, if it exists; the walk stops at the first match.
    pub fn name_of(&self, id: u64) -> Option<CgroupPath> {
        self.walk(&CgroupPath::root())
            .find(|(_, found)| *found == id)
            .map(|(path, _)| path)
    }

    /// [`Cgroup2::name_of`] for a cgroup that existed: `Ok(None)` only when it no longer does.
    /// The walk of `name_of` skips what it cannot list or name, so a miss is checked against
    /// every directory in the tree; an error when that walk cannot list one (a delegated
    /// subtree the agent may not read, say), or finds the cgroup with a name that is not UTF-8.
    pub fn locate(&self, id: u64) -> io::Result<Option<CgroupPath>> {
        if let Some(path) = self.name_of(id) {
            return Ok(Some(path));
        }
        if self.ids(&CgroupPath::root())?.contains(&id) {
            return Err(io::Error::other(format!(
                "cgroup id {id} exists, but its path is not valid UTF-8"
            )));
        }
        Ok(None)
    }
}

/// A cgroup named relative to the cgroup2 mount; empty for the root. Displayed with a leading
/// `/`, the way systemd and /proc/PID/cgroup show it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct CgroupPath(String);

impl CgroupPath {
    /// The root cgroup.
    pub fn root() -> Self {
        Self(String::new())
    }

    /// The path relative to the mount, without a leading slash ("" for the root).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A child of this cgroup.
    pub fn join(&self, name: &str) -> Self {
        if self.0.is_empty() {
            Self(name.to_owned())
        } else {
            Self(format!("{}/{name}", self.0))
        }
    }

    /// The parent cgroup and this one's name in it; `None` for the root.
    pub fn split_last(&self) -> Option<(Self, &str)> {
        match self.0.rsplit_once('/') {
            Some((parent, name)) => Some((Self(parent.to_owned()), name)),
            None if self.0.is_empty() => None,
            None => Some((Self::root(), &self.0)),
        }
    }

    /// Path components.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|c| !c.is_empty())
    }

    /// Whether `self` is `other` or below it.
    pub fn is_within(&self, other: &CgroupPath) -> bool {
        other.0.is_empty()
            || self.0 == other.0
            || (self.0.starts_with(&other.0) && self.0.as_bytes().get(other.0.len()) == Some(&b'/'))
    }
}

/// The first directory name of an absolute path (`sys` for `/sys/fs/cgroup`).
fn first_name(path: &Path) -> Option<&std::ffi::OsStr> {
    path.components().find_map(|c| match c {
        Component::Normal(name) => Some(name),
        _ => None,
    })
}

impl fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}", self.0)
    }
}

/// A cgroup the agent may not look up: a directory on the way that root may not search (one a
/// delegated user owns with mode 0700, say) without CAP_DAC_READ_SEARCH or CAP_DAC_OVERRIDE.
/// Exit 3, which the unit does not retry: only a mode or a capability changed by hand helps.
fn denied(path: &Path, err: &io::Error) -> anyhow::Error {
    Error::Permission(format!(
        "cannot look up the cgroup {}: {err}; a directory on the way may not be searched by \
         the agent, which without CAP_DAC_READ_SEARCH has root's file permissions alone: make \
         the directories on the way searchable (chmod o+x), or give the agent \
         CAP_DAC_READ_SEARCH",
        path.display()
    ))
    .into()
}

#[cfg(test)]
mod tests {
    use std::os::unix::ffi::OsStrExt as _;

    use super::*;

    #[test]
    fn a_path_splits_into_its_parent_and_name() {
        let path = |s: &str| CgroupPath(s.to_owned());
        assert_eq!(path("a/b/c").split_last(), Some((path("a/b"), "c")));
        assert_eq!(path("a").split_last(), Some((CgroupPath::root(), "a")));
        assert_eq!(CgroupPath::root().split_last(), None);
    }

    #[test]
    fn ids_are_every_directory_below_or_the_error_of_a_failed_listing() {
        let dir = std::env::temp_dir().join(format!("ka-walk-{}", std::process::id()));
        fs::create_dir_all(dir.join("a/b")).unwrap();
        fs::create_dir_all(dir.join("c")).unwrap();
        fs::write(dir.join("a/cgroup.procs"), "").unwrap();
        // A name that is not UTF-8, with a cgroup below it: both are there.
        let odd = dir.join(std::ffi::OsStr::from_bytes(b"d\xff"));
        fs::create_dir_all(odd.join("e")).unwrap();
        let cg = Cgroup2::at(&dir);
        let ino = |p: &std::path::Path| fs::metadata(dir.join(p)).unwrap().ino();
        let expected: HashSet<u64> = ["", "a", "a/b", "c"]
            .map(|p| ino(p.as_ref()))
            .into_iter()
            .chain([ino(&odd), ino(&odd.join("e"))])
            .collect();
        let ids = cg.ids(&CgroupPath::root());
        // A sibling whose name reads the same once made UTF-8: each child keeps its own parent.
        let twin = dir.join(std::ffi::OsStr::from_bytes(b"d\xfe"));
        fs::create_dir_all(twin.join("f")).unwrap();
        let (names, parents) = cg.tree(&CgroupPath::root());
        assert_eq!(names[&ino(&odd)], names[&ino(&twin)]);
        assert_eq!(parents[&ino(&odd.join("e"))], ino(&odd));
        assert_eq!(parents[&ino(&twin.join("f"))], ino(&twin));
        assert_eq!(parents[&ino("a/b".as_ref())], ino("a".as_ref()));
        assert_eq!(parents[&ino("a".as_ref())], ino("".as_ref()));
        assert!(
            !parents.contains_key(&ino("".as_ref())),
            "the root has none here"
        );
        let listed = cg.ids(&CgroupPath("a/cgroup.procs".into()));
        let absent = cg.ids(&CgroupPath("gone".into()));
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(ids.unwrap(), expected);
        // Listing a directory can fail for other reasons than permission (too many files open);
        // a file in its place stands in for one here.
        let err = listed.unwrap_err();
        assert!(err.to_string().contains("a/cgroup.procs"), "{err}");
        assert_eq!(absent.unwrap(), HashSet::new(), "gone before the walk");
    }

    const HYBRID: &str = "\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_layouts() {
        assert_eq!(
            cgroup2_mount_in(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount_in(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let two = "cgroup2 /mnt/x cgroup2 rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_mount_in(two), Some(PathBuf::from("/sys/fs/cgroup")));
        let spaced = "cgroup2 /mnt/my\\040cg cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_mount_in(spaced), Some(PathBuf::from("/mnt/my cg")));
        assert_eq!(cgroup2_mount_in("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn parses_absolute_and_relative_paths() {
        let cg = Cgroup2::at("/sys/fs/cgroup");
        assert_eq!(cg.parse("/sys/fs/cgroup").unwrap(), CgroupPath::root());
        assert_eq!(
            cg.parse("/sys/fs/cgroup/system.slice/a.service").unwrap(),
            CgroupPath("system.slice/a.service".into())
        );
        assert_eq!(
            cg.parse("system.slice/./a.service/").unwrap(),
            CgroupPath("system.slice/a.service".into())
        );
        // As status and systemd print it.
        assert_eq!(
            cg.parse("/system.slice/a.service").unwrap(),
            CgroupPath("system.slice/a.service".into())
        );
        assert_eq!(cg.parse("/").unwrap(), CgroupPath::root());
        // A file path beside the mount, not a cgroup path.
        assert!(cg.parse("/sys/kernel/debug").is_err());
        let hybrid = Cgroup2::at("/sys/fs/cgroup/unified");
        let err = hybrid.parse("/sys/fs/cgroup/system.slice").unwrap_err();
        assert!(err.to_string().contains("/system.slice/a.service"), "{err}");
        assert!(cg.parse("a/../b").is_err());
        // The mount's path with its leading `/` left out.
        for typo in ["sys/fs/cgroup/kubepods.slice", "sys/fs/cgroup"] {
            let err = cg.parse(typo).unwrap_err();
            assert!(err.to_string().contains("write /sys/fs/cgroup"), "{err}");
        }
        // Starting like it, where the `/` would not make it a path under the mount either.
        for (mount, typo) in [
            (&cg, "sys/fs/cgroupx"),
            (&hybrid, "sys/fs/cgroup/system.slice"),
            (&hybrid, "./sys/fs/cgroup/unified2"),
        ] {
            let err = mount.parse(typo).unwrap_err().to_string();
            assert!(
                err.contains("lacks its leading `/`") && err.contains("not under the mount"),
                "{err}"
            );
        }
        assert_eq!(
            hybrid
                .parse("sys/fs/cgroup/unified/a")
                .unwrap_err()
                .to_string(),
            "cgroup sys/fs/cgroup/unified/a lacks its leading `/`: relative paths are taken from \
             the cgroup2 mount, so this names /sys/fs/cgroup/unified/sys/fs/cgroup/unified/a; \
             write /sys/fs/cgroup/unified/a"
        );
        assert_eq!(cg.parse("system").unwrap(), CgroupPath("system".into()));
        let err = cg.parse("a\0b").unwrap_err().to_string();
        assert!(err.contains("contains a NUL character"), "{err}");
        let err = cg.parse("/we\nird").unwrap_err().to_string();
        assert_eq!(
            err,
            "cgroup \"/we\\nird\" contains a line break, which the kernel refuses in cgroup names"
        );
        let err = cg.parse("").unwrap_err();
        assert!(
            err.to_string().contains("write \"/\" for the root"),
            "{err}"
        );
        // A name no file can have; a pattern that long may still match a short name.
        let long = "a".repeat(256);
        let err = cg.parse(&format!("/k/{long}")).unwrap_err().to_string();
        assert!(err.ends_with("has a name of 256 bytes; no cgroup name is longer than 255"));
        assert!(cg.parse(&format!("/k/{}", "a".repeat(255))).is_ok());
        assert!(cg.parse(&format!("/k/{}", "[ab]".repeat(80))).is_ok());
    }

    #[test]
    fn within() {
        let a = CgroupPath("a".into());
        let ab = CgroupPath("a/b".into());
        let abc = CgroupPath("abc".into());
        assert!(ab.is_within(&a));
        assert!(a.is_within(&a));
        assert!(!abc.is_within(&a));
        assert!(a.is_within(&CgroupPath::root()));
        assert!(!a.is_within(&ab));
        assert_eq!(ab.to_string(), "/a/b");
        assert_eq!(CgroupPath::root().to_string(), "/");
    }
}
