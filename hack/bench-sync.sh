#!/usr/bin/env bash
# Benchmark of `registry-addon sync` against `skopeo sync --all` on the same corpus.
#
# Builds a corpus (15 images: 6 multi-platform, shared base layers, one big layer) on two
# peer registries, and EXTRA_REPOS more one-layer repositories on the first peer (so that
# its `_catalog` pages), then syncs it into an empty registry with a release build of
# registry-addon, and the same repositories with skopeo into another empty registry. Then
# both again with nothing to do. Prints the times, the ratios, the peers' request counts of
# the no-change round, and registry-addon's peak RSS.
#
# Needs: docker-registry, skopeo, openssl, python3, /usr/bin/time (Debian: docker-registry,
# skopeo, openssl, time). Only loopback addresses are used.
#
# Environment: BIG_MIB (size of the big layer, default 256), EXTRA_REPOS (default 150; 0
# for the 15 images alone), SKIP_BUILD=1 to reuse target/release/registry-addon, KEEP=1 to
# keep the work directory.
set -euo pipefail

BIG_MIB=${BIG_MIB:-256}
EXTRA_REPOS=${EXTRA_REPOS:-150}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/bench-sync.XXXXXX)
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
BIN=${BIN:-"$ROOT/target/release/registry-addon"}

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
    disabled: false
storage:
  filesystem:
    rootdirectory: $WORK/$name/storage
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
  secret: bench
  tls:
    certificate: $WORK/tls/tls.crt
    key: $WORK/tls/tls.key
EOF
    docker-registry serve "$WORK/$name/config.yml" >"$WORK/$name/access.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
        sleep 0.05
    done
    printf -v "PORT_$name" '%s' "$port"
}

start_registry peer1
start_registry peer2
start_registry ours
start_registry skopeo
echo "registries: peer1 :$PORT_peer1, peer2 :$PORT_peer2, ours :$PORT_ours, skopeo :$PORT_skopeo"

# --- corpus -----------------------------------------------------------------------------------
echo "building the corpus (big layer: $BIG_MIB MiB, $EXTRA_REPOS extra repositories)..."
python3 "$ROOT/hack/bench_corpus.py" "$WORK/corpus" "$BIG_MIB" "$EXTRA_REPOS" >"$WORK/corpus.txt"
mapfile -t IMAGES <"$WORK/corpus.txt"

push() { # port name tag dir [dest tag]
    skopeo --insecure-policy copy --all --preserve-digests -q --dest-cert-dir "$WORK/tls/certs.d" \
        "oci:$4:$3" "docker://127.0.0.1:$1/bench/$2:${5:-$3}"
}

