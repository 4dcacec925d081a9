#!/bin/sh
# Build the libFuzzer targets with clang (ASan + UBSan) straight from the core
# sources, and run each for a bounded time on a copy of its committed seed
# corpus.
#
#   fuzz/run.sh [SECONDS]        seconds per target; default $FUZZ_SECONDS or 60
#   FUZZ_TARGETS="url"           run only these targets (default: record url http)
#   FUZZ_BUILD=dir               where binaries, corpora and crashes go
#                                (default build-fuzz)
#
# A crash stops the run with a non-zero status; the input that caused it is
# left in $FUZZ_BUILD/artifacts/. Reproduce it with
#   $FUZZ_BUILD/fuzz_<target> $FUZZ_BUILD/artifacts/crash-...
# and add it to fuzz/corpus/<target>/ once fixed, so it is replayed forever.
# For a longer hunt: fuzz/run.sh 3600 (new inputs found stay in
# $FUZZ_BUILD/corpus-<target>; copy the interesting ones into the repo).
set -eu
cd "$(dirname "$0")/.."
seconds=${1:-${FUZZ_SECONDS:-60}}
targets=${FUZZ_TARGETS:-record url http}
out=${FUZZ_BUILD:-build-fuzz}
cc=${CLANG:-clang}

if ! command -v "$cc" >/dev/null 2>&1; then
    echo "fuzz/run.sh: $cc not found; the fuzzers need clang with libFuzzer" >&2
    exit 1
fi
mkdir -p "$out/artifacts"
flags="-g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
       -D_GNU_SOURCE -std=gnu11 -Wall -Wextra -Werror -Wno-missing-field-initializers -Iinclude -Icore"
core="core/digest.c core/error.c core/http.c core/record.c core/url.c"
# what meson passes to the library's sources (idem_version())
version=$(sed -n "s/^  version: '\(.*\)',$/\1/p" meson.build | head -n 1)
flags="$flags -DIDEM_VERSION_STRING=\"$version\""

status=0
for t in $targets; do
    echo "== fuzz_$t: building"
    # shellcheck disable=SC2086
    "$cc" $flags -o "$out/fuzz_$t" "fuzz/fuzz_$t.c" $core -lcrypto -lpthread
    mkdir -p "$out/corpus-$t"
    cp -n fuzz/corpus/"$t"/* "$out/corpus-$t/" 2>/dev/null || true
    echo "== fuzz_$t: running for $seconds s"
    if ! UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
         "$out/fuzz_$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=1024 -max_len=8192 \
             -print_final_stats=1 -artifact_prefix="$out/artifacts/$t-" \
             "$out/corpus-$t" fuzz/corpus/"$t" >"$out/fuzz_$t.log" 2>&1; then
        echo "fuzz_$t: FAILED; reproducer(s):" >&2
        ls "$out/artifacts/$t-"* >&2 2>/dev/null || true
        tail -n 60 "$out/fuzz_$t.log" >&2
        status=1
        continue
    fi
    grep -E '^stat::number_of_executed_units|^stat::new_units_added|^stat::peak_rss_mb' "$out/fuzz_$t.log" \
        | sed "s/^/fuzz_$t: /"
    grep -E '(DONE|INITED) ' "$out/fuzz_$t.log" | tail -n 1 | sed "s/^/fuzz_$t: /"
done
exit $status
