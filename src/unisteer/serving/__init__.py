"""The steered OpenAI-compatible server: the HTTP app (`app`), request parsing and responses (`protocol`), and
the batch decoder that serves rows with different steering in one forward pass (`batching`).

May import: `unisteer.engine`, `unisteer.data`, `unisteer.generation` (sampling), and unisteer's `errors`,
`config`, `files`.
"""
