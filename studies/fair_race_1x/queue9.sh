#!/bin/bash
# The teacher gap at 16x (1,920 steps, warmup 384 = the 1x share): how far the best student gets from
# teacher-32m's test NLL (issue 28's goal: the teacher at least 0.5 nats below it). xpert and random at the
# 4x pick (lr 4e-3, not re-tuned at 16x), seed 2, test split. A measurement of the gap, not a contrast.
cd /work/main
X="nice -n 5 .venv/bin/python /tmp/xp-run.py"; S=build/study; G=$S/grafts
for a in xpert random; do n=$a-lr4e-3-s2
  [ -f $S/eval/final16x/$n.json ] && continue
  echo "$(date -u +%T) start final16x/$n"
  $X train $G/$a-s2 --data build/teacher/data --steps 1920 --batch-size 8 --seq-len 256 --lr 4e-3 --warmup 384 --eval-every 480 --eval-batches 16 --seed 2 --threads 1 --force -o $S/final16x/$n 2>&1 | tail -1
  mkdir -p $S/eval/final16x
  $X eval $S/final16x/$n/final --task ppl:/work/main/build/teacher/data --split test --max-tokens 8192 -o $S/eval/final16x/$n.json 2>&1 | tail -1
  echo "$(date -u +%T) done final16x/$n"
done
