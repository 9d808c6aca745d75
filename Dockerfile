# syntax=docker/dockerfile:1
# registry-addon: one static binary (serve, sync, render) on a distroless base, non-root.
#
#   docker build -t ghcr.io/registry-addon/registry-addon:0.1.0 .

# Alpine's Rust targets musl and links statically by default: the binary needs no libc.
FROM docker.io/library/rust:1-alpine AS build
RUN apk add --no-cache musl-dev gcc make perl
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
    && cp target/release/registry-addon /registry-addon \
    && ! ldd /registry-addon 2>/dev/null | grep -q '=>'

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /registry-addon /usr/local/bin/registry-addon
USER 65532:65532
EXPOSE 9443 9440
ENTRYPOINT ["/usr/local/bin/registry-addon"]
CMD ["serve", "--listen=0.0.0.0:9443", "--metrics-listen=0.0.0.0:9440"]
