# Multi-stage build: compile in the Rust image, run in a small Debian image as a non-root
# user. Build: docker build -t flagsmith-sse .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin flagsmith-sse

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home flagsmith-sse
COPY --from=build /src/target/release/flagsmith-sse /usr/local/bin/flagsmith-sse
USER 10001
# Flagsmith's Helm chart probes port 8000 (hard-coded for liveness) and its own image serves
# 0.0.0.0:8000, so the image does too; the binary's own default stays :8080.
ENV LISTEN_ADDR=:8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=2s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/livez || exit 1
ENTRYPOINT ["/usr/local/bin/flagsmith-sse"]
CMD ["serve"]
