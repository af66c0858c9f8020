# The toolrank consumers (`consume kafka|dynamodb-streams|kinesis`, `backfill`, `replay`, ...)
# as a slim, non-root image. The Lambda function is packaged by infra/aws/package instead.
#   docker build -t toolrank .
#   docker run --rm toolrank consume kafka --help
# Multi-arch: docker buildx build --platform linux/arm64,linux/amd64 -t ... .

FROM rust:1.95-slim-bookworm AS build
# librdkafka and OpenSSL (both bundled by rdkafka) build with make, perl and a C/C++ compiler.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential perl python3 pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin toolrank \
 && cp target/release/toolrank /usr/local/bin/toolrank

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin toolrank
COPY --from=build /usr/local/bin/toolrank /usr/local/bin/toolrank
USER 10001:10001
# Logs as JSON lines for the platform's log collector; metrics on 9898 for Prometheus.
ENV TOOLRANK_METRICS_ADDR=0.0.0.0:9898
EXPOSE 9898
# tini forwards SIGTERM, which a consumer answers by checkpointing and writing its sinks.
ENTRYPOINT ["/usr/bin/tini", "--", "toolrank"]
CMD ["--help"]
