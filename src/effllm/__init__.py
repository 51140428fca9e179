"""effllm: the library behind the EfficientLLM benchmark pipeline.

Rooms follow the paper's concepts: ``data`` (corpora, tokenizer, reasoning set), ``models`` (the
decoder family), ``training`` (pretraining and fine-tuning loops), ``inference`` (precisions and
decoding), ``measure`` (memory, time, energy, FLOPs), ``records`` (the one metric-record type),
``analysis`` (aggregation, normalisation, scores, ranks) and ``plots`` (figures).
"""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes (imported by peft) logs a missing optional `kernels` package at every import; the
# native CPU kernels are used instead. Never install `kernels`: it would fetch code from the Hub.
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)
