"""Triton kernels and their launchers. Imported only when a Triton backend is chosen: this
package imports triton at module level, so nothing outside effllm.kernels' dispatch imports it.
"""
