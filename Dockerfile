# The `mysimbdp` image, two ways to the same runtime stage:
#
#   docker build .                       compiles the release binary in a Rust image (default)
#   docker build --target prebuilt \
#     --build-arg RUNTIME_IMAGE=... .    packages a binary built outside, from dist/mysimbdp
#                                        (CI: the debug build its tests already made, on the
#                                        local Debian base, with no Rust image and no registry)
#
# Base images come from build arguments; the defaults are the official images. The runtime
# must be Debian bookworm (or glibc as new) for a binary built on a bookworm host to run.
ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUNTIME_IMAGE} AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 mysimbdp \
    && useradd --system --uid 10001 --gid 10001 --home /var/lib/mysimbdp mysimbdp \
    && mkdir -p /var/lib/mysimbdp/staging && chown -R mysimbdp:mysimbdp /var/lib/mysimbdp
# Listen on every interface inside the container (the binary's default is 127.0.0.1, which
# nothing outside the container reaches); staging where the volume is mounted.
ENV MYSIMBDP_LISTEN=0.0.0.0:8800 \
    MYSIMBDP_STAGING_DIR=/var/lib/mysimbdp/staging
WORKDIR /var/lib/mysimbdp
# Numeric, so Kubernetes can check runAsNonRoot (deploy/kubernetes sets the same uid).
USER 10001:10001
EXPOSE 8800
ENTRYPOINT ["mysimbdp"]
CMD ["serve"]

# A binary built outside the image (made executable before: the classic builder has no
# COPY --chmod). Stages are built in order up to the target, so this one
# comes before the Rust stage: `--target prebuilt` never needs the Rust image.
FROM runtime AS prebuilt
COPY dist/mysimbdp /usr/local/bin/mysimbdp

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p mysimbdp --bin mysimbdp

# The default target: the release binary compiled above.
FROM runtime AS release
COPY --from=build /src/target/release/mysimbdp /usr/local/bin/mysimbdp
