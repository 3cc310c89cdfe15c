"""Built-in plugins. Each module registers through the package's own entry points, like an outside plugin."""
