#!/usr/bin/env bash
# Benchmark of Proxy mode: a replica as the Proxy StatefulSet runs it (`registry-addon front`
# with its relay to the upstream, `--remote … --relay-listen`, reading the cached blobs from
# the cache's storage, `--blob-store`, before a CNCF Distribution
# pull-through cache whose proxy.remoteurl is that relay, the cache beside Local's tree), same
# machine, same images. Measured, per image shape (one large blob; many small layers):
#   - warm pull through front + cache ÷ a pull from a plain local registry holding the images
#     (TLS, no front): time ratio plain/warm, target >= 0.9;
#   - cold pull through front + cache (of an image never pulled through it before, the cache
#     emptied and restarted) ÷ a pull of it straight from the upstream: time ratio cold/upstream, target <= 1.3;
#   - for comparison, the same cold pull through Distribution 2.8's proxy reaching the upstream
#     on its own (no relay), which downloads every blob twice.
# A pull is what a node does: the manifest, then every blob, 4 at a time.
#
# The upstream is anonymous here, so that the straight pull pays no bcrypt per request;
# credentials would be added by the relay once per token or per request header, not per byte.
#
# Needs: docker-registry, curl, openssl, htpasswd, python3 (Debian: docker-registry, curl,
# openssl, apache2-utils). Only loopback addresses are used.
#
# Each is measured with one client and with CLIENTS at once (the same image, as nodes pulling it
# together), the time until every client has it. With LINK_MIB, the upstream is reached
# through one link of that bandwidth shared by every connection (hack/throttle.py), as a remote
# registry is; without, on the loopback, where the upstream, the cache and the clients share
# the machine's cores.
#
# LINK_RTT_MS adds that round-trip time to the link. With KEEPALIVE=1 a pull fetches its blobs
# over four kept-alive connections (as containerd does) instead of one curl, and one
# connection, per blob.
#
# Environment: BIG_MIB (default 256), SMALL_LAYERS (default 64, 256 KiB each), ROUNDS
# (default 3), CLIENTS (default 4), LINK_MIB (default: none), LINK_RTT_MS (default 0, with
# LINK_MIB), KEEPALIVE (default 0), BIN (a release binary; default: built as hack/build-image.sh builds it), KEEP=1
# to keep the work directory.
set -euo pipefail

BIG_MIB=${BIG_MIB:-256}
SMALL_LAYERS=${SMALL_LAYERS:-64}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-4}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/bench-proxy.XXXXXX)
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ "${KEEP:-}" != 1 ]]; then rm -rf "$WORK"; else echo "kept $WORK"; fi
}
trap cleanup EXIT

triple=x86_64-unknown-linux-gnu
if [[ -z "${BIN:-}" ]]; then
    (cd "$ROOT" && RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --locked --release --target "$triple" --bin registry-addon)
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/$triple/release/registry-addon"
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { # url [curl args]
    local url=$1
    shift
    for _ in $(seq 200); do
        if curl -s -o /dev/null "$@" "$url"; then return 0; fi
        sleep 0.05
    done
    echo "$url did not answer" >&2
    exit 1
}

