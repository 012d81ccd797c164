"""Built-in method plugins: one file per method (or per family of methods), each registering itself.

A third-party package adds methods the same way and declares a ``peftbench.methods`` entry point."""
