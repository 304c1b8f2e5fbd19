"""The engine: the update family Δh = m·(ΔW·a + Δb) and everything that applies it to a Hugging Face model.

Loading models (`models`), finding their layers (`architecture`), the three forms (`updates`), attaching
them at positions and multipliers (`steering`), folding them into weights (`merge`), the saved format
(`storage`), llama.cpp control vectors (`control_vector`), the frozen-prefix forward (`prefix`), completion
scoring (`scoring`), fingerprints, and every touch point with transformers internals (`hf_compat`).

May import: torch, transformers, safetensors, gguf, and unisteer's `errors`, `config`, `files`. Nothing else of
unisteer — every other subpackage builds on this one.
"""
