"""Training loops: pretraining from scratch and fine-tuning (PEFT via peft)."""
