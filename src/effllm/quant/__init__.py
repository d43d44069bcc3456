"""INT4 weight-only and FP8 GEMMs, quantized linear modules, quantize_(model, config).

Not implemented yet: this package is a placeholder in the layout; nothing here is public API.
"""