# --- TLS and users --------------------------------------------------------------------------
mkdir -p "$WORK/tls"
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
)
RO_PASSWORD=$(head -c 30 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
htpasswd -nbB ro "$RO_PASSWORD" >"$WORK/pull.htpasswd"
: >"$WORK/push.htpasswd"
AUTH="Authorization: Basic $(printf 'ro:%s' "$RO_PASSWORD" | base64 -w0)"

# --- registries ---------------------------------------------------------------------------------
registry_config() { # name port store tls(yes/no)
    mkdir -p "$WORK/$1"
    {
        printf 'version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n'
        printf 'storage:\n  filesystem:\n    rootdirectory: %s\n' "$3"
        printf 'http:\n  addr: 127.0.0.1:%s\n  secret: bench\n  relativeurls: true\n' "$2"
        if [[ $4 == yes ]]; then
            printf '  tls:\n    certificate: %s\n    key: %s\n' "$WORK/tls/tls.crt" "$WORK/tls/tls.key"
        fi
    } >"$WORK/$1/config.yml"
}
UPSTREAM=$(free_port)
LOCAL=$(free_port)
CACHE=$(free_port)
CACHE_ALONE=$(free_port)
RELAY=$(free_port)
FRONT=$(free_port)
FRONT_METRICS=$(free_port)
FRONT_ALONE=$(free_port)
FRONT_ALONE_METRICS=$(free_port)
registry_config upstream "$UPSTREAM" "$WORK/upstream-store" yes
registry_config local "$LOCAL" "$WORK/local-store" yes
docker-registry serve "$WORK/upstream/config.yml" >"$WORK/upstream/log" 2>&1 &
UPSTREAM_PID=$!
PIDS+=($!)
docker-registry serve "$WORK/local/config.yml" >"$WORK/local/log" 2>&1 &
PIDS+=($!)
wait_http "https://127.0.0.1:$UPSTREAM/v2/" --cacert "$WORK/tls/ca.pem"
wait_http "https://127.0.0.1:$LOCAL/v2/" --cacert "$WORK/tls/ca.pem"
# Where pulls straight from the upstream, the relay and the lone cache reach the upstream: with
# LINK_MIB, through one link of that many MiB/s shared by every connection.
REMOTE=$UPSTREAM
if [[ -n "${LINK_MIB:-}" ]]; then
    REMOTE=$(free_port)
    python3 "$ROOT/hack/throttle.py" "$REMOTE" "$UPSTREAM" "$LINK_MIB" "${LINK_RTT_MS:-0}" &
    PIDS+=($!)
    wait_http "https://127.0.0.1:$REMOTE/v2/" --cacert "$WORK/tls/ca.pem"
fi

# The replica as the Proxy StatefulSet runs it: the front, with the relay the cache reaches the
# upstream through (verifying it with its CA), then the cache with its registry container's
# environment. And, as a peer, the cache as Distribution 2.8 runs on its own: the upstream as
# its proxy.remoteurl (its CA in SSL_CERT_FILE), a plain front before it.
registry_config cache "$CACHE" /nonexistent no
registry_config cache-alone "$CACHE_ALONE" /nonexistent no
CACHE_PID=
CACHE_ALONE_PID=
start_cache() {
    rm -rf "$WORK/cache-volume" "$WORK/cache-alone-volume"
    mkdir -p "$WORK/cache-volume" "$WORK/cache-alone-volume"
    REGISTRY_PROXY_REMOTEURL="http://127.0.0.1:$RELAY" \
        REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY="$WORK/cache-volume/proxy-cache" \
        docker-registry serve "$WORK/cache/config.yml" >"$WORK/cache/log" 2>&1 &
    CACHE_PID=$!
    REGISTRY_PROXY_REMOTEURL="https://127.0.0.1:$REMOTE" \
        SSL_CERT_FILE="$WORK/tls/ca.pem" \
        REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY="$WORK/cache-alone-volume/proxy-cache" \
        docker-registry serve "$WORK/cache-alone/config.yml" >"$WORK/cache-alone/log" 2>&1 &
    CACHE_ALONE_PID=$!
    PIDS+=("$CACHE_PID" "$CACHE_ALONE_PID")
    wait_http "http://127.0.0.1:$CACHE/v2/"
    wait_http "http://127.0.0.1:$CACHE_ALONE/v2/"
}
stop_cache() {
    kill "$CACHE_PID" "$CACHE_ALONE_PID" 2>/dev/null || true
    wait "$CACHE_PID" "$CACHE_ALONE_PID" 2>/dev/null || true
}
mkdir -p "$WORK/spool"
"$BIN" front --listen "127.0.0.1:$FRONT" --metrics-listen "127.0.0.1:$FRONT_METRICS" \
    --tls-cert-file "$WORK/tls/tls.crt" --tls-key-file "$WORK/tls/tls.key" \
    --upstream "http://127.0.0.1:$CACHE" --pull-only \
    --remote "https://127.0.0.1:$REMOTE" --remote-ca "$WORK/tls/ca.pem" \
    --relay-listen "127.0.0.1:$RELAY" --relay-spool "$WORK/spool" \
    --blob-store "$WORK/cache-volume/proxy-cache" \
    --pull-users "$WORK/pull.htpasswd" --push-users "$WORK/push.htpasswd" 2>"$WORK/front.log" &
FRONT_PID=$!
PIDS+=($!)
"$BIN" wait --tcp "127.0.0.1:$RELAY"
"$BIN" front --listen "127.0.0.1:$FRONT_ALONE" --metrics-listen "127.0.0.1:$FRONT_ALONE_METRICS" \
    --tls-cert-file "$WORK/tls/tls.crt" --tls-key-file "$WORK/tls/tls.key" \
    --upstream "http://127.0.0.1:$CACHE_ALONE" --pull-only \
    --pull-users "$WORK/pull.htpasswd" --push-users "$WORK/push.htpasswd" 2>"$WORK/front-alone.log" &
PIDS+=($!)
start_cache
wait_http "http://127.0.0.1:$FRONT_METRICS/readyz" -f
wait_http "http://127.0.0.1:$FRONT_ALONE_METRICS/readyz" -f

# --- content: the same images in the upstream and in the plain local registry ---------------------
put_blob() { # port repo file digest
    local location
    location=$(curl -sf --cacert "$WORK/tls/ca.pem" -X POST -D - -o /dev/null \
        "https://127.0.0.1:$1/v2/$2/blobs/uploads/" |
        tr -d '\r' | awk -F': ' 'tolower($1)=="location"{print $2}')
    case $location in http*) ;; *) location="https://127.0.0.1:$1$location" ;; esac
    local sep='?'
    [[ $location == *\?* ]] && sep='&'
    curl -sf --cacert "$WORK/tls/ca.pem" -X PUT -H 'Content-Type: application/octet-stream' \
        --data-binary "@$3" "$location${sep}digest=$4" -o /dev/null
}
make_image() { # repo layer-count layer-bytes
    local repo=$1 dir="$WORK/images/$1" layers=()
    mkdir -p "$dir"
    printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"repo":"%s"}' "$repo" >"$dir/config.json"
    for i in $(seq "$2"); do
        head -c "$3" /dev/urandom >"$dir/layer-$i"
        layers+=("$dir/layer-$i")
    done
    local config digest entries=()
    config=sha256:$(sha256sum "$dir/config.json" | cut -d' ' -f1)
    for layer in "${layers[@]}"; do
        digest=sha256:$(sha256sum "$layer" | cut -d' ' -f1)
        entries+=("{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar\",\"digest\":\"$digest\",\"size\":$(stat -c %s "$layer")}")
        echo "$digest" >>"$dir/blobs"
    done
    echo "$config" >>"$dir/blobs"
    local joined
    joined=$(IFS=,; echo "${entries[*]}")
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[%s]}' \
        "$config" "$(stat -c %s "$dir/config.json")" "$joined" >"$dir/manifest.json"
    for port in "$UPSTREAM" "$LOCAL"; do
        put_blob "$port" "$repo" "$dir/config.json" "$config"
        for layer in "${layers[@]}"; do
            put_blob "$port" "$repo" "$layer" "sha256:$(sha256sum "$layer" | cut -d' ' -f1)"
        done
        curl -sf --cacert "$WORK/tls/ca.pem" -X PUT \
            -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
            --data-binary "@$dir/manifest.json" "https://127.0.0.1:$port/v2/$repo/manifests/v1" -o /dev/null
    done
}
# Every cold pull is of an image nobody pulled through the front before, so that nothing of it
# is left in the relay (which shares a finished download for a few seconds) or the page cache
# of the cache's volume: per round, one image of each shape for one client, and one for many.
for round in $(seq "$ROUNDS") cpu; do
    make_image "large-$round" 1 $((BIG_MIB * 1024 * 1024))
    make_image "small-$round" "$SMALL_LAYERS" $((256 * 1024))
    if [[ $round != cpu ]]; then
        make_image "large-$round-n" 1 $((BIG_MIB * 1024 * 1024))
        make_image "small-$round-n" "$SMALL_LAYERS" $((256 * 1024))
    fi
