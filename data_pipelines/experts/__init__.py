"""Expert policies that generate demonstrations."""
