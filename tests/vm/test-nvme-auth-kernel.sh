#!/bin/bash
# ballast's NVMe in-band authentication (DH-HMAC-CHAP) vs the Linux kernel host (6.12,
# nvme-cli 2.13) in the trixie guest (build-trixie.sh; guest side: guest-nvme-auth.sh). The host
# makes DH-HMAC-CHAP secrets (DHHC-1:01/02/03, base64(key || crc32 LE)), gives them to ballast
# through SPDK's keyring_file_add_key and nvmf_subsystem_add_host dhchap_key/dhchap_ctrlr_key,
# one host NQN per hash/DH-group combination (ballast's per-host dhchap_digests/dhchap_dhgroups
# choose from the host's offer), and one more with a TLS PSK too. The guest: each combination
# connects (uni- and bidirectional), fio verify, wrong / missing / wrong-controller secrets are
# refused, TLS + DH-HMAC-CHAP together; a live controller re-authenticates (sysfs dhchap_secret)
# with the same secret and, after this side rotates the host's key over RPC, with the new one;
# a persistent discovery controller gets the discovery-log change as an AEN (uevent).
# Prints PASS/FAIL and "N passed, M failed".
#
# Environment: BALLAST_BIN, BALLAST_VM_TIMEOUT (default 480 s), KEEP=1 keeps the work dir.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=${BALLAST_BIN:-$root/build/cargo/release/ballast}
export BALLAST_VM_FLAVOUR=trixie
. "$here/host-lib.sh"
trixie_work nvme-auth
trap '[[ -n $spid ]] && kill -KILL $spid 2>/dev/null' EXIT

H256=$(secret DHHC-1 32 01) H384=$(secret DHHC-1 48 02) H512=$(secret DHHC-1 64 03)
C512=$(secret DHHC-1 64 03) WRONG=$(secret DHHC-1 32 01) PSK=$(secret NVMeTLSkey-1 32 01)
R256=$(secret DHHC-1 32 01)   # HF's key after the rotation
for k in H256 H384 H512 C512 PSK R256; do (umask 077; echo "${!k}" > "$work/$k.key"); done
h() { echo "nqn.2014-08.org.nvmexpress:uuid:6f1c3c52-0b1e-4c52-9d1c-7e1d1a3d10$1"; }
HA=$(h 01) HB=$(h 02) HC=$(h 03) HD=$(h 04) HE=$(h 05) HF=$(h 06)
ROTATED=nqn.2026-11.dev.ballast:rotated   # appears in the discovery log once HF's key rotated
HOSTID=6f1c3c52-0b1e-4c52-9d1c-7e1d1a3d1001
VOL0=nqn.2026-11.dev.ballast:vol0
port=$(free_port) tport=$(free_port)
"$bin" serve --data-dir "$work/data" --nbd-listen "127.0.0.1:$(free_port)" --nvmf-listen "127.0.0.1:$port" \
  --export vol0=ram:128M > "$work/server.log" 2>&1 &
spid=$!
for _ in $(seq 100); do listening "$port" && break; sleep 0.2; done
listening "$port" && pass "ballast listening" || { fail "ballast listening"; tail "$work/server.log"; }
rpc() { "$bin" rpc "$1" "$2" --data-dir "$work/data" > "$work/rpc.out" 2>&1 || { cat "$work/rpc.out"; return 1; }; }
add() {   # add HOST KEY CTRLKEY DIGEST DHGROUP (CTRLKEY/DIGEST/DHGROUP may be -)
  local p="\"nqn\":\"$VOL0\",\"host\":\"$1\",\"dhchap_key\":\"$2\""
  [[ $3 == - ]] || p="$p,\"dhchap_ctrlr_key\":\"$3\""
  [[ $4 == - ]] || p="$p,\"dhchap_digests\":[\"$4\"]"
  [[ $5 == - ]] || p="$p,\"dhchap_dhgroups\":[\"$5\"]"
  rpc nvmf_subsystem_add_host "{$p${6:+,$6}}"
}
ok=1
for k in H256 H384 H512 C512 PSK R256; do rpc keyring_file_add_key "{\"name\":\"$k\",\"path\":\"$work/$k.key\"}" || ok=; done
add "$HA" H256 - sha256 ffdhe2048 || ok=
add "$HB" H384 C512 sha384 null || ok=
add "$HC" H512 C512 sha512 ffdhe3072 || ok=
add "$HD" H256 - - - || ok=   # ballast's defaults: the strongest hash offered, ffdhe3072
rpc nvmf_subsystem_add_listener "{\"nqn\":\"$VOL0\",\"listen_address\":{\"trtype\":\"tcp\",\"traddr\":\"127.0.0.1\",\"trsvcid\":\"$tport\"},\"secure_channel\":\"required\"}" || ok=
add "$HE" H256 - sha256 ffdhe2048 '"psk":"PSK"' || ok=
add "$HF" H256 - sha256 ffdhe2048 || ok=
[[ -n $ok ]] && pass "secrets and hosts configured through SPDK's methods" || fail "configuring secrets"
"$bin" rpc nvmf_subsystem_add_host "{\"nqn\":\"$VOL0\",\"host\":\"$(h 09)\",\"dhchap_key\":\"PSK\"}" --data-dir "$work/data" > "$work/rpc.out" 2>&1
grep -q "not a DH-HMAC-CHAP secret" "$work/rpc.out" && ! grep -q "${PSK:16:20}" "$work/rpc.out" \
  && pass "a key that is no DHHC-1 secret is refused, without its bytes" || fail "bad secret: $(cat "$work/rpc.out")"

