#!/bin/bash
# Prometheus metrics, checked with the real Prometheus server (Debian's `prometheus`): it scrapes
# `serve --metrics-listen` every second while fio (ioengine=nbd) reads 4k blocks at a fixed rate;
# then Prometheus' HTTP API must give rate() of the read ops within 15% of fio's own IOPS, the
# counter's increase over the run within 15% of fio's I/O count, and the pool's used bytes and
# the volume's allocated bytes equal to what `ballast pool info` / `volume list` say; the
# queue-depth gauge shows requests in flight during a fio QD32 run and none after it. The
# export counters are per protocol: fio's reads count under protocol="nbd", none under "nvmf";
# then ballast-perf's reads over NVMe/TCP count under "nvmf" (exactly, to its in-flight
# requests) and not under "nbd".
# Then the endpoint's limits: a path other than /metrics gets 404, another method 405, an
# oversized request head 431 (closed), clients beyond --metrics-max-clients 503 without a
# thread, a silent client is closed after --metrics-timeout and frees its slot; bad flag values
# are refused.
set -u -o pipefail
. "$(dirname "$0")/../lib.sh"

T=$TEST_TMP
READ_IOPS=${METRICS_TEST_IOPS:-2000}
RUNTIME_S=10

if ! command -v prometheus >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null 2>&1 || true
fi
if ! command -v prometheus >/dev/null 2>&1; then
    fail "prometheus is installed (apt-get install prometheus)"
    finish
fi

PROM_PID=""
stop_prometheus() {
    [[ -n $PROM_PID ]] || return 0
    kill -TERM "$PROM_PID" 2>/dev/null
    for ((i = 0; i < 100; i++)); do kill -0 "$PROM_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$PROM_PID" 2>/dev/null
    wait "$PROM_PID" 2>/dev/null
    PROM_PID=""
}
add_cleanup stop_prometheus

# http PORT PYTHON-BODY [ARGS...]: run PYTHON-BODY with helpers; sys.argv[1:] = ARGS.
#   connect() -> a socket to the endpoint; status(sock, timeout) -> the reply's status code
#   (int), None on EOF/reset, "timeout"; get(path) -> (status, body).
http() {
    local port=$1 body=$2; shift 2
    "$SYS_PY" - "$@" <<EOF
import json, os, socket, sys, time
PORT = $port
def connect():
    return socket.create_connection(("127.0.0.1", PORT), timeout=5)
def read_all(s, timeout):
    s.settimeout(timeout)
    data = b""
    while True:
        try:
            c = s.recv(65536)
        except socket.timeout:
            return data if data else "timeout"
        except (ConnectionResetError, BrokenPipeError):
            return data
        if not c:
            return data
        data += c
def status(s, timeout=5.0):
    data = read_all(s, timeout)
    if data == "timeout":
        return data
    if not data:
        return None
    return int(data.split(b" ", 2)[1])
def get(path, method="GET", extra=b""):
    s = connect()
    try:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n".encode() + extra + b"\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    data = read_all(s, 10)
    s.close()
    if not data or data == "timeout":
        return None, b""
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body
$body
EOF
}

# promql QUERY [TIME]: the value of an instant query's first sample (empty if none).
promql() {
    "$SYS_PY" - "$PROM_PORT" "$1" "${2:-}" <<'EOF'
import json, sys, urllib.parse, urllib.request
port, query, at = sys.argv[1], sys.argv[2], sys.argv[3]
args = {"query": query}
if at:
    args["time"] = at
url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode(args)
r = json.load(urllib.request.urlopen(url, timeout=10))
res = r["data"]["result"] if r.get("status") == "success" else []
print(res[0]["value"][1] if res else "")
EOF
}

# within A B PCT: |A - B| <= PCT% of B.
within() {
    "$SYS_PY" -c 'import sys; a, b, p = map(float, sys.argv[1:]); sys.exit(0 if abs(a - b) <= b * p / 100 else 1)' "$@"
}

##############################################################################################
echo "## phase 1: Prometheus scrapes ballast during a fio run"
MPORT=$(free_port)
start_ballast --metrics-listen "127.0.0.1:$MPORT" || finish
grep -q "metrics listening (GET /metrics).*max_clients=4 max_request_bytes=8192 timeout_s=10" \
    "$BALLAST_LOG" && pass "log states the metrics endpoint and its default limits" ||
    fail "log states the metrics endpoint and its default limits"
