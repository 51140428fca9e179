"""Small, complete inputs shared by unit and integration tests."""

# A tiny pretraining run spec (the JSON a pretraining job receives): a GQA decoder trained for
# 60 steps with a checkpoint every 10.
SPEC = {
    "run_id": "pretrain/gqa-tiny-s0", "stage": "pretrain", "technique": "gqa", "label": "GQA",
    "size": "tiny", "seed": 0, "group": "attention-tiny", "upstream": None,
    "settings": {
        "model": {"family": "decoder", "hidden_size": 32, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "intermediate_size": 64, "num_key_value_heads": 2,
                  "max_position_embeddings": 64, "rope_theta": 10000.0, "attention": "gqa",
                  "position_encoding": "rope"},
        "train": {"seq_len": 32, "batch_size": 4, "steps": 60, "lr": 3e-3, "min_lr_ratio": 0.1,
                  "warmup_steps": 5, "weight_decay": 0.1, "grad_clip": 1.0, "eval_tokens": 500,
                  "checkpoint_every": 10},
        "long_context": None,
        "measure": {"sample_interval_s": 0.05, "warmup_steps": 2, "peak_flops": None,
                    "threads": 1},
    },
}
