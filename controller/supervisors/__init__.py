"""Supervisor adapters: one module each, one registry entry each (see `registry`)."""
