#!/usr/bin/env bash
# Benchmark of `registry-addon front --remote` (Direct mode) against pulling from the upstream
# straight, same machine, same blobs.
#
# The upstream is a Distribution registry serving TLS. It is pulled from twice: straight, and
# through the front in Direct mode (`ro` at the front, which verifies the upstream with its
# CA and streams). The upstream asks for no credentials: Distribution checks an htpasswd
# bcrypt hash on every request, which would dominate both sides' manifest latency (UPSTREAM_AUTH=1
# turns it on, the front then adds the account). Measured:
#   - pull throughput of a 256 MiB blob, one client and 4 at once, each repeated and
#     interleaved (front ÷ straight; target >= 0.8);
#   - manifest latency with 16 concurrent clients: GET with wrk (keep-alive), and HEAD from
#     Python clients (wrk waits for a body after a HEAD answer that carries a Content-Length);
#     p50/p99 and the p99 the front adds (target <= 2 ms);
#   - the front's peak RSS over the whole run, 4 parallel 256 MiB streams included
#     (target <= 32 MiB).
#
# Needs: docker-registry, curl, wrk, openssl, htpasswd, python3 (Debian: docker-registry, curl,
# wrk, openssl, apache2-utils). Only loopback addresses are used.
#
# Environment: BIG_MIB (default 256), ROUNDS (default 3), UPSTREAM_AUTH (default 0), BIN (a release binary; default:
# built as hack/build-image.sh builds it), KEEP=1 to keep the work directory.
set -euo pipefail

BIG_MIB=${BIG_MIB:-256}
ROUNDS=${ROUNDS:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/bench-direct.XXXXXX)
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
UP_PASSWORD=$(head -c 30 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
htpasswd -nbB ro "$RO_PASSWORD" >"$WORK/pull.htpasswd"
: >"$WORK/push.htpasswd"
htpasswd -nbB mirror "$UP_PASSWORD" >"$WORK/upstream.htpasswd"
mkdir -p "$WORK/creds"
printf mirror >"$WORK/creds/username"
printf '%s' "$UP_PASSWORD" >"$WORK/creds/password"

# --- the upstream and the Direct front ----------------------------------------------------------
STORE=$WORK/storage
UPSTREAM=$(free_port)
FRONT=$(free_port)
FRONT_METRICS=$(free_port)
mkdir -p "$WORK/upstream"
{
    printf 'version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n'
    printf 'storage:\n  filesystem:\n    rootdirectory: %s\n' "$STORE"
    printf 'http:\n  addr: 127.0.0.1:%s\n  secret: bench\n' "$UPSTREAM"
    printf '  tls:\n    certificate: %s\n    key: %s\n' "$WORK/tls/tls.crt" "$WORK/tls/tls.key"
    if [[ ${UPSTREAM_AUTH:-0} == 1 ]]; then
        printf 'auth:\n  htpasswd:\n    realm: bench\n    path: %s\n' "$WORK/upstream.htpasswd"
    fi
} >"$WORK/upstream/config.yml"
docker-registry serve "$WORK/upstream/config.yml" >"$WORK/upstream/log" 2>&1 &
UPSTREAM_PID=$!
PIDS+=($UPSTREAM_PID)
wait_http "https://127.0.0.1:$UPSTREAM/v2/" --cacert "$WORK/tls/ca.pem"
# The front's working directory is empty and read-only: it must store nothing.
mkdir -p "$WORK/cwd"
chmod 555 "$WORK/cwd"
(cd "$WORK/cwd" && exec "$BIN" front --listen "127.0.0.1:$FRONT" --metrics-listen "127.0.0.1:$FRONT_METRICS" \
    --tls-cert-file "$WORK/tls/tls.crt" --tls-key-file "$WORK/tls/tls.key" \
    --remote "https://127.0.0.1:$UPSTREAM" --remote-ca "$WORK/tls/ca.pem" \
    --remote-credentials "$WORK/creds" \
    --pull-users "$WORK/pull.htpasswd" --push-users "$WORK/push.htpasswd" 2>"$WORK/front.log") &
FRONT_PID=$!
PIDS+=($FRONT_PID)
wait_http "http://127.0.0.1:$FRONT_METRICS/readyz" -f

# --- content: a big blob and a small image ------------------------------------------------------
UP_CURL=(--cacert "$WORK/tls/ca.pem" -u "mirror:$UP_PASSWORD")
head -c $((BIG_MIB * 1024 * 1024)) /dev/urandom >"$WORK/big"
BIG=sha256:$(sha256sum "$WORK/big" | cut -d' ' -f1)
put_blob() { # file digest
    local location
    location=$(curl -sf "${UP_CURL[@]}" -X POST -D - -o /dev/null "https://127.0.0.1:$UPSTREAM/v2/bench/blobs/uploads/" |
        tr -d '\r' | awk -F': ' 'tolower($1)=="location"{print $2}')
    case $location in http*) ;; *) location="https://127.0.0.1:$UPSTREAM$location" ;; esac
    local sep='?'
    [[ $location == *\?* ]] && sep='&'
    curl -sf "${UP_CURL[@]}" -X PUT -H 'Content-Type: application/octet-stream' --data-binary "@$1" \
        "$location${sep}digest=$2" -o /dev/null
}
put_blob "$WORK/big" "$BIG"
printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}' >"$WORK/config.json"
CONFIG=sha256:$(sha256sum "$WORK/config.json" | cut -d' ' -f1)
put_blob "$WORK/config.json" "$CONFIG"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":%s}]}' \
    "$CONFIG" "$(stat -c %s "$WORK/config.json")" "$BIG" "$(stat -c %s "$WORK/big")" >"$WORK/manifest.json"
