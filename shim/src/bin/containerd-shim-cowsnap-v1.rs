//! containerd runtime v2 shim `io.containerd.cowsnap.v1`: containerd starts
//! this binary; everything it does lives in [`cowsnap::containerd`].

fn main() {
    cowsnap::containerd::run();
}
