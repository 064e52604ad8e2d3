# syntax=docker/dockerfile:1
#
# keygate container image: a release build on Debian bookworm, run from distroless.
#
#   docker build -t keygate:latest .
#   docker run --rm -p 8080:8080 -p 9901:9901 \
#     -e KEYGATE_PROXY_LISTEN=0.0.0.0:8080 -e KEYGATE_ADMIN_LISTEN=0.0.0.0:9901 \
#     keygate:latest serve --dev
#
# The baked-in /etc/keygate/keygate.yaml is the documented example: it expects the
# app on 127.0.0.1:3000, Redis on 127.0.0.1:6379 and keeps the admin port on loopback.
# Override with KEYGATE_UPSTREAM, KEYGATE_REDIS_URL, KEYGATE_ADMIN_LISTEN and
# KEYGATE_ROOT_TOKEN, or mount your own file over /etc/keygate (k8s/ does that).
#
# BuildKit (the default builder since Docker 23) is required for the cache mounts.

############################ build ############################
FROM rust:1.95.0-bookworm AS build
WORKDIR /src

# Only what the build reads: the manifest and lockfile, the sources, the declared
# bench target (cargo checks that every [[bench]] in Cargo.toml exists) and config/
# (src/dev.rs embeds config/dev.yaml with include_str!).
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY config ./config

# Dependency caching through BuildKit cache mounts: the crate registry, git checkouts
# and target/ survive between builds, so an edit in src/ recompiles keygate only.
# target/ is a cache mount and not part of the image, so the binary is copied out
# in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --profile dist --locked --bin keygate \
 && install -D -m 0755 target/dist/keygate /out/keygate

# Fail the build here, not at deploy time, if the example config is broken.
RUN /out/keygate check-config /src/config/keygate.yaml

############################ runtime ############################
# distroless/cc: glibc, libgcc_s, CA certificates and tzdata; no shell, no package
# manager. keygate links only libc, libm and libgcc_s (no OpenSSL), so nothing else
# is needed, and the bookworm builder's glibc matches debian12's. debian:bookworm-slim
# would work too but adds a shell and apt, i.e. attack surface, for no runtime
# benefit. The :nonroot variant has the nonroot user (uid/gid 65532).
FROM gcr.io/distroless/cc-debian12:nonroot

COPY --from=build /out/keygate /usr/local/bin/keygate
COPY config/keygate.yaml /etc/keygate/keygate.yaml

# Numeric uid:gid (= nonroot) so that Kubernetes' runAsNonRoot can verify the user
# without a passwd lookup; a name here makes such pods fail to start.
USER 65532:65532

# 8080 proxy (public), 9901 admin API, /metrics, /healthz, /readyz (keep private).
EXPOSE 8080 9901

# No HEALTHCHECK: distroless has no curl or shell. Orchestrators probe
# GET /healthz (alive) and GET /readyz (ready) on the admin port (see k8s/).
ENTRYPOINT ["/usr/local/bin/keygate"]
CMD ["serve", "--config", "/etc/keygate/keygate.yaml"]
