"""The architecture table: every supported family declared as data, in one place.

Key templates use {i} for the layer and {j} for the expert. `block` is the MoE block's attribute on
disk in the per-expert layout; the fused layout (transformers v5, save_original_format=False) always
stores `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows first) and `mlp.experts.down_proj` [E, H, I].
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json "model_type" values
    hf_class: str  # transformers class that runs it
    moe: bool = True
    block: str = "mlp"  # MoE block attribute in the per-expert layout
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down
    shared: str | None = None  # shared-expert MLP attribute inside the block
    shared_gate: str | None = None  # a per-token sigmoid gate on the shared expert's output (Qwen2-MoE)
    experts_key: str = "num_experts"  # config key: number of routed experts
    ffn_key: str = "intermediate_size"  # config key: one expert's FFN width
    qk_norm: str | None = None  # "full": q_norm over all heads (OLMoE); "head": per head (Qwen3)
    attention: str = "standard"  # "mla": DeepSeek's latent attention (cannot be inherited by a Llama)
    scoring: str = "softmax"  # router probabilities: softmax over experts, or DeepSeek-V3's sigmoid
    # where the layer norms sit: "pre" (RMSNorm weights before attention and FFN, what a Llama target has),
    # "post" (OLMo2: after them), "none" (OLMo: LayerNorm without weights); only "pre" can be inherited
    norms: str = "pre"
    by_keys: bool = True  # detectable from key names alone (False: its keys are another family's; config.json decides)
    head_dim_default: int | None = None  # head_dim when config.json omits it (None: hidden / heads)
    # detection from key names alone (bare .safetensors): all `requires` present, no `forbids`
    requires: tuple[str, ...] = ()
    forbids: tuple[str, ...] = ()


FAMILIES: tuple[Family, ...] = (
    Family("olmoe", ("olmoe",), "OlmoeForCausalLM", qk_norm="full",
           requires=(".gate.weight", "q_norm"), forbids=("shared_expert", "kv_a_proj")),
    Family("mixtral", ("mixtral",), "MixtralForCausalLM", block="block_sparse_moe",
           expert_names=("w1", "w3", "w2"), experts_key="num_local_experts",
           requires=(".gate.weight",), forbids=("shared_expert", "kv_a_proj", "q_norm")),
    Family("qwen2_moe", ("qwen2_moe",), "Qwen2MoeForCausalLM", shared="shared_expert", shared_gate="shared_expert_gate",
           ffn_key="moe_intermediate_size",
           requires=("shared_expert_gate.weight",)),
    Family("qwen3_moe", ("qwen3_moe",), "Qwen3MoeForCausalLM", ffn_key="moe_intermediate_size",
           qk_norm="head", requires=(".gate.weight", "q_norm"), forbids=("shared_expert", "kv_a_proj")),
    Family("deepseek_v2", ("deepseek_v2",), "DeepseekV2ForCausalLM", shared="shared_experts", attention="mla",
           experts_key="n_routed_experts", ffn_key="moe_intermediate_size",
           requires=(".gate.weight", "kv_a_proj_with_mqa"), forbids=("e_score_correction_bias",)),
    Family("deepseek_v3", ("deepseek_v3",), "DeepseekV3ForCausalLM", shared="shared_experts", attention="mla",
           experts_key="n_routed_experts", scoring="sigmoid",
           ffn_key="moe_intermediate_size", requires=("e_score_correction_bias",)),
    # dense families: what graft writes (llama, qwen3), and sources whose FFN neurons stats/select/graft use
    # (every layer one SwiGLU FFN at model.layers.{i}.mlp.{gate,up,down}_proj)
    Family("llama", ("llama",), "LlamaForCausalLM", moe=False,
           requires=("mlp.gate_proj.weight", "input_layernorm"), forbids=(".gate.weight", "q_norm")),
    Family("qwen3", ("qwen3",), "Qwen3ForCausalLM", moe=False, qk_norm="head", head_dim_default=128,
           requires=("mlp.gate_proj.weight", "q_norm"), forbids=(".gate.weight", "post_feedforward_layernorm")),
    # a Llama with q/k/v biases (no o_proj bias): a bare file of it reads as llama, config.json says qwen2
    Family("qwen2", ("qwen2",), "Qwen2ForCausalLM", moe=False, by_keys=False),
    Family("mistral", ("mistral",), "MistralForCausalLM", moe=False, by_keys=False),  # Llama's keys
    Family("olmo", ("olmo",), "OlmoForCausalLM", moe=False, norms="none",
           requires=("mlp.gate_proj.weight",), forbids=(".gate.weight", "q_norm", "layernorm")),
    Family("olmo2", ("olmo2",), "Olmo2ForCausalLM", moe=False, qk_norm="full", norms="post",
           requires=("mlp.gate_proj.weight", "post_feedforward_layernorm", "q_norm"), forbids=(".gate.weight",)),
)

BY_NAME = {f.name: f for f in FAMILIES}
BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}

LAYER = "model.layers.{i}"
FUSED_GATE_UP = LAYER + ".mlp.experts.gate_up_proj"
FUSED_DOWN = LAYER + ".mlp.experts.down_proj"
MLP = LAYER + ".mlp"  # a dense layer's FFN module (in memory and, with its projections, on disk)
MLP_KEYS = tuple(f"{MLP}.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj"))


def block(family: Family, fused: bool) -> str:
    return "mlp" if fused else family.block


def router_key(family: Family, fused: bool) -> str:
    return f"{LAYER}.{block(family, fused)}.gate.weight"


def router_modules(family: Family, layer: int) -> list[str]:
    """Where the router module may live in memory (transformers v5 moved Mixtral's block to `mlp`)."""
    return [f"model.layers.{layer}.{b}.gate" for b in dict.fromkeys(("mlp", family.block))]


def expert_keys(family: Family) -> tuple[str, str, str]:
    """Per-expert layout: the (gate, up, down) keys of expert {j} in layer {i}."""
    return tuple(f"{LAYER}.{family.block}.experts.{{j}}.{n}.weight" for n in family.expert_names)


def shared_keys(family: Family) -> tuple[str, str, str] | None:
    if family.shared is None:
        return None
    return tuple(f"{LAYER}.mlp.{family.shared}.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj"))


