"""Shared core of the ambient mesh: model, config, identity and CA, control plane, CLI."""
