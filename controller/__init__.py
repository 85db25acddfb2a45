"""agentctl: keeps a host's long-running agent processes exactly as a directory of manifests says."""

__version__ = "0.1.0"
