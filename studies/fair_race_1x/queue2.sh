#!/bin/bash
# session 35: the second seed and the second learning rate of every arm, then 8e-3 for xpert and scratch
cd /work/main
X="nice -n 5 .venv/bin/xpertctl"; S=build/study; TA=/work/main/build/study/teacher; G=$S/grafts
[ -d $G/scratch-matched-s1 ] || $X graft $TA --target 3L,d128,f128 --selection $S/sel-min.json --ffn-init scratch --scale-like $G/xpert-s1 --seed 1 -o $G/scratch-matched-s1
[ -d $G/random-s1 ] || $X graft $TA --target 3L,d128,f128 --selection $S/sel-random.json --scale-like $G/xpert-s1 --seed 1 -o $G/random-s1
[ -d $G/low-s1 ] || $X graft $TA --target 3L,d128,f128 --selection $S/sel-low.json --scale-like $G/xpert-s1 --seed 1 -o $G/low-s1
tr() { arm=$1; lr=$2; s=$3; n=$arm-lr$lr-s$s
  [ -f $S/eval/all/$n.json ] && return
  echo "$(date -u +%T) start $n"
  $X train $G/$arm-s$s --data build/teacher/data --steps 120 --batch-size 8 --seq-len 256 --lr $lr --warmup 24 --eval-every 120 --eval-batches 16 --seed $s --threads 1 -o $S/tune/$n 2>&1 | tail -1
  $X eval $S/tune/$n/final --task ppl:/work/main/build/teacher/data --split test --max-tokens 8192 -o $S/eval/all/$n.json 2>&1 | tail -1
  echo "$(date -u +%T) done $n"; }
tr scratch-matched 2e-3 1; tr random 2e-3 1; tr low 2e-3 1
tr scratch-matched 4e-3 0; tr random 4e-3 0; tr low 4e-3 0
tr xpert 4e-3 1; tr scratch 4e-3 1; tr scratch-matched 4e-3 1; tr random 4e-3 1; tr low 4e-3 1
tr scratch 8e-3 0; tr xpert 8e-3 0; tr scratch 8e-3 1; tr xpert 8e-3 1
