"""Training utilities shared by every loop: Accelerate, checkpoints, EMA, logs."""
