"""The `cdl` command line: one module per noun."""