curl -sf "${UP_CURL[@]}" -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
    --data-binary "@$WORK/manifest.json" "https://127.0.0.1:$UPSTREAM/v2/bench/manifests/v1" -o /dev/null
# Straight pulls use the upstream account, pulls through the front `ro`.
auth_for() { # port
    if [[ $1 == "$UPSTREAM" ]]; then
        echo "Authorization: Basic $(printf 'mirror:%s' "$UP_PASSWORD" | base64 -w0)"
    else
        echo "Authorization: Basic $(printf 'ro:%s' "$RO_PASSWORD" | base64 -w0)"
    fi
}

# --- blob throughput ----------------------------------------------------------------------------
pull_all() { # port clients
    local pids=() start end auth
    auth=$(auth_for "$1")
    start=$(date +%s.%N)
    for _ in $(seq "$2"); do
        curl -sf --cacert "$WORK/tls/ca.pem" -H "$auth" -o /dev/null "https://127.0.0.1:$1/v2/bench/blobs/$BIG" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    end=$(date +%s.%N)
    python3 -c "print($end - $start)"
}
# Warm the page cache and both connections' paths once.
pull_all "$UPSTREAM" 1 >/dev/null
pull_all "$FRONT" 1 >/dev/null

declare -A T
for clients in 1 4; do
    for round in $(seq "$ROUNDS"); do
        T[straight,$clients,$round]=$(pull_all "$UPSTREAM" "$clients")
        T[front,$clients,$round]=$(pull_all "$FRONT" "$clients")
    done
done

# --- manifest latency -----------------------------------------------------------------------------
latency() { # port -> "p50 p99 req/s", latencies in ms
    wrk -t2 -c16 -d5s --latency -H "$(auth_for "$1")" \
        -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
        "https://127.0.0.1:$1/v2/bench/manifests/v1" >"$WORK/wrk.out"
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
read -r S50 S99 SRPS < <(latency "$UPSTREAM")
read -r F50 F99 FRPS < <(latency "$FRONT")
read -r S50b S99b SRPSb < <(latency "$UPSTREAM")
read -r F50b F99b FRPSb < <(latency "$FRONT")

# HEAD, which wrk cannot drive: 16 keep-alive clients in Python threads, the same client for
# both sides, so the difference is the front's (the client's own overhead is in both).
head_latency() { # port -> "p50 p99" in ms
    python3 - "$1" "$WORK/tls/ca.pem" "$(auth_for "$1")" <<'PYHEAD'
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
read -r HS50 HS99 < <(head_latency "$UPSTREAM")
read -r HF50 HF99 < <(head_latency "$FRONT")
read -r HS50b HS99b < <(head_latency "$UPSTREAM")
read -r HF50b HF99b < <(head_latency "$FRONT")
echo "manifest HEAD, 16 clients (Python): straight p50 $HS50 p99 $HS99 / $HS50b $HS99b ms; front p50 $HF50 p99 $HF99 / $HF50b $HF99b ms; p99 added $(python3 -c "print(f'{$HF99 - $HS99:.3f} / {$HF99b - $HS99b:.3f}')") ms (target <= 2 ms)" >"$WORK/head.txt"

RSS_KIB=$(awk '/VmHWM/{print $2}' "/proc/$FRONT_PID/status")
# CPU the front and the upstream spent over the whole run (user + system), for context: on a
# small machine the front's second TLS leg competes with the client and the upstream.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.1f", ($14 + $15) / hz}' "/proc/$1/stat"; }
CPU_LINE="CPU over the run: front $(cpu_s "$FRONT_PID") s, upstream $(cpu_s "$UPSTREAM_PID") s; load average $(cut -d' ' -f1-3 /proc/loadavg)"

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
print(f"Direct front benchmark: {mib} MiB blob, {rounds} interleaved rounds, median of rounds")
print(f"{'pull':<24}{'straight MiB/s':>16}{'front MiB/s':>14}{'ratio':>8}  target >= 0.8")
for clients in (1, 4):
    s = statistics.median(times[("straight", clients)])
    f = statistics.median(times[("front", clients)])
    total = mib * clients
    print(f"{f'{clients} client(s)':<24}{total / s:>16.0f}{total / f:>14.0f}{s / f:>8.2f}")
print(f"{'manifest GET, 16 conns':<24}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>10}")
for name, (p50, p99, rps) in (("straight", lat[0:3]), ("front", lat[3:6]), ("straight (again)", lat[6:9]), ("front (again)", lat[9:12])):
    print(f"  {name:<22}{p50:>10.3f}{p99:>10.3f}{rps:>10.0f}")
added = [lat[4] - lat[1], lat[10] - lat[7]]
print(f"p99 added by the front: {added[0]:.3f} ms, {added[1]:.3f} ms (target <= 2 ms)")
print(f"front peak RSS: {rss / 1024:.1f} MiB (target <= 32 MiB)")
EOF
cat "$WORK/head.txt"
echo "$CPU_LINE"
grep -E '^registry_addon_front_(remote|requests)' <(curl -s "http://127.0.0.1:$FRONT_METRICS/metrics") || true
if [[ -n "$(ls -A "$WORK/cwd")" ]]; then echo "the front wrote into its working directory" >&2; exit 1; fi
