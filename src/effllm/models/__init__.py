"""The decoder family. Importing this package registers our config with the Auto classes."""

from effllm.models.decoder import (  # noqa: F401
    DecoderConfig,
    DecoderForCausalLM,
)
