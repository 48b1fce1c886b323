#!/usr/bin/env bash
# Real processes on 127.0.0.1: one SuperLink, two SuperNodes, then `flwr run`.
# Many machines: start the SuperLink with --host 0.0.0.0, the SuperNodes elsewhere with
# --superlink <host>:9093, and point the connection below at <host>:9093; the app code does
# not change. (--insecure: no TLS; demo only.) Checked with flwr 1.42.
set -euo pipefail
cd "$(dirname "$0")"
export FLWR_HOME="${FLWR_HOME:-$(mktemp -d)}"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "local-deployment"

[superlink.local-deployment]
address = "127.0.0.1:9093"
insecure = true
TOML
flower-superlink --insecure --isolation subprocess --host 127.0.0.1 --port 9093 --disable-runtime-dependency-installation > "$FLWR_HOME/superlink.log" 2>&1 &
PIDS=($!)
sleep 3
for k in 0 1; do
  flower-supernode --insecure --superlink 127.0.0.1:9093 --port "$((9094 + k))" \
    --node-config "partition-id=$k num-partitions=2" > "$FLWR_HOME/supernode$k.log" 2>&1 &
  PIDS+=($!)
done
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
sleep 3
flwr run . local-deployment --stream
