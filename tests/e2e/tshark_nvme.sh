#!/bin/bash
# End-to-end: Wireshark's NVMe/TCP dissector reads ballast's wire traffic as valid NVMe/TCP.
#
# Starts ballast with a RAM export, captures loopback traffic on its NVMe/TCP port while
# ballast-perf runs a short mixed workload with digests off (4 KiB in-capsule writes and
# C2HData reads, 64 KiB writes by R2T/H2CData, 512 KiB writes split into several H2CData
# PDUs, on two queues), then decodes the capture with tshark as nvme-tcp and checks that
#   - every PDU type of the exchange is decoded: ICReq, ICResp, CapsuleCommand,
#     CapsuleResponse, C2HData, R2T, H2CData;
#   - nothing is malformed and there are no expert errors.
# Installs tshark (Debian package, no setuid dumpcap) if it is missing; capturing needs root
# or CAP_NET_RAW.
#
# Environment: BALLAST_BIN (daemon), BALLAST_PERF_BIN (default: next to the daemon, else
# <repo>/build/cargo/release/ballast-perf), BALLAST_KEEP_TMP (keep the capture).
set -u -o pipefail
. "$(dirname "$0")/../lib.sh"

T=$TEST_TMP
PERF_BIN=$(ballast_perf_bin)

# ------------------------------------------------------------------ tshark
install_tshark() {
    command -v tshark >/dev/null 2>&1 && return 0
    command -v apt-get >/dev/null 2>&1 || return 1
    local sudo=""
    ((EUID == 0)) || sudo=sudo
    echo "(installing tshark)"
    echo "wireshark-common wireshark-common/install-setuid boolean false" \
        | $sudo debconf-set-selections
    $sudo apt-get update -qq >/dev/null 2>&1
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq tshark >/dev/null 2>&1
    command -v tshark >/dev/null 2>&1
}

if [[ ${BALLAST_NO_INSTALL:-} == "" ]] && install_tshark; then
    pass "tshark available ($(tshark --version 2>/dev/null | head -1))"
elif command -v tshark >/dev/null 2>&1; then
    pass "tshark available ($(tshark --version 2>/dev/null | head -1))"
else
    fail "tshark available" "not installed and apt-get install tshark failed"
    finish
fi
if [[ ! -x $PERF_BIN ]]; then
    fail "ballast-perf binary" "$PERF_BIN missing (cargo build --release, or set BALLAST_PERF_BIN)"
    finish
fi

# The decode-as protocol name differs across Wireshark versions: find it.
PROTO=""
PROTOCOLS=$(tshark -G protocols 2>/dev/null | awk -F'\t' '{print $3}')
for p in nvme-tcp nvme_tcp nvmetcp; do
    if grep -qx -- "$p" <<<"$PROTOCOLS"; then
        PROTO=$p
        break
    fi
done
if [[ -n $PROTO ]]; then
    pass "tshark has the NVMe/TCP dissector ($PROTO)"
else
    fail "tshark has the NVMe/TCP dissector" "no nvme-tcp protocol in tshark -G protocols"
    finish
fi
TYPE_FIELD=$PROTO.type

# ------------------------------------------------------------------ daemon + capture
start_ballast --export cap=ram:64M || finish
NVMF_ADDR=$(nvmf_addr)
if [[ -z $NVMF_ADDR ]]; then
    fail "ballast has an NVMe/TCP listener" "serve --help shows no --nvmf-listen"
    finish
