# Release binaries of cowsnap in a small Debian image.
#   docker build -t cowsnap .
#   docker run --rm --privileged --pid=host -v /var/lib/cowsnap:/images cowsnap dump --pid PID --images /images/x
# (dumping needs root, the host pid namespace and CAP_SYS_ADMIN/CAP_SYS_PTRACE.)

FROM rust:1-bookworm AS build
# rust:1-bookworm has gcc and binutils (objcopy flattens the restorer blob).
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p cowsnap --bins \
 && install -D -m 0755 target/release/cowsnap /out/cowsnap

FROM debian:bookworm-slim
COPY --from=build /out/ /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/cowsnap"]
CMD ["--help"]
