#!/usr/bin/env bash
# Benchmark of `registry-addon mirror push` and `mirror pull` on the sync benchmark's corpus
# (hack/bench_corpus.py: 15 images, 6 multi-platform, shared base layers, one big layer).
#
# push: the corpus as one OCI layout into an empty registry, against
#   - `skopeo copy --all` of the same images one by one into another empty registry, and
#   - a floor: the corpus's unique blobs PUT monolithically with curl (one streamed PUT per
#     blob, 8 at once, HTTP/1.1) into a third empty registry: no manifests, no existence
#     checks, the bytes alone.
# pull: the pushed images back out of the registry into a layout directory, against
#   `skopeo copy --all` of the same images one by one into another layout directory.
# Prints the times, the ratios, and registry-addon's peak RSS (/usr/bin/time -v).
#
# Needs: docker-registry, skopeo, curl, openssl, python3, /usr/bin/time (Debian:
# docker-registry, skopeo, curl, openssl, time). Only loopback addresses are used.
#
# Environment: BIG_MIB (size of the big layer, default 256), SKIP_BUILD=1 to reuse
# target/release/registry-addon, BIN to run another binary, KEEP=1 to keep the work
# directory.
set -euo pipefail

BIG_MIB=${BIG_MIB:-256}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/bench-mirror.XXXXXX)
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ "${KEEP:-}" != 1 ]]; then rm -rf "$WORK"; else echo "kept $WORK"; fi
}
trap cleanup EXIT

if [[ "${SKIP_BUILD:-}" != 1 ]]; then
    (cd "$ROOT" && cargo build --release --bin registry-addon)
fi
BIN=${BIN:-"${CARGO_TARGET_DIR:-$ROOT/target}/release/registry-addon"}

now() { date +%s.%N; }
elapsed() { python3 -c "print(f'{$2 - $1:.3f}')"; }
ratio() { python3 -c "print(f'{$1 / $2:.3f}')"; }

# --- TLS: a CA and a certificate for 127.0.0.1 --------------------------------------------
mkdir -p "$WORK/tls/certs.d"
(
    cd "$WORK/tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj "/CN=bench CA" -keyout ca.key -out ca.pem \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=registry" \
        -keyout tls.key -out tls.csr 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >ext.cnf
    openssl x509 -req -in tls.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
        -extfile ext.cnf -out tls.crt 2>/dev/null
    cp ca.pem certs.d/ca.crt
)
CERTS="$WORK/tls/certs.d"

# --- registries -----------------------------------------------------------------------------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_registry() { # name -> sets PORT_<name>
    local name=$1 port
    port=$(free_port)
    mkdir -p "$WORK/$name"
    cat >"$WORK/$name/config.yml" <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $WORK/$name/storage
http:
  addr: 127.0.0.1:$port
  secret: bench
  tls:
    certificate: $WORK/tls/tls.crt
    key: $WORK/tls/tls.key
EOF
    docker-registry serve "$WORK/$name/config.yml" >"$WORK/$name/registry.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
        sleep 0.05
    done
    printf -v "PORT_$name" '%s' "$port"
}

start_registry ours
start_registry skopeo
start_registry floor
echo "registries: ours :$PORT_ours, skopeo :$PORT_skopeo, floor :$PORT_floor"

# --- corpus: one layout per image, and all of them in one layout with full names ------------
echo "building the corpus (big layer: $BIG_MIB MiB)..."
python3 "$ROOT/hack/bench_corpus.py" "$WORK/corpus" "$BIG_MIB" >"$WORK/corpus.txt"
mapfile -t IMAGES <"$WORK/corpus.txt"
python3 - "$WORK/corpus.txt" "$WORK/bundle" <<'EOF'
import json, os, sys
lines = [l.split() for l in open(sys.argv[1]) if l.strip()]
out = sys.argv[2]
os.makedirs(os.path.join(out, "blobs", "sha256"), exist_ok=True)
entries = []
for name, tag, d in lines:
    for b in os.listdir(os.path.join(d, "blobs", "sha256")):
        dst = os.path.join(out, "blobs", "sha256", b)
        if not os.path.exists(dst):
            os.link(os.path.join(d, "blobs", "sha256", b), dst)
    top = json.load(open(os.path.join(d, "index.json")))["manifests"][0]
    top["annotations"] = {"org.opencontainers.image.ref.name": f"bench.example/bench/{name}:{tag}"}
    entries.append(top)
with open(os.path.join(out, "oci-layout"), "w") as f:
    f.write('{"imageLayoutVersion":"1.0.0"}')
with open(os.path.join(out, "index.json"), "w") as f:
    json.dump({"schemaVersion": 2, "manifests": entries}, f)
EOF
UNIQUE_BYTES=$(du -sb --apparent-size "$WORK/bundle/blobs/sha256" | cut -f1)
BLOB_COUNT=$(ls "$WORK/bundle/blobs/sha256" | wc -l)
# Read everything once, so that no contender pays for a cold page cache.
cat "$WORK/bundle/blobs/sha256/"* >/dev/null
echo "corpus: ${#IMAGES[@]} images, $BLOB_COUNT unique blobs, $((UNIQUE_BYTES / 1048576)) MiB"

# --- push -----------------------------------------------------------------------------------
echo "push, registry-addon..."
t0=$(now)
/usr/bin/time -v -o "$WORK/time-push.txt" "$BIN" mirror push --from "$WORK/bundle" \
    --to "https://127.0.0.1:$PORT_ours" --ca-file "$WORK/tls/ca.pem" >"$WORK/push.out" 2>"$WORK/push.err"
