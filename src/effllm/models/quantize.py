"""bitsandbytes settings shared by the two places that hold quantised weights: QLoRA's frozen
base (fine-tuning) and post-training int8/int4 (inference).

Which layers stay in high precision is decided here, once: layers the CPU 4-bit kernels cannot
take (docs/metrics.md §8), the output head, MoE routers, and layers a family's forward reads
directly. A model is always loaded fresh from its safetensors with these settings, never
converted in place.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from effllm.specs import QuantSpec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# bitsandbytes' CPU 4-bit eval path repacks each weight into 32-row tiles (asserts
# out_features % 32 == 0) and reshapes absmax to one row of 64-weight blocks per output
# (in_features % 64 != 0 fails with a shape error; tested, bitsandbytes 0.50.2).
INT4_ALIGN = 32
INT4_BLOCK = 64
# Layers whose weight a family's forward reads directly (not through the layer's own forward),
# so a quantised weight breaks it: transformers' pure-PyTorch Mamba computes
# ``dt_proj.weight @ x`` (int8 load: "expected m1 and m2 to have the same dtype").
DIRECT_WEIGHT_USE = {"mamba": ["dt_proj"]}


def model_config(model_dir: str | os.PathLike):
    """The saved model's config, any family; imports our Mamba/RWKV fixes when they apply."""
    from transformers import AutoConfig

    import effllm.models  # noqa: F401 - registers our config with the Auto classes

    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type in ("mamba", "rwkv"):
        import effllm.models.baselines  # noqa: F401 - fixes transformers' Mamba/RWKV defects
    return config


def _architecture(model_dir: str | os.PathLike) -> torch.nn.Module:
    """The saved model's modules on the meta device (no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config(model_dir))


def quantisable_skips(model_dir: str | os.PathLike, align: int = INT4_ALIGN,
                      block: int = INT4_BLOCK) -> list[str]:
    """Full names of linear layers whose widths the CPU 4-bit kernels cannot take (out_features
    not a multiple of ``align`` or in_features of ``block``); they stay in high precision."""
    return sorted(name for name, mod in _architecture(model_dir).named_modules()
                  if isinstance(mod, torch.nn.Linear)
                  and (mod.out_features % align or mod.in_features % block))


def exact_modules(model_dir: str | os.PathLike) -> list[str]:
    """Never quantised: the output head under the family's name for it (tied to the
    embeddings), MoE routers (routing stays exact) and layers in ``DIRECT_WEIGHT_USE``. Our own
    skip list turns off transformers' detection of the head, hence the lookup."""
    model = _architecture(model_dir)
    head = model.get_output_embeddings()
    return sorted({"router", *DIRECT_WEIGHT_USE.get(model.config.model_type, []),
                   *(name for name, mod in model.named_modules() if mod is head)})


def bnb_config(model_dir: str | os.PathLike, precision: str, quant: QuantSpec):
    """(BitsAndBytesConfig for ``int8`` (LLM.int8) or ``int4`` (NF4/FP4), a note naming the
    layers kept in high precision for the kernels' sake, or None)."""
    from transformers import BitsAndBytesConfig

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    keep = exact_modules(model_dir)
    if precision == "int4":
        skips = quantisable_skips(model_dir)
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type or "nf4",
            bnb_4bit_use_double_quant=quant.double_quant is not False,
            bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype or "bf16"],
            llm_int8_skip_modules=[*keep, *skips])
    elif precision == "int8":
        skips = []
        config = BitsAndBytesConfig(load_in_8bit=True,
                                    llm_int8_threshold=(6.0 if quant.threshold is None
                                                        else quant.threshold),
                                    llm_int8_skip_modules=keep)
    else:
        raise ValueError(f"precision {precision!r} is not a bitsandbytes precision (int8, int4)")
    note = (f"kept unquantised (out_features not a multiple of {INT4_ALIGN} or in_features of "
            f"{INT4_BLOCK}): {sorted({s.split('.')[-1] for s in skips})}" if skips else None)
    return config, note


def load_quantised(model_dir: str | os.PathLike, precision: str, quant: QuantSpec,
                   dtype: torch.dtype):
    """A fresh model with int8/int4 linears; other parameters in ``dtype``. Returns
    (model, note)."""
    from transformers import AutoModelForCausalLM

    from effllm.distributed import place

    config, note = bnb_config(model_dir, precision, quant)
    # The whole model on this job's device, as the bf16/fp16 runs are (not split over GPUs).
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=config, dtype=dtype, device_map={"": place().device})
    return model, note