PEER1_REPOS=()
PEER2_REPOS=()
EXTRA=()
PUSHING=()
# Images 0-9 (and the big one) on peer1, 5-14 on peer2: an overlap, as between replicas.
# The extra repositories on peer1 only, pushed four at a time.
i=0
for line in "${IMAGES[@]}"; do
    read -r name tag dir <<<"$line"
    if [[ $name == extra/* ]]; then
        if ((${#PUSHING[@]} >= 4)); then
            wait "${PUSHING[0]}"
            PUSHING=("${PUSHING[@]:1}")
        fi
        push "$PORT_peer1" "$name" "$tag" "$dir" &
        PUSHING+=($!)
        EXTRA+=("bench/$name")
        continue
    fi
    if ((i < 10)) || [[ $name == big ]]; then
        push "$PORT_peer1" "$name" "$tag" "$dir"
        push "$PORT_peer1" "$name" "$tag" "$dir" stable
        PEER1_REPOS+=("bench/$name")
    fi
    if ((i >= 5)) && [[ $name != big ]]; then
        push "$PORT_peer2" "$name" "$tag" "$dir"
        PEER2_REPOS+=("bench/$name")
    fi
    i=$((i + 1))
done
for pid in "${PUSHING[@]}"; do wait "$pid"; done
echo "corpus: ${#IMAGES[@]} images; peer1 $((${#PEER1_REPOS[@]} + ${#EXTRA[@]})) repositories, peer2 ${#PEER2_REPOS[@]}"

# skopeo syncs the extra repositories in one run from a YAML list (one process per
# repository would charge it a start-up each).
{
    echo "127.0.0.1:$PORT_peer1:"
    echo "  cert-dir: $WORK/tls/certs.d"
    echo "  images:"
    for repo in "${EXTRA[@]}"; do echo "    $repo: [v1]"; done
} >"$WORK/extra.yaml"

# --- registry-addon sync --------------------------------------------------------------------
# Every run keeps its memory in one state file, as the sidecar does on its volume; the
# "nostate" run goes without one.
run_ours() { # label [extra args]
    local label=$1 state=(--state-file "$WORK/sync-state.json")
    shift
    [[ $label == nostate ]] && state=()
    RUST_LOG=info /usr/bin/time -v -o "$WORK/time-$label.txt" "$BIN" sync --once "${state[@]}" \
        --local "https://127.0.0.1:$PORT_ours" \
        --peer "https://127.0.0.1:$PORT_peer1" --peer "https://127.0.0.1:$PORT_peer2" \
        --ca-file "$WORK/tls/ca.pem" 2>"$WORK/ours-$label.log"
    grep "sync round finished" "$WORK/ours-$label.log" | sed 's/^.*INFO/  /'
}

run_skopeo() {
    local repo
    for repo in "${PEER1_REPOS[@]}"; do
        skopeo --insecure-policy sync --all --preserve-digests --src docker --dest docker \
            --src-cert-dir "$WORK/tls/certs.d" --dest-cert-dir "$WORK/tls/certs.d" \
            "127.0.0.1:$PORT_peer1/$repo" "127.0.0.1:$PORT_skopeo/bench" >>"$WORK/skopeo.log" 2>&1
    done
    for repo in "${PEER2_REPOS[@]}"; do
        skopeo --insecure-policy sync --all --preserve-digests --src docker --dest docker \
            --src-cert-dir "$WORK/tls/certs.d" --dest-cert-dir "$WORK/tls/certs.d" \
            "127.0.0.1:$PORT_peer2/$repo" "127.0.0.1:$PORT_skopeo/bench" >>"$WORK/skopeo.log" 2>&1
    done
    if ((${#EXTRA[@]} > 0)); then
        # skopeo puts each image under the destination by its last path component.
        skopeo --insecure-policy sync --all --preserve-digests --src yaml --dest docker \
            --dest-cert-dir "$WORK/tls/certs.d" \
            "$WORK/extra.yaml" "127.0.0.1:$PORT_skopeo/bench/extra" >>"$WORK/skopeo.log" 2>&1
    fi
}

median() { # seconds... -> the median
    printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {printf "%.3f", a[int((NR+1)/2)]}'
}

count() { # pattern -> requests to both peers since the marks
    local n1 n2
    n1=$(tail -n +"$((MARK1 + 1))" "$WORK/peer1/access.log" | grep -cE "$1" || true)
    n2=$(tail -n +"$((MARK2 + 1))" "$WORK/peer2/access.log" | grep -cE "$1" || true)
    echo $((n1 + n2))
}

echo "cold round, registry-addon..."
t0=$(now); run_ours cold; t1=$(now)
OURS_COLD=$(elapsed "$t0" "$t1")
echo "cold round, skopeo sync..."
t0=$(now); run_skopeo; t1=$(now)
SKOPEO_COLD=$(elapsed "$t0" "$t1")

echo "no-change round, registry-addon..."
MARK1=$(wc -l <"$WORK/peer1/access.log")
MARK2=$(wc -l <"$WORK/peer2/access.log")
t0=$(now); run_ours warm; t1=$(now)
OURS_WARM=$(elapsed "$t0" "$t1")
BLOB_GETS=$(count '"GET /v2/[^ ]+/blobs/')
TAG_LISTS=$(count '"GET /v2/[^ ]+/tags/list')
MANIFEST_HEADS=$(count '"HEAD /v2/[^ ]+/manifests/')
MANIFEST_GETS=$(count '"GET /v2/[^ ]+/manifests/')
WARM_HEADS=$(grep -o 'local_manifest_heads=[0-9]*' "$WORK/ours-warm.log")
echo "no-change round, registry-addon without a state file..."
t0=$(now); run_ours nostate; t1=$(now)
OURS_NOSTATE=$(elapsed "$t0" "$t1")
NOSTATE_HEADS=$(grep -o 'local_manifest_heads=[0-9]*' "$WORK/ours-nostate.log")
echo "no-change round, skopeo sync (3 times)..."
SKOPEO_RUNS=()
for _ in 1 2 3; do
    t0=$(now); run_skopeo; t1=$(now)
    SKOPEO_RUNS+=("$(elapsed "$t0" "$t1")")
done
SKOPEO_WARM=$(median "${SKOPEO_RUNS[@]}")
echo "no-change round, registry-addon again (2 more times, with the state file)..."
OURS_RUNS=("$OURS_WARM")
for _ in 1 2; do
    t0=$(now); run_ours warm; t1=$(now)
    OURS_RUNS+=("$(elapsed "$t0" "$t1")")
done
OURS_WARM=$(median "${OURS_RUNS[@]}")

# The sidecar runs rounds in one long-lived process; from its second round on it knows the
# local tags it saw. Four rounds a second apart; the median of the last three.
echo "no-change rounds in one process, registry-addon..."
: >"$WORK/ours-steady.log"
RUST_LOG=info "$BIN" sync --interval 1s --state-file "$WORK/sync-state.json" \
    --local "https://127.0.0.1:$PORT_ours" \
    --peer "https://127.0.0.1:$PORT_peer1" --peer "https://127.0.0.1:$PORT_peer2" \
    --ca-file "$WORK/tls/ca.pem" 2>"$WORK/ours-steady.log" &
STEADY_PID=$!
for _ in $(seq 200); do
    (($(grep -c "sync round finished" "$WORK/ours-steady.log" || true) >= 4)) && break
    sleep 0.1
done
kill "$STEADY_PID"
wait "$STEADY_PID" 2>/dev/null || true
OURS_STEADY=$(grep -o 'duration_ms=[0-9]*' "$WORK/ours-steady.log" | tail -n +2 | head -3 | cut -d= -f2 |
    sort -n | awk '{a[NR]=$1} END {printf "%.3f", a[int((NR+1)/2)] / 1000}')
STEADY_HEADS=$(grep "sync round finished" "$WORK/ours-steady.log" | sed -n 2p | grep -o 'local_manifest_heads=[0-9]*')

# Peers' repositories and tags, to compare the request counts with.
REPOS=$((${#PEER1_REPOS[@]} + ${#EXTRA[@]} + ${#PEER2_REPOS[@]}))
TAGS=$((2 * ${#PEER1_REPOS[@]} + ${#EXTRA[@]} + ${#PEER2_REPOS[@]}))
RSS_COLD=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$WORK/time-cold.txt")
RSS_WARM=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$WORK/time-warm.txt")

# Both destinations must hold the same thing.
SAME=yes
for line in "${IMAGES[@]}"; do
    read -r name tag _ <<<"$line"
    a=$(skopeo inspect --raw --cert-dir "$WORK/tls/certs.d" "docker://127.0.0.1:$PORT_ours/bench/$name:$tag" | sha256sum)
    b=$(skopeo inspect --raw --cert-dir "$WORK/tls/certs.d" "docker://127.0.0.1:$PORT_skopeo/bench/$name:$tag" | sha256sum)
    [[ "$a" == "$b" ]] || SAME=no
done

cat <<EOF

== sync benchmark: ${#IMAGES[@]} images ($EXTRA_REPOS one-layer extras), big layer $BIG_MIB MiB, 2 peers ($REPOS peer repositories, $TAGS peer tags) ==
cold round:       registry-addon ${OURS_COLD}s   skopeo sync ${SKOPEO_COLD}s   ratio $(ratio "$OURS_COLD" "$SKOPEO_COLD") (target <= 0.5)
no-change round:  registry-addon ${OURS_WARM}s   skopeo sync ${SKOPEO_WARM}s   ratio $(ratio "$OURS_WARM" "$SKOPEO_WARM") (target <= 0.1)   (a fresh --once process with the state file, $WARM_HEADS; medians of 3: ours ${OURS_RUNS[*]}, skopeo ${SKOPEO_RUNS[*]})
no-change round:  registry-addon ${OURS_NOSTATE}s   skopeo sync ${SKOPEO_WARM}s   ratio $(ratio "$OURS_NOSTATE" "$SKOPEO_WARM")   (a fresh --once process without a state file, $NOSTATE_HEADS)
no-change round:  registry-addon ${OURS_STEADY}s   skopeo sync ${SKOPEO_WARM}s   ratio $(ratio "$OURS_STEADY" "$SKOPEO_WARM") (target <= 0.1)   (the sidecar's later rounds, $STEADY_HEADS)
no-change round requests to the peers: blob GETs $BLOB_GETS (target 0), tags/list $TAG_LISTS (repositories: $REPOS), manifest HEADs $MANIFEST_HEADS (tags: $TAGS), manifest GETs $MANIFEST_GETS
peak RSS of registry-addon: cold $((RSS_COLD / 1024)) MiB, no-change $((RSS_WARM / 1024)) MiB (target <= 32 MiB)
destinations identical: $SAME
EOF
