#!/bin/bash
# ballast's NVMe/TCP secure channel vs the Linux kernel host (nvme-cli 2.13, tlshd, kTLS) in the
# trixie guest (build-trixie.sh; guest side: guest-nvme-tls.sh). The host makes configured PSKs
# in the interchange format (SHA-256 and SHA-384), gives them to ballast through SPDK's
# keyring_file_add_key and nvmf_subsystem_add_host --psk, and serves a TLS-required listener and
# a TLS-optional one. The guest: discovery over TLS (TREQ/TSAS), connect --tls with each key,
# fio verify and a filesystem over TLS, plaintext refused, a wrong key refused, a host with a
# key refused in plaintext on the optional listener. Prints PASS/FAIL and "N passed, M failed".
#
# Environment: BALLAST_BIN, BALLAST_VM_TIMEOUT (default 420 s), KEEP=1 keeps the work dir.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=${BALLAST_BIN:-$root/build/cargo/release/ballast}
export BALLAST_VM_FLAVOUR=trixie
. "$here/host-lib.sh"
trixie_work nvme-tls
trap '[[ -n $spid ]] && kill -KILL $spid 2>/dev/null' EXIT

K256=$(secret NVMeTLSkey-1 32 01) K384=$(secret NVMeTLSkey-1 48 02)
KWRONG=$(secret NVMeTLSkey-1 32 01)
for k in K256 K384; do (umask 077; echo "${!k}" > "$work/$k.key"); done
HOSTNQN=nqn.2014-08.org.nvmexpress:uuid:6f1c3c52-0b1e-4c52-9d1c-7e1d1a3d0001
HOST2=nqn.2014-08.org.nvmexpress:uuid:6f1c3c52-0b1e-4c52-9d1c-7e1d1a3d0002
HOSTID=6f1c3c52-0b1e-4c52-9d1c-7e1d1a3d0001
VOL0=nqn.2026-11.dev.ballast:vol0 VOL1=nqn.2026-11.dev.ballast:vol1
port=$(free_port) oport=$(free_port)
"$bin" serve --data-dir "$work/data" --nbd-listen "127.0.0.1:$(free_port)" --nvmf-listen "127.0.0.1:$port" \
  --nvmf-secure-channel required --export vol0=ram:128M --export vol1=ram:64M > "$work/server.log" 2>&1 &
spid=$!
for _ in $(seq 100); do listening "$port" && break; sleep 0.2; done
listening "$port" && pass "ballast listening, TLS required" || { fail "ballast listening"; tail "$work/server.log"; }
rpc() { "$bin" rpc "$1" "$2" --data-dir "$work/data" > "$work/rpc.out" 2>&1 || { cat "$work/rpc.out"; return 1; }; }
rpc keyring_file_add_key "{\"name\":\"k256\",\"path\":\"$work/K256.key\"}" \
  && rpc keyring_file_add_key "{\"name\":\"k384\",\"path\":\"$work/K384.key\"}" \
  && rpc nvmf_subsystem_add_host "{\"nqn\":\"$VOL0\",\"host\":\"$HOSTNQN\",\"psk\":\"k256\"}" \
  && rpc nvmf_subsystem_add_host "{\"nqn\":\"$VOL1\",\"host\":\"$HOST2\",\"psk\":\"k384\"}" \
  && rpc nvmf_subsystem_add_listener "{\"nqn\":\"$VOL0\",\"listen_address\":{\"trtype\":\"tcp\",\"traddr\":\"127.0.0.1\",\"trsvcid\":\"$oport\"},\"secure_channel\":\"optional\"}" \
  && pass "keys and hosts configured through SPDK's methods" || fail "configuring keys"
rpc keyring_get_keys '{}' && ! grep -q "NVMeTLSkey" "$work/rpc.out" && grep -q k256 "$work/rpc.out" \
  && pass "keyring_get_keys lists names, never keys" || fail "keyring_get_keys leaks or misses"
chmod 644 "$work/K256.key"
"$bin" rpc keyring_file_add_key "{\"name\":\"loose\",\"path\":\"$work/K256.key\"}" --data-dir "$work/data" > "$work/rpc.out" 2>&1
grep -q "Invalid permissions" "$work/rpc.out" && ! grep -q NVMeTLSkey "$work/rpc.out" \
  && pass "a key file others can read is refused" || fail "loose key file: $(cat "$work/rpc.out")"

cat > "$work/params" <<P
PORT=$port
OPORT=$oport
HOSTNQN=$HOSTNQN
HOST2=$HOST2
HOSTID=$HOSTID
VOL0=$VOL0
VOL1=$VOL1
K256=$K256
K384=$K384
KWRONG=$KWRONG
P
run_guest 420 "$here/guest-nvme-tls.sh" "$work/params"
grep -q 'NVMe/TCP TLS established' "$work/server.log" && pass "server log: TLS established" || fail "server log shows TLS"
for k in K256 K384; do grep -q "${!k}" "$work/server.log" && fail "the $k key appears in the server log"; done
if kill -TERM "$spid" && wait "$spid"; then pass "server exits 0 after SIGTERM"; else fail "server exit status"; fi
spid=
grep -q panicked "$work/server.log" && fail "no panic in the server log"
echo "=== $npass passed, $nfail failed"
if ((nfail)) || [[ -n ${KEEP:-} ]]; then echo "logs kept in $work"; else rm -rf "$work"; fi
((nfail == 0))