cat > "$work/params" <<P
PORT=$port
TPORT=$tport
HA=$HA
HB=$HB
HC=$HC
HD=$HD
HE=$HE
HF=$HF
ROTATED=$ROTATED
HOSTID=$HOSTID
VOL0=$VOL0
H256=$H256
H384=$H384
H512=$H512
C512=$C512
WRONG=$WRONG
PSK=$PSK
R256=$R256
P
# Key rotation under a live controller: once HF's admin queue has authenticated twice (at
# connect, then the guest's re-authentication with the same secret), its key at ballast
# becomes R256 (the host added again, as an operator rotates it), and a subsystem named
# $ROTATED appears in the discovery log to tell the guest, which then writes R256 to the
# controller's sysfs dhchap_secret: the kernel re-authenticates every queue with it.
(
  for _ in $(seq 900); do
    if [[ $(grep 'DH-HMAC-CHAP: queue authenticated' "$work/server.log" | grep -c "host=$HF qid=0 ") -ge 2 ]]; then
      sleep 2   # the I/O queues' re-authentication follows the admin queue's
      "$bin" rpc nvmf_subsystem_add_host "{\"nqn\":\"$VOL0\",\"host\":\"$HF\",\"dhchap_key\":\"R256\",\"dhchap_digests\":[\"sha256\"],\"dhchap_dhgroups\":[\"ffdhe2048\"]}" \
        --data-dir "$work/data" > "$work/rotate.out" 2>&1 \
      && "$bin" rpc nvmf_create_subsystem "{\"nqn\":\"$ROTATED\",\"allow_any_host\":true}" --data-dir "$work/data" >> "$work/rotate.out" 2>&1 \
      && "$bin" rpc nvmf_subsystem_add_listener "{\"nqn\":\"$ROTATED\",\"listen_address\":{\"trtype\":\"tcp\",\"traddr\":\"127.0.0.1\",\"trsvcid\":\"$port\"}}" \
        --data-dir "$work/data" >> "$work/rotate.out" 2>&1 && echo rotated >> "$work/rotate.out"
      break
    fi
    sleep 0.5
  done
) &
rotator=$!
run_guest 480 "$here/guest-nvme-auth.sh" "$work/params"
kill "$rotator" 2>/dev/null; wait "$rotator" 2>/dev/null
grep -q '^rotated$' "$work/rotate.out" 2>/dev/null && pass "HF's key rotated over RPC while its controller lived" \
  || { fail "rotating HF's key"; cat "$work/rotate.out" 2>/dev/null; }
# every queue of HF's controller: at connect, with the same secret, with the rotated one
for q in 0 1; do
  n=$(grep 'DH-HMAC-CHAP: queue authenticated' "$work/server.log" | grep -c "host=$HF qid=$q ")
  [[ $n -ge 3 ]] && pass "server log: HF's queue $q authenticated $n times (connect, two re-authentications)" \
    || fail "server log: HF's queue $q authenticated $n times"
done
grep -q 'DH-HMAC-CHAP: queue authenticated' "$work/server.log" && pass "server log: queues authenticated" || fail "server log shows authentication"
grep -q 'DH-HMAC-CHAP: queue authenticated.* qid=[1-9]' "$work/server.log" \
  && pass "server log: I/O queues authenticated too" || fail "server log shows I/O queues authenticating"
grep -q 'DH-HMAC-CHAP: authentication failed' "$work/server.log" && pass "server log: failures logged" || fail "server log shows failures"
for k in H256 H384 H512 C512 WRONG PSK R256; do
  body=$(echo "${!k}" | cut -d: -f3)
  grep -qF "$body" "$work/server.log" && fail "the $k secret appears in the server log"
done
if kill -TERM "$spid" && wait "$spid"; then pass "server exits 0 after SIGTERM"; else fail "server exit status"; fi
spid=
grep -q panicked "$work/server.log" && fail "no panic in the server log"
echo "=== $npass passed, $nfail failed"
if ((nfail)) || [[ -n ${KEEP:-} ]]; then echo "logs kept in $work"; else rm -rf "$work"; fi
((nfail == 0))
