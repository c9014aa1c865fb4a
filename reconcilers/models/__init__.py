"""Pydantic models of every Hyperfleet custom resource (the source of the CRDs)."""
