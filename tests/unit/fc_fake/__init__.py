"""A fake Firecracker for the unit tests: an API server on a real Unix socket that validates every
request against the official ``firecracker.yaml``, and a tiny ``firecracker`` executable serving it."""
