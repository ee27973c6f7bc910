#!/bin/bash
# End-to-end: ballast driven by SPDK's own RPC client, `spdk-rpc` from PyPI's `spdk` package,
# with the lvol + nvmf steps of SPDK's tutorials unchanged (only the base bdev creation is
# replaced: the pool is the lvol store), then the data checked through NBD and NVMe/TCP.
#
#   1  spdk-rpc in a venv (cached in $XDG_CACHE_HOME or build/; SKIP when PyPI is unreachable)
#   2  spdk_get_version, rpc_get_methods, bdev_lvol_get_lvstores (-l, -u)
#   3  bdev_lvol_create by -l and by -u (returns the UUID; thin with -t, thick without); a
#      pattern written through NBD;
#      bdev_lvol_snapshot, bdev_lvol_clone on aliases; bdev_get_bdevs (aliases, uuid,
#      driver_specific.lvol), lookups by alias, UUID and name
#   4  nvmf_create_transport, nvmf_create_subsystem -a -s -d, add_ns (alias), add_listener,
#      add_host, nvmf_get_subsystems; serial/model in Identify Controller and refused when too
#      long; listeners per subsystem (Connect refused where it does not listen, each port's
#      discovery log, get/remove_listener); the clone read back through NBD and NVMe/TCP
#   5  bdev_get_iostat counts the I/O; resize, rename (and back), set_read_only (nbdinfo sees
#      it) and delete by alias and UUID; the pool's file grown and
#      bdev_lvol_grow_lvstore (-l; nothing to grow; -22 with neither -u nor -l, -19 another)
#   5b bdev_lvol_decouple_parent and bdev_lvol_inflate: clones that are clones no more (thin,
#      thick), the space they take, refusals; the snapshot deleted, they keep the pattern
#   6  negative cases: wrong -l / -u (-19 No such device), both (-22), unknown bdev (-19),
#      unknown subsystem, unknown parameter (-32602)
#   7  the keyring and a host's key names (never the keys); 7b SPDK's NVMe-oF tutorial; 7c the
#      log's level and debug flags changed at runtime (log_set_level, log_set_flag, ...)
#   8  after a restart: the lvol and store identities, and the subsystem made in 4
#      (tests/e2e/nvmf_persist.sh covers the restart of the security settings in depth)
set -u -o pipefail
. "$(dirname "$0")/../lib.sh"

T=$TEST_TMP
MiB=$((1024 * 1024))

echo "## 1: spdk-rpc from PyPI"
need_spdk_rpc
check "spdk-rpc is installed ($(spdk_rpc_version))" test -x "$SPDK_RPC"

# Limits section 7b pushes against: RAM exports may total 200 MiB, at most 4 exports.
start_ballast --cores 2 --ram-export-memory 200M --max-exports 4 || finish
NVMF_PORT=$(sed -n 's/.*--nvmf-listen 127.0.0.1:\([0-9]*\).*/\1/p' "$BALLAST_LOG" | tail -n 1)

# py_line EXPR < LINE: evaluate EXPR with `l` bound to the line on stdin (rpc, py and
# rpc_error: tests/lib.sh).
py_line() { "$SYS_PY" -c 'import sys; l=sys.stdin.read().strip(); print(eval(sys.argv[1]))' "$1"; }

echo "## 2: version, methods, lvol store"
check_eq "spdk_get_version names ballast" "True" \
    "$(rpc spdk_get_version | py 'j["version"].startswith("ballast") and "major" in j["fields"]')"
check_eq "rpc_get_methods lists what the script uses" "True" \
    "$(rpc rpc_get_methods | py 'all(m in j for m in ["bdev_lvol_create", "bdev_get_bdevs", "bdev_get_iostat", "nvmf_create_transport", "nvmf_subsystem_add_listener", "spdk_get_version"])')"
rpc bdev_lvol_get_lvstores >"$T/lvs.json"
LVS=$(py 'j[0]["name"]' <"$T/lvs.json")
LVS_UUID=$(py 'j[0]["uuid"]' <"$T/lvs.json")
check_eq "one lvol store with SPDK's fields" "1 True" \
    "$(py '"%d %s" % (len(j), all(k in j[0] for k in ("name", "uuid", "base_bdev", "cluster_size", "total_data_clusters", "free_clusters", "block_size")))' <"$T/lvs.json")"
check_eq "the store is lvs0 with a UUID" "lvs0 36" "$LVS ${#LVS_UUID}"
check_eq "bdev_lvol_get_lvstores -l $LVS" "$LVS_UUID" \
    "$(rpc bdev_lvol_get_lvstores -l "$LVS" | py 'j[0]["uuid"]')"
check_eq "bdev_lvol_get_lvstores -u UUID" "$LVS" \
    "$(rpc bdev_lvol_get_lvstores -u "$LVS_UUID" | py 'j[0]["name"]')"

echo "## 3: lvols, snapshot, clone (the tutorial's lvol steps)"
LVOL_UUID=$(rpc bdev_lvol_create -l "$LVS" -t lvol0 64)
check_eq "bdev_lvol_create -l returns a UUID" 36 "${#LVOL_UUID}"
LVOL1_UUID=$(rpc bdev_lvol_create -u "$LVS_UUID" lvol1 32)
check_eq "bdev_lvol_create -u (thick, as spdk-rpc sends by default) returns another UUID" \
    "36 True" "${#LVOL1_UUID} $([[ $LVOL1_UUID != "$LVOL_UUID" ]] && echo True)"

head -c $((4 * MiB)) /dev/urandom >"$T/pattern"
check "write a 4 MiB pattern to lvol0 through NBD" \
    timeout 60 nbdcopy --flush "$T/pattern" "$NBD_URI/lvol0"
SNAP_UUID=$(rpc bdev_lvol_snapshot "$LVS/lvol0" snap0)
check_eq "bdev_lvol_snapshot LVS/lvol0 returns a UUID" 36 "${#SNAP_UUID}"
# The volume changes after the snapshot; the clone must show the snapshot's data.
head -c $MiB /dev/urandom >"$T/later"
check "overwrite lvol0's first MiB after the snapshot" \
    timeout 60 nbdcopy --flush "$T/later" "$NBD_URI/lvol0"
CLONE_UUID=$(rpc bdev_lvol_clone "$LVS/snap0" clone0)
check_eq "bdev_lvol_clone LVS/snap0 returns a UUID" 36 "${#CLONE_UUID}"
# A taken name: SPDK answers snapshot and clone from their callbacks, -32602 "File exists".
check_eq "bdev_lvol_snapshot to a taken name: -32602 File exists (as SPDK's callback)" \
    "-32602 File exists" "$(rpc_error bdev_lvol_snapshot "$LVS/lvol0" clone0 | cut -d: -f1)"
check_eq "bdev_lvol_clone to a taken name: -32602 File exists" \
    "-32602 File exists" "$(rpc_error bdev_lvol_clone "$LVS/snap0" lvol0 | cut -d: -f1)"

rpc bdev_get_bdevs -b "$LVS/clone0" >"$T/clone.json"
check_eq "bdev_get_bdevs -b LVS/clone0: SPDK's lvol description" \
    "clone0 ['$LVS/clone0'] $CLONE_UUID Logical Volume 4096 16384" \
    "$(py '"%s %s %s %s %d %d" % (j[0]["name"], j[0]["aliases"], j[0]["uuid"], j[0]["product_name"], j[0]["block_size"], j[0]["num_blocks"])' <"$T/clone.json")"
