"""The Hyperfleet guest agent: the program that runs inside a VM (``program``) and the wire
protocol it shares with the host's client (``protocol``; the client is ``reconcilers/guest.py``).

Standard library only, and nothing else of Hyperfleet (import-linter's ``guest-agent``
contract): it runs in the guest, where the operator's dependencies are not installed.
"""
