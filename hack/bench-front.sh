#!/usr/bin/env bash
# Benchmark of `registry-addon front` against the registry straight, same machine, same blobs.
#
# One Distribution store is served twice: by a registry on plain HTTP behind the front (as in
# a registry pod), and by a registry serving TLS itself (as before the front existed). Both
# read the same files, so every difference is the front's. Measured:
#   - pull throughput of a 256 MiB blob, one client and 4 at once, each repeated and
#     interleaved (front ÷ straight; target >= 0.9);
#   - manifest latency with 16 concurrent clients (wrk, keep-alive): p50/p99 and the p99 the
#     front adds (target <= 1 ms). wrk waits for a body after a HEAD answer that carries a
#     Content-Length, so it sends GET: the front's work (credentials, forwarding) is the same,
#     the manifest body (~400 bytes) comes on top;
#   - the front's peak RSS over the whole run, 4 parallel 256 MiB streams included
#     (target <= 32 MiB);
#   - manifest HEAD p50/p99 at 16 clients against a quiet baseline, nginx answering from a
#     static file, direct over TLS and through a second front (see below): there the front's
#     added p99 is not lost in Distribution's own spread.
#
# Needs: docker-registry, curl, wrk, nginx, cargo, openssl, htpasswd, python3 (Debian:
# docker-registry, curl, wrk, apache2-utils, nginx, openssl). Only loopback addresses are used.
#
# Environment: BIG_MIB (default 256), ROUNDS (default 3), HEAD_ROUNDS (default 20),
# HEAD_REQUESTS and HEAD_PACED_REQUESTS (per client, side and round; 1000 back to back,
# 400 paced), BIN (a release binary; default:
# built as hack/build-image.sh builds it, so the image build and this share one build),
# KEEP=1 to keep the work directory.
set -euo pipefail

BIG_MIB=${BIG_MIB:-256}
ROUNDS=${ROUNDS:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/bench-front.XXXXXX)
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
# The HEAD load generator, built before anything is measured.
(cd "$ROOT" && cargo bench --bench head_latency --no-run)

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

# --- one store, two registries, the front -----------------------------------------------------
STORE=$WORK/storage
registry() { # name port tls(yes/no)
    local name=$1 port=$2 tls=$3
    mkdir -p "$WORK/$name"
    {
        printf 'version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n'
        printf 'storage:\n  filesystem:\n    rootdirectory: %s\n' "$STORE"
        printf 'http:\n  addr: 127.0.0.1:%s\n  secret: bench\n  relativeurls: true\n' "$port"
        if [[ $tls == yes ]]; then
            printf '  tls:\n    certificate: %s\n    key: %s\n' "$WORK/tls/tls.crt" "$WORK/tls/tls.key"
        fi
    } >"$WORK/$name/config.yml"
    docker-registry serve "$WORK/$name/config.yml" >"$WORK/$name/log" 2>&1 &
    PIDS+=($!)
}
BEHIND=$(free_port)
STRAIGHT=$(free_port)
FRONT=$(free_port)
FRONT_METRICS=$(free_port)
registry behind "$BEHIND" no
registry straight "$STRAIGHT" yes
wait_http "http://127.0.0.1:$BEHIND/v2/"
wait_http "https://127.0.0.1:$STRAIGHT/v2/" --cacert "$WORK/tls/ca.pem"
"$BIN" front --listen "127.0.0.1:$FRONT" --metrics-listen "127.0.0.1:$FRONT_METRICS" \
    --tls-cert-file "$WORK/tls/tls.crt" --tls-key-file "$WORK/tls/tls.key" \
    --upstream "http://127.0.0.1:$BEHIND" \
    --pull-users "$WORK/pull.htpasswd" --push-users "$WORK/push.htpasswd" 2>"$WORK/front.log" &
FRONT_PID=$!
PIDS+=($FRONT_PID)
wait_http "http://127.0.0.1:$FRONT_METRICS/readyz" -f

