"""Limits shared by the daemon's and the webhook's servers."""
