#!/bin/bash
# session 35: finish the tuning grid (lr 2e-3/4e-3/8e-3 x seeds 0,1 for six arms; scratch-small added), pick each
# arm's lr with `xpertctl tune` on the val split, then the finals: seeds 2-5 at each arm's pick, test split.
cd /work/main
while pgrep -f queue2.sh >/dev/null; do sleep 10; done
X="nice -n 5 .venv/bin/xpertctl"; S=build/study; TA=/work/main/build/study/teacher; G=$S/grafts
graft() { local arm=$1 s=$2; [ -d $G/$arm-s$s ] && return
  case $arm in
    xpert) $X graft $TA --target 3L,d128,f128 --selection $S/sel-min.json --seed $s -o $G/xpert-s$s ;;
    scratch) $X graft $TA --target 3L,d128,f128 --selection $S/sel-min.json --ffn-init scratch --seed $s -o $G/scratch-s$s ;;
    scratch-small) $X graft $TA --target 3L,d128,f128 --selection $S/sel-min.json --ffn-init scratch --out-init small --seed $s -o $G/scratch-small-s$s ;;
    scratch-matched) $X graft $TA --target 3L,d128,f128 --selection $S/sel-min.json --ffn-init scratch --scale-like $G/xpert-s$s --seed $s -o $G/scratch-matched-s$s ;;
    random) $X graft $TA --target 3L,d128,f128 --selection $S/sel-random.json --scale-like $G/xpert-s$s --seed $s -o $G/random-s$s ;;
    low) $X graft $TA --target 3L,d128,f128 --selection $S/sel-low.json --scale-like $G/xpert-s$s --seed $s -o $G/low-s$s ;;
  esac; }
tr() { local arm=$1 lr=$2 s=$3 dir=$4 ev=$5; local n=$arm-lr$lr-s$s
  [ -f $S/eval/$ev/$n.json ] && return
  graft xpert $s; graft $arm $s
  echo "$(date -u +%T) start $dir/$n"
  $X train $G/$arm-s$s --data build/teacher/data --steps 120 --batch-size 8 --seq-len 256 --lr $lr --warmup 24 --eval-every 120 --eval-batches 16 --seed $s --threads 1 -o $S/$dir/$n 2>&1 | tail -1
  mkdir -p $S/eval/$ev
  $X eval $S/$dir/$n/final --task ppl:/work/main/build/teacher/data --split test --max-tokens 8192 -o $S/eval/$ev/$n.json 2>&1 | tail -1
  echo "$(date -u +%T) done $dir/$n"; }
ARMS="xpert scratch scratch-small scratch-matched random low"
for s in 0 1; do for lr in 2e-3 4e-3 8e-3; do for a in $ARMS; do
  [ -f $S/eval/all/$a-lr$lr-s$s.json ] || tr $a $lr $s tune all; done; done; done
rm -rf $S/picks
$X tune $(for a in $ARMS; do echo --arm "$a=$S/tune/$a-lr*-s[01]"; done) -o $S/picks
for a in $ARMS; do
  lr=$(.venv/bin/python -c "import json; print('%g' % json.load(open('$S/picks/picks.json'))['$a']['lr'])" | sed 's/0\.00\([248]\)/\1e-3/')
  echo "$a pick lr $lr"
  for s in 2 3 4 5; do tr $a $lr $s final final; done
done
echo "$(date -u +%T) queue3 finished"
