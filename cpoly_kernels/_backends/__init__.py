"""Backend implementations; each module registers itself on import."""
