#!/bin/bash
# a second worker for the finals (from the other end): arms and seeds in reverse order
cd /work/main
while [ ! -f build/study/picks/picks.json ]; do sleep 15; done
while pgrep -f "make test" >/dev/null; do sleep 15; done
X="nice -n 5 .venv/bin/xpertctl"; S=build/study; G=$S/grafts; TA=/work/main/build/study/teacher
graft() { local arm=$1 s=$2; [ -d $G/$arm-s$s ] && return
  case $arm in
    xpert) $X graft $TA --target 3L,d128,f128 --selection $S/sel-min.json --seed $s -o $G/xpert-s$s ;;
    scratch) $X graft $TA --target 3L,d128,f128 --selection $S/sel-min.json --ffn-init scratch --seed $s -o $G/scratch-s$s ;;
    scratch-small) $X graft $TA --target 3L,d128,f128 --selection $S/sel-min.json --ffn-init scratch --out-init small --seed $s -o $G/scratch-small-s$s ;;
    scratch-matched) $X graft $TA --target 3L,d128,f128 --selection $S/sel-min.json --ffn-init scratch --scale-like $G/xpert-s$s --seed $s -o $G/scratch-matched-s$s ;;
    random) $X graft $TA --target 3L,d128,f128 --selection $S/sel-random.json --scale-like $G/xpert-s$s --seed $s -o $G/random-s$s ;;
    low) $X graft $TA --target 3L,d128,f128 --selection $S/sel-low.json --scale-like $G/xpert-s$s --seed $s -o $G/low-s$s ;;
  esac; }
# scratch-small was picked on the edge of the grid (lr 2e-3, the smallest): extend its grid down to 1e-3 first
for s in 0 1; do n=scratch-small-lr1e-3-s$s
  [ -f $S/eval/all/$n.json ] && continue
  echo "$(date -u +%T) start tune/$n"
  $X train $G/scratch-small-s$s --data build/teacher/data --steps 120 --batch-size 8 --seq-len 256 --lr 1e-3 --warmup 24 --eval-every 120 --eval-batches 16 --seed $s --threads 1 -o $S/tune/$n 2>&1 | tail -1
  $X eval $S/tune/$n/final --task ppl:/work/main/build/teacher/data --split test --max-tokens 8192 -o $S/eval/all/$n.json 2>&1 | tail -1
done
ARMS="xpert scratch scratch-small scratch-matched random low"
rm -rf $S/picks2; $X tune $(for a in $ARMS; do echo --arm "$a=$S/tune/$a-lr*-s[01]"; done) -o $S/picks2
echo "scratch-small pick with 1e-3 in its grid: $(.venv/bin/python -c "import json; print(json.load(open('$S/picks2/picks.json'))['scratch-small'])")"
for a in low random scratch-matched scratch-small scratch xpert; do  # (loop vars: a, s, lr, n)
  lr=$(.venv/bin/python -c "import json; print('%g' % json.load(open('$S/picks2/picks.json'))['$a']['lr'])" | sed 's/0\.00\([1248]\)/\1e-3/')
  for s in 5 4 3 2; do n=$a-lr$lr-s$s
    [ -f $S/eval/final/$n.json ] && continue
    graft xpert $s; graft $a $s
    [ -e $S/final/$n ] && continue  # queue3 is on it
    echo "$(date -u +%T) start final/$n"
    $X train $G/$a-s$s --data build/teacher/data --steps 120 --batch-size 8 --seq-len 256 --lr $lr --warmup 24 --eval-every 120 --eval-batches 16 --seed $s --threads 1 -o $S/final/$n 2>&1 | tail -1
    mkdir -p $S/eval/final
    [ -d $S/final/$n/final ] && $X eval $S/final/$n/final --task ppl:/work/main/build/teacher/data --split test --max-tokens 8192 -o $S/eval/final/$n.json 2>&1 | tail -1
    echo "$(date -u +%T) done final/$n"
  done
done
