//! Eventfds of a dumped tree: each once, by the kernel's `eventfd-id`, with
//! its counter and mode from the first holder's fdinfo. Reads only.

use std::collections::BTreeMap;

use crate::image::sockets::EventfdImage;
use crate::image::types::{Fd, FdKind};
use crate::sys::procfs::{read_eventfd_fdinfo, ProcfsError};

/// Every eventfd `tables` hold, in id order.
pub fn collect(tables: &[(i32, Vec<Fd>)]) -> Result<Vec<EventfdImage>, ProcfsError> {
    let mut first: BTreeMap<u64, (i32, &Fd)> = BTreeMap::new();
    for (pid, fds) in tables {
        for fd in fds {
            if let FdKind::Eventfd { id } = fd.kind {
                first.entry(id).or_insert((*pid, fd));
            }
        }
    }
    first
        .into_iter()
        .map(|(id, (pid, fd))| {
            let info = read_eventfd_fdinfo(pid, fd.fd)?;
            Ok(EventfdImage {
                id,
                count: info.count,
                semaphore: info.semaphore,
                flags: fd.flags,
            })
        })
        .collect()
}
