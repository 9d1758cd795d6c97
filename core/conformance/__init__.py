"""The backend conformance suite: generic cases any backend runs against the float64 oracle."""
