//! The system calls that change mounts, behind a trait (youki's seam) so the mount logic can
//! be unit-tested without root by recording the calls.

use std::path::Path;

use nix::mount::{MntFlags, MsFlags};
use nix::sys::statvfs::FsFlags;

pub(crate) trait Syscall {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> nix::Result<()>;
    fn umount(&self, target: &Path, flags: MntFlags) -> nix::Result<()>;
    /// Per-mount flags of the mount holding `path`.
    fn mount_flags(&self, path: &Path) -> nix::Result<FsFlags>;
    fn chdir(&self, dir: &Path) -> nix::Result<()>;
    /// Makes `new_root` the root with `pivot_root(".", ".")` and detaches the old root.
    fn pivot_root(&self, new_root: &Path) -> nix::Result<()>;
}

/// The real system calls.
pub(crate) struct Linux;

impl Syscall for Linux {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> nix::Result<()> {
        nix::mount::mount(source, target, fstype, flags, data)
    }

    fn umount(&self, target: &Path, flags: MntFlags) -> nix::Result<()> {
        nix::mount::umount2(target, flags)
    }

    fn mount_flags(&self, path: &Path) -> nix::Result<FsFlags> {
        Ok(nix::sys::statvfs::statvfs(path)?.flags())
    }

    fn chdir(&self, dir: &Path) -> nix::Result<()> {
        nix::unistd::chdir(dir)
    }

    fn pivot_root(&self, new_root: &Path) -> nix::Result<()> {
        // No directory for the old root is needed: pivot_root(".", ".") stacks it on top of
        // the new one, where a detached unmount removes it.
        nix::unistd::chdir(new_root)?;
        nix::unistd::pivot_root(".", ".")?;
        nix::mount::umount2(".", MntFlags::MNT_DETACH)?;
        nix::unistd::chdir("/")
    }
}

#[cfg(test)]
pub(crate) mod recorder {
    use std::cell::RefCell;
    use std::path::{Path, PathBuf};
    use std::rc::Rc;

    use super::*;

    #[derive(Clone, Debug, PartialEq, Eq)]
    pub(crate) enum Call {
        Mount {
            source: Option<PathBuf>,
            target: PathBuf,
            fstype: Option<String>,
            flags: MsFlags,
            data: Option<String>,
        },
        Umount(PathBuf),
        Chdir(PathBuf),
        Pivot(PathBuf),
    }

    /// Records calls instead of making them; every call succeeds.
    #[derive(Clone, Default)]
    pub(crate) struct Recorder(pub Rc<RefCell<Vec<Call>>>);

    impl Recorder {
        pub(crate) fn calls(&self) -> Vec<Call> {
            self.0.borrow().clone()
        }
    }

    impl Syscall for Recorder {
        fn mount(
            &self,
            source: Option<&Path>,
            target: &Path,
            fstype: Option<&str>,
            flags: MsFlags,
            data: Option<&str>,
        ) -> nix::Result<()> {
            self.0.borrow_mut().push(Call::Mount {
                source: source.map(Path::to_path_buf),
                target: target.to_path_buf(),
                fstype: fstype.map(str::to_string),
                flags,
                data: data.map(str::to_string),
            });
            Ok(())
        }

        fn umount(&self, target: &Path, _flags: MntFlags) -> nix::Result<()> {
            self.0.borrow_mut().push(Call::Umount(target.to_path_buf()));
            Ok(())
        }

        fn mount_flags(&self, _path: &Path) -> nix::Result<FsFlags> {
            Ok(FsFlags::ST_NOSUID)
        }

        fn chdir(&self, dir: &Path) -> nix::Result<()> {
            self.0.borrow_mut().push(Call::Chdir(dir.to_path_buf()));
            Ok(())
        }

        fn pivot_root(&self, new_root: &Path) -> nix::Result<()> {
            self.0
                .borrow_mut()
                .push(Call::Pivot(new_root.to_path_buf()));
            Ok(())
        }
    }
}
