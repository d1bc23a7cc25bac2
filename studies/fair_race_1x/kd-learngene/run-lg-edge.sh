#!/bin/bash
# learngene picked lr 8e-3 (gain 1), the grid's largest lr: the grid is widened on that edge for it, as it
# was for every arm whose pick sat on an edge (lr 1.6e-2 at gains 1 and 8, seeds 0-1, val split).
set -euo pipefail
.venv/bin/python studies/fair_race_1x/xp_run.py run recipes/fair-race.yaml \
  --set "vars.arms=[learngene]" --set "vars.controls=[learngene]" --set "vars.aux=[learngene]" \
  --set "vars.all_gains=[1,8]" --set "vars.all_seeds=[0,1]" --set "vars.seeds=[]" \
  --set "vars.tune_lrs=[0.016]" --set "vars.tune_gains=[1,8]" \
  --only 'graft-learngene-*' --only 'aux-*' --only 'tune-*' --jobs 2
