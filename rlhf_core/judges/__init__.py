"""AI preference judges (RLAIF): P(response a is better than response b | prompt)."""
