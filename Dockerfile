# subguard container image: a release build on Debian bookworm, run on distroless (glibc, CA
# certificates, libgcc; no shell, no package manager) as the unprivileged user 65532.
#
#   docker build -t ghcr.io/subguard/subguard:0.1.0 .
#   docker build --build-arg FEATURES=otel -t ...   # with OpenTelemetry trace export
#
# Not built by `make test` (it needs a container engine); docs/deploy.md describes the image.

FROM rust:1-bookworm AS build
ARG FEATURES=""
WORKDIR /src
# Manifests first, so that a change to src/ alone reuses the layer with the dependencies fetched
# (Cargo.toml declares the bench target, so benches/ comes along).
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
RUN cargo fetch --locked
COPY src ./src
RUN cargo build --release --locked --bin subguard --features "${FEATURES}" \
    && ./target/release/subguard --version

# cc: glibc and libgcc_s, which the Rust binary links against; the same Debian 12 as the builder.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/subguard /subguard
# distroless' nonroot user, numerically, so that Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
# Admin listener (probes, metrics) in the Kubernetes configs; the decision listener is a Unix
# socket or loopback TCP.
EXPOSE 9192
ENTRYPOINT ["/subguard"]
CMD ["serve", "--config", "/etc/subguard/config.yaml"]
