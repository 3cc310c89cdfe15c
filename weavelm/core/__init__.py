"""The kernel: interfaces, data types and the engine loop. It imports no plugin."""
