"""One LightningModule per algorithm: sft, reward_model, dpo, ppo, grpo."""