read -r code ctype <<<"$(http "$MPORT" '
s, body = get("/metrics")
print(s, "ballast_core_ops_total{" in body.decode())
')"
check_eq "GET /metrics answers 200 with ballast_core_ops_total" "200 True" "$code $ctype"

# Some data in vol0 first: the pool has used clusters, and the reads below hit them.
if (cd "$T" && timeout 120 fio --name=fill --ioengine=nbd --uri="$NBD_URI/vol0" --rw=write \
        --bs=1M --size=32M --iodepth=4 >"$T/fio-fill.out" 2>&1); then
    pass "fio wrote 32 MiB to vol0 over NBD"
else
    fail "fio wrote 32 MiB to vol0 over NBD" "$(tail -n 3 "$T/fio-fill.out" | tr '\n' ' ')"
fi

PROM_PORT=$(free_port)
cat >"$T/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: ballast
    static_configs:
      - targets: ['127.0.0.1:$MPORT']
EOF
prometheus --config.file="$T/prometheus.yml" --storage.tsdb.path="$T/prom-data" \
    --web.listen-address="127.0.0.1:$PROM_PORT" >"$T/prometheus.log" 2>&1 &
PROM_PID=$!
up=""
for ((i = 0; i < 100; i++)); do
    up=$(promql 'up{job="ballast"}' 2>/dev/null)
    [[ $up == 1 ]] && break
    sleep 0.2
done
if [[ $up == 1 ]]; then
    pass "Prometheus scrapes ballast (up{job=\"ballast\"} == 1)"
else
    fail "Prometheus scrapes ballast" "up='$up'; $(tail -n 3 "$T/prometheus.log" | tr '\n' ' ')"
    finish
fi
sleep 2

t_start=$(date +%s.%N)
(cd "$T" && timeout 120 fio --name=randread --ioengine=nbd --uri="$NBD_URI/vol0" --rw=randread \
    --bs=4k --size=32M --iodepth=16 --rate_iops="$READ_IOPS" --time_based --runtime="$RUNTIME_S" \
    --output-format=json --output="$T/fio-read.json" >"$T/fio-read.out" 2>&1)
rc=$?
t_end=$(date +%s.%N)
sleep 3   # two more scrapes after the run
read -r fio_iops fio_ios <<<"$("$SYS_PY" -c 'import json,sys; r=json.load(open(sys.argv[1]))["jobs"][0]["read"]; print(r["iops"], r["total_ios"])' "$T/fio-read.json" 2>/dev/null)"
if ((rc == 0)) && [[ -n ${fio_iops:-} ]]; then
    pass "fio randread 4k at $READ_IOPS IOPS for ${RUNTIME_S}s: $fio_iops IOPS, $fio_ios reads"
else
    fail "fio randread over NBD" "exit $rc: $(tail -n 3 "$T/fio-read.out" | tr '\n' ' ')"
    finish
fi

# rate() over 5 s windows inside the run (which ends when fio does, and started RUNTIME_S
# before, after fio's own start-up), against fio's average IOPS.
reads='sum(ballast_core_ops_total{job="ballast",op="read"})'
bad=0 rates=()
for back in 3.5 2 0.5; do
    at=$("$SYS_PY" -c "print(f'{$t_end - $back:.3f}')")
    r=$(promql "sum(rate(ballast_core_ops_total{job=\"ballast\",op=\"read\"}[5s]))" "$at")
    rates+=("${r:-none}")
    [[ -n $r ]] && within "$r" "$fio_iops" 15 || bad=1
done
if ((bad == 0)); then
    pass "Prometheus rate(read ops[5s]) at 3.5, 2, 0.5 s before the run's end (${rates[*]}) is within 15% of fio's $fio_iops IOPS"
else
    fail "Prometheus rate(read ops[5s]) within 15% of fio's IOPS" "rates ${rates[*]} vs $fio_iops"
