#!/usr/bin/env bash
# Re-run the published studies and their stability check, and copy the results into docs/study/
# (docs/study/RERUN.md: what each step is for, its CPU time, what to look at before publishing).
# Run from the repository root on an otherwise idle machine; RUNS (default runs/) holds the
# study directories, so a killed script resumes where it stopped when run again.
set -euo pipefail
RUNS=${RUNS:-runs}
WORKERS=${WORKERS:-2}

study() {  # study NAME ARGS...: run (or resume) a study into $RUNS/NAME
  local name=$1; shift
  pyalign study "$@" --out "$RUNS/$name" --no-progress
}

reuse() {  # reuse FROM TO PATTERN: copy finished points of one study into another's directory
  mkdir -p "$RUNS/$2/points"
  for point in "$RUNS/$1"/points/$3; do
    [ -f "$point/done.json" ] && [ ! -e "$RUNS/$2/points/$(basename "$point")" ] && cp -r "$point" "$RUNS/$2/points/"
  done
  return 0
}

publish() {  # publish NAME: the study's report, CSV, figures and numbers into docs/study/NAME
  mkdir -p "docs/study/$1"
  rm -f "docs/study/$1"/*.png
  cp "$RUNS/$1"/{report.md,points.csv,summary.json,study.json,run.json} "$RUNS/$1"/*.png "docs/study/$1/"
}

study default --preset default --workers "$WORKERS"
study elastic-reset --preset elastic-reset --workers "$WORKERS"
reuse elastic-reset elastic-reset-kl 'rloo__*'      # the same RLOO points (same ids, same settings)
study elastic-reset-kl --grid docs/study/elastic-reset-kl/grid.toml --workers "$WORKERS"
study lengthy --preset lengthy --workers "$WORKERS"
study lengthy-control --grid docs/study/lengthy-control/grid.toml --workers "$WORKERS"

# Stability: the same slices at two intra-op threads per point (one worker: 2 threads each on
# 2 cores). Their one-thread runs are points of the studies above, reused as they are.
reuse default stability-default-1 'dpo__*'
reuse default stability-default-1 'tr-dpo__tr_tau=16__*'
reuse default stability-default-1 'tr-dpo__tr_tau=32__*'
study stability-default-1 --grid docs/study/stability/default-threads-1.toml --workers "$WORKERS"
study stability-default-2 --grid docs/study/stability/default-threads-2.toml --workers 1
for beta in 0.0125 0.05; do for size in small large; do
  reuse lengthy stability-lengthy-1 "dpo__beta=${beta}__size=${size}__*"
done; done
study stability-lengthy-1 --grid docs/study/stability/lengthy-threads-1.toml --workers "$WORKERS"
study stability-lengthy-2 --grid docs/study/stability/lengthy-threads-2.toml --workers 1
# The same slices with five other seeds (the thread count changes no bit on this task's models)
study stability-default-seeds --grid docs/study/stability/default-seeds-5-9.toml --workers "$WORKERS"
study stability-lengthy-seeds --grid docs/study/stability/lengthy-seeds-5-9.toml --workers "$WORKERS"
# ... and both seed sets pooled: 10 seeds, nothing new to run
for slice in default lengthy; do
  reuse "stability-$slice-1" "stability-$slice-10" '*'
  reuse "stability-$slice-seeds" "stability-$slice-10" '*'
  study "stability-$slice-10" --grid "docs/study/stability/$slice-10-seeds.toml" --workers "$WORKERS"
done

for name in default elastic-reset elastic-reset-kl lengthy lengthy-control; do publish "$name"; done
for slice in default lengthy; do
  python -m pyalign.study.compare "$RUNS/stability-$slice-1" "$RUNS/stability-$slice-2" \
    > "docs/study/stability/$slice.md" || true   # differences are findings, not failures
  python -m pyalign.study.compare "$RUNS/stability-$slice-1" "$RUNS/stability-$slice-seeds" \
    > "docs/study/stability/$slice-seeds.md" || true
  mkdir -p "docs/study/stability/$slice-10"
  cp "$RUNS/stability-$slice-10"/{report.md,summary.json,points.csv} "$RUNS/stability-$slice-10"/*.png \
    "docs/study/stability/$slice-10/"
done
echo "done: look at every PNG under docs/study/ and read docs/study/stability/*.md before publishing"
