#!/usr/bin/env bash
# Hook server benchmark: discovery and a no-op hook over TLS with keep-alive, 64 concurrent
# clients (wrk), against a trivial TLS server (nginx answering a static body to the same
# requests) run in the same script. Prints requests/s, p50 and p99 for both and our figures as ratios to nginx, plus our
# idle RSS and time from start to first answer.
#
# Two loads, each measured in ROUNDS interleaved rounds (nginx, discovery, no-op hook, again),
# reporting the median round and the range of p99 across rounds: on a small VM one run's tail
# moves by milliseconds with the host's scheduling.
#   saturating  each client sends its next request as soon as the answer arrives. Latency is
#               then queueing (64 / throughput) for any server: this load measures throughput.
#   paced       each client waits a random think time between requests (exponential, with
#               each mean of THINK_MS: 10 ms, ~6,000 requests/s in all; 3 ms, ~20,000),
#               independently of the others, as CAPI's controllers do. The p99 target is
#               judged here.
#   hack/bench-webhook.sh [seconds per run, default 4]     env: ROUNDS (7), THINK_MS ("10 3")
# Needs: wrk, nginx (Debian packages wrk, nginx-light), openssl, curl.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-4}
ROUNDS=${ROUNDS:-7}
for tool in wrk nginx openssl curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install wrk nginx-light openssl curl)" >&2; exit 1; }
done

cargo build --release --bin registry-addon >/dev/null
BIN=${CARGO_TARGET_DIR:-target}/release/registry-addon
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

# One certificate for both servers.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
  -keyout "$WORK/tls.key" -out "$WORK/tls.crt" 2>/dev/null

PORT=19443 NGINX_PORT=19444
DISCOVERY=https://127.0.0.1:$PORT/hooks.runtime.cluster.x-k8s.io/v1alpha1/discovery
start_serve() {
  "$BIN" serve --listen 127.0.0.1:$PORT --metrics-listen 127.0.0.1:19440 \
    --tls-cert-file "$WORK/tls.crt" --tls-key-file "$WORK/tls.key" 2>"$WORK/serve.log" &
  SERVE_PID=$!
}
# Time from exec to the first discovery answer: the median of 5 starts (the first start also
# pays for reading the binary from disk).
firsts=()
for _ in 1 2 3 4 5; do
  start_ns=$(date +%s%N)
  start_serve
  until curl -sf --cacert "$WORK/tls.crt" -X POST "$DISCOVERY" -o /dev/null 2>/dev/null; do
    kill -0 "$SERVE_PID" 2>/dev/null || { cat "$WORK/serve.log" >&2; exit 1; }
    sleep 0.002
  done
  firsts+=($(( ($(date +%s%N) - start_ns) / 1000000 )))
  kill "$SERVE_PID"; wait "$SERVE_PID" 2>/dev/null || true
done
first_ms=$(printf '%s\n' "${firsts[@]}" | sort -n | sed -n 3p)
start_serve
PIDS+=("$SERVE_PID")
until curl -sf --cacert "$WORK/tls.crt" -X POST "$DISCOVERY" -o /dev/null 2>/dev/null; do sleep 0.005; done
sleep 1
idle_rss_kib=$(awk '/VmRSS/ {print $2}' /proc/$SERVE_PID/status)

cat >"$WORK/nginx.conf" <<NGINX
worker_processes 2;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log;
events { worker_connections 1024; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$NGINX_PORT ssl;
    ssl_certificate $WORK/tls.crt;
    ssl_certificate_key $WORK/tls.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / { default_type application/json; return 200 '{"apiVersion":"hooks.runtime.cluster.x-k8s.io/v1alpha1","kind":"DiscoveryResponse","status":"Success","message":""}'; }
  }
}
NGINX
nginx -c "$WORK/nginx.conf" -g 'daemon off;' &
PIDS+=($!)
until curl -sfk -X POST "https://127.0.0.1:$NGINX_PORT/" -o /dev/null 2>/dev/null; do sleep 0.05; done

# A BeforeClusterCreate whose cluster has the addon off: decoded, checked, answered.
python3 - "$WORK/noop.json" <<'PY'
import json, sys
cluster = json.load(open("../shared/capi/fixtures/cluster-v1beta2.json"))
cluster["spec"]["topology"]["variables"] = []
json.dump({"apiVersion": "hooks.runtime.cluster.x-k8s.io/v1alpha1", "kind": "BeforeClusterCreateRequest",
           "settings": {}, "cluster": cluster}, open(sys.argv[1], "w"))
