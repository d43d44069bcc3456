"""tensor- and sequence-parallel layers and collectives on torch.distributed.

Not implemented yet: this package is a placeholder in the layout; nothing here is public API.
"""
