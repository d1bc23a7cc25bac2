#!/bin/bash
# kd and the TLEG learngene in the tuned 1x race (issue 28): the same 22 cells (lr x up-gain, warmup 24,
# seeds 0-1, val split) the six other arms got in studies/fair_race_1x/gain-high, in the batches that make
# up that grid; run from the repository root with the snapshot runner (xp_run.py), the teacher paused.
set -euo pipefail
X=".venv/bin/python studies/fair_race_1x/xp_run.py run recipes/fair-race.yaml"
COMMON="--set vars.arms=[kd,learngene] --set vars.controls=[scratch,learngene] --set vars.aux=[learngene]
        --set vars.all_gains=[0.5,1,2,4,8,16,32,64,128] --set vars.all_seeds=[0,1] --set vars.seeds=[]
        --only graft-* --only aux-* --only tune-* --jobs 2"
batch() { $X $COMMON --set "vars.tune_lrs=$1" --set "vars.tune_gains=$2"; }
batch "[0.002,0.004]" "[0.5,1,2,4,8,32,64,128]"   # 16 cells
batch "[0.004,0.008]" "[16]"                       # 2
batch "[0.008]" "[1,8,32]"                         # 3
batch "[0.001]" "[1]"                              # 1: 22 cells in all
