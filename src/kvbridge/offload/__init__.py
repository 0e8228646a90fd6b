"""kvbridge.offload."""
