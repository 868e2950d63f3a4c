"""Models: the embedded tiny video DiT (and its data generator and training)."""
