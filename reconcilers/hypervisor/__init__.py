"""cloud-hypervisor: REST client, process manager, and the contract-checking test double."""
