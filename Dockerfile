# syntax=docker/dockerfile:1
# registry-addon: one static binary (serve, sync, render) on an empty base, non-root.
#
#   docker build -t ghcr.io/registry-addon/registry-addon:0.1.0 .
#
# Offline, hack/build-image.sh builds the binary on the host, lays out the same root
# filesystem with hack/image-rootfs.sh and builds this file with `--build-arg ROOTFS=prebuilt`:
# only the stage the root filesystem comes from differs, the image stage is this file's last.

# `compiled`: build the binary here (needs docker.io); `prebuilt`: take rootfs/ from the context.
ARG ROOTFS=compiled

# Alpine's Rust targets musl and links statically by default: the binary needs no libc.
FROM docker.io/library/rust:1-alpine AS build
RUN apk add --no-cache musl-dev gcc make perl ca-certificates
WORKDIR /src
# Dependencies first, so source edits reuse the cached dependency layer.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin registry-addon \
    && rm -rf src
COPY src ./src
# The stubs' build outputs are older than the real sources; touch forces a rebuild of the crate.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin registry-addon \
    && ! ldd target/release/registry-addon 2>/dev/null | grep -q '=>'
COPY hack/image-rootfs.sh /usr/local/bin/
RUN image-rootfs.sh /rootfs target/release/registry-addon /etc/ssl/certs/ca-certificates.crt

FROM scratch AS rootfs-compiled
COPY --from=build /rootfs/ /

FROM scratch AS rootfs-prebuilt
COPY rootfs/ /

# The image: everything below is shared by both builds.
FROM rootfs-${ROOTFS}
USER 65532:65532
EXPOSE 9443 9440
ENTRYPOINT ["/usr/local/bin/registry-addon"]
CMD ["serve", "--listen=0.0.0.0:9443", "--metrics-listen=0.0.0.0:9440"]
