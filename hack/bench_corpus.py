#!/usr/bin/env python3
"""Writes the sync benchmark corpus as one OCI image layout per image.

Usage: bench_corpus.py OUT_DIR [BIG_LAYER_MIB [EXTRA_REPOS]]

Creates OUT_DIR/<name>/ (an OCI layout whose index.json tags the image) and prints one line
per image: "<name> <tag> <layout dir>". Layers are random (incompressible); a few base
layers are shared between images and platforms, and one image carries a big layer.

EXTRA_REPOS (default 0) more images, "extra/rNNN", each of one small layer of its own: many
repositories, so that a registry's `_catalog` pages (Distribution answers 100 per page
unless asked for more).
"""

import hashlib
import json
import os
import sys

CHUNK = 1 << 20


def write_blob(blobs, data):
    digest = hashlib.sha256(data).hexdigest()
    path = os.path.join(blobs, digest)
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.write(data)
    return {"digest": "sha256:" + digest, "size": len(data)}


def random_blob(pool, cache, blobs, key, size):
    """A random blob of `size` bytes, the same one for the same key (shared layers). Blobs
    are generated once into `pool` and hard-linked into each layout."""
    if key not in cache:
        h = hashlib.sha256()
        tmp = os.path.join(pool, "tmp")
        with open(tmp, "wb") as f:
            left = size
            while left > 0:
                chunk = os.urandom(min(CHUNK, left))
                h.update(chunk)
                f.write(chunk)
                left -= len(chunk)
        os.replace(tmp, os.path.join(pool, h.hexdigest()))
        cache[key] = {"digest": "sha256:" + h.hexdigest(), "size": size}
    desc = cache[key]
    dst = os.path.join(blobs, desc["digest"][7:])
    if not os.path.exists(dst):
        os.link(os.path.join(pool, desc["digest"][7:]), dst)
    return dict(desc)


def image_manifest(pool, cache, blobs, arch, layers):
    layer_descs = []
    for key, size in layers:
        d = random_blob(pool, cache, blobs, key, size)
        d["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip"
        layer_descs.append(d)
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in layer_descs]},
            "config": {"Env": ["IMAGE=" + "-".join(k for k, _ in layers)]},
        }
    ).encode()
    cdesc = write_blob(blobs, config)
    cdesc["mediaType"] = "application/vnd.oci.image.config.v1+json"
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": cdesc,
            "layers": layer_descs,
        }
    ).encode()
    mdesc = write_blob(blobs, manifest)
    mdesc["mediaType"] = "application/vnd.oci.image.manifest.v1+json"
    return mdesc


def layout(out, name, tag, top):
    d = os.path.join(out, name)
    with open(os.path.join(d, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    top = dict(top)
    top["annotations"] = {"org.opencontainers.image.ref.name": tag}
    with open(os.path.join(d, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [top]}, f)
    print(name, tag, d)


def main():
    out = sys.argv[1]
    big_mib = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    extra = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    cache = {}
    pool = os.path.join(out, "_pool")
    os.makedirs(pool, exist_ok=True)
    MiB = 1 << 20
    images = []
    # Six multi-platform images sharing a base layer across images and platforms.
    for i in range(6):
        images.append(
            (f"multi{i}", "v1", [
                ("amd64", [("base-amd64", 12 * MiB), (f"m{i}-amd64", (2 + i % 3) * MiB)]),
                ("arm64", [("base-arm64", 11 * MiB), (f"m{i}-arm64", (2 + i % 3) * MiB)]),
            ])
        )
    # Eight single-platform images over a second shared base.
    for i in range(8):
        images.append(
            (f"single{i}", "1.0", [
                ("amd64", [("base2", 6 * MiB), (f"s{i}", (1 + i % 4) * MiB), (f"s{i}-small", 40 * 1024)]),
            ])
        )
    # One image with the big layer.
    images.append(("big", "latest", [("amd64", [("base2", 6 * MiB), ("big", big_mib * MiB)])]))
    for i in range(extra):
        images.append((f"extra/r{i:03d}", "v1", [("amd64", [(f"x{i}", 4096 + i)])]))

    for name, tag, platforms in images:
        blobs = os.path.join(out, name, "blobs", "sha256")
        os.makedirs(blobs, exist_ok=True)
        descs = []
        for arch, layers in platforms:
            d = image_manifest(pool, cache, blobs, arch, layers)
            d["platform"] = {"architecture": arch, "os": "linux"}
            descs.append(d)
        if len(descs) == 1:
            top = dict(descs[0])
            top.pop("platform")
        else:
            index = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.index.v1+json",
                    "manifests": descs,
                }
            ).encode()
            top = write_blob(blobs, index)
            top["mediaType"] = "application/vnd.oci.image.index.v1+json"
        layout(out, name, tag, top)


if __name__ == "__main__":
    main()
