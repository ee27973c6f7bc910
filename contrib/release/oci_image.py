#!/usr/bin/env python3
"""Packs a FROM-scratch OCI image holding one static `ballast` binary (standard library only).

    oci_image.py --binary PATH --layout DIR [--archive FILE.tar] [--tag TAG]

The image has one layer: /ballast (0755), and the empty directories /var/lib/ballast (the data
directory: mount a volume there), /run/ballast and /tmp. Its entry point runs
`serve --data-dir /var/lib/ballast` on all addresses (NBD 10809, NVMe/TCP 4420) with JSON logs;
arguments given to `docker run`/`podman run` follow (`--pool`, `--export`, ...).

io_uring and container seccomp: Docker's and containerd's default seccomp profiles deny
io_uring_setup/io_uring_enter/io_uring_register (podman's allows them on recent versions). Run
ballast with a profile that allows those three (or `--security-opt seccomp=unconfined` on a host
you trust); ballast says so and exits if the kernel refuses io_uring.

The layout is deterministic for a given binary (fixed timestamps, sorted entries), so the same
binary always gives the same image digest.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile

ENTRYPOINT = ["/ballast", "serve", "--data-dir", "/var/lib/ballast",
              "--nbd-listen", "0.0.0.0:10809", "--nvmf-listen", "0.0.0.0:4420",
              "--log-format", "json"]
EPOCH = 0


def layer_tar(binary):
    """The layer, uncompressed: directories first, then the binary."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("run", "run/ballast", "tmp", "var", "var/lib", "var/lib/ballast"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "tmp" else (0o700 if "ballast" in d else 0o755)
            info.mtime = EPOCH
            tar.addfile(info)
        info = tarfile.TarInfo("ballast")
        info.size = os.path.getsize(binary)
        info.mode = 0o755
        info.mtime = EPOCH
        with open(binary, "rb") as f:
            tar.addfile(info, f)
    return buf.getvalue()


def blob(layout, data):
    digest = hashlib.sha256(data).hexdigest()
    path = os.path.join(layout, "blobs", "sha256", digest)
    with open(path, "wb") as f:
        f.write(data)
    return "sha256:" + digest, len(data)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", required=True)
    ap.add_argument("--layout", required=True, help="OCI image layout directory (replaced)")
    ap.add_argument("--archive", help="also write the layout as a tar (oci-archive)")
    ap.add_argument("--tag", default="latest")
    args = ap.parse_args()

    if os.path.exists(args.layout):
        shutil.rmtree(args.layout)
    os.makedirs(os.path.join(args.layout, "blobs", "sha256"))
    raw = layer_tar(args.binary)
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    layer_digest, layer_size = blob(args.layout, gzip.compress(raw, mtime=EPOCH))
    config = {
        "created": "1970-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ENTRYPOINT,
            "ExposedPorts": {"10809/tcp": {}, "4420/tcp": {}},
            "Volumes": {"/var/lib/ballast": {}},
            "WorkingDir": "/var/lib/ballast",
            "StopSignal": "SIGTERM",
            "Labels": {"org.opencontainers.image.title": "ballast",
                       "org.opencontainers.image.description":
                           "userspace NVMe/TCP and NBD block-storage target"},
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "oci_image.py"}],
    }
    cfg = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    cfg_digest, cfg_size = blob(args.layout, cfg)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": cfg_digest, "size": cfg_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest, "size": layer_size}],
    }
    man = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    man_digest, man_size = blob(args.layout, man)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": man_digest, "size": man_size,
                       "annotations": {"org.opencontainers.image.ref.name": args.tag}}],
    }
    with open(os.path.join(args.layout, "index.json"), "w") as f:
        json.dump(index, f, sort_keys=True, separators=(",", ":"))
    with open(os.path.join(args.layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    total = sum(os.path.getsize(os.path.join(dp, n))
                for dp, _, names in os.walk(args.layout) for n in names)
    if args.archive:
        with tarfile.open(args.archive, "w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(os.listdir(args.layout)):
                tar.add(os.path.join(args.layout, name), arcname=name)
    print("image: %s (%s), %d bytes; manifest %s" % (args.layout, args.tag, total, man_digest))


if __name__ == "__main__":
    main()