done

# --- pulls -----------------------------------------------------------------------------------------
pull() { # base repo -> seconds
    local base=$1 repo=$2 start end
    start=$(date +%s.%N)
    curl -sf --cacert "$WORK/tls/ca.pem" -H "$AUTH" \
        -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
        -o /dev/null "$base/v2/$repo/manifests/v1"
    if [[ "${KEEPALIVE:-}" == 1 ]]; then
        # Four connections kept alive, each fetching its share of the blobs in turn, as
        # containerd's pooled client does.
        local k urls pids=()
        for k in 0 1 2 3; do
            urls=()
            while read -r digest; do
                urls+=(-o /dev/null "$base/v2/$repo/blobs/$digest")
            done < <(awk -v k="$k" 'NR % 4 == k' "$WORK/images/$repo/blobs")
            if [[ ${#urls[@]} -gt 0 ]]; then
                curl -sf --cacert "$WORK/tls/ca.pem" -H "$AUTH" "${urls[@]}" &
                pids+=($!)
            fi
        done
        wait "${pids[@]}"
    else
        xargs -P 4 -I{} curl -sf --cacert "$WORK/tls/ca.pem" -H "$AUTH" -o /dev/null \
            "$base/v2/$repo/blobs/{}" <"$WORK/images/$repo/blobs"
    fi
    end=$(date +%s.%N)
    python3 -c "print($end - $start)"
}
pull_many() { # clients base repo -> seconds until every client has the image
    local n=$1 base=$2 repo=$3 start end pids=()
    start=$(date +%s.%N)
    for _ in $(seq "$n"); do
        pull "$base" "$repo" >/dev/null &
        pids+=($!)
    done
    wait "${pids[@]}"
    end=$(date +%s.%N)
    python3 -c "print($end - $start)"
}
# The cache holds every blob once its own background copy is committed (Distribution 2.8 stores
# a blob by a second download, after answering the client).
wait_cached() { # volume repo
    local volume=$1 repo=$2
    for _ in $(seq 600); do
        local missing=0
        while read -r digest; do
            [[ -e "$WORK/$volume/proxy-cache/docker/registry/v2/repositories/$repo/_layers/sha256/${digest#sha256:}/link" ]] || missing=1
        done <"$WORK/images/$repo/blobs"
        [[ $missing == 0 ]] && return 0
        sleep 0.05
    done
    echo "the cache did not store $repo" >&2
    exit 1
}

# Warm the page cache and every path once.
for repo in $(ls "$WORK/images"); do
    pull "https://127.0.0.1:$LOCAL" "$repo" >/dev/null
    pull "https://127.0.0.1:$UPSTREAM" "$repo" >/dev/null
done

declare -A T
for round in $(seq "$ROUNDS"); do
    for shape in large small; do
        one=$shape-$round many=$shape-$round-n
        T[upstream,$shape,$round]=$(pull "https://127.0.0.1:$REMOTE" "$one")
        stop_cache
        start_cache
        T[cold,$shape,$round]=$(pull "https://127.0.0.1:$FRONT" "$one")
        wait_cached cache-volume "$one"
        T[alone,$shape,$round]=$(pull "https://127.0.0.1:$FRONT_ALONE" "$one")
        wait_cached cache-alone-volume "$one"
        T[local,$shape,$round]=$(pull "https://127.0.0.1:$LOCAL" "$one")
        T[warm,$shape,$round]=$(pull "https://127.0.0.1:$FRONT" "$one")
        # CLIENTS nodes pulling the same image at once (a DaemonSet rolled out, say).
        T[upstream_n,$shape,$round]=$(pull_many "$CLIENTS" "https://127.0.0.1:$REMOTE" "$many")
        stop_cache
        start_cache
        T[cold_n,$shape,$round]=$(pull_many "$CLIENTS" "https://127.0.0.1:$FRONT" "$many")
        wait_cached cache-volume "$many"
        T[alone_n,$shape,$round]=$(pull_many "$CLIENTS" "https://127.0.0.1:$FRONT_ALONE" "$many")
        wait_cached cache-alone-volume "$many"
        T[local_n,$shape,$round]=$(pull_many "$CLIENTS" "https://127.0.0.1:$LOCAL" "$many")
        T[warm_n,$shape,$round]=$(pull_many "$CLIENTS" "https://127.0.0.1:$FRONT" "$many")
    done
done

# Where the CPU of one more cold pull of the large image goes (seconds of user + system time),
# and how many pages the front faulted in meanwhile (fresh memory, costly on a VM).
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
stop_cache
start_cache
declare -A CPU_BEFORE
for p in upstream:$UPSTREAM_PID front:$FRONT_PID cache:$CACHE_PID; do CPU_BEFORE[${p%%:*}]=$(cpu "${p#*:}"); done
faults_before=$(awk '{print $10}' "/proc/$FRONT_PID/stat")
cold_once=$(pull "https://127.0.0.1:$FRONT" large-cpu)
faults=$(($(awk '{print $10}' "/proc/$FRONT_PID/stat") - faults_before))
wait_cached cache-volume large-cpu
ticks=$(getconf CLK_TCK)
cpu_report="cold pull of the large image once more: ${cold_once}s; CPU seconds:"
for p in upstream:$UPSTREAM_PID front:$FRONT_PID cache:$CACHE_PID; do
    cpu_report+=" ${p%%:*} $(python3 -c "print(round(($(cpu "${p#*:}") - ${CPU_BEFORE[${p%%:*}]}) / $ticks, 2))")"
done

python3 - "$BIG_MIB" "$SMALL_LAYERS" "$ROUNDS" "$CLIENTS" "${LINK_MIB:-}" "$(for k in "${!T[@]}"; do echo "$k=${T[$k]}"; done)" <<'EOF'
import statistics, sys
big, layers, rounds, clients, link = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
times = {}
for line in sys.argv[6].split("\n"):
    key, value = line.split("=")
    side, repo, _ = key.split(",")
    times.setdefault((side, repo), []).append(float(value))
med = lambda side, repo: statistics.median(times[(side, repo)])
where = f"through one {link} MiB/s link" if link else "on the loopback, no link limit"
import os
if link and os.environ.get("LINK_RTT_MS", "0") != "0":
    where += f", {os.environ['LINK_RTT_MS']} ms round trip"
if os.environ.get("KEEPALIVE") == "1":
    where += "; clients keep their connections alive"
print(f"proxy benchmark: upstream {where}; {rounds} interleaved rounds, median of rounds, seconds per pull")
print(f"{'image':<26}{'clients':>8}{'local':>8}{'warm':>8}{'local/warm':>12}{'upstream':>10}{'cold':>8}{'cold/upstream':>15}{'alone':>8}{'alone/upstream':>16}")
for repo, label in (("large", f"1 blob of {big} MiB"), ("small", f"{layers} layers of 256 KiB")):
    for n, suffix in ((1, ""), (clients, "_n")):
        l, w, u, c, a = (med(side + suffix, repo) for side in ("local", "warm", "upstream", "cold", "alone"))
        print(f"{label:<26}{n:>8}{l:>8.3f}{w:>8.3f}{l / w:>12.2f}{u:>10.3f}{c:>8.3f}{c / u:>15.2f}{a:>8.3f}{a / u:>16.2f}")
print("targets: local/warm >= 0.9, cold/upstream <= 1.3")
print("alone: a cold pull through Distribution 2.8's own proxy to the upstream (no relay), for comparison")
EOF
echo "$cpu_report (front includes its relay); the front's minor page faults during the pull: $faults"
# Every round's times of the large image's pulls by one client, and what the relay did.
for side in upstream cold; do
    line="$side, 1 blob, 1 client, per round:"
    for round in $(seq "$ROUNDS"); do line+=" ${T[$side,large,$round]}"; done
    echo "$line"
done
curl -s "http://127.0.0.1:$FRONT_METRICS/metrics" |
    awk '/^registry_addon_front_relay_(blob_downloads_total|blob_shared_total|spools_reused_total|spools_idle) /{printf "%s %s  ", substr($1, 28), $2} END {print ""}'

