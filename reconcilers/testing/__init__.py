"""Test and dev tooling, kept out of the product: the cloud-hypervisor double (``chdouble``),
the in-memory API server of the unit tests (``fakekube``), the local control plane of the
demo and the integration tests (``devstack``) and the demo's script (``demo``).

tests/ and bench/ use it freely; in the product only ``hyperfleet demo``
(``hyperfleet.operator.demo``) may import it, which import-linter checks (pyproject.toml)."""