def shared_gate_key(family: Family) -> str | None:
    return None if family.shared_gate is None else f"{LAYER}.mlp.{family.shared_gate}.weight"


def detect(keys: set[str], shapes: dict[str, list[int]]) -> list[Family]:
    """Families whose key signature matches a key set (used when no config.json says model_type)."""
    def has(s: str) -> bool:
        return any(s in k for k in keys)

    found = []
    for fam in FAMILIES:
        if not fam.by_keys:
            continue
        if not all(has(r) for r in fam.requires) or any(has(f) for f in fam.forbids):
            continue
        if fam.qk_norm is not None:
            qn = next((k for k in sorted(keys) if k.endswith("self_attn.q_norm.weight")), None)
            qp = qn and qn.replace("q_norm", "q_proj")
            if qn is None or qp not in shapes:
                continue
            full = shapes[qn][0] == shapes[qp][0]
            if full != (fam.qk_norm == "full"):
                continue
        found.append(fam)
    return found


# ---- what a config.json states, checked against the weights before a model is built -------------------
# (io.checkpoint.config_disagreements reads this; a family's sizes follow from its fields, not its name)

EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")  # aliases transformers maps


@dataclass(frozen=True)
class Size:
    """A size a config.json states and the weights show: dim `dim` of tensor `key` ({i}: each layer of kind
    `layers`, {j}: each routed expert) equals the product of the stated values `names` (see `stated`) times
    `times`; with `bound`, the stated value lies in 1..that dim instead (top-k of the experts)."""
    names: tuple[str, ...]
    key: str
    dim: int
    layers: str = ""  # "": no {i}; "all", "moe" (layers with a router on disk) or "dense" (the others)
    times: int = 1
    bound: bool = False


ATTN = LAYER + ".self_attn"
QK_NORM_SIZES = {  # listed before the projections: a lie about head_dim alone is blamed on head_dim
    "head": (Size(("head_dim",), ATTN + ".q_norm.weight", 0, "all"), Size(("head_dim",), ATTN + ".k_norm.weight", 0, "all")),
    "full": (Size(("heads", "head_dim"), ATTN + ".q_norm.weight", 0, "all"),
             Size(("kv_heads", "head_dim"), ATTN + ".k_norm.weight", 0, "all")),
    None: (),
}
ATTENTION_SIZES = {
    "standard": (Size(("heads", "head_dim"), ATTN + ".q_proj.weight", 0, "all"),
                 Size(("kv_heads", "head_dim"), ATTN + ".k_proj.weight", 0, "all"),
                 Size(("kv_heads", "head_dim"), ATTN + ".v_proj.weight", 0, "all"),
                 Size(("heads", "head_dim"), ATTN + ".o_proj.weight", 1, "all")),
    "mla": (Size(("q_lora_rank",), ATTN + ".q_a_proj.weight", 0, "all"),
            Size(("kv_lora_rank",), ATTN + ".kv_b_proj.weight", 1, "all"),
            Size(("heads", "qk_head_dim"), ATTN + ".q_proj.weight", 0, "all"),
            Size(("heads", "qk_head_dim"), ATTN + ".q_b_proj.weight", 0, "all"),
            Size(("kv_a_dim",), ATTN + ".kv_a_proj_with_mqa.weight", 0, "all"),
            Size(("heads", "kv_b_head_dim"), ATTN + ".kv_b_proj.weight", 0, "all"),
            Size(("heads", "v_head_dim"), ATTN + ".o_proj.weight", 1, "all")),
}


