"""Data preparation: the pretraining corpus, its tokenizer and the step-by-step reasoning set.

Public entry points live in the submodules (``corpus``, ``tokenizer``, ``reasoning``), so importing
one does not pull in another's heavy dependencies (only the tokenizer needs ``transformers``).
"""

from __future__ import annotations


class DataSourceError(RuntimeError):
    """A configured data source is missing offline or malformed; the message says how to fix it."""
