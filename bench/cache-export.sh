#!/usr/bin/env bash
# bench/cache-export.sh -- CI build caching across two runners (issue 8): runner A builds
# testdata/cache-export cold with --cache-to (mode=max and mode=min, registry and local);
# runner B, an empty store, builds with --cache-from; then one source file changes on B.
# Prints bytes written for the cache, bytes B fetched, and wall times. A benchmark, not a
# test (tests/e2e/cache_export.rs asserts the behaviour): copy figures into RESULTS.md.
#
# Needs root and the test registry on 127.0.0.1:5000. STRATA=path/to/strata to pick the
# binary (default target/debug/strata, built first).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
reg=${STRATA_BENCH_REGISTRY:-127.0.0.1:5000}
work=${STRATA_BENCH_DIR:-/tmp/strata-bench-cache}
if [ -z "${STRATA:-}" ]; then
  (cd "$repo" && cargo build -q -p strata)
  STRATA=$repo/target/debug/strata
fi
export SOURCE_DATE_EPOCH=1700000000
rm -rf "$work" && mkdir -p "$work"

now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc; }
field() { sed -n "s/.*$1.*/\\1/p" "$2" | head -1; }

run() { # name root ctx args...
  local name=$1 root=$2 ctx=$3; shift 3
  local t0 t1
  t0=$(now)
  "$STRATA" --root "$root" build --progress=plain "$@" "$ctx" 2>"$work/$name.log"
  t1=$(now)
  local ran cached wrote fetched
  ran=$(grep -c ' DONE ' "$work/$name.log" || true)
  cached=$(grep -c ' CACHED$' "$work/$name.log" || true)
  wrote=$(field 'wrote [0-9]* blobs (\([0-9]*\) bytes)' "$work/$name.log")
  fetched=$(field 'fetched [0-9]* blobs (\([0-9]*\) bytes)' "$work/$name.log")
  printf '%-22s %6.2fs  steps run %2s cached %2s  cache bytes written %-9s fetched %s\n' \
    "$name" "$(secs "$t0" "$t1")" "$ran" "$cached" "${wrote:--}" "${fetched:--}"
}

for mode in max min; do
  tag=bench-$$-$mode
  ref=$reg/strata-bench/cache-$mode-$$:main # a fresh repository: no blob is there yet
  cp -a "$repo/testdata/cache-export" "$work/ctx-a-$mode"
  cp -a "$repo/testdata/cache-export" "$work/ctx-b-$mode"
  run "A cold registry $mode" "$work/a-$mode" "$work/ctx-a-$mode" \
    --cache-to "type=registry,ref=$ref,mode=$mode"
  run "B from registry $mode" "$work/b-$mode" "$work/ctx-b-$mode" \
    --cache-from "type=registry,ref=$ref" -t "$tag"
  echo "application source v2" >"$work/ctx-b-$mode/app.txt"
  run "B app.txt changed $mode" "$work/b-$mode" "$work/ctx-b-$mode" \
    --cache-from "type=registry,ref=$ref" -t "$tag"
done

cp -a "$repo/testdata/cache-export" "$work/ctx-a-local"
cp -a "$repo/testdata/cache-export" "$work/ctx-b-local"
run "A cold local max" "$work/a-local" "$work/ctx-a-local" \
  --cache-to "type=local,dest=$work/cache-dir,mode=max"
run "B from local max" "$work/b-local" "$work/ctx-b-local" \
  --cache-from "type=local,src=$work/cache-dir" -t bench-local
echo "cache dir: $(du -sb "$work/cache-dir" | cut -f1) bytes"
