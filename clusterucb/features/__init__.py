"""Per-sample gradient features: the batched gradients, random projections, the sharded store, influence scores."""
