#!/bin/sh
# Regenerates manifests/ from helm/registry-addon (see gen-manifests.py).
exec python3 "$(dirname "$0")/gen-manifests.py" "$@"