fi
before=$(promql "$reads" "$("$SYS_PY" -c "print(f'{$t_start - 0.5:.3f}')")")
after=$(promql "$reads" "$("$SYS_PY" -c "print(f'{$t_end + 2.5:.3f}')")")
delta=$("$SYS_PY" -c "print(int(float('${after:-0}') - float('${before:-0}')))")
if [[ -n $before && -n $after ]] && within "$delta" "$fio_ios" 15; then
    pass "the read counter grew by $delta over the run in Prometheus; fio did $fio_ios reads"
else
    fail "the read counter's growth matches fio's reads" "before '$before' after '$after' fio $fio_ios"
fi
# The same reads counted per export (vol0's device, over NBD here), summed over the cores.
vbefore=$(promql 'sum(ballast_export_ops_total{job="ballast",export="vol0",protocol="nbd",op="read"})' "$("$SYS_PY" -c "print(f'{$t_start - 0.5:.3f}')")")
vafter=$(promql 'sum(ballast_export_ops_total{job="ballast",export="vol0",protocol="nbd",op="read"})' "$("$SYS_PY" -c "print(f'{$t_end + 2.5:.3f}')")")
vdelta=$("$SYS_PY" -c "print(int(float('${vafter:-0}') - float('${vbefore:-0}')))")
if [[ -n $vbefore && -n $vafter ]] && within "$vdelta" "$fio_ios" 15; then
    pass "vol0's own NBD read counter grew by $vdelta over the run; fio did $fio_ios reads"
else
    fail "vol0's NBD read counter matches fio's reads" "before '$vbefore' after '$vafter' fio $fio_ios"
fi
check_eq "vol0's NVMe/TCP read counter in Prometheus stays 0 (fio came by NBD)" 0 \
    "$(promql 'sum(ballast_export_ops_total{job="ballast",export="vol0",protocol="nvmf",op="read"})')"
vbytes=$(promql 'sum(ballast_export_bytes_total{job="ballast",export="vol0",op="write"})')
if [[ -n $vbytes ]] && (( ${vbytes%.*} >= 32 * 1024 * 1024 )); then
    pass "vol0's written bytes count the 32 MiB fill ($vbytes)"
else
    fail "vol0's written bytes count the 32 MiB fill" "'$vbytes'"
fi
commits=$(promql 'max(ballast_pool_commits_total{job="ballast"})')
pending=$(promql 'max(ballast_pool_pending_records{job="ballast"})')
if [[ -n $commits ]] && (( ${commits%.*} > 0 )) && [[ ${pending%.*} == 0 ]]; then
    pass "the pool's commits are counted ($commits) and nothing is left pending after the run"
else
    fail "pool commits counted, nothing pending" "commits '$commits' pending '$pending'"
fi
lat=$(promql 'sum(ballast_core_request_latency_seconds_count{job="ballast"})')
ops=$(promql 'sum(ballast_core_ops_total{job="ballast"})')
check_eq "the latency histogram counts every request (histogram count == ops)" "$ops" "$lat"
p99=$(promql 'histogram_quantile(0.99, sum by (le) (rate(ballast_core_request_latency_seconds_bucket{job="ballast"}[5s])))' \
    "$("$SYS_PY" -c "print(f'{$t_end - 2:.3f}')")")
if [[ -n $p99 ]] && "$SYS_PY" -c 'import sys; v=float(sys.argv[1]); sys.exit(0 if 0 < v < 1 else 1)' "$p99"; then
    pass "histogram_quantile(0.99) of the read latency mid-run is ${p99}s"
else
    fail "histogram_quantile(0.99) mid-run is a latency" "'$p99'"
fi

# The pool's used bytes and the volume's allocated bytes, against the CLI.
cli_used=$(ballast_ctl pool info --json | "$SYS_PY" -c 'import json,sys; j=json.load(sys.stdin); j=j[0] if isinstance(j, list) else j; print(j["used_bytes"])')
prom_used=$(promql 'diskpool_used_size_bytes{job="ballast"}')
if [[ -n $cli_used ]] && ((cli_used > 0)) && [[ $prom_used == "$cli_used" ]]; then
    pass "diskpool_used_size_bytes in Prometheus ($prom_used) == ballast pool info used_bytes"
else
    fail "diskpool_used_size_bytes == ballast pool info used_bytes" "prometheus '$prom_used', cli '$cli_used'"
