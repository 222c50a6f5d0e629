"""Adapters: the IM channels and the upstream agents, each a translator at the edge."""
