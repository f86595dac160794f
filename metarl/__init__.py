"""metarl: distributed actor-learner meta-RL (FOMAML, MAML, Reptile) with task skipping."""

__version__ = "0.1.0"
