#!/bin/sh
# make bench: operation throughput, then whole-pipeline time and peak memory on the demo model.
# Quote the figures with the machine they ran on (nproc, CPU model) or as ratios.
set -e
cd "$(dirname "$0")/.."
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2)"
${CC:-cc} ${CFLAGS:--O3} -std=c99 -ffp-contract=off -fopenmp -I. $(ls *.c | grep -v '^main.c$') tests/bench.c -o tests/bench -lm
./tests/bench
echo
dir=$(mktemp -d)
for t in 1 2; do
  echo "demo pipeline (writes a tiny model, 3 x txt2img 128x128 8 steps + a shadow run), $t thread(s):"
  if [ -x /usr/bin/time ]; then
    OMP_NUM_THREADS=$t /usr/bin/time -f "  wall %e s, peak memory %M kB" ./sdref demo --out "$dir" --threads $t > /dev/null
  else
    start=$(date +%s)
    OMP_NUM_THREADS=$t ./sdref demo --out "$dir" --threads $t > /dev/null
    echo "  wall about $(( $(date +%s) - start )) s (install 'time' for peak memory)"
  fi
done
rm -rf "$dir"
