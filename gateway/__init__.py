"""Edge gateway tier: validation and partial aggregation (numpy only).

Runs on edge servers, so it must import without torch, CrypTen or Ray.
"""
