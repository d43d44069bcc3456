"""KV-cache eviction (H2O, CAKE, SnapKV, StreamingLLM) and KV quantization in a transformers Cache.

Not implemented yet: this package is a placeholder in the layout; nothing here is public API.
"""
