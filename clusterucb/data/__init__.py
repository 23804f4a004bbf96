"""Data: staged sources -> pool table, target-task sets, tokenization."""
