"""Choosing the data: k-means arms, the bandit policies, the per-epoch selection loop, recall, the run registry."""
