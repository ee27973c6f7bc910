#!/bin/bash
# The NVMe passthrough suite on the trixie guest (Linux 6.12): passthrough commands on buffers
# registered with the core's device ring (test-nvme-passthrough.sh --trixie).
exec "$(dirname "$0")/test-nvme-passthrough.sh" --trixie "$@"
