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
ENV LISTEN_ADDR=:8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=2s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/livez || exit 1
ENTRYPOINT ["/usr/local/bin/flagsmith-sse"]
CMD ["serve"]
