"""Kernels shared by several plugins. A plugin never imports another plugin's module; what two plugins
share lives here."""
