#!/usr/bin/env bash
# Builds the container image without network access: the static binary with cargo on the
# host, its root filesystem with hack/image-rootfs.sh, then the Dockerfile's image stage with
# buildah (`--build-arg ROOTFS=prebuilt`), written as an OCI archive:
#
#   hack/build-image.sh        # -> ${CARGO_TARGET_DIR:-target}/image/registry-addon.tar
#
# Where registries are reachable, `docker build .` builds the same image stage from a binary
# compiled in the Dockerfile. Needs cargo, buildah (Debian package buildah) and the CA roots
# of ca-certificates (CA_BUNDLE, default /etc/ssl/certs/ca-certificates.crt).
set -euo pipefail
# A relative CARGO_TARGET_DIR is taken from where the script was started.
target_dir=$(realpath -m "${CARGO_TARGET_DIR:-$(dirname "$0")/../target}")
export CARGO_TARGET_DIR=$target_dir
cd "$(dirname "$0")/.."

command -v buildah >/dev/null 2>&1 || {
  echo "$0: buildah not found: apt-get install buildah" >&2
  exit 1
}
ca_bundle=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
triple=x86_64-unknown-linux-gnu
out=$target_dir/image

# glibc, statically linked (static-pie): the image has no libc. With --target, RUSTFLAGS
# reach only the binary's crates, not build scripts and proc macros.
start=$(date +%s)
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --locked --release --target "$triple" --bin registry-addon
echo "build-image: cargo build took $(($(date +%s) - start))s"
binary=$target_dir/$triple/release/registry-addon
if ! ldd "$binary" 2>&1 | grep -Eq 'statically linked|not a dynamic executable'; then
  echo "$0: $binary is linked dynamically:" >&2
  ldd "$binary" >&2
  exit 1
fi

version=$("$binary" --version | awk '{print $2}')
tag=ghcr.io/registry-addon/registry-addon:$version
rm -rf "$out/context"
hack/image-rootfs.sh "$out/context/rootfs" "$binary" "$ca_bundle"

# Storage of its own under the target dir: nothing of the machine's buildah or podman images
# is read or changed. vfs and chroot need neither overlay mounts nor a daemon.
b=(buildah --root "$out/storage" --runroot "$out/run" --storage-driver vfs)
# The commit time, so that rebuilding one commit gives the same image.
timestamp=$(git log -1 --format=%ct 2>/dev/null || echo 0)
"${b[@]}" bud --quiet --isolation chroot --squash --timestamp "$timestamp" \
  --build-arg ROOTFS=prebuilt -f Dockerfile -t "$tag" "$out/context" >/dev/null
rm -f "$out/registry-addon.tar"
"${b[@]}" push --quiet --format oci "$tag" "oci-archive:$out/registry-addon.tar:$tag"
"${b[@]}" rmi --force "$tag" >/dev/null

echo "build-image: $tag in $out/registry-addon.tar ($(du -k "$out/registry-addon.tar" | cut -f1) KiB; binary $(du -k "$binary" | cut -f1) KiB)"
