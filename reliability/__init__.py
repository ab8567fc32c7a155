"""Soak and load runs of the whole freeze path on real containerd (``make reliability``)."""
