#!/bin/bash
# sequential queue (one training at a time)
cd /work/main
X="nice -n 10 .venv/bin/xpertctl"; S=build/study; TA=/work/main/build/study/teacher; G=$S/grafts
tr() { arm=$1; lr=$2; s=$3
  echo "$(date -u +%T) start $arm lr$lr s$s"
  $X train $G/$arm-s$s --data build/teacher/data --steps 120 --batch-size 8 --seq-len 256 --lr $lr --warmup 24 --eval-every 120 --eval-batches 16 --seed $s --threads 1 -o $S/tune/$arm-lr$lr-s$s 2>&1 | tail -1
  echo "$(date -u +%T) done $arm lr$lr s$s"; }
tr scratch 2e-3 0
tr scratch-matched 2e-3 0
tr random 2e-3 0
$X graft $TA --target 3L,d128,f128 --selection $S/sel-min.json --seed 1 -o $G/xpert-s1
$X graft $TA --target 3L,d128,f128 --selection $S/sel-min.json --ffn-init scratch --seed 1 -o $G/scratch-s1
tr xpert 2e-3 1
tr scratch 2e-3 1
tr xpert 4e-3 0
tr scratch 4e-3 0
tr low 2e-3 0
