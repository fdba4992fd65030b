"""The DeepSpeed learner: supervised fine-tuning and GRPO on the rollout stream."""
