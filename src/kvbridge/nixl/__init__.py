"""kvbridge.nixl."""
