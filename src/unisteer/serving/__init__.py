"""The steered OpenAI-compatible server: the HTTP app (`app`), request parsing and responses (`protocol`), and
the batch decoder that serves rows with different steering in one forward pass (`batching`), and what it
counts, served at /metrics in Prometheus text format and as JSON (`metrics`).

May import: `unisteer.engine`, `unisteer.data`, `unisteer.generation` (sampling), and unisteer's `errors`,
`config`, `files`.
"""
