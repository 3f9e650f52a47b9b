"""Our PPO engine: policy, frozen reference, reward and value models; per-token KL penalty, GAE, clipped losses."""
