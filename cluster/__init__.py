"""The control plane: command line, and (as the project grows) router, Serve app and controller."""
