"""Device tier: data, models, local training, update codecs.

Kept numpy-only at import time: ``gateway`` imports the envelope and codecs
from here on edge servers that have no torch. Torch enters only in
``devices.models``, ``devices.training`` and ``devices.cohort``.
"""
