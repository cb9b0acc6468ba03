#!/usr/bin/env bash
# CI entry point: exactly the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo xtask test
