#!/usr/bin/env bash
# Replication latency of push notifications: from a push done to the image served by every
# replica.
#
# Starts three docker-registry replicas on loopback, each notifying its own release-build
# `registry-addon sync` sidecar (rounds every 2m, the default, so rounds play no part), with
# the notification settings the chart renders. Then PUSHES times (default 20): a new image
# (a 1 MiB layer of its own over a shared 4 MiB base) copied with skopeo to the replicas in
# turn; after skopeo returns, the other two are polled (HEAD of the tag, persistent
# connections, 5 ms apart) until both serve the pushed digest. Prints p50, p99 and max.
#
# Needs: docker-registry, skopeo, python3 (Debian: docker-registry, skopeo). Loopback only.
# Environment: PUSHES (default 20), SKIP_BUILD=1 to reuse target/release/registry-addon,
# KEEP=1 to keep the work directory.
set -euo pipefail

PUSHES=${PUSHES:-20}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/bench-replication.XXXXXX)
PIDS=()
TOKEN=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ "${KEEP:-}" != 1 ]]; then rm -rf "$WORK"; else echo "kept $WORK"; fi
}
trap cleanup EXIT

if [[ "${SKIP_BUILD:-}" != 1 ]]; then
    (cd "$ROOT" && cargo build --release --bin registry-addon)
fi
BIN=${BIN:-"$ROOT/target/release/registry-addon"}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "nothing listens on :$1" >&2
    return 1
}

REG=()
NOTIFY=()
for i in 0 1 2; do
    REG[i]=$(free_port)
    NOTIFY[i]=$(free_port)
done

for i in 0 1 2; do
    mkdir -p "$WORK/r$i"
    cat >"$WORK/r$i/config.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $WORK/r$i/storage
http:
  addr: 127.0.0.1:${REG[i]}
  secret: bench
EOF
    # The value the chart renders, with the sidecar's port and the token expanded.
    REGISTRY_NOTIFICATIONS_ENDPOINTS="- name: sync
  url: http://127.0.0.1:${NOTIFY[i]}/events
  headers:
    Authorization: [\"Bearer $TOKEN\"]
  timeout: 5s
  threshold: 3
  backoff: 1s
  ignore:
    mediatypes: [application/octet-stream]
    actions: [pull, delete]
" docker-registry serve "$WORK/r$i/config.yml" >"$WORK/r$i/registry.log" 2>&1 &
    PIDS+=($!)
done
for i in 0 1 2; do wait_port "${REG[i]}"; done

for i in 0 1 2; do
    peers=()
    for j in 0 1 2; do
        if ((j != i)); then peers+=(--peer "http://127.0.0.1:${REG[j]}"); fi
    done
    REGISTRY_NOTIFY_TOKEN=$TOKEN RUST_LOG=info "$BIN" sync --local "http://127.0.0.1:${REG[i]}" \
        "${peers[@]}" --interval 2m --notify-listen "127.0.0.1:${NOTIFY[i]}" \
        >"$WORK/r$i/sidecar.log" 2>&1 &
    PIDS+=($!)
done
for i in 0 1 2; do wait_port "${NOTIFY[i]}"; done
echo "replicas :${REG[0]} :${REG[1]} :${REG[2]}; sidecars :${NOTIFY[0]} :${NOTIFY[1]} :${NOTIFY[2]}"

python3 - "$WORK" "$PUSHES" "${REG[@]}" <<'EOF'
import hashlib, http.client, json, os, statistics, subprocess, sys, time

work, pushes, ports = sys.argv[1], int(sys.argv[2]), [int(p) for p in sys.argv[3:]]
MiB = 1 << 20
base = os.urandom(4 * MiB)


def blob(d, data):
    h = hashlib.sha256(data).hexdigest()
    with open(os.path.join(d, "blobs", "sha256", h), "wb") as f:
        f.write(data)
    return {"digest": "sha256:" + h, "size": len(data)}


def layout(n):
    d = os.path.join(work, f"layout{n}")
    os.makedirs(os.path.join(d, "blobs", "sha256"))
    layers = [blob(d, base), blob(d, os.urandom(MiB))]
    for l in layers:
        l["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip"
    config = blob(d, json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": [l["digest"] for l in layers]}}).encode())
    config["mediaType"] = "application/vnd.oci.image.config.v1+json"
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": config, "layers": layers}).encode()
    top = blob(d, manifest)
    top["mediaType"] = "application/vnd.oci.image.manifest.v1+json"
    top["annotations"] = {"org.opencontainers.image.ref.name": "v1"}
    with open(os.path.join(d, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [top]}, f)
    with open(os.path.join(d, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    return d, top["digest"]


conns = {p: http.client.HTTPConnection("127.0.0.1", p) for p in ports}


def served(port, repo, digest):
    c = conns[port]
    try:
        c.request("HEAD", f"/v2/{repo}/manifests/v1", headers={
            "Accept": "application/vnd.oci.image.manifest.v1+json"})
        r = c.getresponse()
        r.read()
        last[port] = (r.status, r.getheader("Docker-Content-Digest"))
        return r.status == 200 and r.getheader("Docker-Content-Digest") == digest
    except (http.client.HTTPException, OSError) as e:
        last[port] = e
        c.close()
        return False


last = {}


lat = []
for n in range(pushes):
    d, digest = layout(n)
    src = ports[n % 3]
    others = [p for p in ports if p != src]
    repo = f"bench/app{n}"
    subprocess.run(["skopeo", "--insecure-policy", "copy", "-q", "--preserve-digests", "--dest-tls-verify=false",
                    f"oci:{d}:v1", f"docker://127.0.0.1:{src}/{repo}:v1"], check=True)
    done = time.monotonic()
    pending = set(others)
    while pending:
        pending = {p for p in pending if not served(p, repo, digest)}
        if pending:
            if time.monotonic() - done > 20:
                sys.exit(f"{repo} ({digest}) not replicated within 20 s: {last}")
            time.sleep(0.005)
    lat.append(time.monotonic() - done)
    print(f"  push {n + 1:2d} to :{src}: served by the other two after {lat[-1] * 1000:.0f} ms")

lat.sort()
p = lambda q: lat[min(len(lat) - 1, int(round(q * (len(lat) - 1))))]
print()
print(f"== replication latency over {pushes} pushes (3 replicas, 1 MiB new layer + 4 MiB base, rounds every 2m) ==")
print(f"p50 {p(0.5) * 1000:.0f} ms   p99 {p(0.99) * 1000:.0f} ms   max {lat[-1] * 1000:.0f} ms   (target: every replica within 5 s)")
EOF

# The sidecars' own pushes were recognised: nothing bounced back.
for i in 0 1 2; do
    grep -q "tag not pushed out" "$WORK/r$i/sidecar.log" && echo "sidecar $i: some push-outs failed (see $WORK/r$i/sidecar.log)"
done
true
