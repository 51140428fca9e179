"""A base model's weights read once per node, straight into the dtype and onto the device each
parameter trains in.

``from_pretrained`` on every torchrun rank puts one host copy of the checkpoint in each rank's
process (8 ranks x 96 GB of fp32 at 24B parameters against a node's 512 GB), and loading in fp32
to cast frozen weights to bf16 afterwards holds an fp32 copy of weights that never train. Here
every rank builds the model on the meta device (no memory); rank 0 alone reads the
safetensors checkpoint, one tensor at a time, casts it to that parameter's dtype (bf16 for
frozen weights at bf16 precision, fp32 for trained ones) and moves it to its device; the other
ranks receive each tensor by broadcast on their device and never open the checkpoint. A node's
host memory then holds one tensor of the checkpoint at a time, and no device ever holds a
frozen weight in fp32.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import torch
from torch import nn


def empty_model(model_dir: str | os.PathLike) -> nn.Module:
    """The model of ``model_dir`` with its parameters on the meta device (no memory, no weights
    read) and its buffers real, the weights tied as the config says; the generation settings
    of ``generation_config.json`` when the folder has one (as ``from_pretrained`` reads them)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, GenerationConfig

    from effllm.models.quantize import model_config

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(model_config(model_dir), dtype=torch.float32)
    model.tie_weights()  # from_config under init_empty_weights leaves the head untied
    if (Path(model_dir) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    return model


def checkpoint_files(model_dir: str | os.PathLike) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (one file, or the shards of an index)."""
    from safetensors import safe_open

    folder = Path(model_dir)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {name: folder / file
                for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    with safe_open(single, "pt") as f:
        return dict.fromkeys(f.keys(), single)


def read_tensors(model_dir: str | os.PathLike, groups: dict[str, list[str]]):
    """(name, CPU tensor as stored) for each name of ``groups`` (name -> the names the tensor
    may be stored under: a tied weight's), one at a time, in that order. A tensor the
    checkpoint lacks under every name is an error naming it."""
    from safetensors import safe_open

    where = checkpoint_files(model_dir)
    stored = {name: next((a for a in aliases if a in where), None)
              for name, aliases in groups.items()}
    missing = [n for n, key in stored.items() if key is None]
    if missing:
        raise KeyError(f"{model_dir}: the checkpoint has no tensor(s) {missing[:5]}"
                       f"{' ...' if len(missing) > 5 else ''}")
    with ExitStack() as stack:
        handles = {}
        for name, key in stored.items():
            file = where[key]
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(file, "pt"))
            yield name, handles[file].get_tensor(key)


def tied_groups(model: nn.Module) -> dict[str, list[str]]:
    """The model's state entries still on the meta device, each tensor once under its first
    name, in the model's order -> every name it has (more than one for a tied weight, which a
    checkpoint stores once under one of them)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.device.type == "meta":
            groups.setdefault(id(tensor), []).append(name)
    return {names[0]: names for names in groups.values()}


def load_weights(model: nn.Module, model_dir: str | os.PathLike, device: str | torch.device,
                 dtype_of: Callable[[torch.Tensor], torch.dtype]) -> nn.Module:
    """Fill ``model`` (built by :func:`empty_model`) with the checkpoint's tensors, each in
    ``dtype_of(its meta tensor)`` on ``device`` (see the module's docstring: rank 0 reads,
    the others receive). Returns the model, ties restored, in eval mode as ``from_pretrained``
    leaves it."""
    from effllm.distributed import is_distributed, is_main

    shared = is_distributed()
    groups = tied_groups(model)
    state_now = model.state_dict(keep_vars=True)
    targets = {name: state_now[name] for name in groups}
    state = {}
    if not shared or is_main():
        for name, stored in read_tensors(model_dir, groups):
            meta = targets[name]
            if stored.shape != meta.shape:
                raise ValueError(f"{model_dir}: {name} has shape {tuple(stored.shape)}, the "
                                 f"model {tuple(meta.shape)}")
            # A copy of its own (the stored tensor maps the file), in its dtype on the device.
            state[name] = stored.to(dtype=dtype_of(meta), device=device, copy=True)
            del stored
            if shared:
                torch.distributed.broadcast(state[name], src=0)
    else:
        for name, meta in targets.items():
            state[name] = torch.empty(meta.shape, dtype=dtype_of(meta), device=device)
            torch.distributed.broadcast(state[name], src=0)
    model.load_state_dict(state, strict=False, assign=True)  # keeps requires_grad
    model.tie_weights()
    model.to(device)  # the buffers built from the config
    left = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    if left:
        raise ValueError(f"{model_dir}: not loaded: {left[:5]}")
    return model.eval()
