"""Interoperation with RLlib: theta as an RLModule, RLlib's PPO as a fine-tuner."""
