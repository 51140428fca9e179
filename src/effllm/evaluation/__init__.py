"""Evaluation: the quality of a model on held-out data, the same at every stage.

Below training and inference, which both score models with it, so that "perplexity" and
"exact match" mean one thing in the pretraining, fine-tuning and inference records. Submodules:
``perplexity`` (corpus windows), ``scoring`` (completion loss, token accuracy, exact match) and
``harness`` (lm-evaluation-harness task scores of an in-memory model).
"""
