"""What survives a kill: a search, a grid, searches started together."""
