"""Open a Hugging Face model directory or a bare .safetensors file and read experts lazily."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import XpertError
from . import arch, provenance
from .arch import Family
from .files import ShardedReader, open_files, tree_size

INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


def has_tokenizer(files) -> bool:
    """Whether these file names include a tokenizer's vocabulary (not just its config)."""
    return any(n in files for n in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def tokenizer_files(directory: Path) -> dict[str, Path]:
    """The tokenizer files present in a directory (what a model directory copies along)."""
    return {n: Path(directory) / n for n in TOKENIZER_FILES if (Path(directory) / n).is_file()}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass
class Checkpoint:
    path: Path  # the directory or the bare file
    files: list[Path]  # weight files
    config: dict  # config.json ({} when absent)
    family: Family
    fused: bool  # fused 3-D expert tensors instead of per-expert keys
    reader: ShardedReader
    num_layers: int
    moe_layers: list[int]
    num_experts: int
    top_k: int | None
    hidden: int
    expert_ffn: int
    shared_ffn: int | None
    fingerprint: dict
    dense_layers: list[int] = field(default_factory=list)  # a dense source's layers with a SwiGLU FFN

    @property
    def dense(self) -> bool:
        """A dense source: every layer one always-on FFN, whose neurons stand in for experts."""
        return not self.family.moe

    @property
    def ffn_layers(self) -> list[int]:
        """The layers whose FFN knowledge the toolbox works on: MoE layers, or a dense model's FFN layers."""
        return self.dense_layers if self.dense else self.moe_layers
    config_path: Path | None = None  # the config.json read (None: none beside the weights)
    config_disagrees: list[str] = field(default_factory=list)  # where config.json and the weights differ

    # ---- reads -------------------------------------------------------------------------------
    def expert_requests(self, layer: int, j: int) -> list[tuple[str, object]]:
        """The (name, slice) reads for expert j of layer i, in (gate, up, down) order."""
        if self.fused:
            gu, dn, inner = arch.FUSED_GATE_UP.format(i=layer), arch.FUSED_DOWN.format(i=layer), self.expert_ffn
            return [(gu, (j, slice(0, inner))), (gu, (j, slice(inner, 2 * inner))), (dn, j)]
        return [(k.format(i=layer, j=j), None) for k in arch.expert_keys(self.family)]

    def experts(self, layer: int, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Experts `ids` of one MoE layer as (gate [I,H], up [I,H], down [H,I]); one open per shard."""
        self._check_layer(layer)
        for j in ids:
            if not 0 <= j < self.num_experts:
                raise XpertError(f"{self.path}: layer {layer} has experts 0..{self.num_experts - 1}, not {j}")
        reqs = [r for j in ids for r in self.expert_requests(layer, j)]
        flat = self.reader.read(reqs)
        return [tuple(flat[3 * n: 3 * n + 3]) for n in range(len(ids))]  # type: ignore[misc]

    def expert(self, layer: int, j: int):
        return self.experts(layer, [j])[0]

    def mlp(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A dense layer's FFN as (gate [N,H], up [N,H], down [H,N]); one open per shard."""
        if layer not in self.dense_layers:
            raise XpertError(f"{self.path}: layer {layer} has no dense FFN (FFN layers: {_ranges(self.dense_layers)})")
        g, u, d = self.reader.read([(k.format(i=layer), None) for k in arch.MLP_KEYS])
        n, h = self.expert_ffn, self.hidden
        if tuple(g.shape) != (n, h) or tuple(u.shape) != (n, h) or tuple(d.shape) != (h, n):
            raise XpertError(f"{self.path}: layer {layer} FFN has shapes gate {list(g.shape)}, up {list(u.shape)}, "
                             f"down {list(d.shape)}; expected [{n}, {h}], [{n}, {h}], [{h}, {n}]")
        return g, u, d

    def finite_experts(self, layer: int, ids: list[int]):
        """experts(), refused when one holds NaN or Inf (before it is consolidated, copied or compared)."""
        experts = self.experts(layer, ids)
        for j, e in zip(ids, experts):
            self.refuse_nonfinite(f"expert {j} of layer {layer}", *e)
        return experts

    def router(self, layer: int) -> torch.Tensor:
        self._check_layer(layer)
        return self.reader.read_one(arch.router_key(self.family, self.fused).format(i=layer))

    def shared(self, layer: int):
        """The shared expert(s) of a layer as (gate, up, down), or None for families without one; refused
        when they hold NaN or Inf (every reader copies or runs them)."""
        keys = arch.shared_keys(self.family)
        if keys is None:
            return None
        self._check_layer(layer)
        mats = tuple(self.reader.read([(k.format(i=layer), None) for k in keys]))
        for k, m in zip(keys, mats):
            self.refuse_nonfinite(k.format(i=layer), m)
        return mats

    def tensor(self, name: str) -> torch.Tensor:
        return self.reader.read_one(name)

    def has(self, name: str) -> bool:
        return name in self.reader.weight_map

    def _check_layer(self, layer: int) -> None:
        if layer not in self.moe_layers:
            raise XpertError(f"{self.path}: layer {layer} is not an MoE layer (MoE layers: {_ranges(self.moe_layers)})")

    def require_moe(self, why: str = "this command needs an MoE model") -> "Checkpoint":
        if not self.family.moe or not self.moe_layers:
            raise XpertError(f"{self.path}: a dense {self.family.name} checkpoint; {why}")
        return self

    def require_ffn_source(self) -> "Checkpoint":
        """An MoE with routers, or a dense model with SwiGLU FFNs (stats, select, graft, fidelity take both)."""
        if self.dense:
            if not self.dense_layers:
                raise XpertError(f"{self.path}: a dense {self.family.name} checkpoint without "
                                 "model.layers.N.mlp.gate_proj/up_proj/down_proj FFNs")
            act = self.config.get("hidden_act") or self.config.get("hidden_activation") or "silu"
            if act not in ("silu", "swish"):
                raise XpertError(f"{self.path}: its FFN activation is {act!r}; dense sources need SwiGLU (silu), "
                                 "the FFN every target here computes")
            return self
        return self.require_moe()

    # ---- description ---------------------------------------------------------------------------
    @property
    def dtype(self) -> str:
        names = list(self.reader.weight_map)
        return _DTYPES.get(self.reader.dtype(names[0]), self.reader.dtype(names[0])) if names else "?"

    @property
    def vocab(self) -> int | None:
        """The vocabulary size: the embedding's rows, else config.json's."""
        if self.has("model.embed_tokens.weight"):
            return self.reader.shape("model.embed_tokens.weight")[0]
        v = self.config.get("vocab_size")
        return int(v) if v is not None else None

    def attention_heads(self) -> tuple[int, int, int] | None:
        """(heads, kv heads, head_dim): config.json's, else what the shapes tell (per-head QK-norm gives
        the head size, q/k projections then give the counts); None when neither says."""
        cfg = self.config
        if cfg.get("num_attention_heads"):
            heads = int(cfg["num_attention_heads"])
            kv = int(cfg.get("num_key_value_heads") or heads)
            hd = cfg.get("head_dim") if self.family.attention == "standard" and cfg.get("head_dim") else None
            return heads, kv, int(hd or self.hidden // heads)
        layer = f"model.layers.{(self.moe_layers or [0])[0]}.self_attn"
        if self.family.qk_norm == "head" and all(self.has(f"{layer}.{k}.weight") for k in ("q_norm", "q_proj", "k_proj")):
            hd = self.reader.shape(f"{layer}.q_norm.weight")[0]
            return (self.reader.shape(f"{layer}.q_proj.weight")[0] // hd,
                    self.reader.shape(f"{layer}.k_proj.weight")[0] // hd, hd)
        return None

    def summary(self) -> dict:
        n_params = 0
        for name in self.reader.weight_map:
            numel = 1
            for d in self.reader.shape(name):
                numel *= d
            n_params += numel
        shared_n = self.config.get("n_shared_experts", 1 if self.shared_ffn else 0) if self.shared_ffn else 0
        heads, kv_heads, head_dim = self.attention_heads() or (None, None, None)
        return {
            "path": str(self.path),
            "family": self.family.name,
            "layout": "fused" if self.fused else ("per-expert" if self.family.moe else "dense"),
            "layers": self.num_layers,
            "moe_layers": _ranges(self.moe_layers),
            "dense_layers": _ranges([i for i in range(self.num_layers) if i not in self.moe_layers]),
            "experts": self.num_experts,
            "top_k": self.top_k,
            "shared_experts": shared_n,
            "shared_ffn": self.shared_ffn,
            "hidden": self.hidden,
            "expert_ffn": self.expert_ffn,
            "heads": heads,
            "kv_heads": kv_heads,
            "head_dim": head_dim,
            "vocab": self.vocab,
            "dtype": self.dtype,
            "parameters": n_params,
            "bytes": tree_size(self.files),
            "files": len(self.files),
            # only when config.json disagrees: a truthful checkpoint's summary is what it was
            **({"config_disagrees": list(self.config_disagrees)} if self.config_disagrees else {}),
        }

    def refuse_nonfinite(self, what: str, *tensors: torch.Tensor) -> None:
        """One line naming `what` when any of its weights is NaN or Inf (before it is copied or used)."""
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            raise XpertError(f"{self.path}: {what} has NaN or Inf weights")

    def finite_tensor(self, name: str) -> torch.Tensor:
        """Tensor `name`, refused when it holds NaN or Inf."""
        t = self.tensor(name)
        self.refuse_nonfinite(name, t)
        return t


_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def _ranges(xs: list[int]) -> str:
    """[0,1,2,5] -> '0-2,5' (short and readable in tables)."""
    out, start = [], None
    for n, x in enumerate(xs):
        if start is None:
            start = x
        if n + 1 == len(xs) or xs[n + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ",".join(out) or "-"


def _load_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise XpertError(f"{path}: not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(obj, dict):
        raise XpertError(f"{path}: expected a JSON object")
    return obj


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_SHARD_NAME = re.compile(r".*-\d+-of-\d+\.safetensors")


def resolve_source(src: str | Path) -> Path:
    """A local path as given; a missing path that reads as a hub id (org/name) resolves to its snapshot
    in the local Hugging Face cache, as transformers would offline. Nothing is downloaded."""
    src = Path(src)
    if src.exists() or not _HUB_ID.fullmatch(str(src)) or src.parent.exists():
        return src  # a local path (a missing one is reported by whoever reads it)
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(str(src), local_files_only=True))
    except Exception:  # not cached (huggingface_hub raises several types), or a malformed id
        raise XpertError(f"{src}: no such file or directory, nor a model in the local Hugging Face cache "
                         "(xpertctl does not download: fetch it first, e.g. `hf download`, or pass its directory)") from None


def _shard_of(src: Path) -> Path | None:
    """The index naming `src` as one of several shards, if there is one beside it."""
    index = src.parent / INDEX
    if index.is_file():
        try:
            wm = json.loads(index.read_text()).get("weight_map") or {}
        except (OSError, ValueError, AttributeError):
            wm = {}
        if src.name in set(wm.values()) and len(set(wm.values())) > 1:
            return index
    return index if _SHARD_NAME.fullmatch(src.name) else None


def _weight_files(src: Path) -> tuple[list[Path], dict[str, str] | None, dict, Path | None]:
    """Weight files, optional weight_map, config and the index path for a directory or a file."""
    if src.is_file():
        kind = provenance.kind_of(src)
        if kind not in (None, "weights", "grafted"):  # an xpertctl artifact given where a model belongs
            raise XpertError(f"{src}: is {provenance.describe(kind)}, expected a model checkpoint (directory or weights file)")
        if src.suffix != ".safetensors":
            raise XpertError(f"{src}: expected a model directory or a .safetensors file")
        index = _shard_of(src)
        if index is not None:  # its keys are a fraction of the model: never guess a family from them
            where = f"its directory {src.parent}" if index.is_file() else f"the model directory with its {INDEX}"
            raise XpertError(f"{src}: one shard of a sharded checkpoint; pass {where}")
        cfg_path = src.parent / "config.json"
        return [src], None, (_load_json(cfg_path) if cfg_path.is_file() else {}), None
    if not src.is_dir():
        raise XpertError(f"{src}: no such file or directory")
    cfg_path = src / "config.json"
    config = _load_json(cfg_path) if cfg_path.is_file() else {}
    index = src / INDEX
    if index.is_file():
        idx = _load_json(index)
        wm = idx.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise XpertError(f"{index}: no weight_map")
        files = []
        for fname in sorted(set(wm.values())):
            p = src / fname
            if not p.is_file():
                raise XpertError(f"{index}: names shard {fname!r}, which is missing")
            files.append(p)
        return files, wm, config, index
    single = src / "model.safetensors"
    if single.is_file():
        return [single], None, config, None
    others = sorted(src.glob("*.safetensors"))
    if len(others) == 1:
        return others, None, config, None
    if (src / "pytorch_model.bin").exists() or list(src.glob("pytorch_model-*.bin")):
        raise XpertError(f"{src}: only PyTorch .bin weights; convert to safetensors first")
    raise XpertError(f"{src}: no model.safetensors or {INDEX} (not a model directory?)")


def fingerprint(src: Path, files: list[Path], index: Path | None) -> dict:
    """The weights' fingerprint: their headers and index (cheap, and changes with the weights' layout)."""
    return provenance.fingerprint(src, files + ([index] if index is not None else []))


def config_disagreements(ck: Checkpoint) -> list[str]:
    """Where config.json states another size than the weights have, one line each (the first layer,
    expert or tensor that shows it), from the architecture table's sizes: read from the safetensors
    headers only. What a model built from that config would get wrong, said before it is built."""
    cfg, fam, reader = ck.config, ck.family, ck.reader
    if not cfg:
        return []
    where = ck.config_path or "config.json"
    v = arch.stated(fam, cfg)
    on_disk = sorted({int(m.group(1)) for k in reader.weight_map if (m := _LAYER_RE.match(k))})
    out: list[str] = []
    if "layers" in v and v["layers"][0] != len(on_disk):
        out.append(f"{where}: {v['layers'][1]}, but the weights have layers {_ranges(on_disk)} (model.layers.N.*)")
    if fam.moe and ck.moe_layers and (placed := arch.stated_moe_layers(cfg, len(on_disk))) is not None:
        moe, text = placed
        rkey = arch.router_key(fam, ck.fused)
        wrong = next((i for i in on_disk if (i in moe) != (i in ck.moe_layers)), None)
        if wrong is not None:
            what = (f"an MoE layer, but the weights have no router {rkey.format(i=wrong)}" if wrong in moe else
                    f"dense, but the weights have its router {rkey.format(i=wrong)}")
            out.append(f"{where}: {text} makes layer {wrong} {what}")
    dense = [i for i in on_disk if i not in ck.moe_layers]
    layer_sets = {"": [None], "all": on_disk, "moe": ck.moe_layers, "dense": dense}
    blamed: set[str] = set()  # config keys already named: a size derived from them is not named again
    for size in arch.sizes(fam):
        if not all(n in v for n in size.names):
            continue
        keys_used = {k for n in size.names for k in _KEY_RE.findall(v[n][1])}
        if keys_used & blamed:
            continue
        want = size.times
        for n in size.names:
            want *= v[n][0]
        for i in layer_sets[size.layers]:
            key = size.key if i is None else size.key.replace("{i}", str(i))
            if "{j}" in key:
                rows = reader.shape(arch.router_key(fam, ck.fused).format(i=i))[0] if ck.moe_layers else 0
                keys = [key.format(j=j) for j in range(rows)]
            else:
                keys = [key]
            bad = next((k for k in keys if k in reader.weight_map and len(reader.shape(k)) > size.dim
                        and not _fits(want, reader.shape(k)[size.dim], size.bound)), None)
            if bad is None:
                continue
            shape = reader.shape(bad)
            if size.bound:
                text = f"{v[size.names[0]][1]} (must be 1..{shape[size.dim]}, the experts to choose from)"
            else:
                text = " × ".join(v[n][1] for n in size.names) + (f" × {size.times}" if size.times != 1 else "")
                text += "" if text.endswith(f"={want}") else f" = {want}"
            out.append(f"{where}: {text}, but {bad} has shape {shape}")
            blamed |= keys_used
            break
    return out


_KEY_RE = re.compile(r"([a-z_]+)=")


def _fits(want: int, have: int, bound: bool) -> bool:
    return 1 <= want <= have if bound else want == have


def check_model_dir(path: Path) -> None:
    """Before transformers builds a model from a directory (train, eval): refuse a config.json that
    disagrees with the safetensors weights beside it. Model types outside the architecture table and
    directories without safetensors are left to transformers."""
    path = Path(path)
    cfg = path / "config.json"
    if not cfg.is_file() or not any(path.glob("*.safetensors")):
        return
    if _load_json(cfg).get("model_type") in arch.BY_MODEL_TYPE:
        open_checkpoint(path)


def open_checkpoint(src: str | Path, *, check_config: bool = True) -> Checkpoint:
    """The checkpoint at `src`, read lazily. Its config.json is checked against the weights' shapes
    (config_disagreements): the first disagreement is an error unless check_config is False (inspect,
    which reports them all)."""
    src = resolve_source(src)
    files, wm, config, index = _weight_files(src)
    reader = open_files(files, wm)
    keys = set(reader.weight_map)
    shapes = {k: reader.shape(k) for k in keys if k.endswith(("q_norm.weight", "q_proj.weight"))}

    family = None
    mt = config.get("model_type")
    if mt is not None:
        family = arch.BY_MODEL_TYPE.get(mt)
        if family is None:
            known = ", ".join(sorted(arch.BY_MODEL_TYPE))
            raise XpertError(f"{src}: unsupported model_type {mt!r} (supported: {known})")
    else:
        found = arch.detect(keys, shapes)
        if len(found) != 1:
            what = "match no supported family" if not found else \
                f"are ambiguous ({', '.join(f.name for f in found)}); put its config.json next to it"
            raise XpertError(f"{src}: key names {what}")
        family = found[0]

    layers = sorted({int(m.group(1)) for k in keys if (m := _LAYER_RE.match(k))})
    if not layers:
        raise XpertError(f"{src}: no model.layers.N.* tensors (not a decoder checkpoint?)")
    num_layers = layers[-1] + 1  # the weights' truth; a config.json that says otherwise is reported below

    fused = family.moe and arch.FUSED_GATE_UP.format(i=layers[-1]) in keys
    rkey = arch.router_key(family, fused) if family.moe else None
    moe_layers = [i for i in layers if rkey and rkey.format(i=i) in keys]

    num_experts = expert_ffn = 0
    hidden = reader.shape("model.embed_tokens.weight")[1] if "model.embed_tokens.weight" in keys else \
        int(config.get("hidden_size", 0))
    shared_ffn = None
    dense_layers: list[int] = []
    if moe_layers:
        i = moe_layers[0]
        num_experts, hidden = reader.shape(rkey.format(i=i))
        if fused:
            gu = reader.shape(arch.FUSED_GATE_UP.format(i=i))
            if gu[0] != num_experts or gu[1] % 2:
                raise XpertError(f"{src}: fused gate_up_proj of layer {i} has shape {gu}, expected [{num_experts}, 2I, {hidden}]")
            expert_ffn = gu[1] // 2
        else:
            gk = arch.expert_keys(family)[0].format(i=i, j=0)
            if gk not in keys:
                raise XpertError(f"{src}: router found but no expert tensor {gk!r}")
            expert_ffn = reader.shape(gk)[0]
        sk = arch.shared_keys(family)
        if sk and sk[0].format(i=i) in keys:
            shared_ffn = reader.shape(sk[0].format(i=i))[0]
    elif family.moe:
        pass  # an MoE family with no routers on disk: inspect shows it, require_moe() refuses it
    else:
        key = f"model.layers.{layers[0]}.mlp.gate_proj.weight"
        expert_ffn = reader.shape(key)[0] if key in keys else int(config.get("intermediate_size", 0))
        if not hidden and key in keys:
            hidden = reader.shape(key)[1]
        dense_layers = [i for i in layers if all(k.format(i=i) in keys for k in arch.MLP_KEYS)]

    top_k = config.get("num_experts_per_tok") if family.moe else None
    cfg_path = (src if src.is_dir() else src.parent) / "config.json"
    ck = Checkpoint(
        path=src, files=files, config=config, family=family, fused=fused, reader=reader,
        num_layers=num_layers, moe_layers=moe_layers, num_experts=num_experts,
        top_k=int(top_k) if top_k is not None else None, hidden=hidden, expert_ffn=expert_ffn,
        shared_ffn=shared_ffn, fingerprint=fingerprint(src, files, index), dense_layers=dense_layers,
        config_path=cfg_path if config else None,
    )
    ck.config_disagrees = config_disagreements(ck)
    if check_config and ck.config_disagrees:
        raise XpertError(ck.config_disagrees[0])
    return ck
