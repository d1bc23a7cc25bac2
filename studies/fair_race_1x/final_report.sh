#!/bin/bash
# the finals through `xpertctl report`: each arm's runs at its pick (picks2: the grid with scratch-small's 1e-3),
# renamed ARM-3L-sSEED.json (the report's naming); Holm over the 5 declared primary contrasts
cd /work/main
S=build/study; R=$S/eval/named; P=$S/picks2; rm -rf $R; mkdir -p $R
for a in xpert scratch scratch-small scratch-matched random low; do
  lr=$(.venv/bin/python -c "import json; print('%g' % json.load(open('$P/picks.json'))['$a']['lr'])" | sed 's/0\.00\([1248]\)/\1e-3/')
  for f in $S/eval/final/$a-lr$lr-s*.json; do s=$(basename $f .json); s=${s##*-s}; cp $f $R/$a-3L-s$s.json; done
done
.venv/bin/xpertctl report --results "$R/*.json" --baseline scratch --teacher $S/eval/teacher.json \
  --primary xpert:scratch --primary xpert:scratch-small --primary xpert:scratch-matched --primary xpert:random --primary xpert:low \
  --tuning 1=$P --title "Fair race, 1x budget (120 steps), teacher-32m (step 4,000)" --out $S/report --force
