//! `open_by_handle_at(2)`: the path of a file known by its file handle
//! (what inotify's fdinfo reports for each watch). Needs
//! CAP_DAC_READ_SEARCH (the dumper is root). Opens with O_PATH only.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The path (as this process sees it) of the file whose handle is
/// (`handle_type`, `handle`) on the file system mounted at `mount_dir`.
pub fn path_of(mount_dir: &Path, handle_type: i32, handle: &[u8]) -> io::Result<PathBuf> {
    let mount = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(mount_dir)?;
    // struct file_handle { u32 handle_bytes; int handle_type; u8 f_handle[]; }
    let mut buf = Vec::with_capacity(8 + handle.len());
    buf.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
    buf.extend_from_slice(&handle_type.to_ne_bytes());
    buf.extend_from_slice(handle);
    // SAFETY: buf holds a complete struct file_handle for the call; the
    // kernel only reads it. The returned fd is ours.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount.as_raw_fd(),
            buf.as_mut_ptr(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handle_of_a_directory_leads_back_to_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        // name_to_handle_at gives the handle to look up.
        let mut buf = vec![0u8; 8 + 128];
        buf[..4].copy_from_slice(&128u32.to_ne_bytes());
        let mut mount_id: libc::c_int = 0;
        let c = std::ffi::CString::new(dir.path().to_str().expect("utf-8")).expect("cstr");
        // SAFETY: buf is a file_handle with room for 128 bytes; c is a valid path.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_name_to_handle_at,
                libc::AT_FDCWD,
                c.as_ptr(),
                buf.as_mut_ptr(),
                &mut mount_id,
                0,
            )
        };
        assert_eq!(rc, 0, "name_to_handle_at: {}", io::Error::last_os_error());
        let len = u32::from_ne_bytes(buf[..4].try_into().expect("4")) as usize;
        let kind = i32::from_ne_bytes(buf[4..8].try_into().expect("4"));
        let got = path_of(Path::new("/"), kind, &buf[8..8 + len]);
        // / and the temp dir may be different file systems: look up from
        // the temp dir's own mount, which is an ancestor of it anyway.
        let got = got.or_else(|_| path_of(dir.path(), kind, &buf[8..8 + len]));
        assert_eq!(got.expect("path_of"), dir.path());
    }
}
