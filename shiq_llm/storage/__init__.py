"""Layer 0 — files on disk: atomic writes, JSONL, resumable shards, checksums and manifests.

Nothing here knows about models or losses; every layer above writes through it, so that a killed job never
leaves a half-written file where a finished one is expected.
"""