check_eq "clone0's driver_specific.lvol" "$LVS_UUID True False True snap0" \
    "$(py 'str(j[0]["driver_specific"]["lvol"]["lvol_store_uuid"]) + " " + " ".join(str(j[0]["driver_specific"]["lvol"][k]) for k in ("thin_provision", "snapshot", "clone", "base_snapshot"))' <"$T/clone.json")"
check_eq "snap0 is a snapshot listing clone0 among its clones" "True ['clone0']" \
    "$(rpc bdev_get_bdevs -b "$SNAP_UUID" | py '"%s %s" % (j[0]["driver_specific"]["lvol"]["snapshot"], j[0]["driver_specific"]["lvol"]["clones"])')"
check_eq "bdev_get_bdevs finds lvol0 by UUID, alias and name" "lvol0 lvol0 lvol0" \
    "$(rpc bdev_get_bdevs -b "$LVOL_UUID" | py 'j[0]["name"]') $(rpc bdev_get_bdevs -b "$LVS/lvol0" | py 'j[0]["name"]') $(rpc bdev_get_bdevs -b lvol0 | py 'j[0]["name"]')"
check_eq "bdev_get_bdevs lists every lvol" "True" \
    "$(rpc bdev_get_bdevs | py 'set(["lvol0", "lvol1", "snap0", "clone0"]) <= set(b["name"] for b in j)')"
check_eq "bdev_lvol_create: -t thin (lvol0), without it thick (lvol1, SPDK's default)" "True False" \
    "$(rpc bdev_lvol_get_lvols | py '" ".join(str(v["is_thin_provisioned"]) for n in ("lvol0", "lvol1") for v in j if v["name"] == n)')"
check_eq "bdev_lvol_get_lvols: aliases and UUIDs" "$LVS/clone0 $CLONE_UUID True" \
    "$(rpc bdev_lvol_get_lvols | py '" ".join(str(x) for v in j if v["name"] == "clone0" for x in (v["alias"], v["uuid"], v["is_clone"]))')"

echo "## 4: NVMe-oF (the tutorial's nvmf steps)"
NQN=nqn.2016-06.io.spdk:cnode1
HOST=nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000b0b0
check "nvmf_create_transport -t TCP" rpc nvmf_create_transport -t TCP
check "nvmf_create_transport -t TCP again (idempotent)" rpc nvmf_create_transport -t TCP
check "nvmf_create_subsystem $NQN -a -s SPDK00000000000001 -d SPDK_Controller1" \
    rpc nvmf_create_subsystem "$NQN" -a -s SPDK00000000000001 -d SPDK_Controller1
check "nvmf_subsystem_add_ns $NQN $LVS/clone0" rpc nvmf_subsystem_add_ns "$NQN" "$LVS/clone0"
check "nvmf_subsystem_add_listener -t tcp -a 127.0.0.1 -s $NVMF_PORT" \
    rpc nvmf_subsystem_add_listener "$NQN" -t tcp -a 127.0.0.1 -s "$NVMF_PORT"
check "nvmf_subsystem_add_host $NQN HOSTNQN" rpc nvmf_subsystem_add_host "$NQN" "$HOST"
check "nvmf_subsystem_allow_any_host --no-allow-any-host (only listed hosts from now on)" \
    rpc nvmf_subsystem_allow_any_host --no-allow-any-host "$NQN"
rpc nvmf_get_subsystems >"$T/subs.json"
check_eq "nvmf_get_subsystems: SPDK's shape for $NQN" \
    "NVMe False ['$HOST'] 1 clone0 $NVMF_PORT True True" \
    "$(py '" ".join(str(x) for s in j if s["nqn"] == "'"$NQN"'" for x in (s["subtype"], s["allow_any_host"], [h["nqn"] for h in s["hosts"]], s["namespaces"][0]["nsid"], s["namespaces"][0]["bdev_name"], s["listen_addresses"][0]["trsvcid"], len(s["namespaces"][0]["uuid"]) == 36, bool(s["serial_number"] and s["model_number"])))' <"$T/subs.json")"

check_eq "nvmf_get_subsystems: the -s/-d serial and model numbers" "SPDK00000000000001 SPDK_Controller1" \
    "$(py '" ".join(s["serial_number"] + " " + s["model_number"] for s in j if s["nqn"] == "'"$NQN"'")' <"$T/subs.json")"
# nvmeq PYTHON-BODY [ARGS...]: run PYTHON-BODY with tests/nvmeraw.py as `n`; sys.argv[1:] = ARGS.
nvmeq() { local body=$1; shift; PYTHONPATH="$REPO_ROOT/tests" timeout 60 "$SYS_PY" -c "import sys, nvmeraw as n
$body" "$@"; }
check_eq "Identify Controller over NVMe/TCP reports them (SN bytes 4-23, MN bytes 24-63)" \
    "'SPDK00000000000001  ' 'SPDK_Controller1'" \
    "$(nvmeq 'd = n.admin_queue(int(sys.argv[1]), sys.argv[2]).identify_controller()
print(repr(d[4:24].decode()), repr(d[24:64].decode().rstrip()))' "$NVMF_PORT" "$NQN" 2>&1)"
check_eq "nvmf_create_subsystem -s with 21 characters: SPDK's -32602 Invalid SN" \
    "-32602 Invalid SN 123456789012345678901" \
    "$(rpc_error nvmf_create_subsystem nqn.2016-06.io.spdk:badsn -s 123456789012345678901)"
check_eq "nvmf_create_subsystem -d with 41 characters: -32602 Invalid MN" \
    "-32602 Invalid MN $(printf 'm%.0s' {1..41})" \
    "$(rpc_error nvmf_create_subsystem nqn.2016-06.io.spdk:badmn -d "$(printf 'm%.0s' {1..41})")"
check_eq "the refused subsystems were not created" "False" \
    "$(rpc nvmf_get_subsystems | py 'any(s["nqn"].endswith(("badsn", "badmn")) for s in j)')"
# SPDK's default controller-id range (older clients always send it) is accepted; another is not.
check "nvmf_create_subsystem -i 1 -I 65519 (SPDK's defaults)" \
    rpc nvmf_create_subsystem nqn.2016-06.io.spdk:cntlid -i 1 -I 65519
check_eq "nvmf_create_subsystem -i 5: -32602" "-32602" \
    "$(rpc_error nvmf_create_subsystem nqn.2016-06.io.spdk:cntlid5 -i 5 | cut -d' ' -f1)"
check_eq "nvmf_get_subsystems of an unknown NQN: -19 No such device (as SPDK)" \
    "-19 No such device" "$(rpc_error nvmf_get_subsystems nqn.2016-06.io.spdk:none)"
check_eq "nvmf_subsystem_add_ns -n 4294967295 (the broadcast id): -32602" "-32602" \
    "$(rpc_error nvmf_subsystem_add_ns nqn.2016-06.io.spdk:cntlid "$LVS/clone0" -n 4294967295 | cut -d' ' -f1)"
check_eq "nvmf_subsystem_add_ns -n 1025 (beyond Identify's NN 1024): -32602" "-32602" \
    "$(rpc_error nvmf_subsystem_add_ns nqn.2016-06.io.spdk:cntlid "$LVS/clone0" -n 1025 | cut -d' ' -f1)"
check "nvmf_delete_subsystem nqn.2016-06.io.spdk:cntlid" \
    rpc nvmf_delete_subsystem nqn.2016-06.io.spdk:cntlid
# max_namespaces (-m): the highest namespace id, enforced and reported (and Identify's NN).
check "nvmf_create_subsystem -m 1" rpc nvmf_create_subsystem nqn.2016-06.io.spdk:one -m 1
check "the first namespace fits" rpc nvmf_subsystem_add_ns nqn.2016-06.io.spdk:one "$LVS/clone0"
check_eq "a second one is refused (-32602)" "-32602" \
    "$(rpc_error nvmf_subsystem_add_ns nqn.2016-06.io.spdk:one "$LVS/lvol0" | cut -d' ' -f1)"
check_eq "nvmf_get_subsystems reports max_namespaces 1 and one namespace" "1 1" \
    "$(rpc nvmf_get_subsystems nqn.2016-06.io.spdk:one | py '"%d %d" % (j[0]["max_namespaces"], len(j[0]["namespaces"]))')"
check "nvmf_delete_subsystem nqn.2016-06.io.spdk:one" rpc nvmf_delete_subsystem nqn.2016-06.io.spdk:one
# Persistent discovery: a discovery controller whose host enabled discovery-change notices
# (AEC bit 31) and holds an AER hears of a subsystem created over RPC (0070F002h: what
# nvme-cli's autoconnect udev rule keys on).
check_eq "a discovery controller's AER completes with 0x70f002 when a subsystem is created" \
    "0 0x70f002" "$(nvmeq '
import json, socket
a = n.admin_queue(int(sys.argv[1]), "nqn.2014-08.org.nvmexpress.discovery")
a.send(n.capsule(n.sqe(0x09, 101, cdw=(0x0b, 1 << 31, 0, 0, 0, 0))))  # Set Features AEC
assert a.response()[1] == 0
a.send(n.capsule(n.sqe(0x0c, 102)))  # Asynchronous Event Request: held
r = socket.socket(socket.AF_UNIX); r.connect(sys.argv[2])
r.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "nvmf_create_subsystem",
                      "params": {"nqn": "nqn.2016-06.io.spdk:aen"}}).encode())
