#!/bin/bash
# The up-gain grid's edge (scratch and scratch-matched picked 128, the largest gain tried): gain 256 at
# lr 4e-3 (every arm's pick) for all eight arms, seeds 0-1, val split; run after run.sh, the same way.
set -euo pipefail
.venv/bin/python studies/fair_race_1x/xp_run.py run recipes/fair-race.yaml \
  --set "vars.arms=[xpert,scratch,scratch-small,scratch-matched,random,low,kd,learngene]" \
  --set "vars.controls=[scratch,scratch-small,scratch-matched,random,low,learngene]" --set "vars.aux=[learngene]" \
  --set "vars.all_gains=[256]" --set "vars.all_seeds=[0,1]" --set "vars.seeds=[]" \
  --set "vars.tune_lrs=[0.004]" --set "vars.tune_gains=[256]" \
  --only 'graft-*' --only 'aux-*' --only 'tune-*' --jobs 2
