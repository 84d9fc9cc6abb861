"""The `snapfs` command."""
