# syntax=docker/dockerfile:1

# Tessera: one binary, many roles (`tessera serve <service>`). Build from the repository root:
#   docker build -t tessera:0.1.0 --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" .
#
# BINARY=prebuilt takes the runtime tree from the build context's `out/` instead of building
# it (scripts/image-check.sh does this with the binary CI built, so the final stage below is
# the one that is assembled and run in CI). The default builds it here.
ARG BINARY=builder

# --- build --------------------------------------------------------------------------------
# The official Rust image on Alpine: its native target is musl, and Rust links musl binaries
# statically, so the result runs on an empty base image.
FROM rust:1.95.0-alpine3.23 AS builder
# The workspace compiles C (the bundled SQLite of libsqlite3-sys, ring); the image has gcc,
# musl-dev adds the C library headers and start files. Not pinned to a version: Alpine keeps
# only the newest build of a package in a branch, and the branch is pinned by the tag above.
# hadolint ignore=DL3018
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY . .
# BuildKit cache mounts keep the crate registry and target/ between builds, so only the
# crates that changed recompile; the binary is copied out of the cache within the same step.
# protoc comes vendored with the build (protoc-bin-vendored, itself static), nothing to install.
# The build fails if the binary turns out to need a dynamic loader or shared libraries, which
# the runtime image does not have. /out also gets the little a static binary needs at run
# time: a passwd and group entry for uid 65532 and an empty /tmp.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p tessera-cli --bin tessera \
    && install -D -m 0755 target/release/tessera /out/usr/local/bin/tessera \
    && readelf -W -l -d /out/usr/local/bin/tessera >/tmp/elf \
    && if grep -Eq 'INTERP|\(NEEDED\)' /tmp/elf; then \
        echo "target/release/tessera is not statically linked" >&2; exit 1; \
    fi \
    && mkdir -p /out/etc /out/tmp \
    && chmod 1777 /out/tmp \
    && printf 'nonroot:x:65532:65532:nonroot:/tmp:/sbin/nologin\n' >/out/etc/passwd \
    && printf 'nonroot:x:65532:\n' >/out/etc/group

# --- or: a runtime tree prepared outside (out/ in the build context, same layout as /out) --
FROM scratch AS prebuilt
COPY out/ /out/

# The stage named by BINARY (a stage of this file, never a pulled image).
# checkov:skip=CKV_DOCKER_7:BINARY names a stage of this file (builder or prebuilt), not an image
FROM ${BINARY} AS binary

# --- run ----------------------------------------------------------------------------------
# Nothing but the binary: no shell, no package manager, no C library, no CA certificates
# (the mesh trusts only the CA mounted with each service's certificate).
FROM scratch
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="tessera" \
      org.opencontainers.image.description="Tessera gRPC microservice mesh: one binary, run as tessera serve <service>." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/tessera" \
      org.opencontainers.image.base.name="scratch"
# The whole tree: the binary, passwd/group and /tmp; from `prebuilt`, also the shared
# libraries a binary built elsewhere needs (scripts/image-check.sh copies them).
COPY --from=binary /out/ /
# Numeric, so Kubernetes can check runAsNonRoot.
USER 65532:65532
# Internal mTLS gRPC, admin (plaintext gRPC health and /metrics), gateway public port.
EXPOSE 8443 9090 8080
# Docker only; Kubernetes uses the native gRPC probes in k8s/base instead.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/tessera", "probe", "--addr", "127.0.0.1:9090", "--service", "readiness"]
ENTRYPOINT ["/usr/local/bin/tessera"]
CMD ["--help"]
