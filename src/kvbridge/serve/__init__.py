"""kvbridge.serve."""
