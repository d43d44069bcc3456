"""Benchmark cases shipped with effllm: ``registry.load_builtin_cases`` imports every module here
(each registers its cases on import). Add a module to add cases; nothing needs listing."""
