# Multi-stage build: compile in the Rust image, run in a small Debian image as a non-root
# user. Build: docker build -t flagsmith-sse .
#
# Base images are pinned by digest (the multi-platform index, so amd64 and arm64 both
# resolve), with the tag they were published as. The digests are those listed by
# docker-library/repo-info (repos/rust/remote/1.98.0-slim-bookworm.md and
# repos/debian/remote/bookworm-20260918-slim.md). To update: pick the new tags, then
# `docker buildx imagetools inspect <image>:<tag>` prints the digest to paste here.
FROM rust:1.98.0-slim-bookworm@sha256:f5b930229aa3a991d2ad65e358fc460719ddc404e5af6cb044d57215abce933e AS build
WORKDIR /src
# Dependencies first, against placeholder sources: this layer is rebuilt only when
# Cargo.toml or Cargo.lock change, not on every source change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin flagsmith-sse \
    && rm -rf src
COPY src ./src
# COPY keeps the files' own times, which can be older than the placeholder build: touch so
# that cargo rebuilds the crate itself.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin flagsmith-sse

FROM debian:bookworm-20260918-slim@sha256:3783cc01769c7b2b1b83a5c5ad96c815348e28ed7da68e2e3687004faa906251
# ca-certificates: Redis over TLS (REDIS_USE_SSL) verifies against the system's CAs.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home flagsmith-sse
COPY --from=build /src/target/release/flagsmith-sse /usr/local/bin/flagsmith-sse
USER 10001
# Flagsmith's Helm chart probes port 8000 (hard-coded for liveness) and its own image serves
# 0.0.0.0:8000, so the image does too; the binary's own default stays :8080.
ENV LISTEN_ADDR=:8000
EXPOSE 8000
# The binary checks itself: it reads the same LISTEN_ADDR and TLS_CERT_FILE as `serve`
# (so a changed port or TLS needs no change here) and needs no HTTP client in the image
# and no token.
# `--live` asks /livez: Docker Swarm replaces unhealthy containers, and restarting does not
# bring back a broker that is down; readiness belongs to the orchestrator's own probe
# (/readyz), or `flagsmith-sse healthcheck` without --live.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/flagsmith-sse", "healthcheck", "--live"]
ENTRYPOINT ["/usr/local/bin/flagsmith-sse"]
CMD ["serve"]
