"""MoE expert offload (RAM / disk tier, bounded cache) and prefetch, routing-trace tools.

Not implemented yet: this package is a placeholder in the layout; nothing here is public API.
"""
