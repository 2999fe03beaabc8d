# syntax=docker/dockerfile:1
#
# The example upstream (examples/upstream_echo.rs): the operator's own service that
# docker/compose.yaml puts behind both portcullis replicas. Build context: the repository
# root
#   docker build -f docker/upstream.Dockerfile -t portcullis-upstream-echo:latest .
# It reads each connection's PROXY v2 header, logs the client's address and identity, and
# answers each frame with `<identity>: <payload>`. Replace it with your service.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY examples ./examples
RUN cargo build --release --locked --example upstream_echo

# distroless "cc": glibc and libgcc, no shell; ":nonroot" runs as uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /src/target/release/examples/upstream_echo /usr/local/bin/upstream_echo
USER 65532:65532
EXPOSE 7000
ENTRYPOINT ["/usr/local/bin/upstream_echo"]
CMD ["0.0.0.0:7000"]
