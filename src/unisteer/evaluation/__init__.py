"""Evaluation as functions of m: choice accuracy with bias-free scores (`choices`), multiplier selection
(`selection`), answers parsed from generations (`parsing`), steered perplexity (`perplexity`), and the LLM
judge (`judge`, its rubrics in `rubrics`, judged generations in `judging`).

May import: `unisteer.engine`, `unisteer.data`, `unisteer.generation`, and unisteer's `errors`, `config`,
`files`.
"""