def sizes(family: Family) -> list[Size]:
    """Every size the config states and where the weights show it, in the order they are checked."""
    out = [Size(("vocab",), "model.embed_tokens.weight", 0), Size(("hidden",), "model.embed_tokens.weight", 1),
           Size(("vocab",), "lm_head.weight", 0), Size(("hidden",), "model.norm.weight", 0)]
    if family.moe:
        for r in dict.fromkeys((router_key(family, False), router_key(family, True))):  # either layout
            out += [Size(("experts",), r, 0, "moe"), Size(("top_k",), r, 0, "moe", bound=True),
                    Size(("hidden",), r, 1, "moe")]
        out += [Size(("expert_ffn",), expert_keys(family)[0], 0, "moe"),
                Size(("expert_ffn",), FUSED_GATE_UP, 1, "moe", times=2)]
        if family.shared:
            out.append(Size(("shared_ffn",), shared_keys(family)[0], 0, "moe"))
    out.append(Size(("dense_ffn",), LAYER + ".mlp.gate_proj.weight", 0, "dense"))
    return out + list(QK_NORM_SIZES[family.qk_norm]) + list(ATTENTION_SIZES[family.attention])


def stated(family: Family, config: dict) -> dict[str, tuple[int, str]]:
    """The sizes a config.json states, by the names `sizes` uses: (value, how the message names it).
    Keys the config leaves out are left out (transformers' defaults are not guessed), except the few
    every class derives the same way (kv heads, head_dim)."""
    v: dict[str, tuple[int, str]] = {}

    def put(name: str, *keys: str) -> None:
        for k in keys:
            x = config.get(k)
            if isinstance(x, int) and not isinstance(x, bool):
                v[name] = (x, f"{k}={x}")
                return

    put("vocab", "vocab_size")
    put("hidden", "hidden_size")
    put("layers", "num_hidden_layers")
    put("heads", "num_attention_heads")
    put("kv_heads", "num_key_value_heads")
    if family.moe:
        put("experts", family.experts_key, *EXPERT_COUNT_KEYS)
        put("top_k", "num_experts_per_tok")
        put("expert_ffn", family.ffn_key)
    put("dense_ffn", "intermediate_size")
    if family.shared:
        put("shared_ffn", "shared_expert_intermediate_size")
        if "shared_ffn" not in v and "n_shared_experts" in config and "expert_ffn" in v:
            n = config["n_shared_experts"]
            if isinstance(n, int):
                v["shared_ffn"] = (n * v["expert_ffn"][0], f"n_shared_experts={n} × {v['expert_ffn'][1]}")
    if "heads" in v and "kv_heads" not in v:
        v["kv_heads"] = (v["heads"][0], f"num_key_value_heads={v['heads'][0]} (as num_attention_heads)")
    if family.attention == "standard":
        put("head_dim", "head_dim")
        if "head_dim" not in v and family.head_dim_default:
            v["head_dim"] = (family.head_dim_default, f"head_dim={family.head_dim_default} (the default)")
        elif "head_dim" not in v and "hidden" in v and v.get("heads", (0,))[0] > 0:
            hd = v["hidden"][0] // v["heads"][0]
            v["head_dim"] = (hd, f"head_dim={hd} (hidden_size={v['hidden'][0]} / num_attention_heads={v['heads'][0]})")
    else:  # latent attention: its own head sizes (config's head_dim is the rope part there)
        for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            put(k, k)
        for name, a, b in (("qk_head_dim", "qk_nope_head_dim", "qk_rope_head_dim"),
                           ("kv_a_dim", "kv_lora_rank", "qk_rope_head_dim"),
                           ("kv_b_head_dim", "qk_nope_head_dim", "v_head_dim")):
            if a in v and b in v:
                v[name] = (v[a][0] + v[b][0], f"({v[a][1]} + {v[b][1]})")
    return v


def stated_moe_layers(config: dict, n: int) -> tuple[set[int], str] | None:
    """Which of n layers the config makes MoE layers (DeepSeek's first_k_dense_replace; Qwen-MoE's
    mlp_only_layers and decoder_sparse_step), and how the message names the keys; None when it does not say."""
    k = config.get("first_k_dense_replace")
    if isinstance(k, int) and not isinstance(k, bool):
        return {i for i in range(n) if i >= k}, f"first_k_dense_replace={k}"
    only, step = config.get("mlp_only_layers"), config.get("decoder_sparse_step")
    if isinstance(only, list) or isinstance(step, int):
        only = only if isinstance(only, list) else []
        step = step if isinstance(step, int) and step > 0 else 1
        return ({i for i in range(n) if i not in only and (i + 1) % step == 0},
                f"mlp_only_layers={only}, decoder_sparse_step={step}")
    return None
