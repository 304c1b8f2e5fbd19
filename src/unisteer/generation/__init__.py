"""Generating text: one way to pick tokens (`sampling`, shared with the server) and batched, resumable steered
generation (`generate`), including the plain model's own answers that AxBench pairs use.

May import: `unisteer.engine`, `unisteer.data`, and unisteer's `errors`, `config`, `files`.
"""
