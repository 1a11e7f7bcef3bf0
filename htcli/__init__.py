"""HyperTransport toolkit: steer text-to-image diffusion models by editing activations."""

__version__ = "0.1.0"  # the package version: pyproject.toml reads it from here
