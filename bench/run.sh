#!/bin/sh
# Run the benchmark and draw its chart: run.sh IDEM_BENCH OUTDIR [idem_bench options]
set -e
bench=$1
out=$2
shift 2
"$bench" --csv "$out/idem_bench.csv" "$@" | tee "$out/idem_bench.md"
"$(dirname "$0")/plot.sh" "$out/idem_bench.csv" "$out/idem_bench.png"
echo "table: $out/idem_bench.md  csv: $out/idem_bench.csv  chart: $out/idem_bench.png" >&2
