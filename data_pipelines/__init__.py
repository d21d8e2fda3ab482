"""Dataset builders, expert policies and grain input pipelines."""
