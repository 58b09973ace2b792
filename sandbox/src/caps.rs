//! Capabilities: Docker's default set for the step process.

use crate::error::{Context, SetupError};

/// Docker's (and BuildKit's) default capabilities, by number (linux/capability.h).
pub(crate) const DEFAULT_CAPS: &[u32] = &[
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    5,  // CAP_KILL
    6,  // CAP_SETGID
    7,  // CAP_SETUID
    8,  // CAP_SETPCAP
    10, // CAP_NET_BIND_SERVICE
    13, // CAP_NET_RAW
    18, // CAP_SYS_CHROOT
    27, // CAP_MKNOD
    29, // CAP_AUDIT_WRITE
    31, // CAP_SETFCAP
];

pub(crate) fn default_mask() -> u64 {
    DEFAULT_CAPS.iter().fold(0, |m, c| m | (1u64 << c))
}

/// Removes every capability outside the default set from the bounding set (which is what
/// root's capabilities become at exec) and clears the ambient set. Needs CAP_SETPCAP, so it
/// runs before the uid changes.
pub(crate) fn limit_bounding_set() -> Result<(), SetupError> {
    let keep = default_mask();
    for cap in 0..64u32 {
        if keep & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc != 0 {
            let err = nix::Error::last();
            if err == nix::Error::EINVAL {
                // Past the kernel's last capability.
                break;
            }
            return Err(err).ctx(|| format!("drop capability {cap} from bounding set"));
        }
    }
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        return Err(nix::Error::last()).ctx(|| "clear ambient capabilities".into());
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_V3: u32 = 0x2008_0522;

/// Sets effective and permitted to `mask`, inheritable to none (as Docker since
/// CVE-2022-24769). Can only lower what the process has.
pub(crate) fn set_caps(mask: u64) -> Result<(), SetupError> {
    let mut header = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let lo = mask as u32;
    let hi = (mask >> 32) as u32;
    let data = [
        CapData {
            effective: lo,
            permitted: lo,
            inheritable: 0,
        },
        CapData {
            effective: hi,
            permitted: hi,
            inheritable: 0,
        },
    ];
    // SAFETY: capset(2) reads a v3 header and two data structs, which these are.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(nix::Error::last()).ctx(|| "set capabilities".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_has_docker_defaults_only() {
        let m = default_mask();
        assert_eq!(m.count_ones(), 14);
        assert_ne!(m & (1 << 0), 0, "CAP_CHOWN");
        assert_eq!(m & (1 << 21), 0, "CAP_SYS_ADMIN must not be kept");
        assert_eq!(m & (1 << 2), 0, "CAP_DAC_READ_SEARCH must not be kept");
    }
}
