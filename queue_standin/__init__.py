"""A stand-in for the Queue Service, for local runs and tests only."""
