"""tropical-profile: measure a real engine and write a latency profile (imports torch and engines lazily)."""
