//! Syscall wrappers the store's crates share: openat2(2) (layer apply resolves paths
//! inside the layer's root, the incremental COPY beneath a previous snapshot) and flock(2)
//! (the store, its databases, cache keys and the usage table).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `openat2(dir, path, flags | O_CLOEXEC, resolve)`, retried on EINTR and on the EAGAIN
/// the kernel returns when a concurrent rename raced the resolution. An empty `path` is
/// `dir` itself (".").
pub fn openat2(
    dir: &OwnedFd,
    path: &[u8],
    flags: libc::c_int,
    resolve: u64,
) -> io::Result<OwnedFd> {
    let p = CString::new(if path.is_empty() { b"." } else { path })
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "nul byte in path"))?;
    // SAFETY: open_how is plain data; zero is a valid initial value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = resolve;
    loop {
        // SAFETY: valid fd, NUL-terminated path and a correctly sized open_how.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                p.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            let fd = i32::try_from(fd).map_err(|_| io::Error::other("fd out of range"))?;
            // SAFETY: the kernel just returned this fd to us.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EAGAIN) && err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// `flock(file, op)`, retried when a signal interrupts the wait.
pub fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: flock on a descriptor `file` owns for the duration of the call.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Turns O_DIRECT on or off for an open file; false when the filesystem refuses it.
pub fn set_direct(file: &File, on: bool) -> bool {
    // SAFETY: fcntl on a descriptor `file` owns; F_GETFL/F_SETFL pass no memory.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags < 0 {
            return false;
        }
        let flags = if on {
            flags | libc::O_DIRECT
        } else {
            flags & !libc::O_DIRECT
        };
        libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags) == 0
    }
}
