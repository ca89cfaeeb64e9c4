"""olm: keep a causal language model learning as new text shards arrive."""

__version__ = "0.1.0"
