#!/usr/bin/env bash
# Call 2 on the GPU machine; experiments/gpu/README.md has the device run (command, carry, timeout_s).
cd "$(dirname "$0")/../.." && exec python3 experiments/gpu/kit.py call2 "$@"
