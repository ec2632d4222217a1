"""Shells: where scheduler commands run. ``ssh`` (paramiko) for a cluster's login node,
``local`` for a scheduler on this machine."""