# --- content: a big blob and a small image ------------------------------------------------------
head -c $((BIG_MIB * 1024 * 1024)) /dev/urandom >"$WORK/big"
BIG=sha256:$(sha256sum "$WORK/big" | cut -d' ' -f1)
put_blob() { # file digest
    local location
    location=$(curl -sf -X POST -D - -o /dev/null "http://127.0.0.1:$BEHIND/v2/bench/blobs/uploads/" |
        tr -d '\r' | awk -F': ' 'tolower($1)=="location"{print $2}')
    case $location in http*) ;; *) location="http://127.0.0.1:$BEHIND$location" ;; esac
    local sep='?'
    [[ $location == *\?* ]] && sep='&'
    curl -sf -X PUT -H 'Content-Type: application/octet-stream' --data-binary "@$1" \
        "$location${sep}digest=$2" -o /dev/null
}
put_blob "$WORK/big" "$BIG"
printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}' >"$WORK/config.json"
CONFIG=sha256:$(sha256sum "$WORK/config.json" | cut -d' ' -f1)
put_blob "$WORK/config.json" "$CONFIG"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":%s}]}' \
    "$CONFIG" "$(stat -c %s "$WORK/config.json")" "$BIG" "$(stat -c %s "$WORK/big")" >"$WORK/manifest.json"
curl -sf -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
    --data-binary "@$WORK/manifest.json" "http://127.0.0.1:$BEHIND/v2/bench/manifests/v1" -o /dev/null
AUTH="Authorization: Basic $(printf 'ro:%s' "$RO_PASSWORD" | base64 -w0)"

# --- blob throughput ----------------------------------------------------------------------------
pull_all() { # base clients
    local pids=() start end
    start=$(date +%s.%N)
    for _ in $(seq "$2"); do
        curl -sf --cacert "$WORK/tls/ca.pem" -H "$AUTH" -o /dev/null "$1/v2/bench/blobs/$BIG" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    end=$(date +%s.%N)
    python3 -c "print($end - $start)"
}
# Warm the page cache and both connections' paths once.
pull_all "https://127.0.0.1:$STRAIGHT" 1 >/dev/null
pull_all "https://127.0.0.1:$FRONT" 1 >/dev/null

declare -A T
for clients in 1 4; do
    for round in $(seq "$ROUNDS"); do
        T[straight,$clients,$round]=$(pull_all "https://127.0.0.1:$STRAIGHT" "$clients")
        T[front,$clients,$round]=$(pull_all "https://127.0.0.1:$FRONT" "$clients")
    done
done

# --- manifest latency -----------------------------------------------------------------------------
latency() { # base -> "p50 p99 req/s", latencies in ms
    wrk -t2 -c16 -d5s --latency -H "$AUTH" \
        -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
        "$1/v2/bench/manifests/v1" >"$WORK/wrk.out"
    python3 - "$WORK/wrk.out" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
def ms(label):
    m = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
if non2xx:
    sys.exit(f"{non2xx.group(1)} failed requests:\n{text}")
rps = re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)
print(f"{ms('50%'):.3f} {ms('99%'):.3f} {float(rps):.0f}")
EOF
}
read -r S50 S99 SRPS < <(latency "https://127.0.0.1:$STRAIGHT")
read -r F50 F99 FRPS < <(latency "https://127.0.0.1:$FRONT")
read -r S50b S99b SRPSb < <(latency "https://127.0.0.1:$STRAIGHT")
read -r F50b F99b FRPSb < <(latency "https://127.0.0.1:$FRONT")

# HEAD, which wrk cannot drive: 16 keep-alive clients in Python threads, the same client for
# both sides, so the difference is the front's (the client's own overhead is in both).
head_latency() { # port -> "p50 p99" in ms
    python3 - "$1" "$WORK/tls/ca.pem" "$AUTH" <<'PYHEAD'
import http.client, ssl, sys, threading, time
port, ca, auth = int(sys.argv[1]), sys.argv[2], sys.argv[3].split(": ", 1)[1]
ctx = ssl.create_default_context(cafile=ca)
samples, lock = [], threading.Lock()
def client():
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx)
    mine = []
    for _ in range(300):
        start = time.perf_counter()
        conn.request("HEAD", "/v2/bench/manifests/v1", headers={"Authorization": auth,
                     "Accept": "application/vnd.oci.image.manifest.v1+json"})
        r = conn.getresponse(); r.read()
        if r.status != 200:
            sys.exit(f"HEAD answered {r.status}")
        mine.append(time.perf_counter() - start)
    with lock:
        samples.extend(mine)