PY
lua_for() { # body file, wrk script, mean think time per request in ms (0: closed loop)
  python3 - "$1" "$2" "$3" <<'PY'
import json, sys
body = open(sys.argv[1]).read()
script = 'wrk.method = "POST"\nwrk.body = %s\n' % json.dumps(body)
if int(sys.argv[3]) > 0:
    # Independent clients: exponential think times, a different random stream per thread.
    script += """
local threads = 0
function setup(thread) threads = threads + 1; thread:set("id", threads) end
function init(args) math.randomseed(os.time() * 1000 + (id or 0)) end
function delay() return math.floor(-math.log(1 - math.random()) * %d) end
""" % int(sys.argv[3])
open(sys.argv[2], "w").write(script)
PY
}
echo '{}' >"$WORK/empty.json"
THINK_MS=${THINK_MS:-10 3}
for think in 0 $THINK_MS; do
  lua_for "$WORK/empty.json" "$WORK/discovery-$think.lua" "$think"
  lua_for "$WORK/noop.json" "$WORK/noop-$think.lua" "$think"
done

# wrk output → "rps p50_ms p99_ms"
measure() {
  wrk -t2 -c64 -d"${DURATION}s" --latency -s "$2" "$1" >"$WORK/wrk.out"
  python3 - "$WORK/wrk.out" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
def ms(v):
    n, unit = re.match(r"([\d.]+)(us|ms|s)", v).groups()
    return float(n) * {"us": 0.001, "ms": 1, "s": 1000}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
p50 = ms(re.search(r"^\s+50%\s+(\S+)", text, re.M).group(1))
p99 = ms(re.search(r"^\s+99%\s+(\S+)", text, re.M).group(1))
errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
if errors: sys.exit("non-2xx answers: " + errors.group(1))
print(f"{rps:.0f} {p50:.3f} {p99:.3f}")
PY
}
HOOK="https://127.0.0.1:$PORT/hooks.runtime.cluster.x-k8s.io/v1alpha1/beforeclustercreate/before-cluster-create?timeout=10s"
: >"$WORK/rows"
for think in 0 $THINK_MS; do
  for _ in $(seq "$ROUNDS"); do
    echo "$think nginx $(measure "https://127.0.0.1:$NGINX_PORT/" "$WORK/discovery-$think.lua")" >>"$WORK/rows"
    echo "$think discovery $(measure "$DISCOVERY" "$WORK/discovery-$think.lua")" >>"$WORK/rows"
    echo "$think nginx-body $(measure "https://127.0.0.1:$NGINX_PORT/" "$WORK/noop-$think.lua")" >>"$WORK/rows"
    echo "$think noop $(measure "$HOOK" "$WORK/noop-$think.lua")" >>"$WORK/rows"
  done
done
load_rss_kib=$(awk '/VmHWM/ {print $2}' /proc/$SERVE_PID/status)

python3 - "$WORK/rows" "$ROUNDS" <<PY
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
# Each of ours is compared with nginx receiving the same request.
names = {"nginx": "nginx, empty body", "discovery": "discovery",
         "nginx-body": "nginx, the no-op hook's body", "noop": "no-op BeforeClusterCreate"}
peer = {"nginx": "nginx", "discovery": "nginx", "nginx-body": "nginx-body", "noop": "nginx-body"}
print(f"64 clients, TLS keep-alive, median of {sys.argv[2]} rounds")
print(f"{'':44} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'p99 range':>12} {'req/s÷nginx':>11} {'p99÷nginx':>9}")
for think in dict.fromkeys(r[0] for r in rows):
    load = "saturating" if think == "0" else f"paced, {think} ms mean think"
    med = {}
    for key in names:
        runs = [[float(x) for x in r[2:]] for r in rows if r[0] == think and r[1] == key]
        med[key] = [statistics.median(col) for col in zip(*runs)] + [min(r[2] for r in runs), max(r[2] for r in runs)]
    for key, label in names.items():
        rps, p50, p99, lo, hi = med[key]
        n = med[peer[key]]
        print(f"{label + ' (' + load + ')':44.44} {rps:8.0f} {p50:7.3f} {p99:7.3f} {lo:5.2f}-{hi:<6.2f} {rps/n[0]:11.2f} {p99/n[2]:9.2f}")
    if think != "0":
        verdict = lambda key: "met" if med[key][2] <= 2 else "MISSED"
        print(f"p99 target (<= 2 ms), {load}: discovery {verdict('discovery')} ({med['discovery'][2]:.2f} ms), "
              f"no-op hook {verdict('noop')} ({med['noop'][2]:.2f} ms); nginx {med['nginx'][2]:.2f} / {med['nginx-body'][2]:.2f} ms")
print(f"first answer after start: $first_ms ms, median of 5 starts: ${firsts[*]} (target <= 100)")
print(f"idle RSS: {$idle_rss_kib/1024:.1f} MiB (target <= 30); peak RSS under load: {$load_rss_kib/1024:.1f} MiB")
PY
