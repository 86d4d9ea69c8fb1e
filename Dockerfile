# syntax=docker/dockerfile:1
# Builds `krest` (scheduler node, CLI, built-in workers) and `krest-demo-worker` into a small,
# non-root Debian image.
#
#   docker build -t krest .            (KREST_GIT_REVISION=$(git rev-parse --short=12 HEAD) as a
#                                      build arg stamps `krest --version`)

# --- build -----------------------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src

# 1. Dependencies only: this layer is rebuilt only when a manifest or the lock file changes.
#    Each workspace member gets an empty stand-in for its sources and build script.
COPY Cargo.toml Cargo.lock ./
COPY schemas/Cargo.toml schemas/
COPY scheduler/Cargo.toml scheduler/
COPY worker-sdk/Cargo.toml worker-sdk/
COPY demo-worker/Cargo.toml demo-worker/
COPY test-support/Cargo.toml test-support/
RUN set -eux; \
    for c in schemas worker-sdk demo-worker test-support scheduler; do \
      mkdir -p "$c/src"; echo '' > "$c/src/lib.rs"; \
    done; \
    echo 'fn main() {}' > scheduler/src/main.rs; \
    echo 'fn main() {}' > scheduler/build.rs; \
    echo 'fn main() {}' > demo-worker/src/main.rs; \
    mkdir -p scheduler/benches; \
    echo 'fn main() {}' > scheduler/benches/engine.rs; \
    echo 'fn main() {}' > scheduler/benches/api.rs; \
    cargo build --release --locked -p krest -p krest-demo-worker; \
    rm -rf schemas/src worker-sdk/src demo-worker/src test-support/src scheduler/src scheduler/build.rs

# 2. The sources.
COPY . .
ARG KREST_GIT_REVISION=""
ENV KREST_GIT_REVISION=${KREST_GIT_REVISION}
RUN set -eux; \
    touch schemas/src/lib.rs worker-sdk/src/lib.rs demo-worker/src/lib.rs \
          demo-worker/src/main.rs scheduler/src/lib.rs scheduler/src/main.rs scheduler/build.rs; \
    cargo build --release --locked -p krest -p krest-demo-worker; \
    install -m 0755 target/release/krest target/release/krest-demo-worker /usr/local/bin/

# --- run -------------------------------------------------------------------------------------
FROM debian:bookworm-slim
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates; \
    rm -rf /var/lib/apt/lists/*; \
    useradd --system --uid 10001 --home /var/lib/krest --create-home krest
COPY --from=build /usr/local/bin/krest /usr/local/bin/krest-demo-worker /usr/local/bin/
COPY examples /usr/share/krest/examples
USER 10001:10001
WORKDIR /var/lib/krest
# A node listens on all interfaces inside the container, so its health endpoint is reachable
# from outside it (publish or probe port 8722).
ENV KREST_HTTP=0.0.0.0:8722 \
    KREST_DB=sqlite:///var/lib/krest/krest.db
EXPOSE 8722
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["krest", "health", "--timeout", "4s"]
ENTRYPOINT ["krest"]
CMD ["scheduler"]
