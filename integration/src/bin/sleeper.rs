//! `cowsnap-sleeper SECONDS`: sleeps SECONDS with `nanosleep(2)` the way
//! many programs do, restarting the whole interval when interrupted
//! (EINTR) and never looking at the time left the kernel writes to `rem`.
//! A restore that turns an interrupted sleep into EINTR makes it sleep
//! its whole interval again; the end-to-end tests use it to check that a
//! restored sleep keeps its remaining time.

fn main() {
    let seconds: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            eprintln!("usage: cowsnap-sleeper SECONDS");
            std::process::exit(2)
        });
    let request = libc::timespec {
        tv_sec: seconds.trunc() as libc::time_t,
        tv_nsec: (seconds.fract() * 1e9) as libc::c_long,
    };
    let mut rem = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: both pointers are to live timespecs for the duration of the call.
    while unsafe { libc::nanosleep(&request, &mut rem) } != 0 {
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            eprintln!("nanosleep: {}", std::io::Error::last_os_error());
            std::process::exit(1);
        }
    }
}
