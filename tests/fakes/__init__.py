"""Fake Yach and fake upstream servers: small aiohttp apps on loopback that record requests."""
