# Runs inside the test guest (tests/vm/run.sh, booted with nvme_core.multipath=N) as two NVMe/TCP
# hosts of one volume: two controllers (through the subsystem's two listeners) with their own host
# NQN and host identifier, each with its own block device. nvme-cli's resv-* commands (through the kernel's passthrough ioctls) register,
# acquire, preempt, release and clear reservations; dd and fio show what each host may then do.
# Parameters come from /guest/params. Prints "PASS: ..."/"FAIL: ..." lines.
. /guest/params
. /guest/guest-lib.sh
A=10.0.2.2
NQN=nqn.2026-11.dev.ballast:vol0
OTHER=nqn.2026-11.dev.ballast:vol1
HA=nqn.2014-08.org.example:host-a IA=aaaaaaaa-0000-4000-8000-00000000000a
HB=nqn.2014-08.org.example:host-b IB=bbbbbbbb-0000-4000-8000-00000000000b
check() { what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }
refused() { what=$1; shift; if "$@"; then fail "$what"; else pass "$what"; fi; }
# dev_host HOSTNQN SUBNQN: the namespace block device of that host's controller of SUBNQN
dev_host() { for c in /sys/class/nvme/nvme*; do
  [ "$(cat "$c/hostnqn" 2>/dev/null)" = "$1" ] && [ "$(cat "$c/subsysnqn" 2>/dev/null)" = "$2" ] \
    && ls -d "$c"/nvme*n1 2>/dev/null | head -1 | xargs -r basename; done | head -1; }
wr() { dd if=/dev/urandom of="$1" bs=4k count=1 seek="${2:-0}" oflag=direct 2>/dev/null; }
say() { echo "$1" | nc "$A" "$SIGNAL_PORT" >/dev/null 2>&1 || true; }
rd() { dd if="$1" of=/dev/null bs=4k count=1 skip="${2:-0}" iflag=direct 2>/dev/null; }
# field DEV NAME: a number from the extended reservation report (nvme-cli's JSON)
field() { nvme resv-report "$1" --eds -o json 2>/dev/null | tr -d ' \n' | sed -n "s/.*\"$2\":\([0-9]*\).*/\1/p" | head -1; }
# rlog CTRL: nvme-cli's read of the Reservation Notification log page (80h, raw), as
# "COUNT TYPE MORE NSID" (each read takes the oldest notification)
rlog() { nvme get-log "/dev/$1" --log-id=0x80 --log-len=64 --namespace-id=0xffffffff -b 2>/dev/null \
  | od -An -tu1 -v | tr -s ' \n' ' ' \
  | awk 'NF >= 16 { c = 0; for (i = 8; i >= 1; i--) c = c * 256 + $i; print c, $9, $10, $13 + 256 * $14 }'; }

set +e
check "host A connects (own host NQN and host id)" nvme connect -t tcp -a $A -s $PORT -n $NQN --hostnqn=$HA --hostid=$IA
# nvme-cli 2.3 takes a second controller of one subsystem at one address for a duplicate
# whatever the host NQN: host B comes through the subsystem's second listener.
out=$(nvme connect -t tcp -a $A -s $PORT2 -n $NQN --hostnqn=$HB --hostid=$IB 2>&1)
check "host B connects to the same subsystem (its second listener)" [ $? = 0 ]
[ -n "$out" ] && echo "$out" | sed 's/^/guest: connect: /'
check "host B connects to another volume's subsystem" nvme connect -t tcp -a $A -s $PORT -n $OTHER --hostnqn=$HB --hostid=$IB
sleep 1
DA=/dev/$(dev_host $HA $NQN) DB=/dev/$(dev_host $HB $NQN) DO=/dev/$(dev_host $HB $OTHER)
echo "devices: A=$DA B=$DB other=$DO"
nvme list
check "two block devices for one namespace (one per host)" sh -c "[ -b $DA ] && [ -b $DB ] && [ $DA != $DB ]"
C=$(basename "$DA" | sed 's/n1$//')
oncs=$(nvme id-ctrl /dev/$C | awk '/^oncs/ {print $3}')
check "id-ctrl ONCS says Reservations (bit 5; ONCS $oncs)" sh -c "[ -n '$oncs' ] && [ \$(( $oncs & 0x20 )) -ne 0 ]"
check "id-ns RESCAP lists the six types, IEKEY and PTPL (a pool)" sh -c "nvme id-ns $DA | grep -E '^rescap' | grep -q '0xff'"
check "id-ns NMIC: shared" sh -c "nvme id-ns $DA | grep -E '^nmic' | grep -q '0x1'"
check "report without --eds is refused (128-bit host ids)" sh -c "! nvme resv-report $DA >/dev/null 2>&1"
check "report: nothing registered" [ "$(field $DA regctl)" = 0 ]

