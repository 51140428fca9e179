"""The decoder family. Importing this package registers our config with the Auto classes.

Modules, lowest first (each imports only modules named before it): ``config`` (DecoderConfig),
``positions`` (RoPE, sinusoidal, ALiBi, T5 buckets), ``layers`` (RMSNorm, SwiGLU MLP, attention
inputs); the variants ``mla``, ``nsa``, ``moe``; ``decoder`` (the model, imports a variant only when
a config uses it); ``baselines`` (size-matched non-decoder families) and ``quantize``
(bitsandbytes loading).
"""

from effllm.models.config import DecoderConfig  # noqa: F401
from effllm.models.decoder import DecoderForCausalLM  # noqa: F401
