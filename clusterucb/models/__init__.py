"""The base model and its adapter: building, loading, LoRA, generation, hub and wheel fetching."""
