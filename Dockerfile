# One image for the whole system: order-service, inventory-consumer and
# stress-test; docker-compose.yml picks the binary with `command`.
#
#   docker build -t outbox:dev .
#   docker run --rm outbox:dev order-service --help
#
# BINARIES names the image or stage the binaries are taken from (in /out/):
# the `builder` stage below by default. scripts/compose-smoke.sh, on a machine
# without a registry (no rust image to pull), passes an image holding binaries
# compiled on the host instead; with BuildKit the builder stage is then skipped.
# (No `# syntax=` line: BuildKit's built-in Dockerfile frontend is used, so the
# build pulls nothing but the base images.)
ARG BINARIES=builder

# ---- build -------------------------------------------------------------------
FROM rust:1.95-slim-bookworm AS builder
WORKDIR /src

# No C dependencies: lapin is built without TLS, reqwest without default
# features, so the slim image's toolchain is all that is needed.
COPY . .

# The cargo registry and the target directory live in BuildKit cache mounts, so
# a rebuild after a source change recompiles only the workspace crates. The
# binaries are copied out in the same step, because the cache is not part of
# the image, and lose their line tables there (about 50 MB each down to 11;
# backtraces keep the function names).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        -p order-service -p inventory-consumer -p stress-test \
 && mkdir -p /out \
 && cp target/release/order-service \
       target/release/inventory-consumer \
       target/release/stress-test /out/ \
 && strip --strip-debug /out/*

# ---- the binaries, from the builder or from the host ---------------------------
FROM ${BINARIES} AS binaries

# ---- run ---------------------------------------------------------------------
FROM debian:bookworm-slim

# curl for the health checks in docker-compose.yml.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 outbox \
 && useradd --system --uid 10001 --gid outbox --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin outbox

COPY --from=binaries /out/ /usr/local/bin/

USER 10001:10001
# order-service answers on 8080, inventory-consumer on 8081.
EXPOSE 8080 8081
CMD ["order-service"]