check "A registers key 161" nvme resv-register $DA -n 1 --nrkey=161 --rrega=0
check "B registers key 178" nvme resv-register $DB -n 1 --nrkey=178 --rrega=0
refused "B registering another key is refused" nvme resv-register $DB -n 1 --nrkey=5 --rrega=0
refused "B replacing with a wrong current key is refused" nvme resv-register $DB -n 1 --crkey=99 --nrkey=5 --rrega=2
check "report: 2 registrants, generation 2" sh -c "[ $(field $DB regctl) = 2 ] && [ $(field $DB gen) = 2 ]"
refused "A acquiring with B's key is refused" nvme resv-acquire $DA -n 1 --crkey=178 --rtype=1 --racqa=0
check "A acquires Write Exclusive" nvme resv-acquire $DA -n 1 --crkey=161 --rtype=1 --racqa=0
check "report (from B): type 1" [ "$(field $DB rtype)" = 1 ]
refused "B acquiring too is refused" nvme resv-acquire $DB -n 1 --crkey=178 --rtype=1 --racqa=0
check "A writes" wr $DA 10
refused "B's write is refused (reservation conflict)" wr $DB 11
refused "B's flush is refused" nvme flush $DB -n 1
check "B reads" rd $DB 10
check "B writes another volume meanwhile" wr $DO 11
check "A changes its reservation to Exclusive Access (preempting its own key)" nvme resv-acquire $DA -n 1 --crkey=161 --prkey=161 --rtype=2 --racqa=1
refused "B's read is refused now" rd $DB 10
check "B preempts A (A's key): B holds Write Exclusive" nvme resv-acquire $DB -n 1 --crkey=178 --prkey=161 --rtype=1 --racqa=1
check "report: 1 registrant, type 1, generation 4" sh -c "[ $(field $DB regctl) = 1 ] && [ $(field $DB rtype) = 1 ] && [ $(field $DB gen) = 4 ]"
refused "A (preempted) cannot write" wr $DA 12
CB=$(basename "$DB" | sed 's/n1$//')
got=$(rlog $C)
check "nvme get-log 80h on A's controller: Registration Preempted, namespace 1 ($got)" [ "$got" = "1 1 0 1" ]
got=$(rlog $C)
check "... taken by the read: the next one is empty ($got)" [ "$got" = "0 0 0 0" ]
got=$(rlog $CB)
check "B's controller: Reservation Released when A changed its type ($got)" [ "$got" = "1 2 0 1" ]
check "A reads" rd $DA 12
refused "A (no registrant now) cannot release" nvme resv-release $DA -n 1 --crkey=161 --rtype=1 --rrela=0
check "fio verify from the holder B (4k-64k, QD8)" fio_verify "$(basename $DB)" 64k 8m
refused "B releasing the wrong type is refused" nvme resv-release $DB -n 1 --crkey=178 --rtype=2 --rrela=0
check "B releases" nvme resv-release $DB -n 1 --crkey=178 --rtype=1 --rrela=0
check "A writes again" wr $DA 12
check "A registers again and acquires Write Exclusive - Registrants Only" sh -c "nvme resv-register $DA -n 1 --nrkey=161 --rrega=0 && nvme resv-acquire $DA -n 1 --crkey=161 --rtype=3 --racqa=0"
check "B (a registrant) writes" wr $DB 13
check "B unregisters" nvme resv-register $DB -n 1 --crkey=178 --rrega=1
refused "B (no registrant now) cannot write" wr $DB 13
check "A clears everything" nvme resv-release $DA -n 1 --crkey=161 --rrela=1
check "report: nothing registered, no reservation" sh -c "[ $(field $DA regctl) = 0 ] && [ $(field $DA rtype) = 0 ]"
check "B writes again" wr $DB 13
check "the data A and B wrote reads back the same through both" sh -c "[ \"\$(dd if=$DA bs=4k count=16 iflag=direct 2>/dev/null | md5sum)\" = \"\$(dd if=$DB bs=4k count=16 iflag=direct 2>/dev/null | md5sum)\" ]"