fi
cli_alloc=$(ballast_ctl volume list --json | "$SYS_PY" -c 'import json,sys; print([v["allocated_bytes"] for v in json.load(sys.stdin) if v["name"] == "vol0"][0])')
prom_alloc=$(promql 'volume_allocated_bytes{job="ballast",name="vol0"}')
check_eq "volume_allocated_bytes{name=vol0} in Prometheus == ballast volume list" "$cli_alloc" "$prom_alloc"
total=$(promql 'diskpool_total_size_bytes{job="ballast"}')
cli_total=$(ballast_ctl pool info --json | "$SYS_PY" -c 'import json,sys; j=json.load(sys.stdin); j=j[0] if isinstance(j, list) else j; print(j["data_bytes"])')
check_eq "diskpool_total_size_bytes == ballast pool info data_bytes" "$cli_total" "$total"
conns=$(promql 'sum(ballast_core_connections_accepted_total{job="ballast"})')
if [[ -n $conns ]] && ((conns >= 2)); then
    pass "ballast_core_connections_accepted_total counts fio's connections ($conns)"
else
    fail "ballast_core_connections_accepted_total counts fio's connections" "'$conns'"
fi
# Every query of the example Grafana dashboard runs on this Prometheus and returns data.
out=$("$SYS_PY" - "$PROM_PORT" "$REPO_ROOT/docs/grafana-ballast.json" <<'EOF'
import json, sys, urllib.parse, urllib.request
port, path = sys.argv[1], sys.argv[2]
dash = json.load(open(path))
bad, n = [], 0
for panel in dash["panels"]:
    for t in panel["targets"]:
        q = t["expr"].replace("$instance", ".*").replace("$__rate_interval", "5s")
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
        try:
            r = json.load(urllib.request.urlopen(url, timeout=10))
            ok = r.get("status") == "success" and r["data"]["result"]
        except Exception:  # a 400 for a query that does not parse
            ok = False
        n += 1
        if not ok:
            bad.append(q)
print(n, len(bad), bad[:3])
EOF
)
read -r nq nbad rest <<<"$out"
if [[ ${nbad:-x} == 0 ]] && ((nq > 10)); then
    pass "all $nq queries of docs/grafana-ballast.json return data from Prometheus"
else
    fail "the Grafana dashboard's queries return data" "$out"
fi
stop_prometheus
[[ -z $PROM_PID ]] && pass "prometheus stopped" || fail "prometheus stopped"

##############################################################################################
echo "## phase 1b: the queue-depth gauge, during and after a fio QD32 run"
# qdepth: ballast_export_queue_depth{export="vol0",protocol="nbd"} scraped now (empty if absent).
qdepth() {
    http "$MPORT" '
s, body = get("/metrics")
for line in body.decode().splitlines():
    if line.startswith("ballast_export_queue_depth{export=\"vol0\",protocol=\"nbd\"} "):
        print(line.rsplit(" ", 1)[1])
'
}
(cd "$T" && timeout 60 fio --name=qd32 --ioengine=nbd --uri="$NBD_URI/vol0" --rw=randrw \
    --bs=4k --size=32M --iodepth=32 --direct=1 --time_based --runtime=4 \
    >"$T/fio-qd32.out" 2>&1) &
fio_pid=$!
sleep 1
depths=()
for ((i = 0; i < 10; i++)); do depths+=("$(qdepth)"); sleep 0.2; done
wait "$fio_pid"
fio_rc=$?
max_depth=$("$SYS_PY" -c 'import sys; print(max(int(v or 0) for v in sys.argv[1:]))' "${depths[@]}")
if ((fio_rc == 0)) && ((max_depth > 0 && max_depth <= 32)); then
    pass "ballast_export_queue_depth{export=vol0,protocol=nbd} during fio QD32 reaches $max_depth (samples ${depths[*]})"
else
    fail "the queue depth shows requests in flight during fio QD32" \
        "fio exit $fio_rc, samples '${depths[*]}'; $(tail -n 2 "$T/fio-qd32.out" | tr '\n' ' ')"
