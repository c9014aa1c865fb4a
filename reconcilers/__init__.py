"""Hyperfleet domain: CRD models, pure reconcile logic, scheduler, I/O clients."""
