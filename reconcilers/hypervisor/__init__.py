"""cloud-hypervisor: REST client, process manager, event monitor and fencing (its test double
is ``hyperfleet.reconcilers.testing.chdouble``)."""
