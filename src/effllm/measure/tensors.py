"""Memory of the technique, not of the process: a tensor-level account of one unit of work.

The process's RSS on a CPU carries Python, torch and the data (~0.4 GB), which at our model
sizes swamps what a technique changes. torch's ``MemTracker`` (a dispatch mode with module and
optimiser hooks) books every storage the work allocates, and every parameter, buffer, gradient
and optimiser state of the tracked modules, by kind. We run one representative unit of work (a
training step, a generate()) under it, on the run's real tensors or on fake ones (the plan), and
read the peak by part and a time-weighted mean: the same account on any device.

Tensors torch does not see as parameters (bitsandbytes' quantisation state: absmax, codebooks,
LLM.int8's ``CB``/``SCB``; HQQ's scales and zero points) are added as the constant part
``quant_state``, each storage once. A quantised weight that is a tensor subclass (torchao's) is
counted by the plain tensors it holds, never by its logical dtype's size.
"""

from __future__ import annotations

import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from effllm.records import Metric

GB = 1e9
# MemTracker's kinds -> our parts, in display order.
KINDS = {"PARAM": "params", "BUFFER": "buffers", "GRAD": "grads", "OPT": "optimizer",
         "ACT": "activations", "TEMP": "temporaries", "OTH": "other"}
PARTS = (*KINDS.values(), "quant_state")
METHOD = "tensor_account"


def _quantisation_state(module: torch.nn.Module) -> list[torch.Tensor]:
    """Tensors bitsandbytes keeps beside a layer's weight: the 4-bit ``quant_state`` (absmax,
    codebook, offset, and double quant's nested ``state2``) and LLM.int8's ``CB``/``SCB``, which
    sit on the weight after loading and move to ``module.state`` on the first forward; and
    HQQ's ``meta`` (scales and zero points, quantised themselves when so configured)."""
    weight = getattr(module, "weight", None)
    # torchao's weight holds its data in inner tensors: counted as the weight's own
    holders, state = [None if _quantised_subclass(weight) else weight], getattr(
        weight, "quant_state", None)
    while state is not None:
        holders.append(state)
        state = getattr(state, "state2", None)
    if hasattr(getattr(module, "state", None), "SCB"):  # bitsandbytes' MatmulLtState
        holders.append(module.state)
    found = [v for h in holders if h is not None and hasattr(h, "__dict__")
             for v in vars(h).values() if isinstance(v, torch.Tensor)]
    meta = getattr(module, "meta", None) if hasattr(module, "W_q") else None  # HQQLinear
    while isinstance(meta, dict):
        found += [v for v in meta.values() if isinstance(v, torch.Tensor)]
        meta = next((v for k, v in meta.items() if k in ("meta_scale", "meta_zero")), None)
    return found


def _quantised_subclass(t) -> bool:
    """A torchao quantised weight: a tensor subclass whose ``nbytes`` is its logical dtype's
    and whose data pointer is 0 (DTensor shards and bitsandbytes' parameters are not)."""
    return type(t).__module__.startswith("torchao.") and hasattr(type(t), "__tensor_flatten__")


def _plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s data: itself, or a torchao weight's inner tensors."""
    if _quantised_subclass(t):
        names, _ = t.__tensor_flatten__()
        return [p for name in names if isinstance(getattr(t, name), torch.Tensor)
                for p in _plain_tensors(getattr(t, name))]
    return [t]


def _distinct_bytes(tensors, seen: set) -> int:
    """Bytes of the tensors not in ``seen`` (then added): shared or tied memory counts once."""
    total = 0
    for t in (p for tensor in tensors for p in _plain_tensors(tensor)):
        key = (t.data_ptr(), t.nbytes)
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total


def linear_weight_bytes(model) -> dict[str, int]:
    """Bytes each linear layer's weight holds now (bias excluded): packed 4-bit or int8 data plus
    its quantisation state, or a plain weight's nbytes."""
    return {name: _distinct_bytes([mod.W_q if hasattr(mod, "W_q") else mod.weight,
                                   *_quantisation_state(mod)], set())
            for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) or hasattr(mod, "W_q")}  # or HQQLinear


def weight_bytes(model) -> int:
    """Bytes held by all parameters and buffers plus bitsandbytes' quantisation state; tied once."""
    seen: set = set()
    return sum(_distinct_bytes([*mod.parameters(recurse=False), *mod.buffers(recurse=False),
                                *_quantisation_state(mod)], seen) for mod in model.modules())


def quant_state_bytes(model) -> int:
    """Bytes of quantisation state that are neither parameters nor buffers (MemTracker cannot
    see them: they exist before the work and belong to no module's parameters)."""
    seen: set = {(p.data_ptr(), p.nbytes) for t in (*model.parameters(), *model.buffers())
                 for p in _plain_tensors(t)}
    return sum(_distinct_bytes(_quantisation_state(mod), seen) for mod in model.modules())