fi
check_eq "ballast_export_queue_depth{export=vol0,protocol=nbd} is 0 once fio is done" 0 "$(qdepth)"
core_depth=$(http "$MPORT" '
s, body = get("/metrics")
print(sum(int(l.rsplit(" ", 1)[1]) for l in body.decode().splitlines()
          if l.startswith("ballast_core_queue_depth{")))
')
check_eq "ballast_core_queue_depth summed over the cores is 0 too" 0 "$core_depth"

echo "## phase 1c: the same export over NVMe/TCP counts apart"
# vol_reads PROTOCOL: ballast_export_ops_total{export="vol0",protocol=PROTOCOL,op="read"} now
vol_reads() {
    http "$MPORT" '
s, body = get("/metrics")
want = "ballast_export_ops_total{export=\"vol0\",protocol=\"%s\",op=\"read\"} " % sys.argv[1]
print(next((l.rsplit(" ", 1)[1] for l in body.decode().splitlines() if l.startswith(want)), ""))
' "$1"
}
nbd0=$(vol_reads nbd) nvmf0=$(vol_reads nvmf)
PERF=$(ballast_perf_bin)
NVMF_ADDR=$(nvmf_addr)
if [[ -x $PERF && -n $NVMF_ADDR ]] && "$PERF" --addr "$NVMF_ADDR" --nqn nqn.2026-11.dev.ballast:vol0 \
        --rw randread --qd 4 --runtime 2 --json >"$T/perf.json" 2>"$T/perf.err"; then
    n=$("$SYS_PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["jobs"][0]["read"]["total_ios"])' "$T/perf.json")
    nvmf1=$(vol_reads nvmf)
    got=$((${nvmf1:-0} - ${nvmf0:-0}))
    if ((n > 0 && got >= n && got <= n + 4)); then
        pass "ballast-perf's $n NVMe/TCP reads of vol0 count under protocol=\"nvmf\" ($got: its own and at most the 4 in flight when it stopped)"
    else
        fail "vol0's NVMe/TCP reads counted under protocol=\"nvmf\"" "before '$nvmf0' after '$nvmf1', ballast-perf $n"
    fi
    nbd1=$(vol_reads nbd)
    if [[ -n $nbd0 && $nbd0 == "$nbd1" ]] && ((${nbd0%.*} >= fio_ios)); then
        pass "...and not under protocol=\"nbd\" (still $nbd0: phase 1's reads)"
    else
        fail "...and not under protocol=\"nbd\"" "before '$nbd0' after '$nbd1', fio read $fio_ios"
    fi
else
    fail "ballast-perf reads vol0 over NVMe/TCP" "$PERF $NVMF_ADDR: $(tail -n 2 "$T/perf.err" | tr '\n' ' ')"
fi

##############################################################################################
echo "## phase 2: the endpoint's limits (defaults)"
out=$(http "$MPORT" '
a, _ = get("/")
b, _ = get("/metrics/x")
c, _ = get("/metrics", method="POST")
d, body = get("/metrics", method="HEAD")
print(a, b, c, d, len(body))
')
check_eq "/ and /metrics/x get 404, POST 405, HEAD 200 without a body" "404 404 405 200 0" "$out"
out=$(http "$MPORT" '
s, body = get("/metrics", extra=b"X-Pad: " + b"a" * 16000 + b"\r\n")
print(s, body.decode().strip())
')
check_eq "a 16 KiB request head gets 431 (limit 8K)" \
    "431 request too large (limit 8192 bytes)" "$out"
out=$(http "$MPORT" '
s, _ = get("/metrics", extra=b"X-Pad: " + b"a" * 7000 + b"\r\n")
print(s)
')
check_eq "a 7 KiB request head (under the limit) is served" 200 "$out"
out=$(http "$MPORT" '
held = []
for _ in range(6):
    held.append(connect())
    time.sleep(0.05)
time.sleep(0.3)
got = [status(s, 0.3) for s in held]
print(got[:4] == ["timeout"] * 4 and got[4:] == [503, 503], got)
')
check_eq "6 silent clients: 4 held, the 5th and 6th get 503" True "${out%% *}"
threads_before=$(ls "/proc/$PID/task" | wc -l)
out=$(http "$MPORT" '
import threading
pid = sys.argv[1]
held, lock = [], threading.Lock()
def one():
    try:
        s = connect()
        with lock:
            held.append(s)
    except OSError:
        pass
ts = [threading.Thread(target=one) for _ in range(60)]
for t in ts: t.start()
peak = 0
for _ in range(10):
    peak = max(peak, len(os.listdir(f"/proc/{pid}/task")))
    time.sleep(0.05)
for t in ts: t.join()
refused = sum(1 for s in held if status(s, 0.2) == 503)
print(peak, refused)
' "$PID")
read -r peak refused <<<"$out"
if [[ -n ${peak:-} ]] && ((peak <= threads_before + 4)); then
    pass "60 clients at once: the daemon's threads stay within the bound ($peak <= $threads_before + 4)"
else
    fail "60 clients at once: threads stay within the bound" "peak ${peak:-?}, before $threads_before"
fi
check_eq "60 clients at once: all but 4 get 503" 56 "${refused:-?}"
sleep 0.5
out=$(http "$MPORT" 'print(get("/metrics")[0])')
check_eq "after they close, a scrape is served" 200 "$out"
n_refused=$(grep -c "metrics client refused: too many metrics clients" "$BALLAST_LOG")
if ((n_refused >= 1 && n_refused <= 8)); then
    pass "58 refusals log $n_refused warning lines (rate-limited)"
else
    fail "refusals are logged rate-limited" "$n_refused lines"
fi
stop_ballast

##############################################################################################
echo "## phase 3: the flags"
start_ballast --metrics-listen "127.0.0.1:$MPORT" --metrics-max-clients 1 \
    --metrics-max-request 1K --metrics-timeout 2 || finish
out=$(http "$MPORT" '
a, _ = get("/metrics", extra=b"X-Pad: " + b"a" * 1100 + b"\r\n")
# With --metrics-max-clients 1 the refused client holds the one place until its handler has
# closed it, a moment after its reply: a 503 meanwhile is the client limit, not the size limit.
for _ in range(20):
    b, _ = get("/metrics", extra=b"X-Pad: " + b"a" * 800 + b"\r\n")
    if b != 503:
        break
    time.sleep(0.05)
print(a, b)
')
check_eq "--metrics-max-request 1K: 1.1 KiB refused (431), 0.8 KiB served" "431 200" "$out"
out=$(http "$MPORT" '
s = connect()
time.sleep(0.2)
t = connect()
second = status(t, 1.0)
t0 = time.monotonic()
first = status(s, 5.0)
waited = time.monotonic() - t0
after, _ = get("/metrics")
print(second, first, 1.0 < waited + 0.2 < 3.5, after)
')
check_eq "--metrics-max-clients 1 and --metrics-timeout 2: a second client gets 503, the silent one 408 after ~2 s, then a scrape is served" \
    "503 408 True 200" "$out"
stop_ballast
bin=$(ballast_bin)
for bad in "--metrics-max-clients 0" "--metrics-max-request 10" "--metrics-max-request 2M" \
           "--metrics-timeout 0" "--metrics-listen nowhere"; do
    # shellcheck disable=SC2086
    out=$("$bin" serve --data-dir "$T/never" $bad 2>&1); rc=$?
    if ((rc != 0)) && grep -q "invalid value .* for '${bad%% *}" <<<"$out"; then
        pass "serve $bad is refused: $(head -n1 <<<"$out")"
    else
        fail "serve $bad is refused" "exit $rc: $out"
    fi
done
[[ ! -e $T/never ]] && pass "a refused flag starts nothing" || fail "a refused flag starts nothing"
# A start that fails once the cores run (the metrics address is the NVMe/TCP listener's, bound
# just before): the cores stop and the pool is committed, as a clean stop does; no hang.
p1=$(free_port); p2=$(free_port)
out=$(timeout 60 "$bin" serve --data-dir "$T/late" --nbd-listen "127.0.0.1:$p1" \
      --nvmf-listen "127.0.0.1:$p2" --metrics-listen "127.0.0.1:$p2" 2>&1); rc=$?
if ((rc != 0 && rc != 124)) && grep -q "stopping them, committing" <<<"$out"; then
    pass "a start failing after the cores started stops them and commits (exit $rc)"
else
    fail "a start failing after the cores started stops them and commits" "exit $rc: $(tail -5 <<<"$out")"
fi
finish
