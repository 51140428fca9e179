"""The GPU suite (``pytest -m gpu``): every test here is marked ``gpu`` and skipped, with the
reason, where torch sees no CUDA device (this project's CI and development machines)."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    here = str(__file__).rsplit("/", 1)[0]
    reason = None
    if not torch.cuda.is_available():
        reason = (f"no CUDA device: torch {torch.__version__} "
                  f"({'CUDA ' + torch.version.cuda if torch.version.cuda else 'a CPU build'})")
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.gpu)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