threads = [threading.Thread(target=client) for _ in range(16)]
[t.start() for t in threads]; [t.join() for t in threads]
samples.sort()
q = lambda f: samples[int(f * (len(samples) - 1))] * 1000
print(f"{q(0.5):.3f} {q(0.99):.3f}")
PYHEAD
}
read -r HS50 HS99 < <(head_latency "$STRAIGHT")
read -r HF50 HF99 < <(head_latency "$FRONT")
read -r HS50b HS99b < <(head_latency "$STRAIGHT")
read -r HF50b HF99b < <(head_latency "$FRONT")
echo "manifest HEAD, 16 clients (Python): straight p50 $HS50 p99 $HS99 / $HS50b $HS99b ms; front p50 $HF50 p99 $HF99 / $HF50b $HF99b ms; p99 added $(python3 -c "print(f'{$HF99 - $HS99:.3f} / {$HF99b - $HS99b:.3f}')") ms (target <= 1 ms)" >"$WORK/head.txt"

RSS_KIB=$(awk '/VmHWM/{print $2}' "/proc/$FRONT_PID/status")

# --- manifest HEAD against a quiet baseline ------------------------------------------------------
# Distribution's own p99 (tens of ms, with ms of spread on 2 cores) hides what the front adds.
# Here nginx answers the manifest HEAD from a static file, with Distribution's headers, twice:
# over TLS itself (direct), and over plain HTTP to a second front (through the front). Both are
# HEADed by benches/head_latency.rs (wrk cannot: it waits for a body after a HEAD answer with
# a Content-Length), 16 keep-alive connections, in HEAD_ROUNDS rounds that alternate which
# side goes first, so that the machine's drift falls on both: once back to back (queueing at
# saturation) and once paced, each client waiting an exponential 5 ms on average between
# requests (independent clients, as nodes are). Printed: the medians over rounds of each
# side's p50 and p99, and the range of the per-round difference.
HEAD_ROUNDS=${HEAD_ROUNDS:-20}
HEAD_REQUESTS=${HEAD_REQUESTS:-1000}
HEAD_PACED_REQUESTS=${HEAD_PACED_REQUESTS:-400}
mkdir -p "$WORK/nginx"
cp "$WORK/manifest.json" "$WORK/nginx/manifest.json"
MANIFEST_DIGEST=sha256:$(sha256sum "$WORK/manifest.json" | cut -d' ' -f1)
NGINX_TLS=$(free_port)
NGINX_PLAIN=$(free_port)
cat >"$WORK/nginx/nginx.conf" <<NGINX
# One process, as the current user: nothing shared with a system nginx.
daemon off;
master_process off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/tmp-body;
    proxy_temp_path $WORK/nginx/tmp-proxy;
    fastcgi_temp_path $WORK/nginx/tmp-fastcgi;
    uwsgi_temp_path $WORK/nginx/tmp-uwsgi;
    scgi_temp_path $WORK/nginx/tmp-scgi;
    keepalive_requests 10000000;
    server {
        listen 127.0.0.1:$NGINX_TLS ssl;
        listen 127.0.0.1:$NGINX_PLAIN;
        ssl_certificate $WORK/tls/tls.crt;
        ssl_certificate_key $WORK/tls/tls.key;
        location = /v2/ { default_type application/json; return 200 '{}'; }
        location = /v2/bench/manifests/v1 {
            alias $WORK/nginx/manifest.json;
            default_type application/vnd.oci.image.manifest.v1+json;
            add_header Docker-Content-Digest $MANIFEST_DIGEST;
            add_header Docker-Distribution-Api-Version registry/2.0;
        }
    }
}
NGINX
nginx -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" 2>"$WORK/nginx/stderr" &
PIDS+=($!)
wait_http "http://127.0.0.1:$NGINX_PLAIN/v2/" -f
FRONT_NG=$(free_port)
FRONT_NG_METRICS=$(free_port)
"$BIN" front --listen "127.0.0.1:$FRONT_NG" --metrics-listen "127.0.0.1:$FRONT_NG_METRICS" \
    --tls-cert-file "$WORK/tls/tls.crt" --tls-key-file "$WORK/tls/tls.key" \
    --upstream "http://127.0.0.1:$NGINX_PLAIN" \
    --pull-users "$WORK/pull.htpasswd" --push-users "$WORK/push.htpasswd" 2>"$WORK/front-ng.log" &
