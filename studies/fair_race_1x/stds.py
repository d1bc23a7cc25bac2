# per-layer std of the FFN matrices of the seed-0 grafts
from safetensors import safe_open
import glob
arms = ["xpert", "scratch", "scratch-small", "scratch-matched", "random", "low"]
print(f"{'arm':16s} layer  gate_std  up_std   down_std  up/down")
for a in arms:
    files = glob.glob(f"build/study/grafts/{a}-s0/*.safetensors")
    t = {}
    for fn in files:
        with safe_open(fn, "pt") as f:
            for k in f.keys():
                if ".mlp." in k: t[k] = f.get_tensor(k).float()
    for l in range(3):
        g, u, d = (t[f"model.layers.{l}.mlp.{m}_proj.weight"].std().item() for m in ("gate", "up", "down"))
        print(f"{a:16s} {l:5d}  {g:.5f}  {u:.5f}  {d:.5f}  {u/d:6.2f}")