fi
NVMF_PORT=${NVMF_ADDR##*:}
NQN=nqn.2026-11.dev.ballast:cap
CAP=$T/nvme.pcapng

tshark -i lo -f "tcp port $NVMF_PORT" -B 64 -w "$CAP" -q >"$T/capture.out" 2>&1 &
CAP_PID=$!
add_cleanup "kill -INT $CAP_PID"
started=0
for ((i = 0; i < 100; i++)); do
    if grep -q "Capturing on" "$T/capture.out" 2>/dev/null; then started=1; break; fi
    kill -0 "$CAP_PID" 2>/dev/null || break
    sleep 0.1
done
if ((started)); then
    pass "capturing on lo, port $NVMF_PORT"
else
    fail "capturing on lo" "$(tail -3 "$T/capture.out" | tr '\n' ' ')"
    finish
fi
sleep 0.3

perf() {   # perf NAME ARGS...: one ballast-perf run, digests off
    local name=$1; shift
    if timeout 60 "$PERF_BIN" --addr "$NVMF_ADDR" --nqn "$NQN" --runtime 5 "$@" \
        >"$T/perf-$name.out" 2>&1; then
        pass "ballast-perf $name: $(grep -m1 'total:' "$T/perf-$name.out" | sed 's/^ *//')"
    else
        fail "ballast-perf $name" "$(tail -3 "$T/perf-$name.out" | tr '\n' ' ')"
    fi
}
perf randrw-4k --rw randrw --bs 4k --qd 4 --queues 2 --number-ios 200
perf randrw-64k --rw randrw --bs 64k --qd 4 --number-ios 100
perf write-512k --rw write --bs 512k --qd 2 --number-ios 8

sleep 0.5
kill -INT "$CAP_PID" 2>/dev/null
for ((i = 0; i < 100; i++)); do kill -0 "$CAP_PID" 2>/dev/null || break; sleep 0.1; done
kill -KILL "$CAP_PID" 2>/dev/null
wait "$CAP_PID" 2>/dev/null
if [[ -s $CAP ]]; then
    pass "capture written ($(stat -c %s "$CAP") bytes)"
else
    fail "capture written" "$(tail -3 "$T/capture.out" | tr '\n' ' ')"
    finish
fi
if grep -qiE '[1-9][0-9]* packets? dropped' "$T/capture.out"; then
    fail "capture dropped no packets" "$(grep -i dropped "$T/capture.out" | tr '\n' ' ')"
fi

# ------------------------------------------------------------------ decode
DECODE=(-r "$CAP" -d "tcp.port==$NVMF_PORT,$PROTO")
if ! tshark "${DECODE[@]}" -Y "$PROTO" -T fields -e "$TYPE_FIELD" >"$T/types.txt" 2>"$T/decode.err"; then
    fail "tshark decodes the capture" "$(tail -3 "$T/decode.err" | tr '\n' ' ')"
    finish
fi
# One line per packet; a packet may carry several PDUs (comma-separated types).
tr ',' '\n' <"$T/types.txt" | grep -v '^$' | sort | uniq -c >"$T/type-counts.txt"
echo "PDU types decoded (count type):"
sed 's/^/    /' "$T/type-counts.txt"
count_type() { awk -v t="$1" '$2 == t {print $1}' "$T/type-counts.txt"; }
declare -A NAMES=([0]=ICReq [1]=ICResp [4]=CapsuleCommand [5]=CapsuleResponse
    [6]=H2CData [7]=C2HData [9]=R2T)
for t in 0 1 4 5 6 7 9; do
    n=$(count_type "$t")
    if [[ -n $n && $n -gt 0 ]]; then
        pass "decoded ${NAMES[$t]} PDUs (type $t): $n"
    else
        fail "decoded ${NAMES[$t]} PDUs (type $t)" "none in the capture"
    fi
done
# Connections: 3 runs x (admin + I/O queues) = 3 + 4 = 7 ICReq/ICResp pairs.
check_eq "as many ICResp as ICReq" "$(count_type 0)" "$(count_type 1)"
if [[ $(count_type 0) -ge 7 ]]; then
    pass "ICReq on every connection (>= 7)"
else
    fail "ICReq on every connection" "$(count_type 0) < 7"
fi

rc=0
bad=$(tshark "${DECODE[@]}" -Y '_ws.malformed || _ws.expert.severity >= error' 2>"$T/bad.err") \
    || rc=$?
if ((rc != 0)); then
    fail "no malformed packets and no expert errors" "tshark exit $rc: $(tail -2 "$T/bad.err")"
elif [[ -z $bad ]]; then
    pass "no malformed packets and no expert errors"
else
    fail "no malformed packets and no expert errors" \
        "$(wc -l <<<"$bad") packets, e.g.: $(head -3 <<<"$bad" | tr '\n' ' ')"
fi
# The NVMe layer decodes the commands too (opcodes of reads and writes).
ops=$(tshark "${DECODE[@]}" -Y 'nvme.cmd.opc' -T fields -e nvme.cmd.opc 2>/dev/null \
    | tr ',' '\n' | sort -u | tr '\n' ' ')
if [[ $ops == *0x01* && $ops == *0x02* ]]; then
    pass "NVMe Read and Write commands decoded (opcodes: $ops)"
else
    fail "NVMe Read and Write commands decoded" "opcodes seen: '$ops'"
fi

stop_ballast
finish