@dataclass
class TensorAccount:
    """Bytes live during the tracked work on one device, by part.

    ``at_peak``: the parts at the moment the total peaked (for a training step often the
    optimiser step, when activations are already freed); ``part_peaks``: each part's own
    largest value; ``activation_peak``: activations and temporaries together at their largest.
    ``mean`` is time-weighted over the work (tracking slows it, evenly per op).
    """

    device: str
    peak: int
    mean: float
    at_peak: dict[str, int]
    part_peaks: dict[str, int]
    activation_peak: int
    seconds: float
    kv_cache: int | None = None  # bytes the decoding state held at the end (inference)
    notes: list[str] = field(default_factory=list)
    # Per phase marked with Tracking.phase(): the parts when that phase's total peaked (a plan
    # extrapolates each phase on its own; the overall peak is the largest phase's).
    phases: dict[str, dict[str, int]] = field(default_factory=dict)
    phase_part_peaks: dict[str, dict[str, int]] = field(default_factory=dict)  # each its own

    def metrics(self, what: str) -> dict[str, Metric]:
        """The account as metrics: the tensor peak and mean, and the parts a technique moves."""
        note = f"{what}; {', '.join(self.notes)}" if self.notes else what

        def gb(value: float, desc: str) -> Metric:
            return Metric.measured(value / GB, "GB", METHOD, f"{desc}; {note}")

        parts = self.at_peak
        out = {
            "memory_tensor_peak": gb(self.peak, f"largest total of live tensors on {self.device}"),
            "memory_tensor_mean": gb(self.mean, "time-weighted mean of live tensors"),
            "memory_weights": gb(parts["params"] + parts["buffers"] + parts["quant_state"],
                                 "parameters, buffers and quantisation state"),
            "memory_grads": gb(self.part_peaks["grads"], "gradients at their largest"),
            "memory_optimizer": gb(self.part_peaks["optimizer"],
                                   "optimiser state at its largest"),
            "memory_activations": gb(self.activation_peak,
                                     "activations and temporaries together at their largest"),
        }
        if self.kv_cache is not None:
            out["memory_kv_cache"] = gb(self.kv_cache, "the decoding state after generation")
        return out

    def describe(self) -> dict:
        """For provenance: every part at the peak and at its own largest, in bytes."""
        return {"device": self.device, "peak": self.peak, "mean": round(self.mean),
                "at_peak": self.at_peak, "part_peaks": self.part_peaks,
                "activation_peak": self.activation_peak, "kv_cache": self.kv_cache,
                "seconds": round(self.seconds, 4), "notes": self.notes}


def _tracker_class():
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        """MemTracker that also keeps each part's largest value and the total's time series
        (every allocation and free passes through ``_update_snap``)."""

        def __init__(self):
            super().__init__()
            self.series: list[tuple[float, int]] = []
            self.part_max: dict[str, int] = {}
            self.act_max = 0
            self._seen: set = set()
            self.phase = "work"
            self.phase_peaks: dict[str, dict[str, int]] = {}
            self.phase_part_max: dict[str, dict[str, int]] = {}

        # Module-wise snapshots (MemTracker's per-module report) are not needed and refuse a
        # module called twice in one window (generate()): keep only what the booking needs,
        # each module's parameters tracked once and the recomputation (checkpointing) region.
        def _pre_fw_hook(self, module, inputs):
            if module not in self._seen:
                self._seen.add(module)
                self._track_module_params_and_buffers(module, install_grad_hooks=True)
            elif self._mod_tracker.is_bw and self._ac_mod is None:
                self._ac_mod = weakref.ref(module)
                self._in_ac = True

        def _post_fw_hook(self, module, inputs, outputs):
            if self._ac_mod is not None and self._ac_mod() is module:
                self._ac_mod = None
                self._in_ac = False

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            # As MemTracker's, but gradient hooks only on parameters that can have a gradient
            # (bitsandbytes' int8 weights are parameters that never require one).
            from torch.distributed._tools.mem_tracker import _MemRefType

            def on_grad(grad):
                self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

            for param in module.parameters():
                self._update_and_maybe_create_winfos(param, _MemRefType.PARAM)
                if param.grad is not None:
                    on_grad(param.grad)
                if (install_grad_hooks and param.requires_grad
                        and param not in self._param_to_grad_hook_handles):
                    self._param_to_grad_hook_handles[param] = (
                        param.register_hook(on_grad),
                        param.register_post_accumulate_grad_hook(lambda p: on_grad(p.grad)))
            for buffer in module.buffers():
                self._update_and_maybe_create_winfos(buffer, _MemRefType.BUFFER)
            return 0, 0  # (MemTracker's module-wise sums, unused here)

        def _pre_bw_hook(self, module, args):
            pass

        def _post_bw_hook(self, module, args):
            pass

        def _update_peak_stats(self, peak_state):
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)

        def _update_snap(self, u_type, winfo, old_mem_consumed=None, old_reftype=None):
            super()._update_snap(u_type, winfo, old_mem_consumed, old_reftype)
            if not self._recording or winfo.device != self.device:
                return
            snap = self._curr_mem_snap.get(winfo.device, {"Total": 0})
            self.series.append((time.perf_counter(), snap["Total"]))
            for kind, amount in snap.items():
                name = getattr(kind, "name", kind)
                if amount > self.part_max.get(name, 0):
                    self.part_max[name] = amount
            act = sum(v for k, v in snap.items() if getattr(k, "name", "") in ("ACT", "TEMP"))
            self.act_max = max(self.act_max, act)
            if snap["Total"] > self.phase_peaks.get(self.phase, {}).get("Total", -1):
                self.phase_peaks[self.phase] = {getattr(k, "name", k): int(v)
                                                for k, v in snap.items()}
            most = self.phase_part_max.setdefault(self.phase, {})
            for kind, amount in snap.items():
                name = getattr(kind, "name", kind)
                most[name] = max(most.get(name, 0), int(amount))

        _recording = False
        device: torch.device | None = None

    return Tracker


