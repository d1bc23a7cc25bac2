#!/bin/bash
# A second worker for queue8.sh, started once a core was free (the teacher paused): the same runs from the
# other end (seed 9 first). It skips a run the first worker has started or finished, and marks each run it
# starts with an empty eval file, which the first worker's check (eval file exists) skips; eval --force
# then writes the real one.
cd /work/main
X="nice -n 5 .venv/bin/python /tmp/xp-run.py"; S=build/study; G=$S/grafts
tr() { local arm=$1 lr=$2 s=$3 dir=$4 ev=$5; local n=$arm-lr$lr-s$s
  [ -f $S/eval/$ev/$n.json ] && return
  [ -e $S/$dir/$n ] && return   # the other worker has it
  touch $S/eval/$ev/$n.json
  echo "$(date -u +%T) start $dir/$n"
  $X train $G/$arm-s$s --data build/teacher/data --steps 480 --batch-size 8 --seq-len 256 --lr $lr --warmup 96 --eval-every 480 --eval-batches 16 --seed $s --threads 1 -o $S/$dir/$n 2>&1 | tail -1
  [ -d $S/$dir/$n/final ] && $X eval $S/$dir/$n/final --task ppl:/work/main/build/teacher/data --split test --max-tokens 8192 --force -o $S/eval/$ev/$n.json 2>&1 | tail -1
  echo "$(date -u +%T) done $dir/$n"; }
for s in 9 8 7 6; do for a in random scratch-matched xpert; do tr $a 4e-3 $s final4x final4x; done; done
echo "$(date -u +%T) queue8b finished"
