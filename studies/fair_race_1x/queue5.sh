#!/bin/bash
# precision for the two contrasts that decide "which experts" and "beyond scale": seeds 6-9 of xpert, random and
# scratch-matched at their 1x picks (added after the 4-seed result; reported apart from the declared finals)
cd /work/main
X="nice -n 10 .venv/bin/xpertctl"; S=build/study; G=$S/grafts; TA=/work/main/build/study/teacher
graft() { local arm=$1 s=$2; [ -d $G/$arm-s$s ] && return
  case $arm in
    xpert) $X graft $TA --target 3L,d128,f128 --selection $S/sel-min.json --seed $s -o $G/xpert-s$s ;;
    scratch-matched) $X graft $TA --target 3L,d128,f128 --selection $S/sel-min.json --ffn-init scratch --scale-like $G/xpert-s$s --seed $s -o $G/scratch-matched-s$s ;;
    random) $X graft $TA --target 3L,d128,f128 --selection $S/sel-random.json --scale-like $G/xpert-s$s --seed $s -o $G/random-s$s ;;
  esac; }
for s in 6 7 8 9; do for a in xpert random scratch-matched; do n=$a-lr4e-3-s$s
  [ -f $S/eval/extra/$n.json ] && continue
  graft xpert $s; graft $a $s
  echo "$(date -u +%T) start extra/$n"
  $X train $G/$a-s$s --data build/teacher/data --steps 120 --batch-size 8 --seq-len 256 --lr 4e-3 --warmup 24 --eval-every 120 --eval-batches 16 --seed $s --threads 1 -o $S/extra/$n 2>&1 | tail -1
  mkdir -p $S/eval/extra
  $X eval $S/extra/$n/final --task ppl:/work/main/build/teacher/data --split test --max-tokens 8192 -o $S/eval/extra/$n.json 2>&1 | tail -1
done; done
echo "$(date -u +%T) queue5 finished"
