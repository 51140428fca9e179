"""The GPU plan: what every job of the grid needs on a GPU, simulated before any job runs.

Each job's real unit of work (one optimiser step of its training, or its serving passes) runs
on fake tensors (``FakeTensorMode``: shapes and dtypes, no storage) under the tensor account of
:mod:`effllm.measure.tensors`, with FSDP2 sharding over a fake process group of the job's ranks.
Floors, lowest first: ``workload`` (what a job does, as a JSON-able spec), ``simulate`` (one
workload on fake tensors, cached on disk), ``fit`` (per-rank peak by part, device sizes, GPU
counts, GPU-hours), ``grid`` (the workload of every job of the grid), ``check`` (the refusal of
a job that does not fit) and ``report`` (the plan's table). docs/plan.md says what is exact and
what is estimated.
"""
