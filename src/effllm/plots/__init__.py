"""Figures. Every figure takes its style from :mod:`effllm.plots.style` and nothing else."""
