# Release binaries of cowsnap (and its containerd shim) in a small Debian image.
#   docker build -t cowsnap .
#   docker run --rm --privileged --pid=host -v /var/lib/cowsnap:/images cowsnap dump --pid PID --images /images/x
# (dumping needs root, the host pid namespace and CAP_SYS_ADMIN/CAP_SYS_PTRACE.)

FROM rust:1-bookworm AS build
# rust:1-bookworm has gcc and binutils (objcopy flattens the restorer blob);
# libseccomp-dev gives libseccomp.a (linked statically, .cargo/config.toml).
RUN apt-get update && apt-get install -y --no-install-recommends libseccomp-dev
WORKDIR /src
COPY . .
# cowsnap is linked statically: the containerd shim also runs it as the
# restore helper inside containers' rootfs.
RUN cargo build --release --locked -p cowsnap --bin containerd-shim-cowsnap-v1 -p cowsnapd --bins \
 && RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked \
      -p cowsnap --bin cowsnap --target x86_64-unknown-linux-gnu \
 && install -D -m 0755 target/x86_64-unknown-linux-gnu/release/cowsnap /out/cowsnap \
 && install -D -m 0755 target/release/containerd-shim-cowsnap-v1 /out/containerd-shim-cowsnap-v1 \
 && install -D -m 0755 target/release/cowsnapd /out/cowsnapd \
 && install -D -m 0755 target/release/cowsnap-ctl /out/cowsnap-ctl

FROM debian:bookworm-slim
COPY --from=build /out/ /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/cowsnap"]
CMD ["--help"]
