#!/usr/bin/env bash
# Only when call 2 says model piece 1 is missing (the machine went cold): re-carry it, then call 2 again.
cd "$(dirname "$0")/../.." && exec python3 experiments/gpu/kit.py relay "$@"
