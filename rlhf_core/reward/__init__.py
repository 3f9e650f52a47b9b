"""Reward model: Bradley-Terry training on human and AI (soft) labels, evaluation, and the gate before PPO."""
