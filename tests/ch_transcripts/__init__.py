"""Transcripts of the real cloud-hypervisor, recorded by ``record.py``."""
