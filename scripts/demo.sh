#!/usr/bin/env bash
# The README's `make demo`: train a CVAE on the embedded digits data, export it into a model
# repository, serve it over gRPC, sample every class through the server, run a batch job with a
# preview grid, then stop the server. Usage: scripts/demo.sh [DEMO_DIR]
set -euo pipefail
demo=${1:-demo}
bin=$(dirname "$0")/../.venv/bin
port=${VAESERVE_DEMO_PORT:-8001}
# REST (the Open Inference Protocol over HTTP) on any free port unless one is given: 8000 may
# be taken on a developer's machine.
http_port=${VAESERVE_DEMO_HTTP_PORT:-0}
# Each run starts afresh: the folder is the demo's own (marked), so a re-run replaces it; a
# folder that is not a demo's is never touched.
if [ -e "$demo" ]; then
  if [ ! -e "$demo/.vaeserve-demo" ] && [ -n "$(ls -A "$demo")" ]; then
    echo "demo.sh: $demo exists and is not a demo folder; choose another: scripts/demo.sh DIR" >&2
    exit 2
  fi
  rm -rf "$demo"
fi
mkdir -p "$demo"
touch "$demo/.vaeserve-demo"

echo "== 1/4 train (vae-train) -> $demo/run"
"$bin/vae-train" --dataset digits --model cvae --out "$demo/run"

echo "== 2/4 export (vae-export) -> $demo/models/digits"
"$bin/vae-export" --checkpoint "$demo/run/checkpoint.pt" --repository "$demo/models" --name digits --force --version 1

echo "== 3/4 serve (vae-serve) on 127.0.0.1:$port"
"$bin/vae-serve" --repository "$demo/models" --host 127.0.0.1 --port "$port" \
  --http-port "$http_port" >"$demo/server.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  "$bin/vae-healthcheck" --address "127.0.0.1:$port" --timeout 1 >/dev/null 2>&1 && break
  kill -0 $server 2>/dev/null || { cat "$demo/server.log"; exit 1; }
  sleep 0.5
done
"$bin/vae-healthcheck" --address "127.0.0.1:$port" --timeout 2
rest=$(sed -n 's/.*REST listening on \(http[^ ]*\).*/\1/p' "$demo/server.log" | head -n 1)
echo "   REST: $rest/v2/models/digits-sampler (curl it while the demo runs)"

echo "== 4/4 generate (vae-generate) over gRPC -> $demo/samples"
"$bin/vae-generate" --server "127.0.0.1:$port" --model digits --num 2000 --labels balanced \
  --seed 0 --shard-size 500 --out "$demo/samples" --preview "$demo/samples_grid.png"

kill -TERM $server; wait $server || { echo "server exited with $?"; exit 1; }
trap - EXIT
echo
echo "demo done: $demo/run/metrics.json, $demo/run/*.png, $demo/models/digits/1/, $demo/samples/, $demo/samples_grid.png"
