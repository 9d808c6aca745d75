#!/bin/sh
# Lays out the image's root filesystem under DEST: the binary, CA roots for registries with
# public certificates, the 65532 "nonroot" user and group, and a world-writable /tmp (where
# `serve` writes its self-signed CA when it has no certificate). The Dockerfile runs it in its
# build stage and hack/build-image.sh on the host, so both image builds hold the same files.
#
#   hack/image-rootfs.sh DEST BINARY CA_BUNDLE
set -eu
if [ $# -ne 3 ]; then
  echo "usage: $0 DEST BINARY CA_BUNDLE" >&2
  exit 2
fi
dest=$1 binary=$2 ca_bundle=$3
[ -f "$binary" ] || { echo "$0: binary $binary: no such file" >&2; exit 1; }
grep -q 'BEGIN CERTIFICATE' "$ca_bundle" 2>/dev/null \
  || { echo "$0: CA bundle $ca_bundle: no certificate in it (install ca-certificates)" >&2; exit 1; }

rm -rf "$dest"
mkdir -p "$dest/usr/local/bin" "$dest/etc/ssl/certs"
cp "$binary" "$dest/usr/local/bin/registry-addon"
chmod 0755 "$dest/usr/local/bin/registry-addon"
cp "$ca_bundle" "$dest/etc/ssl/certs/ca-certificates.crt"
chmod 0644 "$dest/etc/ssl/certs/ca-certificates.crt"
printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
  'nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin' >"$dest/etc/passwd"
printf '%s\n' 'root:x:0:' 'nonroot:x:65532:' >"$dest/etc/group"
chmod 0644 "$dest/etc/passwd" "$dest/etc/group"
mkdir -m 1777 "$dest/tmp"