assert "result" in json.loads(r.makefile().readline())
cid, st, dw0 = a.response()
print(st, hex(dw0) if cid == 102 else "cid %d" % cid)' "$NVMF_PORT" "$RPC_SOCK" 2>&1)"
check "nvmf_delete_subsystem nqn.2016-06.io.spdk:aen" rpc nvmf_delete_subsystem nqn.2016-06.io.spdk:aen

# Listeners belong to subsystems: cnode2 listens on a second port only.
NQN2=nqn.2016-06.io.spdk:cnode2
PORT2=$(free_port)
check "nvmf_create_subsystem $NQN2 -a" rpc nvmf_create_subsystem "$NQN2" -a
check "nvmf_subsystem_add_ns $NQN2 $LVS/lvol0" rpc nvmf_subsystem_add_ns "$NQN2" "$LVS/lvol0"
check_eq "$NQN2 listens nowhere yet: Connect on $NVMF_PORT refused (Connect Invalid Parameters)" \
    "0x182" "$(nvmeq 'print(hex(n.connect_status(int(sys.argv[1]), sys.argv[2])))' "$NVMF_PORT" "$NQN2" 2>&1)"
check "nvmf_subsystem_add_listener $NQN2 -s $PORT2 (a new port)" \
    rpc nvmf_subsystem_add_listener "$NQN2" -t tcp -a 127.0.0.1 -s "$PORT2"
check_eq "nvmf_subsystem_get_listeners $NQN2: the new port only" "['$PORT2']" \
    "$(rpc nvmf_subsystem_get_listeners "$NQN2" | py '[l["address"]["trsvcid"] for l in j]')"
check_eq "ballast nvmf listeners $NQN2: an aligned table" "TRTYPE ADRFAM ADDRESS|TCP IPv4 127.0.0.1:$PORT2" \
    "$(ballast_ctl nvmf listeners "$NQN2" | awk '{print $1, $2, $3}' | paste -sd'|')"
check_eq "ballast nvmf list: $NQN2's row names its listener" "127.0.0.1:$PORT2" \
    "$(ballast_ctl nvmf list | awk -v q="$NQN2" '$1 == q {print $NF}')"
# ANA: the listener's state as SPDK's client sets it, through the path it names.
ana_read() {
    nvmeq 'a, io = n.io_queue(int(sys.argv[1]), sys.argv[2])
st, _ = io.read_command(n.sqe(n.OP_READ, io.next_cid(), nsid=1, sgl_len=4096))
print(hex(st), io.dnr)' "$PORT2" "$NQN2" 2>&1
}
check "nvmf_subsystem_listener_set_ana_state $NQN2 -n inaccessible -s $PORT2" \
    rpc nvmf_subsystem_listener_set_ana_state "$NQN2" -n inaccessible -t tcp -a 127.0.0.1 -s "$PORT2"
check_eq "nvmf_subsystem_get_listeners: group 1 inaccessible there" "[(1, 'inaccessible')]" \
    "$(rpc nvmf_subsystem_get_listeners "$NQN2" | py '[(s["ana_group"], s["ana_state"]) for l in j for s in l["ana_states"]]')"
check_eq "a read through that path: Asymmetric Access Inaccessible (302h), no DNR" "0x302 False" "$(ana_read)"
check "nvmf_subsystem_listener_set_ana_state $NQN2 -n optimized -g 1" \
    rpc nvmf_subsystem_listener_set_ana_state "$NQN2" -n optimized -t tcp -a 127.0.0.1 -s "$PORT2" -g 1
check_eq "read through it again: served" "0x0 False" "$(ana_read)"
check_eq "set_ana_state on a port $NQN2 does not use: refused (-32602)" "-32602" \
    "$(rpc_error nvmf_subsystem_listener_set_ana_state "$NQN2" -n optimized -t tcp -a 127.0.0.1 -s "$NVMF_PORT" | cut -d' ' -f1)"
check "nvmf_create_subsystem -r (ANA reporting: every subsystem has it)" \
    rpc nvmf_create_subsystem nqn.2016-06.io.spdk:ana -r
check "nvmf_delete_subsystem nqn.2016-06.io.spdk:ana" rpc nvmf_delete_subsystem nqn.2016-06.io.spdk:ana
check_eq "Connect: $NQN2 accepted on $PORT2, $NQN refused there, $NQN2 refused on $NVMF_PORT" \
    "0x0 0x182 0x182" \
    "$(nvmeq 'p1, p2, a, b = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
print(*(hex(n.connect_status(p, q)) for p, q in ((p2, b), (p2, a), (p1, b))))' "$NVMF_PORT" "$PORT2" "$NQN" "$NQN2" 2>&1)"
disc() { nvmeq 'print(n.admin_queue(int(sys.argv[1]), n.DISCOVERY_NQN).discovery_log())' "$1" 2>&1; }
check_eq "the discovery log on $PORT2 lists $NQN2 there, nothing else" \
    "[('$NQN2', '127.0.0.1:$PORT2')]" "$(disc "$PORT2")"
d1=$(disc "$NVMF_PORT")
if [[ $d1 == *"('$NQN', '127.0.0.1:$NVMF_PORT')"* && $d1 != *"$NQN2"* ]]; then
    pass "the discovery log on $NVMF_PORT lists $NQN there, not $NQN2"
else
    fail "the discovery log on $NVMF_PORT lists $NQN there, not $NQN2" "$d1"
fi
check "nvmf_subsystem_remove_listener $NQN2 -s $PORT2" \
    rpc nvmf_subsystem_remove_listener "$NQN2" -t tcp -a 127.0.0.1 -s "$PORT2"
