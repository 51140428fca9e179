"""Measuring a window of work: memory, time, energy, utilisation and FLOPs.

What is measured is kept apart from how it is launched: a stage opens a :class:`Window`, does its
work, and asks the window for :class:`~effllm.records.Metric` values. Anything this machine cannot
measure comes back ``unavailable`` (never 0).
"""

from effllm.measure.energy import EnergyMeter  # noqa: F401
from effllm.measure.flops import count_flops  # noqa: F401
from effllm.measure.memory import MemorySampler  # noqa: F401
from effllm.measure.timing import Timer, latency_summary, sync  # noqa: F401
from effllm.measure.window import Window  # noqa: F401
