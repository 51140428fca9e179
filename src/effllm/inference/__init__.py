"""Inference: loading a model at a precision, fixed-length decoding benchmarks, evaluation."""
