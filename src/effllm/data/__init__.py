"""Package data: texts the demo and benchmarks use (written for effllm)."""
