"""Layer 4 — the embedded tasks: everything a CPU needs to show learning without a download.

- :mod:`~shiq_llm.tasks.synthetic`: counting prompts, a programmatic reward, a tiny reference, offline rows.
- :mod:`~shiq_llm.tasks.multiturn`: multi-step tool-use dialogues with a reward per agent turn.

Imports: the layers below; the trainer and its config never import the tasks.
"""
