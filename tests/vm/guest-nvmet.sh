# Runs inside the test guest: serves the kernel's own NVMe/TCP target (nvmet) on the guest's
# port 4420, which the host reaches through a qemu port forward, and waits until the host has
# run our initiator against it.
. /guest/params
NQN=nqn.2014-08.org.example:ref
cd /sys/kernel/config/nvmet
mkdir subsystems/$NQN
echo 1 > subsystems/$NQN/attr_allow_any_host
mkdir subsystems/$NQN/namespaces/1
dd if=/dev/zero of=/tmp/ref.img bs=1M count=64 2>/dev/null
echo 1 > subsystems/$NQN/namespaces/1/buffered_io
echo /tmp/ref.img > subsystems/$NQN/namespaces/1/device_path
echo 1 > subsystems/$NQN/namespaces/1/enable
mkdir ports/1
echo tcp > ports/1/addr_trtype; echo ipv4 > ports/1/addr_adrfam
echo 0.0.0.0 > ports/1/addr_traddr; echo 4420 > ports/1/addr_trsvcid
ln -s /sys/kernel/config/nvmet/subsystems/$NQN ports/1/subsystems/
cd /tmp
echo "nvmet ready"
echo ready | nc 10.0.2.2 "$SIGNAL_PORT" >/dev/null 2>&1
i=0
while [ $i -lt 240 ]; do
  r=$(echo poll | nc 10.0.2.2 "$SIGNAL_PORT" 2>/dev/null)
  [ "$r" = done ] && break
  sleep 1; i=$((i+1))
done
echo "host finished: $r"
