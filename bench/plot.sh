#!/bin/sh
# Chart of operations per second by store and path, library beside raw,
# from the CSV idem_bench writes: plot.sh idem_bench.csv idem_bench.png
set -e
csv=${1:-idem_bench.csv}
png=${2:-idem_bench.png}
data=$(mktemp)
trap 'rm -f "$data"' EXIT
# One row per store and path: label, then lib and raw op/s at 1 thread and
# at 4 threads ("NaN" where a side was not measured).
awk -F, '
    NR > 1 && $3 ~ /^[0-9]+t$/ && $4 ~ /^(lib|raw)$/ {
        row = $1 "/" $2
        if (!(row in seen)) { seen[row] = 1; order[n++] = row }
        v[row, $3, $4] = $5
    }
    function val(r, c, s) { return ((r, c, s) in v) ? v[r, c, s] : "NaN" }
    END {
        for (i = 0; i < n; i++) {
            r = order[i]
            printf "\"%s\" %s %s %s %s\n", r, val(r, "1t", "lib"), val(r, "1t", "raw"),
                   val(r, "4t", "lib"), val(r, "4t", "raw")
        }
    }' "$csv" > "$data"
gnuplot <<GP
set terminal pngcairo size 1400,600 noenhanced font ",10"
set output "$png"
set title "libidempotency: operations per second by store and path (library beside raw client)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set logscale y
set ylabel "operations per second (log scale)"
set grid ytics
set xtics rotate by -30
set key top left
plot "$data" using 2:xtic(1) title "library, 1 thread", \
     "" using 3 title "raw, 1 thread", \
     "" using 4 title "library, 4 threads", \
     "" using 5 title "raw, 4 threads"
GP
echo "chart: $png" >&2
