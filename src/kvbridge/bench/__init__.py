"""kvbridge.bench."""
