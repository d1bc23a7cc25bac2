#!/bin/bash
# the 4x finals through `xpertctl report` (PICKS=picks4x: the first, two-point grid; default picks4x-wide: queue7.sh) (the report calls its one budget "1x": here it is 480 steps = 4x)
cd /work/main
S=build/study; R=$S/eval/named4x; P=$S/${PICKS:-picks4x-wide}; rm -rf $R; mkdir -p $R
for a in xpert scratch-matched random; do
  lr=$(.venv/bin/python -c "import json; print('%g' % json.load(open('$P/picks.json'))['$a']['lr'])" | sed 's/0\.00\([1248]\)/\1e-3/')
  for f in $S/eval/final4x/$a-lr$lr-s*.json; do s=$(basename $f .json); s=${s##*-s}; cp $f $R/$a-3L-s$s.json; done
done
.venv/bin/xpertctl report --results "$R/*.json" --baseline scratch-matched --teacher $S/eval/teacher.json \
  --primary xpert:scratch-matched --primary xpert:random \
  --tuning 1=$P --title "Fair race, 4x budget (480 steps; the report's '1x' is this run's only budget), teacher-32m" --out $S/report4x --force
