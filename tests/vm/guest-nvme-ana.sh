# Runs inside the test guest (tests/vm/run.sh; native multipath on, the kernel's default) as one
# NVMe/TCP host of one volume through its two listeners: one multipath block device, two paths
# (controllers). It asks the host to set each path's ANA state ("ana PORT STATE" to the signal
# port) and checks what the kernel makes of it: the path's ana_state in sysfs, which controller
# the writes go through (each controller's SMART host write commands), I/O held while no path
# serves, fio verify across flips. Parameters come from /guest/params. Prints PASS/FAIL lines.
. /guest/params
. /guest/guest-lib.sh
A=10.0.2.2
NQN=nqn.2026-11.dev.ballast:vol0
check() { what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }
say() { echo "$1" | nc "$A" "$SIGNAL_PORT" >/dev/null 2>&1 || true; }
# ctrl_of PORT: the controller (nvmeK) of vol0 connected through that port
ctrl_of() { for c in /sys/class/nvme/nvme*; do
  [ "$(cat "$c/subsysnqn" 2>/dev/null)" = "$NQN" ] && grep -q "trsvcid=$1\(,\|$\)" "$c/address" && basename "$c"; done | head -1; }
# state CTRL: the ANA state of its path to namespace 1, as the kernel keeps it
state() { cat /sys/class/nvme/"$1"/nvme*c*n1/ana_state 2>/dev/null | head -1; }
# expect CTRL STATE: the kernel reports it within 15 s (a notice and a log page read)
expect() { for _ in $(seq 150); do [ "$(state "$1")" = "$2" ] && return 0; sleep 0.1; done
  echo "guest: $1 is $(state "$1"), expected $2"; return 1; }
# set_ana PORT STATE CTRL: the host sets it, the kernel sees it
# (the kernel's sysfs spells non-optimized and persistent-loss with a dash)
set_ana() { say "ana $1 $2"; check "path $3 (port $1) becomes $2 in the kernel" expect "$3" "$(echo "$2" | tr _ -)"; }
writes_of() { nvme smart-log "/dev/$1" 2>/dev/null | awk -F: '/host_write_commands/ {gsub(/[ ,\t]/, "", $2); print $2}'; }
# through CTRL_TO CTRL_NOT N: N direct 4k writes to the multipath device all went through
# CTRL_TO, none through CTRL_NOT
through() { local t0 n0 t1 n1; t0=$(writes_of "$1") n0=$(writes_of "$2")
  dd if=/dev/urandom of="$HEAD" bs=4k count="$3" oflag=direct 2>/dev/null || return 1
  sleep 0.5; t1=$(writes_of "$1") n1=$(writes_of "$2")
  echo "guest: writes $1 $t0->$t1, $2 $n0->$n1"
  [ $((t1 - t0)) -ge "$3" ] && [ "$n1" = "$n0" ]; }

set +e
check "native multipath is on (nvme_core.multipath=Y)" [ "$(cat /sys/module/nvme_core/parameters/multipath)" = Y ]
check "connect through port $PORT" nvme connect -t tcp -a $A -s $PORT -n $NQN
check "connect through port $PORT2 (the same host: a second path)" nvme connect -t tcp -a $A -s $PORT2 -n $NQN
sleep 1
CA=$(ctrl_of $PORT) CB=$(ctrl_of $PORT2)
# The multipath device (the paths, nvmeXcYn1, are hidden: no device node).
heads() { ls /sys/block | grep -c '^nvme[0-9]*n1$'; }
HEAD=/dev/$(ls /sys/block | grep '^nvme[0-9]*n1$' | head -1)
echo "guest: paths $CA (port $PORT) and $CB (port $PORT2), device $HEAD"
nvme list-subsys
check "two controllers, one block device" sh -c "[ -n '$CA' ] && [ -n '$CB' ] && [ '$CA' != '$CB' ] && [ -b $HEAD ] && [ $(heads) = 1 ]"
check "id-ctrl CMIC: several controllers and ANA reporting (0xa)" sh -c "nvme id-ctrl /dev/$CA | grep -E '^cmic' | grep -q '0xa'"
check "id-ns ANAGRPID 1" sh -c "nvme id-ns $HEAD | grep -E '^anagrpid' | grep -q ': *1$'"
check "both paths optimized" sh -c "[ '$(state $CA)' = optimized ] && [ '$(state $CB)' = optimized ]"
nvme ana-log /dev/$CA > /tmp/ana-log 2>&1
check "nvme ana-log reads the log page (group 1, optimized)" grep -qi optimized /tmp/ana-log
grep -qi optimized /tmp/ana-log || sed 's/^/guest: ana-log: /' /tmp/ana-log
check "fio verify on the multipath device" fio_verify "$(basename $HEAD)" 64k 8m

set_ana $PORT inaccessible "$CA"
check "the other path stays optimized" [ "$(state $CB)" = optimized ]
check "64 writes go through $CB only" through "$CB" "$CA" 64
set_ana $PORT optimized "$CA"
set_ana $PORT2 inaccessible "$CB"
check "64 writes go through $CA only" through "$CA" "$CB" 64
set_ana $PORT non_optimized "$CA"
set_ana $PORT2 optimized "$CB"
check "optimized before non-optimized: 64 writes through $CB only" through "$CB" "$CA" 64

# No path serves: I/O waits (the kernel requeues it), then goes once a path does.
set_ana $PORT inaccessible "$CA"
set_ana $PORT2 inaccessible "$CB"
dd if=/dev/urandom of=/tmp/held bs=4k count=16 2>/dev/null
dd if=/tmp/held of="$HEAD" bs=4k count=16 seek=2048 oflag=direct 2>/dev/null & held=$!
sleep 3
check "a write with no path serving waits" kill -0 $held
set_ana $PORT2 optimized "$CB"
done_in=-1; for i in $(seq 150); do kill -0 $held 2>/dev/null || { done_in=$i; break; }; sleep 0.1; done
wait $held; rc=$?
check "...and completes once a path serves again (exit $rc, after ${done_in}00 ms)" test $rc = 0 -a $done_in -ge 0
check "...its data reads back" sh -c "dd if=$HEAD bs=4k count=16 skip=2048 iflag=direct 2>/dev/null | cmp -s - /tmp/held"
set_ana $PORT optimized "$CA"

# fio verify while the paths flip under it (each flip through the host's control plane).
fio --name=flip --filename="$HEAD" --ioengine=libaio --direct=1 --rw=randwrite --bsrange=4k-64k \
    --iodepth=8 --size=48m --verify=crc32c --do_verify=1 --output=/tmp/flip.out >/dev/null 2>&1 & fiop=$!
for round in 1 2 3; do
  say "ana $PORT inaccessible"; sleep 1; say "ana $PORT optimized"
  say "ana $PORT2 inaccessible"; sleep 1; say "ana $PORT2 optimized"
done
wait $fiop; rc=$?
[ $rc = 0 ] || tail -5 /tmp/flip.out
check "fio verify across six path flips" [ $rc = 0 ]
both_optimized() { expect "$CA" optimized && expect "$CB" optimized; }
check "both paths optimized at the end" both_optimized
dmesg | grep -i 'nvme' | grep -iE 'ana|requeu|failover' | tail -5 | sed 's/^/guest: dmesg: /'
nvme disconnect -n $NQN >/dev/null 2>&1
echo "GUEST-DONE failed=$failed"
