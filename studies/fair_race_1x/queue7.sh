#!/bin/bash
# The 4x grid widened: every 4x pick of queue6 was 4e-3, the edge of its 2e-3/4e-3 grid, so lr 8e-3 is
# added for the same three arms and seeds 0-1 (val split), the tune is redone on the three-point grid
# (picks4x-wide), and any arm whose pick moves gets its finals (seeds 2-5, test split) at the new pick.
# One worker (the other core trains the teacher).
cd /work/main
X="nice -n 5 .venv/bin/python /tmp/xp-run.py"; S=build/study; G=$S/grafts  # X: a snapshot of the code
tr() { local arm=$1 lr=$2 s=$3 dir=$4 ev=$5; local n=$arm-lr$lr-s$s
  [ -f $S/eval/$ev/$n.json ] && return
  echo "$(date -u +%T) start $dir/$n"
  $X train $G/$arm-s$s --data build/teacher/data --steps 480 --batch-size 8 --seq-len 256 --lr $lr --warmup 96 --eval-every 480 --eval-batches 16 --seed $s --threads 1 --force -o $S/$dir/$n 2>&1 | tail -1
  mkdir -p $S/eval/$ev
  [ -d $S/$dir/$n/final ] && $X eval $S/$dir/$n/final --task ppl:/work/main/build/teacher/data --split test --max-tokens 8192 -o $S/eval/$ev/$n.json 2>&1 | tail -1
  echo "$(date -u +%T) done $dir/$n"; }
for s in 0 1; do for a in xpert scratch-matched random; do tr $a 8e-3 $s tune4x all4x; done; done
[ -f $S/picks4x-wide/picks.json ] || $X tune $(for a in xpert scratch-matched random; do echo --arm "$a=$S/tune4x/$a-lr*-s[01]"; done) -o $S/picks4x-wide
for a in xpert scratch-matched random; do
  lr=$(.venv/bin/python -c "import json; print('%g' % json.load(open('$S/picks4x-wide/picks.json'))['$a']['lr'])" | sed 's/0\.00\([1248]\)/\1e-3/')
  for s in 2 3 4 5; do tr $a $lr $s final4x final4x; done
done
echo "$(date -u +%T) queue7 finished"
