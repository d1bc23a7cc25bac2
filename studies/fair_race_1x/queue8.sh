#!/bin/bash
# More 4x seeds for precision: seeds 6-9 of xpert, scratch-matched and random at their 4x pick (4e-3, interior
# of the 2e-3/4e-3/8e-3 grid: queue7.sh), test split; the grafts of seeds 7-9 made as run.sh made the others.
# With seeds 2-9 the two 4x contrasts have 8 paired seeds. One worker (the other core trains the teacher).
cd /work/main
X="nice -n 5 .venv/bin/python /tmp/xp-run.py"; S=build/study; G=$S/grafts; TA=$(realpath $S/teacher)
for s in 7 8 9; do
  [ -d $G/xpert-s$s ] || $X graft $TA --target 3L,d128,f128 --selection $S/sel-min.json --seed $s -o $G/xpert-s$s
  [ -d $G/scratch-matched-s$s ] || $X graft $TA --target 3L,d128,f128 --selection $S/sel-min.json --ffn-init scratch --scale-like $G/xpert-s$s --seed $s -o $G/scratch-matched-s$s
  [ -d $G/random-s$s ] || $X graft $TA --target 3L,d128,f128 --selection $S/sel-random.json --scale-like $G/xpert-s$s --seed $s -o $G/random-s$s
done 2>&1 | grep -v "^note"
tr() { local arm=$1 lr=$2 s=$3 dir=$4 ev=$5; local n=$arm-lr$lr-s$s
  [ -f $S/eval/$ev/$n.json ] && return
  echo "$(date -u +%T) start $dir/$n"
  $X train $G/$arm-s$s --data build/teacher/data --steps 480 --batch-size 8 --seq-len 256 --lr $lr --warmup 96 --eval-every 480 --eval-batches 16 --seed $s --threads 1 --force -o $S/$dir/$n 2>&1 | tail -1
  mkdir -p $S/eval/$ev
  [ -d $S/$dir/$n/final ] && $X eval $S/$dir/$n/final --task ppl:/work/main/build/teacher/data --split test --max-tokens 8192 -o $S/eval/$ev/$n.json 2>&1 | tail -1
  echo "$(date -u +%T) done $dir/$n"; }
for s in 6 7 8 9; do for a in xpert scratch-matched random; do tr $a 4e-3 $s final4x final4x; done; done
echo "$(date -u +%T) queue8 finished"
