"""Training updates: the configuration (`config`) and reference presets (`presets`), the objectives and their
registry (`objectives`), the frozen-prefix sequence cache and scorer (`sequences`), the trainer with its
safetensors checkpoints (`trainer`, `checkpoint`), and the closed-form DiffMean vector (`diffmean`).

May import: `unisteer.engine`, `unisteer.data`, and unisteer's `errors`, `config`, `files`.
"""
