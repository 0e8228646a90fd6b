"""The disk tier behind the CPU tier: records on a filesystem, read back through CPU blocks."""
