# Multi-stage build of the `mysimbdp` binary.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin mysimbdp

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/mysimbdp mysimbdp \
    && mkdir -p /var/lib/mysimbdp/staging && chown -R mysimbdp /var/lib/mysimbdp
COPY --from=build /src/target/release/mysimbdp /usr/local/bin/mysimbdp
USER mysimbdp
EXPOSE 8800
ENTRYPOINT ["mysimbdp"]
CMD ["serve"]
