#!/usr/bin/env bash
# Set up jaxunlearn on every worker of a Cloud TPU pod slice.
# The full pod script comes with the scale-out issue; for now this prints its usage.
set -euo pipefail
cat <<USAGE
usage: tpu_setup.sh TPU_NAME ZONE [PROJECT]

Installs jaxunlearn with the 'tpu' extra on every worker of the named TPU VM:
  gcloud compute tpus tpu-vm ssh TPU_NAME --zone ZONE --worker=all \\
    --command 'pip install "jaxunlearn[tpu] @ git+<your fork>"'
(not automated yet: run the line above by hand).
USAGE
