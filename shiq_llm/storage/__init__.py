"""Layer 0 — files on disk: atomic writes, JSON Lines, resumable shards, checksums and manifests.

- :mod:`~shiq_llm.storage.atomic`: ``atomic_write`` (a file) and ``atomic_directory`` (a folder).
- :mod:`~shiq_llm.storage.jsonl`: the one JSON Lines reader and writer.
- :mod:`~shiq_llm.storage.shards`: resumable sharded outputs (``generate``, ``score``).
- :mod:`~shiq_llm.storage.integrity`: SHA-256 manifests of files, verified on load.

Nothing here knows about models or losses; every layer above writes through it, so that a killed job never
leaves a half-written file where a finished one is expected.
"""
