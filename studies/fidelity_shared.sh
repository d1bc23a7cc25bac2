#!/bin/bash
# --shared none vs concat on the tiny shared-expert fixtures (issue 20):
#   studies/fidelity_shared.sh REPO_ROOT OUT_DIR
# builds fixtures/make_fixtures.py's qwen2_moe, deepseek_v2, deepseek_v3 into OUT_DIR/fx; stats on 4,096 train
# tokens of three domains of fixtures/corpus-mini; graft -t 2L; fidelity on 4,096 test tokens per domain.
set -e
cd $1; W=$2; mkdir -p $W
PY=${PYTHON:-python}
P="env PYTHONPATH=$PWD OMP_NUM_THREADS=1 $PY -m xpertctl.cli"
C=fixtures/corpus-mini
[ -d $W/fx/qwen2_moe ] || PYTHONPATH=$PWD $PY -c "
import importlib.util, pathlib
spec = importlib.util.spec_from_file_location('mf', 'fixtures/make_fixtures.py'); m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m); m.build(pathlib.Path('$W/fx'), ['qwen2_moe', 'deepseek_v2', 'deepseek_v3'])" >/dev/null
for fam in qwen2_moe deepseek_v2 deepseek_v3; do
  S=$W/fx/$fam
  $P stats $S -d legal=$C/train/legal.txt -d code=$C/train/code.txt -d scripture=$C/train/scripture.txt \
     --max-tokens 4096 -o $W/$fam-stats.safetensors --force >/dev/null 2>&1
  for sh in none concat; do
    $P graft $S --target 2L --stats $W/$fam-stats.safetensors --shared $sh --dtype float32 -o $W/$fam-$sh --force \
       >/dev/null 2>$W/$fam-$sh.err
    for d in legal code scripture; do
      $P fidelity $S $W/$fam-$sh -d $d=$C/test/$d.txt --max-tokens 4096 -o $W/$fam-$sh-$d.json --force >/dev/null 2>&1
    done
  done
done
$PY - $W <<'PYEOF'
import json, sys
W = sys.argv[1]
for fam in ("qwen2_moe", "deepseek_v2", "deepseek_v3"):
    for sh in ("none", "concat"):
        cells = []
        for d in ("legal", "code", "scripture"):
            L = json.load(open(f"{W}/{fam}-{sh}-{d}.json"))["layers"]
            cells.append(" ".join(f"{l['rel_error']:.3f}" for l in L) + " (sel-mix "
                         + " ".join(f"{l['references']['selected_mixture']['rel_error']:.3f}" for l in L) + ")")
        print(f"{fam:12s} {sh:6s}", " / ".join(cells))
PYEOF