t1=$(now)
OURS_PUSH=$(elapsed "$t0" "$t1")
sed 's/^/  /' "$WORK/push.out"

echo "push, skopeo copy --all one by one..."
t0=$(now)
for line in "${IMAGES[@]}"; do
    read -r name tag dir <<<"$line"
    skopeo --insecure-policy copy --all --preserve-digests -q --dest-cert-dir "$CERTS" \
        "oci:$dir:$tag" "docker://127.0.0.1:$PORT_skopeo/bench/$name:$tag"
done
t1=$(now)
SKOPEO_PUSH=$(elapsed "$t0" "$t1")

echo "floor, unique blobs PUT with curl, 8 at once..."
FLOOR_URL="https://127.0.0.1:$PORT_floor"
mapfile -t BLOBS < <(ls "$WORK/bundle/blobs/sha256")
POSTS=()
for _ in "${BLOBS[@]}"; do POSTS+=("$FLOOR_URL/v2/floor/blobs/uploads/"); done
t0=$(now)
# One upload session per blob (the POSTs on one connection), then each blob in one streamed
# PUT, 8 at once, HTTP/1.1 as our blob transfers are.
mapfile -t LOCS < <(curl -sS --http1.1 --cacert "$WORK/tls/ca.pem" -X POST -o /dev/null \
    -w '%header{location}\n' "${POSTS[@]}")
: >"$WORK/floor.curl"
for i in "${!BLOBS[@]}"; do
    loc=${LOCS[$i]}
    case $loc in http*) ;; *) loc="$FLOOR_URL$loc" ;; esac
    printf 'upload-file = "%s"\nurl = "%s&digest=sha256:%s"\noutput = "/dev/null"\n' \
        "$WORK/bundle/blobs/sha256/${BLOBS[$i]}" "$loc" "${BLOBS[$i]}" >>"$WORK/floor.curl"
done
curl -sS -f --http1.1 --cacert "$WORK/tls/ca.pem" --parallel --parallel-max 8 \
    -H 'Content-Type: application/octet-stream' -K "$WORK/floor.curl"
t1=$(now)
FLOOR_STORED=$(find "$WORK/floor/storage/docker/registry/v2/blobs" -name data | wc -l)
FLOOR_PUSH=$(elapsed "$t0" "$t1")

# --- pull: the pushed images back out --------------------------------------------------------
REFS=()
for line in "${IMAGES[@]}"; do
    read -r name tag _ <<<"$line"
    REFS+=("127.0.0.1:$PORT_ours/bench/$name:$tag")
done
echo "pull, registry-addon..."
t0=$(now)
/usr/bin/time -v -o "$WORK/time-pull.txt" "$BIN" mirror pull "${REFS[@]}" --to "$WORK/pulled" \
    --ca-file "$WORK/tls/ca.pem" >"$WORK/pull.out" 2>"$WORK/pull.err"
t1=$(now)
OURS_PULL=$(elapsed "$t0" "$t1")
sed 's/^/  /' "$WORK/pull.out"

echo "pull, skopeo copy --all one by one..."
t0=$(now)
for line in "${IMAGES[@]}"; do
    read -r name tag _ <<<"$line"
    skopeo --insecure-policy copy --all --preserve-digests -q --src-cert-dir "$CERTS" \
        "docker://127.0.0.1:$PORT_ours/bench/$name:$tag" "oci:$WORK/skopeo-pulled:$name-$tag"
done
t1=$(now)
SKOPEO_PULL=$(elapsed "$t0" "$t1")

RSS_PUSH=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$WORK/time-push.txt")
RSS_PULL=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$WORK/time-pull.txt")

# Both registries must hold the same thing, and the pulled layout the same digests.
SAME=yes
for line in "${IMAGES[@]}"; do
    read -r name tag _ <<<"$line"
    a=$(skopeo inspect --raw --cert-dir "$CERTS" "docker://127.0.0.1:$PORT_ours/bench/$name:$tag" | sha256sum | cut -d' ' -f1)
    b=$(skopeo inspect --raw --cert-dir "$CERTS" "docker://127.0.0.1:$PORT_skopeo/bench/$name:$tag" | sha256sum | cut -d' ' -f1)
    c=$(python3 -c "import json,sys; i=json.load(open('$WORK/pulled/index.json')); print([m['digest'][7:] for m in i['manifests'] if m['annotations']['org.opencontainers.image.ref.name']=='127.0.0.1:$PORT_ours/bench/$name:$tag'][0])")
    [[ "$a" == "$b" && "$a" == "$c" ]] || SAME=no
done

cat <<EOF

== mirror benchmark: ${#IMAGES[@]} images, big layer $BIG_MIB MiB, $BLOB_COUNT unique blobs ($((UNIQUE_BYTES / 1048576)) MiB) ==
push: registry-addon ${OURS_PUSH}s   skopeo copy ${SKOPEO_PUSH}s   ratio $(ratio "$OURS_PUSH" "$SKOPEO_PUSH") (target <= 0.5)
push: registry-addon ${OURS_PUSH}s   floor (curl PUTs) ${FLOOR_PUSH}s   ratio $(ratio "$OURS_PUSH" "$FLOOR_PUSH") (target <= 1.5)
pull: registry-addon ${OURS_PULL}s   skopeo copy ${SKOPEO_PULL}s   ratio $(ratio "$OURS_PULL" "$SKOPEO_PULL") (target <= 0.5)
peak RSS of registry-addon: push $((RSS_PUSH / 1024)) MiB, pull $((RSS_PULL / 1024)) MiB (target <= 48 MiB)
registries and pulled layout identical: $SAME; floor stored $FLOOR_STORED of $BLOB_COUNT blobs
EOF