def _time_weighted(series: list[tuple[float, int]], end: float) -> float:
    """Mean of a step function (each value holds until the next event) over its span."""
    if not series:
        return 0.0
    span = end - series[0][0]
    if span <= 0:
        return float(series[-1][1])
    area = sum(v * (t1 - t0) for (t0, v), (t1, _) in zip(series, [*series[1:], (end, 0)]))
    return area / span


class Tracking:
    """Handle of :func:`track`: ``account`` is set when the block ends; :meth:`phase` names the
    part of the work that follows (forward, backward, optimiser step), each peak kept apart."""

    account: TensorAccount | None = None
    _tracker = None

    def phase(self, name: str) -> None:
        self._tracker.phase = name


@contextmanager
def track(*tracked, device: torch.device | str | None = None, extra_bytes: int = 0):
    """Track the tensors of the work inside the block; ``tracked``: the modules and optimisers
    whose existing state counts (parameters, buffers, gradients, optimiser state).

    ``device``: which device's account to keep (default: the first tracked module's);
    ``extra_bytes``: state the tracker cannot see (:func:`quant_state_bytes`), a constant part.
    """
    tracker = _tracker_class()()
    modules = [t for t in tracked if isinstance(t, torch.nn.Module)]
    optimizers = [t for t in tracked if isinstance(t, torch.optim.Optimizer)]
    for module in modules:
        tracker.track_external(module)
    if optimizers:
        tracker.track_external(*optimizers)
    if device is None:
        first = next((p for m in modules for p in m.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = tracker.device = torch.device(device)
    handle = Tracking()
    handle._tracker = tracker
    with tracker:
        start = time.perf_counter()
        before = tracker.get_tracker_snapshot().get(device, {})
        tracker.series.append((start, before.get("Total", 0)))
        tracker._recording = True
        yield handle
        tracker._recording = False
        end = time.perf_counter()
    snap = tracker.get_tracker_snapshot("peak").get(device, {})
    at_peak = {part: int(snap.get(_kind(kind), 0)) for kind, part in KINDS.items()}
    at_peak["quant_state"] = extra_bytes
    part_peaks = {part: max(int(tracker.part_max.get(kind, 0)), at_peak[part])
                  for kind, part in KINDS.items()}
    part_peaks["quant_state"] = extra_bytes
    activation_peak = max(tracker.act_max, at_peak["activations"] + at_peak["temporaries"])
    notes = [] if not extra_bytes else [f"{extra_bytes} B quantisation state added"]
    handle.account = TensorAccount(
        device=str(device), peak=int(snap.get("Total", 0)) + extra_bytes,
        mean=_time_weighted(tracker.series, end) + extra_bytes, at_peak=at_peak,
        part_peaks=part_peaks, activation_peak=activation_peak, seconds=end - start,
        notes=notes, phases={name: _parts(snap, extra_bytes)
                             for name, snap in tracker.phase_peaks.items()},
        phase_part_peaks={name: _parts(snap, extra_bytes)
                          for name, snap in tracker.phase_part_max.items()})


def _parts(snap: dict[str, int], extra_bytes: int) -> dict[str, int]:
    """A snapshot by MemTracker kind as our parts, with the total."""
    parts = {part: snap.get(kind, 0) for kind, part in KINDS.items()}
    parts["quant_state"] = extra_bytes
    parts["total"] = snap.get("Total", 0) + extra_bytes
    return parts


def _kind(name: str):
    from torch.distributed._tools.mem_tracker import _MemRefType

    return _MemRefType[name]