PIDS+=($!)
wait_http "http://127.0.0.1:$FRONT_NG_METRICS/readyz" -f
for port in "$NGINX_TLS" "$FRONT_NG"; do
    code=$(curl -s -o /dev/null -w '%{http_code}' -I --cacert "$WORK/tls/ca.pem" -H "$AUTH" \
        "https://127.0.0.1:$port/v2/bench/manifests/v1")
    [[ $code == 200 ]] || {
        echo "HEAD on :$port answered $code" >&2
        exit 1
    }
done

# The load generator: benches/head_latency.rs, built once here (release settings).
HEAD_BENCH=(env CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}" cargo bench --quiet --manifest-path "$ROOT/Cargo.toml" --bench head_latency --)
head_bench() { # think_us requests key label
    TARGETS="direct=https://127.0.0.1:$NGINX_TLS,front=https://127.0.0.1:$FRONT_NG" \
        CA_FILE="$WORK/tls/ca.pem" AUTHORIZATION="${AUTH#Authorization: }" \
        ROUNDS="$HEAD_ROUNDS" REQUESTS="$2" THINK_US="$1" \
        "${HEAD_BENCH[@]}" >"$WORK/head-$3.txt"
    echo "  $4: $(sed -n 's/^summary: //p' "$WORK/head-$3.txt")"
}
{
    echo "manifest HEAD, quiet baseline: nginx answering from a static file, direct over TLS and through a second front (benches/head_latency.rs, 16 keep-alive clients, alternating rounds):"
    head_bench 0 "$HEAD_REQUESTS" saturated "back to back"
    head_bench 5000 "$HEAD_PACED_REQUESTS" paced "paced, 5 ms mean think time"
} >"$WORK/quiet-summary.txt"

python3 - "$BIG_MIB" "$ROUNDS" "$RSS_KIB" "$S50 $S99 $SRPS $F50 $F99 $FRPS $S50b $S99b $SRPSb $F50b $F99b $FRPSb" \
    "$(for k in "${!T[@]}"; do echo "$k=${T[$k]}"; done)" <<'EOF'
import statistics, sys
mib, rounds, rss = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
lat = [float(x) for x in sys.argv[4].split()]
times = {}
for line in sys.argv[5].split("\n"):
    key, value = line.split("=")
    side, clients, _ = key.split(",")
    times.setdefault((side, int(clients)), []).append(float(value))
print(f"front benchmark: {mib} MiB blob, {rounds} interleaved rounds, median of rounds")
print(f"{'pull':<24}{'straight MiB/s':>16}{'front MiB/s':>14}{'ratio':>8}  target >= 0.9")
for clients in (1, 4):
    s = statistics.median(times[("straight", clients)])
    f = statistics.median(times[("front", clients)])
    total = mib * clients
    print(f"{f'{clients} client(s)':<24}{total / s:>16.0f}{total / f:>14.0f}{s / f:>8.2f}")
print(f"{'manifest GET, 16 conns':<24}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>10}")
for name, (p50, p99, rps) in (("straight", lat[0:3]), ("front", lat[3:6]), ("straight (again)", lat[6:9]), ("front (again)", lat[9:12])):
    print(f"  {name:<22}{p50:>10.3f}{p99:>10.3f}{rps:>10.0f}")
added = [lat[4] - lat[1], lat[10] - lat[7]]
print(f"p99 added by the front: {added[0]:.3f} ms, {added[1]:.3f} ms (target <= 1 ms)")
print(f"front peak RSS: {rss / 1024:.1f} MiB (target <= 32 MiB)")
EOF
cat "$WORK/head.txt"
cat "$WORK/quiet-summary.txt"