check_eq "after it: no listener, Connect on $PORT2 refused, its discovery log empty" \
    "[] 0x182 []" \
    "$(rpc nvmf_subsystem_get_listeners "$NQN2" | tr -d '\n ') $(nvmeq 'print(hex(n.connect_status(int(sys.argv[1]), sys.argv[2])))' "$PORT2" "$NQN2" 2>&1) $(disc "$PORT2")"
check_eq "removing it again: -32602 Invalid parameters" "-32602 Invalid parameters" \
    "$(rpc_error nvmf_subsystem_remove_listener "$NQN2" -t tcp -a 127.0.0.1 -s "$PORT2")"
check "nvmf_delete_subsystem $NQN2" rpc nvmf_delete_subsystem "$NQN2"

# The clone holds the snapshot's data: the whole pattern, not the later overwrite.
check_eq "clone0 read through NBD equals the pattern written before the snapshot" \
    "$(sha "$T/pattern")" \
    "$(timeout 60 nbdcopy "$NBD_URI/clone0" - 2>/dev/null | head -c $((4 * MiB)) | sha256sum | cut -d' ' -f1)"
cat >"$T/nvme_read.py" <<'PYEOF'
"""Reads LEN bytes from namespace 1 of NQN over NVMe/TCP (tests/nvmeraw.py) to stdout."""
import struct, sys
import nvmeraw as n

