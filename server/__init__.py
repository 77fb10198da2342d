"""packserve server."""
