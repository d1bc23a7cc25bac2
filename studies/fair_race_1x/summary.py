# val loss (last) and test NLL (mean over the six domains) of every run
import json, glob, os
rows = []
for f in sorted(glob.glob("build/study/eval/all/*.json")):
    n = os.path.basename(f)[:-5]
    d = json.load(open(f))
    ppl = next(v for k, v in d["tasks"].items() if k.startswith("ppl:"))
    doms = {k: v["nll"] for k, v in ppl.items() if isinstance(v, dict)}
    met = [json.loads(l) for l in open(f"build/study/tune/{n}/metrics.jsonl")]
    val = [m["val_loss"] for m in met if "val_loss" in m][-1]
    rows.append((n, val, sum(doms.values()) / len(doms)))
print(f"{'run':28s} val_loss  test_nll(mean of 6 domains)")
for n, v, t in rows: print(f"{n:28s} {v:.4f}    {t:.4f}")
t = json.load(open("build/study/eval/teacher.json"))
ppl = next(v for k, v in t["tasks"].items() if k.startswith("ppl:"))
doms = {k: v["nll"] for k, v in ppl.items() if isinstance(v, dict)}
print(f"teacher test nll mean {sum(doms.values())/len(doms):.4f}", {k: round(v, 3) for k, v in doms.items()})
