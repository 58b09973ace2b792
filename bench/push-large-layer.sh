#!/usr/bin/env bash
# bench/push-large-layer.sh -- time `strata push` of ../shared/bench/cases/large-layer
# (one ~300 MB RUN layer): gzip push, zstd push, and a second (no-op) push, with peak RSS
# from /usr/bin/time -v when present. A benchmark, not a test: it prints figures and
# appends nothing by itself (copy them into bench/RESULTS.md).
#
# Needs root and the test registry on 127.0.0.1:5000 (../shared/testenv/registry start &&
# ../shared/testenv/seed-images). Builds target/release/strata first.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
case_dir=$(cd "$repo/../shared/bench/cases/large-layer" && pwd)
reg=${STRATA_BENCH_REGISTRY:-127.0.0.1:5000}
work=${STRATA_BENCH_DIR:-/tmp/strata-bench-push}
root=$work/root

(cd "$repo" && cargo build --release -q -p strata)
strata=$work/strata
rm -rf "$work" && mkdir -p "$work"
cp "$repo/target/release/strata" "$strata"

has_time_v=0
if [ -x /usr/bin/time ] && /usr/bin/time -v true 2>/dev/null; then has_time_v=1; fi

# measure LABEL CMD...: wall seconds (and peak RSS in MB when /usr/bin/time -v exists).
measure() {
  local label=$1; shift
  local t0 t1 rss=""
  t0=$(date +%s.%N)
  if [ "$has_time_v" = 1 ]; then
    /usr/bin/time -v -o "$work/time.txt" "$@" >"$work/out.txt" 2>"$work/err.txt"
    rss=$(awk -F': ' '/Maximum resident set size/ {printf "%.1f", $2/1024}' "$work/time.txt")
  else
    "$@" >"$work/out.txt" 2>"$work/err.txt"
  fi
  t1=$(date +%s.%N)
  printf '%-34s %6.2f s   peak RSS %s MB   %s\n' "$label" "$(echo "$t1 - $t0" | bc)" \
    "${rss:-n/a}" "$(grep -h 'blobs uploaded' "$work/err.txt" | tail -n1)"
}

id=$$-$(date +%s)
gz=$reg/bench/large-layer-gzip-$id:1
zs=$reg/bench/large-layer-zstd-$id:1

echo "large-layer push benchmark, $(nproc) cores, strata $(git -C "$repo" rev-parse --short HEAD)"
# Builds: the RUN runs once (uncompressed export); the next builds only diff and
# compress the cached layer anew, so their time is the export (tar + compress) cost.
measure "build (RUN, uncompressed export)" "$strata" --root "$root" build --progress=plain \
  --output "type=image,name=$reg/bench/plain-$id:1,compression=uncompressed" "$case_dir"
measure "build (cached RUN, gzip export)" "$strata" --root "$root" build --progress=plain -t "$gz" "$case_dir"
measure "build (cached RUN, zstd export)" "$strata" --root "$root" build --progress=plain \
  --output "type=image,name=$zs,compression=zstd" "$case_dir"
du -h "$root/content" | tail -n1 | sed 's/^/content store: /'
measure "push gzip (new repository)" "$strata" --root "$root" push "$gz"
measure "push gzip again (nothing new)" "$strata" --root "$root" push "$gz"
measure "push zstd (new repository)" "$strata" --root "$root" push "$zs"
measure "push zstd again (nothing new)" "$strata" --root "$root" push "$zs"