# Persist Through Power Loss set with Set Features 83h (nvme-cli set-feature/get-feature).
check "nvme set-feature 0x83 (Reservation Persistence) 1" nvme set-feature /dev/$C -f 0x83 -n 1 -v 1
got=$(nvme get-feature /dev/$C -f 0x83 -n 1 2>&1)
check "nvme get-feature 0x83 reads 1 ($got)" sh -c "echo '$got' | grep -qiE 'value: *0x0*1\$'"
check "report: PTPLS 1" [ "$(field $DA ptpls)" = 1 ]
check "nvme set-feature 0x83 0" nvme set-feature /dev/$C -f 0x83 -n 1 -v 0
check "report: PTPLS 0" [ "$(field $DA ptpls)" = 0 ]

# Persist Through Power Loss (what Linux's own pr_ops always ask for): the appliance is killed
# (-9) and started again under the connected hosts; the fenced host stays fenced.
check "A registers asking for PTPL (--cptpl=3)" nvme resv-register $DA -n 1 --nrkey=161 --rrega=0 --cptpl=3
check "B registers" nvme resv-register $DB -n 1 --nrkey=178 --rrega=0
check "A acquires Write Exclusive" nvme resv-acquire $DA -n 1 --crkey=161 --rtype=1 --racqa=0
check "report: PTPLS 1" [ "$(field $DA ptpls)" = 1 ]
gen=$(field $DA gen)
say restart
# The host kills the daemon: B's controller leaves "live" (the connection is gone) ...
i=0; while [ $i -lt 300 ] && [ "$(cat /sys/class/nvme/$CB/state)" = live ]; do sleep 0.1; i=$((i+1)); done
check "the appliance went away (B's controller $(cat /sys/class/nvme/$CB/state))" [ "$(cat /sys/class/nvme/$CB/state)" != live ]
# ... and the kernel host reconnects on its own (reconnect_delay 10 s).
i=0; while [ $i -lt 90 ] && [ "$(cat /sys/class/nvme/$CB/state)" != live ]; do sleep 1; i=$((i+1)); done
echo "guest: reconnected after ${i} s; report: $(nvme resv-report $DB --eds -o json 2>&1 | tr -d ' \n')"
check "after kill -9 and a restart both hosts reconnect and see 2 registrants" sh -c "[ \"\$(cat /sys/class/nvme/$CB/state)\" = live ] && [ \"$(field $DB regctl)\" = 2 ]"
check "report after the restart: type 1, same generation, PTPLS 1" sh -c "[ $(field $DB rtype) = 1 ] && [ $(field $DB gen) = $gen ] && [ $(field $DB ptpls) = 1 ]"
refused "the fenced host B still cannot write" wr $DB 14
check "the holder A writes" wr $DA 14
check "A clears (PTPL goes with the registrations)" nvme resv-release $DA -n 1 --crkey=161 --rrela=1
check "B writes again" wr $DB 14
nvme disconnect-all
dmesg | grep -q "BUG:\|Oops:" && fail "no kernel oops" || pass "no kernel oops"
[ "$failed" = 0 ] && echo "guest: all passed"
echo GUEST-DONE
