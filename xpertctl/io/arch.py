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
    Family("qwen3", ("qwen3",), "Qwen3ForCausalLM", moe=False, qk_norm="head",
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
