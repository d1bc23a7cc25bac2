#!/bin/bash
# Per-domain, per-layer fidelity of the default one-shot graft on each domain's *test* split (issue 20 goal):
#   studies/fidelity_per_domain.sh REPO_ROOT OUT_DIR [extra graft args, e.g. --rescale routed]
# stats on all of fixtures/corpus-mini's train split (cached in $STATS), 6-layer target, min selection,
# `xpertctl fidelity` with 4,096 tokens per domain; prints rel_error per layer and the selected-mixture reference.
set -e
cd $1; W=$2; shift 2
PY=${PYTHON:-python}
P="env PYTHONPATH=$PWD OMP_NUM_THREADS=1 $PY -m xpertctl.cli"
C=fixtures/corpus-mini
mkdir -p $W
D=""; for n in code legal lexicon manuals quotes scripture; do D="$D -d $n=$C/train/$n.txt"; done
STATS=${STATS:-$W/stats.safetensors}
[ -f $STATS ] || $P stats fixtures/teacher $D -o $STATS --seq-len 256 2>/dev/null
$P graft fixtures/teacher --target 6L --stats $STATS -o $W/student --force "$@" 2>$W/graft.err
for n in code legal lexicon manuals quotes scripture; do
  $P fidelity fixtures/teacher $W/student -d $n=$C/test/$n.txt --max-tokens 4096 -o $W/fid-$n.json --force 2>/dev/null
done
$PY - $W <<'PY'
import json,sys
W=sys.argv[1]
for n in "code legal lexicon manuals quotes scripture".split():
    d=json.load(open(f"{W}/fid-{n}.json"))
    r=[l["rel_error"] for l in d["layers"]]
    sm=[l["references"]["selected_mixture"]["rel_error"] if l["references"]["selected_mixture"] else float('nan') for l in d["layers"]]
    print(f"{n:10s} tok={sum(d['tokens'].values()):5d}", " ".join(f"{x:.3f}" for x in r), f"mean {sum(r)/len(r):.3f}  selmix", " ".join(f"{x:.3f}" for x in sm))
PY
