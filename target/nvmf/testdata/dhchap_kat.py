#!/usr/bin/env python3
"""Known answers for ballast's DH-HMAC-CHAP controller (target/nvmf/src/auth/chap/tests.rs and
auth/machine/tests.rs), computed independently of the Rust code: a line-by-line port of the
Linux kernel's host side (drivers/nvme/host/auth.c: nvme_auth_set_dhchap_negotiate_data,
nvme_auth_dhchap_setup_host_response, nvme_auth_set_dhchap_reply_data,
nvme_auth_dhchap_setup_ctrl_response) and of drivers/nvme/common/auth.c
(nvme_auth_transform_key, nvme_auth_augmented_challenge), with Python's hashlib/hmac and
pow() for the RFC 7919 group. Run it to print the constants the tests embed."""
import hashlib, hmac, struct, subprocess, base64

H = {1: hashlib.sha256, 2: hashlib.sha384, 3: hashlib.sha512}
HOSTNQN = b"nqn.2014-08.org.nvmexpress:uuid:ballast-kat-host"
SUBNQN = b"nqn.2026-11.dev.ballast:kat"

def transform(key_hash, key, nqn):  # nvme_auth_transform_key
    if key_hash == 0:
        return key
    return hmac.new(key, nqn + b"NVMe-over-Fabrics", H[key_hash]).digest()

def augmented(hash_id, skey, c):  # nvme_auth_augmented_challenge
    return hmac.new(H[hash_id](skey).digest(), c, H[hash_id]).digest()

def host_response(hash_id, kh, c1, s1, tid):  # nvme_auth_dhchap_setup_host_response
    m = c1 + struct.pack("<I", s1) + struct.pack("<H", tid) + b"\0" + b"HostHost"
    return hmac.new(kh, m + HOSTNQN + b"\0" + SUBNQN, H[hash_id]).digest()

def ctrl_response(hash_id, kc, c2, s2, tid):  # nvme_auth_dhchap_setup_ctrl_response
    m = c2 + struct.pack("<I", s2) + struct.pack("<H", tid) + b"\0" + b"Controller"
    return hmac.new(kc, m + SUBNQN + b"\0" + HOSTNQN, H[hash_id]).digest()

def ffdhe2048_p():
    pem = subprocess.run(["openssl", "genpkey", "-genparam", "-algorithm", "DH", "-pkeyopt",
                          "group:ffdhe2048"], capture_output=True, text=True, check=True).stdout
    der = base64.b64decode("".join(l for l in pem.splitlines() if not l.startswith("-----")))
    i = 2 + (der[1] & 0x7f if der[1] & 0x80 else 0)
    assert der[i] == 2
    n = der[i + 1] & 0x7f
    ln = int.from_bytes(der[i + 2:i + 2 + n], "big")
    return int.from_bytes(der[i + 2 + n:i + 2 + n + ln], "big")

HOST_KEY = bytes(range(32))            # DHHC-1:01: (SHA-256)
CTRL_KEY = bytes(range(100, 164))      # DHHC-1:03: (SHA-512)
kh = transform(1, HOST_KEY, HOSTNQN)
kc = transform(3, CTRL_KEY, SUBNQN)
print("transformed host key", kh.hex())

# Case 1: null DH group, SHA-256.
c1 = bytes((0xa0 + i) & 0xff for i in range(32)); s1 = 0x11223344; tid = 0x0102
c2 = bytes((0x50 + i) & 0xff for i in range(32)); s2 = 0x55667788
print("null R1", host_response(1, kh, c1, s1, tid).hex())
print("null R2", ctrl_response(1, kc, c2, s2, tid).hex())

# Case 2: ffdhe2048, SHA-384, as the state machine draws it: C1 (48), S1 (4, LE), then the
# private exponent (29 bytes, top byte masked to 1 bit: 225 bit exponents).
p = ffdhe2048_p()
c1 = bytes((0x31 * i + 7) & 0xff for i in range(48))
s1_bytes = bytes([0x78, 0x56, 0x34, 0x12]); s1 = struct.unpack("<I", s1_bytes)[0]
x_bytes = bytearray((0x5b * i + 3) & 0xff for i in range(29)); x_bytes[0] &= 0x01
x = int.from_bytes(x_bytes, "big")
y = int.from_bytes(bytes((0x17 * i + 11) & 0xff for i in range(28)), "big")
tid = 0x0a0b
ctrl_pub = pow(2, x, p).to_bytes(256, "big")
host_pub = pow(2, y, p).to_bytes(256, "big")
shared = pow(int.from_bytes(ctrl_pub, "big"), y, p).to_bytes(256, "big")
assert shared == pow(int.from_bytes(host_pub, "big"), x, p).to_bytes(256, "big")
r1 = host_response(2, kh, augmented(2, shared, c1), s1, tid)
c2 = bytes((0x29 * i + 1) & 0xff for i in range(48)); s2 = 0x01020304
r2 = ctrl_response(2, kc, augmented(2, shared, c2), s2, tid)
challenge = (bytes([0x01, 0x01, 0, 0]) + struct.pack("<H", tid) + bytes([48, 0, 2, 1])
             + struct.pack("<H", 256) + s1_bytes + c1 + ctrl_pub)
reply = (bytes([0x01, 0x02, 0, 0]) + struct.pack("<H", tid) + bytes([48, 0, 1, 0])
         + struct.pack("<H", 256) + struct.pack("<I", s2) + r1 + c2 + host_pub)
success1 = bytes([0x01, 0x03, 0, 0]) + struct.pack("<H", tid) + bytes([48, 0, 1]) + bytes(7) + r2
print("dh C1", c1.hex())
print("dh x", bytes(x_bytes).hex())
print("dh challenge sha256", hashlib.sha256(challenge).hexdigest())
print("dh reply", reply.hex())
print("dh success1", success1.hex())