port, nqn, length = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
admin, io = n.io_queue(port, nqn)
chunk = 128 * 1024
out = bytearray()
for off in range(0, length, chunk):
    io.s.sendall(io.read_cmd(off // 4096, chunk))
    got = bytearray()
    while True:
        typ, p = io.pdu()
        if typ == n.C2H_DATA:
            hlen, pdo = p[2], p[3]
            got += p[pdo:]
            if p[1] & 0x08:  # SUCCESS: no response capsule follows
                break
        elif typ == n.CAPSULE_RESP:
            sf = struct.unpack("<H", p[22:24])[0]
            if (sf >> 1) & 0x7FF:
                sys.exit("read failed: status 0x%x" % ((sf >> 1) & 0x7FF))
            break
        else:
            sys.exit("unexpected PDU type %d" % typ)
    out += got
sys.stdout.buffer.write(bytes(out))
PYEOF
check_eq "clone0 read through NVMe/TCP ($NQN, the allowed host) equals the pattern" \
    "$(sha "$T/pattern")" \
    "$(PYTHONPATH="$REPO_ROOT/tests" timeout 60 "$SYS_PY" "$T/nvme_read.py" "$NVMF_PORT" "$NQN" $((4 * MiB)) 2>"$T/nvme.err" | sha256sum | cut -d' ' -f1)"
[[ -s $T/nvme.err ]] && echo "  nvme_read: $(tail -n 2 "$T/nvme.err" | tr '\n' ' ')"
check_eq "lvol0 itself changed after the snapshot (NBD)" "$(sha "$T/later")" \
    "$(timeout 60 nbdcopy "$NBD_URI/lvol0" - 2>/dev/null | head -c $MiB | sha256sum | cut -d' ' -f1)"

echo "## 5: iostat, resize, delete"
check_eq "bdev_get_iostat --names LVS/lvol0 counts lvol0's own writes (4 MiB pattern + 1 MiB later)" "True lvol0 1000000" \
    "$(rpc bdev_get_iostat --names "$LVS/lvol0" | py '"%s %s %d" % (j["bdevs"][0]["bytes_written"] >= 5 * 2**20, j["bdevs"][0]["name"], j["tick_rate"])')"
check_eq "bdev_get_iostat counts clone0's reads apart (NBD and NVMe/TCP), and it wrote nothing" "True 0" \
    "$(rpc bdev_get_iostat --names "$LVS/clone0" | py '"%s %d" % (j["bdevs"][0]["num_read_ops"] > 0, j["bdevs"][0]["bytes_written"])')"
check_eq "bdev_get_iostat lists every bdev" "True" \
    "$(rpc bdev_get_iostat | py 'str(set(["lvol0", "clone0"]) <= set(b["name"] for b in j["bdevs"]))')"
check_eq "bdev_get_iostat --per-channel has one entry per core" 2 \
    "$(rpc bdev_get_iostat -c | py 'len(j["cores"])')"
check "bdev_lvol_resize LVS/lvol1 64" rpc bdev_lvol_resize "$LVS/lvol1" 64
check_eq "lvol1 is 64 MiB" 16384 "$(rpc bdev_get_bdevs -b "$LVOL1_UUID" | py 'j[0]["num_blocks"]')"
check "bdev_lvol_rename LVS/lvol1 lvol1r" rpc bdev_lvol_rename "$LVS/lvol1" lvol1r
check_eq "lvol1r keeps lvol1's UUID; LVS/lvol1 is gone (-19)" "$LVOL1_UUID -19 No such device" \
    "$(rpc bdev_get_bdevs -b "$LVS/lvol1r" | py 'j[0]["uuid"]') $(rpc_error bdev_get_bdevs -b "$LVS/lvol1")"
check_eq "nbdinfo: the export follows the name" 67108864 "$(timeout 30 nbdinfo --size "$NBD_URI/lvol1r")"
check_eq "bdev_lvol_rename to a taken name: -32602 File exists (as SPDK's callback)" \
    "-32602 File exists" "$(rpc_error bdev_lvol_rename "$LVS/lvol1r" lvol0 | cut -d: -f1)"
check_eq "bdev_lvol_rename of an unknown lvol: -19 No such device" "-19 No such device" \
    "$(rpc_error bdev_lvol_rename "$LVS/nosuch" x)"
check "bdev_lvol_rename by UUID, back to lvol1" rpc bdev_lvol_rename "$LVOL1_UUID" lvol1
check "bdev_lvol_set_read_only LVS/lvol1" rpc bdev_lvol_set_read_only "$LVS/lvol1"
check_eq "bdev_lvol_get_lvols: lvol1 read-only" "True" \
    "$(rpc bdev_lvol_get_lvols | py 'str(any(v["name"] == "lvol1" and v["read_only"] for v in j))')"
check_eq "nbdinfo: lvol1 is offered read-only" "true" \
    "$(timeout 30 nbdinfo --json "$NBD_URI/lvol1" | py 'str(j["exports"][0]["is_read_only"]).lower()')"
check_eq "a read-only lvol cannot be resized: -32602" "-32602" \
    "$(rpc_error bdev_lvol_resize "$LVS/lvol1" 96 | cut -d' ' -f1)"
check "bdev_lvol_delete by UUID" rpc bdev_lvol_delete "$LVOL1_UUID"
check_eq "the deleted lvol is gone (-19)" "-19 No such device" "$(rpc_error bdev_get_bdevs -b "$LVS/lvol1")"

# The pool's file grown from outside, then the store grown into it (SPDK's
# bdev_lvol_grow_lvstore after a base bdev resize): its data clusters follow the file.
POOL_FILE=$(rpc bdev_lvol_get_lvstores -u "$LVS_UUID" | py 'j[0]["base_bdev"]')
CLUSTERS=$(rpc bdev_lvol_get_lvstores -u "$LVS_UUID" | py 'j[0]["total_data_clusters"]')
CLUSTER_SIZE=$(rpc bdev_lvol_get_lvstores -u "$LVS_UUID" | py 'j[0]["cluster_size"]')
check_eq "bdev_lvol_grow_lvstore with the file unchanged: true, nothing grows" "true $CLUSTERS" \
    "$(rpc bdev_lvol_grow_lvstore -u "$LVS_UUID") $(rpc bdev_lvol_get_lvstores -u "$LVS_UUID" | py 'j[0]["total_data_clusters"]')"
check "the pool's file grown by 1 GiB (truncate)" truncate -s +1G "$POOL_FILE"
check_eq "bdev_lvol_grow_lvstore -l $LVS" true "$(rpc bdev_lvol_grow_lvstore -l "$LVS")"
check_eq "the store has 1 GiB more data clusters" "$((CLUSTERS + 1024 * MiB / CLUSTER_SIZE))" \
    "$(rpc bdev_lvol_get_lvstores -u "$LVS_UUID" | py 'j[0]["total_data_clusters"]')"
check_eq "bdev_lvol_grow_lvstore without -u or -l (-22)" "-22 Invalid argument" \
    "$(rpc_error bdev_lvol_grow_lvstore)"
check_eq "bdev_lvol_grow_lvstore of another store (-19)" "-19 No such device" \
    "$(rpc_error bdev_lvol_grow_lvstore -l nosuchstore)"

echo "## 5b: decouple_parent and inflate (SPDK's methods)"
# clone0 (the snapshot's 4 MiB pattern, exported under $NQN) leaves snap0; a second clone
# is inflated; snap0 deleted after: both keep the pattern.
CLONE1_UUID=$(rpc bdev_lvol_clone "$LVS/snap0" clone1)
check_eq "bdev_lvol_clone LVS/snap0 clone1" 36 "${#CLONE1_UUID}"
FREE0=$(rpc bdev_lvol_get_lvstores -u "$LVS_UUID" | py 'j[0]["free_clusters"]')
check "bdev_lvol_decouple_parent LVS/clone0" rpc bdev_lvol_decouple_parent "$LVS/clone0"
check_eq "clone0: no clone now, no base snapshot, still thin; snap0 lists clone1 alone" \
    "False None True ['clone1']" \
    "$(rpc bdev_get_bdevs -b "$LVS/clone0" | py '"%s %s %s" % (j[0]["driver_specific"]["lvol"]["clone"], j[0]["driver_specific"]["lvol"].get("base_snapshot"), j[0]["driver_specific"]["lvol"]["thin_provision"])') $(rpc bdev_get_bdevs -b "$SNAP_UUID" | py 'j[0]["driver_specific"]["lvol"]["clones"]')"
check_eq "bdev_lvol_get_lvols: clone0 is_clone false" "False" \
    "$(rpc bdev_lvol_get_lvols | py 'str([v["is_clone"] for v in j if v["name"] == "clone0"][0])')"
check_eq "the store lost the 4 MiB clone0 copied (in clusters)" \
    "$((4 * MiB / CLUSTER_SIZE))" \
    "$((FREE0 - $(rpc bdev_lvol_get_lvstores -u "$LVS_UUID" | py 'j[0]["free_clusters"]')))"
check_eq "bdev_lvol_decouple_parent again: nothing to decouple from (-32602)" "-32602" \
    "$(rpc_error bdev_lvol_decouple_parent "$LVS/clone0" | cut -d' ' -f1)"
FREE1=$(rpc bdev_lvol_get_lvstores -u "$LVS_UUID" | py 'j[0]["free_clusters"]')
check "bdev_lvol_inflate clone1 by UUID" rpc bdev_lvol_inflate "$CLONE1_UUID"
check_eq "clone1: thick, no clone" "False False" \
    "$(rpc bdev_get_bdevs -b "$CLONE1_UUID" | py '"%s %s" % (j[0]["driver_specific"]["lvol"]["thin_provision"], j[0]["driver_specific"]["lvol"]["clone"])')"
check_eq "the store lost clone1's whole 64 MiB (4 copied, 60 allocated), in clusters" \
    "$((64 * MiB / CLUSTER_SIZE))" \
    "$((FREE1 - $(rpc bdev_lvol_get_lvstores -u "$LVS_UUID" | py 'j[0]["free_clusters"]')))"
check_eq "bdev_lvol_inflate of a snapshot: -32602" "-32602" \
    "$(rpc_error bdev_lvol_inflate "$LVS/snap0" | cut -d' ' -f1)"
check_eq "bdev_lvol_inflate of an unknown lvol: -19 No such device" "-19 No such device" \
    "$(rpc_error bdev_lvol_inflate "$LVS/nosuch")"
check "bdev_lvol_delete LVS/snap0 (its former clones keep their data)" rpc bdev_lvol_delete "$LVS/snap0"
for c in clone0 clone1; do
    check_eq "$c still reads the pattern through NBD" "$(sha "$T/pattern")" \
        "$(timeout 60 nbdcopy "$NBD_URI/$c" - 2>/dev/null | head -c $((4 * MiB)) | sha256sum | cut -d' ' -f1)"
done

echo "## 6: errors with SPDK's codes"
check_eq "bdev_lvol_create -l WRONG: -19 No such device" "-19 No such device" \
    "$(rpc_error bdev_lvol_create -l WRONG x 4)"
check_eq "bdev_lvol_create -u OTHER-UUID: -19 No such device" "-19 No such device" \
    "$(rpc_error bdev_lvol_create -u 00000000-0000-0000-0000-000000000001 x 4)"
check_eq "bdev_lvol_create -l and -u together: -22 Invalid argument" "-22 Invalid argument" \
    "$(rpc_error bdev_lvol_create -l "$LVS" -u "$LVS_UUID" x 4)"
check_eq "nothing was created by the refused calls" "False" \
    "$(rpc bdev_lvol_get_lvols | py '"x" in [v["name"] for v in j]')"
check_eq "bdev_get_bdevs -b unknown: -19" "-19 No such device" "$(rpc_error bdev_get_bdevs -b nope)"
check_eq "bdev_lvol_snapshot of an unknown lvol: -19" "-19 No such device" \
    "$(rpc_error bdev_lvol_snapshot "$LVS/nope" s)"
check_eq "bdev_lvol_get_lvstores -l WRONG: -19" "-19 No such device" \
    "$(rpc_error bdev_lvol_get_lvstores -l WRONG)"
check_eq "an alias of another store does not resolve" "-19 No such device" \
    "$(rpc_error bdev_lvol_snapshot other/lvol0 s)"
check_eq "nvmf_subsystem_add_ns of an unknown bdev: -32602" "-32602" \
    "$(rpc_error nvmf_subsystem_add_ns "$NQN" nope | cut -d' ' -f1)"
check_eq "nvmf_subsystem_add_ns to an unknown subsystem: -32602" "-32602" \
    "$(rpc_error nvmf_subsystem_add_ns nqn.2016-06.io.spdk:none "$LVS/lvol0" | cut -d' ' -f1)"
check_eq "nvmf_create_subsystem twice: -32603" "-32603 Unable to create subsystem $NQN" \
    "$(rpc_error nvmf_create_subsystem "$NQN")"
check_eq "nvmf_create_transport -t RDMA: -32602" "-32602" \
    "$(rpc_error nvmf_create_transport -t RDMA | cut -d' ' -f1)"
raw_error() {
    "$SYS_PY" - "$RPC_SOCK" "$1" <<'PYEOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode())
r = json.loads(s.makefile().readline())
print(r["error"]["code"], r["error"]["message"].split(":")[0])
PYEOF
}
check_eq "an unknown parameter is refused (-32602 Invalid parameters)" "-32602 Invalid parameters" \
    "$(raw_error '{"jsonrpc":"2.0","id":1,"method":"bdev_get_bdevs","params":{"nmae":"x"}}')"
check_eq "an unknown lvol parameter: SPDK's -32603 decode failure" \
    "-32603 spdk_json_decode_object failed" \
    "$(raw_error '{"jsonrpc":"2.0","id":1,"method":"bdev_lvol_delete","params":{"name":"lvol0","x":1}}')"
# JSON-RPC framing as SPDK's server takes it.
check_eq "a batch array: -32600 Invalid request (SPDK supports none)" "-32600 Invalid request" \
    "$(raw_error '[{"jsonrpc":"2.0","id":1,"method":"spdk_get_version"}]')"
check_eq "positional params: the method's decode failure (-32603 for lvol methods)" \
    "-32603 spdk_json_decode_object failed" \
    "$(raw_error '{"jsonrpc":"2.0","id":1,"method":"bdev_lvol_delete","params":["lvol0"]}')"
check_eq "jsonrpc 1.0: -32600 Invalid request" "-32600 Invalid request" \
    "$(raw_error '{"jsonrpc":"1.0","id":1,"method":"spdk_get_version"}')"
out=$("$SYS_PY" - "$RPC_SOCK" <<'PYEOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
# A notification (no id) is not answered; the request after it is.
s.sendall(b'{"jsonrpc":"2.0","method":"spdk_get_version"}{"jsonrpc":"2.0","id":"two","method":"spdk_get_version"}')
r = json.loads(s.makefile().readline())
print(r["id"], "version" in r["result"])
PYEOF
)
check_eq "a notification gets no reply; the next request does" "two True" "$out"

echo "## 7: keys: the keyring, a host's TLS PSK and DH-HMAC-CHAP keys through spdk-rpc"
# interchange PREFIX HH NBYTES: PREFIX:HH:base64(key || crc32 LE): (as nvme gen-tls-key and
# nvme gen-dhchap-key print them)
interchange() {
    "$SYS_PY" -c 'import base64,os,sys,zlib
k=os.urandom(int(sys.argv[3]))
print("%s:%s:%s:" % (sys.argv[1], sys.argv[2], base64.b64encode(k + zlib.crc32(k).to_bytes(4, "little")).decode()))' "$@"
}
PSK_TEXT=$(interchange NVMeTLSkey-1 01 32)
DH_TEXT=$(interchange DHHC-1 01 32)
(umask 077; echo "$PSK_TEXT" >"$T/psk0"; echo "$DH_TEXT" >"$T/dh0")
HOST2=nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000c0c0
check "keyring_file_add_key psk0" rpc keyring_file_add_key psk0 "$T/psk0"
check "keyring_file_add_key dh0" rpc keyring_file_add_key dh0 "$T/dh0"
keys=$(rpc keyring_get_keys)
check_eq "keyring_get_keys: names and paths, never the keys" "dh0 psk0 False" \
    "$(py '" ".join(sorted(k["name"] for k in j)) + " " + str(any(k.get("module") != "keyring_file" for k in j))' <<<"$keys")"
if grep -q "${PSK_TEXT:20:20}\|${DH_TEXT:12:20}" <<<"$keys"; then fail "keyring_get_keys leaks key text"; fi
check "nvmf_subsystem_add_host --psk psk0 --dhchap-key dh0" \
    rpc nvmf_subsystem_add_host "$NQN" "$HOST2" --psk psk0 --dhchap-key dh0
subs=$(rpc nvmf_get_subsystems)
check_eq "nvmf_get_subsystems names the host's keys (SPDK's fields)" "psk0 dh0" \
    "$(py '" ".join(str(h.get(k)) for s in j if s["nqn"] == "'"$NQN"'" for h in s["hosts"] if h["nqn"] == "'"$HOST2"'" for k in ("psk", "dhchap_key"))' <<<"$subs")"
if grep -q "${PSK_TEXT:20:20}\|${DH_TEXT:12:20}" <<<"$subs"; then fail "nvmf_get_subsystems leaks key text"; fi
check_eq "add_host --psk with a key that is no TLS PSK is refused" "-32602" \
    "$(rpc_error nvmf_subsystem_add_host "$NQN" "$HOST2" --psk dh0 | cut -d' ' -f1)"
check_eq "add_host --psk with no such key is refused" "-32602" \
    "$(rpc_error nvmf_subsystem_add_host "$NQN" "$HOST2" --psk nosuch | cut -d' ' -f1)"
check "nvmf_subsystem_remove_host forgets the keys" rpc nvmf_subsystem_remove_host "$NQN" "$HOST2"
check_eq "the host and its key names are gone" "0" \
    "$(rpc nvmf_get_subsystems | py 'sum(1 for s in j for h in s["hosts"] if h["nqn"] == "'"$HOST2"'")')"
check "keyring_file_remove_key psk0" rpc keyring_file_remove_key psk0
check_eq "removing it again: -19 No such device" "-19 No such device" "$(rpc_error keyring_file_remove_key psk0)"
if grep -q "${PSK_TEXT:20:20}\|${DH_TEXT:12:20}" "$BALLAST_LOG"; then fail "a key appears in the server log"; else pass "no key in the server log"; fi

echo "## 7b: SPDK's NVMe-oF tutorial unchanged (a malloc bdev), controllers, queue pairs, key rotation"
NQN3=nqn.2016-06.io.spdk:cnode3
check_eq "bdev_malloc_create -b Malloc0 64 512 answers the name" "Malloc0" "$(rpc bdev_malloc_create -b Malloc0 64 512)"
# SPDK's counter names unnamed ones: Malloc0 first (taken: -17, as SPDK answers), then Malloc1.
check_eq "bdev_malloc_create 8 4096 without a name: SPDK's counter (Malloc0, taken: -17)" "-17" \
    "$(rpc_error bdev_malloc_create 8 4096 | cut -d' ' -f1)"
check_eq "... and again: Malloc1" "Malloc1" "$(rpc bdev_malloc_create 8 4096)"
check_eq "--ram-export-memory 200M: 160 MiB more (on 72) is -12, naming the flag" "-12 True" \
    "$(rpc_error bdev_malloc_create -b Big 160 512 | py_line '"%s %s" % (l.split()[0], "--ram-export-memory" in l)')"
check_eq "bdev_get_bdevs -b Malloc0: SPDK's malloc bdev (product, block size, blocks)" "Malloc disk 512 131072" \
    "$(rpc bdev_get_bdevs -b Malloc0 | py '"%s %d %d" % (j[0]["product_name"], j[0]["block_size"], j[0]["num_blocks"])')"
check_eq "bdev_malloc_create with a taken name: -17" "-17" "$(rpc_error bdev_malloc_create -b Malloc0 8 512 | cut -d' ' -f1)"
check_eq "bdev_malloc_create with block size 520: -22" "-22" "$(rpc_error bdev_malloc_create -b Mx 8 520 | cut -d' ' -f1)"
check_eq "bdev_malloc_create with metadata (-m 8): -22" "-22" "$(rpc_error bdev_malloc_create -b Mx 8 512 -m 8 | cut -d' ' -f1)"
check "nvmf_create_subsystem $NQN3 -a -s SPDK00000000000003 -d SPDK_Controller3" \
    rpc nvmf_create_subsystem "$NQN3" -a -s SPDK00000000000003 -d SPDK_Controller3
check "nvmf_subsystem_add_ns $NQN3 Malloc0" rpc nvmf_subsystem_add_ns "$NQN3" Malloc0
check "nvmf_subsystem_add_listener $NQN3 -t tcp -a 127.0.0.1 -s $NVMF_PORT" \
    rpc nvmf_subsystem_add_listener "$NQN3" -t tcp -a 127.0.0.1 -s "$NVMF_PORT"
check_eq "nothing connected: nvmf_subsystem_get_controllers and _get_qpairs list none" "[] []" \
    "$(rpc nvmf_subsystem_get_controllers "$NQN3" | py 'j') $(rpc nvmf_subsystem_get_qpairs "$NQN3" | py 'j')"
# A host connects an admin and an I/O queue and stays while spdk-rpc looks.
PYTHONPATH="$REPO_ROOT/tests" timeout 90 "$SYS_PY" -c 'import os, sys, time, nvmeraw as n
port, nqn = int(sys.argv[1]), sys.argv[2]
a, io = n.io_queue(port, nqn)
st, d = a.admin_read(0x06, [0, 0, 0, 0, 0, 0], 4096, nsid=1)
print("lbads", d[130] if st == 0 else "status 0x%x" % st, flush=True)
deadline = time.monotonic() + 60
while not os.path.exists(sys.argv[3]) and time.monotonic() < deadline:
    time.sleep(0.1)' "$NVMF_PORT" "$NQN3" "$T/host3.done" >"$T/host3.out" 2>&1 &
HOST3_PID=$!
for _ in $(seq 50); do grep -q lbads "$T/host3.out" && break; sleep 0.2; done
check_eq "the namespace's LBA size is its malloc bdev's (512: LBADS 9)" "lbads 9" "$(cat "$T/host3.out")"
check_eq "nvmf_subsystem_get_controllers: the host, its hostid, 1 I/O queue pair, an I/O controller" \
    "1 True True 1 io" \
    "$(rpc nvmf_subsystem_get_controllers "$NQN3" | py '"%d %s %s %d %s" % (len(j), j[0]["hostnqn"].startswith("nqn."), len(j[0]["hostid"]) == 36, j[0]["num_io_qpairs"], j[0]["cntrltype"])')"
check_eq "nvmf_subsystem_get_qpairs: queues 0 and 1 of that controller, enabled, at the listener, no auth" \
    "[0, 1] ['enabled'] ['$NVMF_PORT'] True False" \
    "$(rpc nvmf_subsystem_get_qpairs "$NQN3" | py '"%s %s %s %s %s" % ([q["qid"] for q in j], sorted({q["state"] for q in j}), sorted({q["listen_address"]["trsvcid"] for q in j}), len({q["cntlid"] for q in j}) == 1, any("auth" in q for q in j))')"
check_eq "... each from the host's own address (peer_address: two ports of 127.0.0.1)" "['127.0.0.1'] 2 True" \
    "$(rpc nvmf_subsystem_get_qpairs "$NQN3" | py '"%s %d %s" % (sorted({q["peer_address"]["traddr"] for q in j}), len({q["peer_address"]["trsvcid"] for q in j}), all(q["peer_address"]["trsvcid"] != "'"$NVMF_PORT"'" for q in j))')"
touch "$T/host3.done"; wait "$HOST3_PID" 2>/dev/null
check_eq "nvmf_subsystem_get_controllers of an unknown subsystem: -32602" "-32602" \
    "$(rpc_error nvmf_subsystem_get_controllers nqn.2016-06.io.spdk:nosuch | cut -d' ' -f1)"
# Key rotation: SPDK's nvmf_subsystem_set_keys on a listed host.
HOST3=nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000d0d0
(umask 077; interchange DHHC-1 01 32 >"$T/dh1"; interchange DHHC-1 01 32 >"$T/dh2")
check "keyring_file_add_key dh1, dh2" sh -c "'$SPDK_RPC' -s '$RPC_SOCK' keyring_file_add_key dh1 '$T/dh1' && '$SPDK_RPC' -s '$RPC_SOCK' keyring_file_add_key dh2 '$T/dh2'"
check "nvmf_subsystem_add_host $NQN3 --dhchap-key dh1" rpc nvmf_subsystem_add_host "$NQN3" "$HOST3" --dhchap-key dh1
check "nvmf_subsystem_set_keys --dhchap-key dh2 --dhchap-ctrlr-key dh1" \
    rpc nvmf_subsystem_set_keys "$NQN3" "$HOST3" --dhchap-key dh2 --dhchap-ctrlr-key dh1
host3_keys() { rpc nvmf_get_subsystems | py '" ".join(str(h.get(k)) for s in j if s["nqn"] == "'"$NQN3"'" for h in s["hosts"] if h["nqn"] == "'"$HOST3"'" for k in ("dhchap_key", "dhchap_ctrlr_key"))'; }
check_eq "nvmf_get_subsystems names the new keys" "dh2 dh1" "$(host3_keys)"
check "nvmf_subsystem_set_keys without keys (the host connects unauthenticated)" rpc nvmf_subsystem_set_keys "$NQN3" "$HOST3"
check_eq "... and the keys are gone" "None None" "$(host3_keys)"
check_eq "set_keys on a host not listed: -32602" "-32602" \
    "$(rpc_error nvmf_subsystem_set_keys "$NQN3" "${HOST3%d0d0}e0e0" --dhchap-key dh1 | cut -d' ' -f1)"
check_eq "set_keys with a controller key and no host key: -32602" "-32602" \
    "$(rpc_error nvmf_subsystem_set_keys "$NQN3" "$HOST3" --dhchap-ctrlr-key dh1 | cut -d' ' -f1)"
check_eq "set_keys naming a key not in the keyring: -32602" "-32602" \
    "$(rpc_error nvmf_subsystem_set_keys "$NQN3" "$HOST3" --dhchap-key nosuch | cut -d' ' -f1)"
# An existing file as an aio and a uring bdev.
truncate -s 16M "$T/aio.img"
check_eq "bdev_aio_create FILE aio0 4096" "aio0" "$(rpc bdev_aio_create "$T/aio.img" aio0 4096)"
check_eq "bdev_get_bdevs -b aio0: SPDK's aio bdev" "AIO disk 4096 4096" \
    "$(rpc bdev_get_bdevs -b aio0 | py '"%s %d %d" % (j[0]["product_name"], j[0]["block_size"], j[0]["num_blocks"])')"
truncate -s 32M "$T/aio.img"
check "bdev_aio_rescan aio0 after the file grew to 32 MiB" rpc bdev_aio_rescan aio0
check_eq "... its new size (8192 blocks of 4096)" "8192" "$(rpc bdev_get_bdevs -b aio0 | py 'j[0]["num_blocks"]')"
check_eq "bdev_aio_rescan of a malloc bdev: -19" "-19" "$(rpc_error bdev_aio_rescan Malloc1 | cut -d' ' -f1)"
check "framework_wait_init" rpc framework_wait_init
check_eq "bdev_aio_create of a file that does not exist: -2" "-2" \
    "$(rpc_error bdev_aio_create "$T/nosuch.img" aio1 | cut -d' ' -f1)"
check_eq "bdev_uring_create FILE ur0" "ur0" "$(rpc bdev_uring_create "$T/aio.img" ur0)"
check_eq "--max-exports 4: a fifth export is -12, naming the flag" "-12 True" \
    "$(rpc_error bdev_malloc_create -b Five 1 512 | py_line '"%s %s" % (l.split()[0], "--max-exports" in l)')"
check_eq "bdev_uring_create failing (no such file): SPDK's uring answer, -32603" "-32603 True" \
    "$(rpc_error bdev_uring_create "$T/nosuch.img" ur1 | py_line '"%s %s" % (l.split()[0], "No such file" in l)')"
check_eq "bdev_aio_delete of a malloc bdev: -19 No such device" "-19 No such device" "$(rpc_error bdev_aio_delete Malloc1)"
check "bdev_aio_delete aio0, bdev_uring_delete ur0, bdev_malloc_delete Malloc1" \
    sh -c "'$SPDK_RPC' -s '$RPC_SOCK' bdev_aio_delete aio0 && '$SPDK_RPC' -s '$RPC_SOCK' bdev_uring_delete ur0 && '$SPDK_RPC' -s '$RPC_SOCK' bdev_malloc_delete Malloc1"
check_eq "they are gone" "-19 -19 -19" \
    "$(for b in aio0 ur0 Malloc1; do rpc_error bdev_get_bdevs -b $b | cut -d' ' -f1; done | tr '\n' ' ' | sed 's/ $//')"
# Deleting a bdev a namespace uses removes the namespace (SPDK hot-removes it).
check "bdev_malloc_delete Malloc0 (namespace 1 of $NQN3)" rpc bdev_malloc_delete Malloc0
check_eq "... and $NQN3 has no namespace left" "[]" \
    "$(rpc nvmf_get_subsystems "$NQN3" | py '[n["nsid"] for n in j[0]["namespaces"]]')"
check "nvmf_delete_subsystem $NQN3" rpc nvmf_delete_subsystem "$NQN3"
check_eq "export_remove refuses a pool volume (bdev_lvol_delete deletes it)" "True" \
    "$(ballast_ctl rpc export_remove '{"name":"lvol0"}' 2>&1 | py_line '"bdev_lvol_delete" in l')"
# A namespace kept in the pool names its bdev and that bdev's UUID: a RAM bdev's namespace is
# not restored after a restart, nor attached to another device given the name (section 8).
NQN9=nqn.2016-06.io.spdk:cnode9
check "a kept namespace of a malloc bdev: Malloc9 in $NQN9 (any host)" \
    sh -c "'$SPDK_RPC' -s '$RPC_SOCK' bdev_malloc_create -b Malloc9 8 512 >/dev/null && '$SPDK_RPC' -s '$RPC_SOCK' nvmf_create_subsystem '$NQN9' -a && '$SPDK_RPC' -s '$RPC_SOCK' nvmf_subsystem_add_ns '$NQN9' Malloc9"
# Deleting an lvol another subsystem has as a namespace removes that namespace too.
check "an lvol nsvol, namespace 2 of $NQN9" \
    sh -c "'$SPDK_RPC' -s '$RPC_SOCK' bdev_lvol_create -l '$LVS' -t nsvol 4 >/dev/null && '$SPDK_RPC' -s '$RPC_SOCK' nvmf_subsystem_add_ns '$NQN9' '$LVS/nsvol'"
check "bdev_lvol_delete $LVS/nsvol" rpc bdev_lvol_delete "$LVS/nsvol"
check_eq "... and its namespace left $NQN9" "['Malloc9']" \
    "$(rpc nvmf_get_subsystems "$NQN9" | py '[n["bdev_name"] for n in j[0]["namespaces"]]')"

echo "## 7c: the log's level and debug flags at runtime (SPDK's log_* methods)"
lvl() { rpc "$1" | py j; }
check_eq "log_get_level: INFO (no RUST_LOG)" "INFO" "$(lvl log_get_level)"
check "log_set_print_level WARNING" rpc log_set_print_level WARNING
check_eq "log_get_print_level and log_get_level: WARNING (one sink, one level)" "WARNING WARNING" \
    "$(lvl log_get_print_level) $(lvl log_get_level)"
loud=$("$(ballast_bin)" rpc log_set_level '{"level": "LOUD"}' --rpc-socket "$RPC_SOCK" 2>&1)
check_eq "log_set_level LOUD (ballast rpc: spdk-rpc offers only SPDK's five): -32602, unchanged" \
    "True WARNING" \
    "$(grep -q 'Invalid parameters: invalid log level "LOUD"' <<<"$loud" && echo True) $(lvl log_get_level)"
check_eq "log_set_flag bdev_nvme (no such component here): -32602" "-32602" \
    "$(rpc_error log_set_flag bdev_nvme | cut -d' ' -f1)"
discs() { grep -c "client sent NBD_CMD_DISC" "$BALLAST_LOG"; }
before=$(discs)
timeout 30 nbdinfo --size "$NBD_URI/lvol0" >/dev/null
check_eq "at WARNING, an NBD client's disconnect logs no debug line" "$before" "$(discs)"
check "log_set_flag nbd" rpc log_set_flag nbd
check_eq "log_get_flags: nbd on, nvmf off" "True False" \
    "$(rpc log_get_flags | py 'str(j["nbd"]) + " " + str(j["nvmf"])')"
timeout 30 nbdinfo --size "$NBD_URI/lvol0" >/dev/null
check_eq "the nbd flag shows NBD's debug lines whatever the level (nbdinfo's NBD_CMD_DISC)" \
    "$((before + 1))" "$(discs)"
check "log_clear_flag nbd" rpc log_clear_flag nbd
timeout 30 nbdinfo --size "$NBD_URI/lvol0" >/dev/null
check_eq "cleared: no more" "$((before + 1))" "$(discs)"
check "log_set_flag ballast (the control plane)" rpc log_set_flag ballast
timeout 30 nbdinfo --size "$NBD_URI/lvol0" >/dev/null
check_eq "... shows none of NBD's debug lines (the ballast_* crates are not the control plane)" \
    "$((before + 1))" "$(discs)"
check "log_clear_flag ballast" rpc log_clear_flag ballast
check "log_set_level DEBUG" rpc log_set_level DEBUG
timeout 30 nbdinfo --size "$NBD_URI/lvol0" >/dev/null
check_eq "at DEBUG every component's debug lines show" "$((before + 2))" "$(discs)"
check_eq "ballast log --level info: the CLI sets and shows it" "level INFO|debug (none)" \
    "$("$(ballast_bin)" log --rpc-socket "$RPC_SOCK" --level info | paste -sd'|')"

echo "## 8: identities survive a restart"
stop_ballast
start_ballast --cores 2 || finish
check_eq "after restart: lvol0 keeps its UUID, the store its name and UUID" \
    "lvol0 $LVS_UUID" \
    "$(rpc bdev_get_bdevs -b "$LVOL_UUID" | py 'j[0]["name"]') $(rpc bdev_lvol_get_lvstores -l "$LVS" | py 'j[0]["uuid"]')"
check_eq "after restart: $NQN is back (serial, model, access, host, namespace, listener)" \
    "SPDK00000000000001 SPDK_Controller1 False ['$HOST'] clone0 ['$NVMF_PORT']" \
    "$(rpc nvmf_get_subsystems "$NQN" | py '" ".join(str(x) for x in (j[0]["serial_number"], j[0]["model_number"], j[0]["allow_any_host"], [h["nqn"] for h in j[0]["hosts"]], j[0]["namespaces"][0]["bdev_name"], [a["trsvcid"] for a in j[0]["listen_addresses"]]))')"
check_eq "after restart: $NQN9 is back without the gone Malloc9's namespace" "[]" \
    "$(rpc nvmf_get_subsystems "$NQN9" | py '[n["bdev_name"] for n in j[0]["namespaces"]]')"
check "an lvol named Malloc9 now" rpc bdev_lvol_create -l "$LVS" -t Malloc9 4
stop_ballast
start_ballast --cores 2 || finish
check_eq "after another restart: the lvol named Malloc9 is not attached to $NQN9 (another device)" "[]" \
    "$(rpc nvmf_get_subsystems "$NQN9" | py '[n["bdev_name"] for n in j[0]["namespaces"]]')"
grep -q "kept namespace not restored: its bdev is another device now" "$BALLAST_LOG" \
    && pass "the server log says why" || fail "no log line for the namespace not restored"
finish
