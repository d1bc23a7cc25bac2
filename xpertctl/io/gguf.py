"""GGUF model files (llama.cpp's format) read as a Hugging Face model: weights dequantized by transformers'
own GGUF loader (which needs the `gguf` package: the `real` extra), config and tokenizer files."""
from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import torch

from ..errors import XpertError

EXTRA = "pip install 'xpertctl[real]'"


def require_gguf(what: str) -> None:
    """One line naming the extra when the `gguf` package is missing (checked before any long work)."""
    if importlib.util.find_spec("gguf") is None:
        raise XpertError(f"{what}: reading a GGUF file needs the gguf package; install the extra: {EXTRA}")


def read_model(path: Path, dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], str, dict[str, bytes]]:
    """(state dict, config.json text, tokenizer files) of the GGUF model file `path`, dequantized to `dtype`.
    A tied output head is left out of the state dict, as save_pretrained leaves it out."""
    import transformers
    path = Path(path)
    require_gguf(str(path))
    kw = dict(gguf_file=path.name)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kw)
        tok = transformers.AutoTokenizer.from_pretrained(path.parent, **kw)
    except (ValueError, KeyError, OSError) as e:
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        raise XpertError(f"{path}: not a GGUF model transformers can read ({lines[-1] if lines else type(e).__name__})") from None
    config = model.config
    # the weights are written dequantized: the GGUF's quantization no longer applies to them
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    config.architectures = [type(model).__name__]
    config._name_or_path = ""
    if hasattr(config, "_model_name_or_path"):  # the GGUF's general.name, not a path
        del config._model_name_or_path
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with tempfile.TemporaryDirectory(prefix=".xpertctl-tok-") as d:
        tok.save_pretrained(d)
        files = {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if p.is_file()}
    return state, config.to_json_string(), files  # the config as save_pretrained writes it
