#!/bin/bash
# the 4x budget (480 steps, warmup 96 = the 1x share), for the decisive arms: xpert, scratch-matched, random.
# Tuning: lr 2e-3 / 4e-3 x seeds 0, 1 (val split); finals: seeds 2-5 at each arm's pick (test split).
# Run as two workers: `queue6.sh A` and `queue6.sh B` (B walks the lists from the other end).
cd /work/main
W=${1:-A}
# /tmp/xp-run.py is studies/fair_race_1x/xp_run.py; /tmp/xp-snapshot holds `git archive HEAD xpertctl` of the commit run
X="nice -n 5 .venv/bin/python /tmp/xp-run.py"; S=build/study; G=$S/grafts  # X: a snapshot of the code (edits to the tree mid-run do not reach it)
tr() { local arm=$1 lr=$2 s=$3 dir=$4 ev=$5; local n=$arm-lr$lr-s$s
  [ -f $S/eval/$ev/$n.json ] && return
  [ -e $S/$dir/$n ] && return   # the other worker has it
  echo "$(date -u +%T) start $dir/$n"
  $X train $G/$arm-s$s --data build/teacher/data --steps 480 --batch-size 8 --seq-len 256 --lr $lr --warmup 96 --eval-every 480 --eval-batches 16 --seed $s --threads 1 -o $S/$dir/$n 2>&1 | tail -1
  mkdir -p $S/eval/$ev
  [ -d $S/$dir/$n/final ] && $X eval $S/$dir/$n/final --task ppl:/work/main/build/teacher/data --split test --max-tokens 8192 -o $S/eval/$ev/$n.json 2>&1 | tail -1
  echo "$(date -u +%T) done $dir/$n"; }
ARMS="xpert scratch-matched random"; SEEDS="0 1"; LRS="2e-3 4e-3"; FS="2 3 4 5"
[ $W = B ] && { ARMS="random scratch-matched xpert"; SEEDS="1 0"; LRS="4e-3 2e-3"; FS="5 4 3 2"; }
for s in $SEEDS; do for lr in $LRS; do for a in $ARMS; do tr $a $lr $s tune4x all4x; done; done; done
# both workers wait for the whole grid, then pick
while [ $(ls $S/eval/all4x/*.json 2>/dev/null | wc -l) -lt 12 ]; do sleep 10; done
if [ $W = A ]; then $X tune $(for a in xpert scratch-matched random; do echo --arm "$a=$S/tune4x/$a-lr*-s[01]"; done) -o $S/picks4x; fi
while [ ! -f $S/picks4x/picks.json ]; do sleep 5; done
for a in $ARMS; do
  lr=$(.venv/bin/python -c "import json; print('%g' % json.load(open('$S/picks4x/picks.json'))['$a']['lr'])" | sed 's/0\.00\([1248]\)/\1e-3/')
  for s in $FS; do tr $a $lr $s final4x final4x; done
done
echo "$(date -u +%T) queue6 $W finished"
