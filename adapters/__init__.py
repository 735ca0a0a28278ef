"""Engine adapters (vLLM, SGLang): the only place an engine is imported."""
