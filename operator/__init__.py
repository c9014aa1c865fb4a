"""Kopf shell: process entry points, handler registration, settings."""
