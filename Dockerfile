# Builds the `krest` and `krest-demo-worker` binaries into a small Debian image.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bins && \
    cp target/release/krest target/release/krest-demo-worker /usr/local/bin/

FROM debian:bookworm-slim
RUN useradd --system --home /var/lib/krest --create-home krest
COPY --from=build /usr/local/bin/krest /usr/local/bin/krest-demo-worker /usr/local/bin/
COPY examples /usr/share/krest/examples
USER krest
WORKDIR /var/lib/krest
ENTRYPOINT ["krest"]
