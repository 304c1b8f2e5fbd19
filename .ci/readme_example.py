"""Run the README's Python example verbatim, then check that what it built really steers.

Usage: python .ci/readme_example.py README.md   (run from a scratch folder: the example writes files)
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

SECTION = "## The engine in a few lines"


def example_code(readme: Path) -> str:
    text = readme.read_text(encoding="utf-8")
    if SECTION not in text:
        sys.exit(f"{readme}: no section {SECTION!r}")
    block = re.search(r"```python\n(.*?)```", text[text.index(SECTION):], flags=re.S)
    if block is None:
        sys.exit(f"{readme}: no python block under {SECTION!r}")
    return block.group(1)


def main() -> None:
    readme = Path(sys.argv[1])
    started = time.monotonic()
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(example_code(readme), str(readme), "exec"), namespace)  # noqa: S102 - our own README
    import torch

    import unisteer as us

    model, update, inputs = namespace["model"], namespace["update"], namespace["inputs"]
    with torch.no_grad():
        plain = model(**inputs).logits
        with us.Steering(model, update, multiplier=0.0):
            zero = model(**inputs).logits
        with us.Steering(model, update, multiplier=2.0):
            steered = model(**inputs).logits
    assert torch.equal(zero, plain), "m = 0 must be the plain model bit for bit"
    effect = float((steered - plain).abs().max())
    assert effect > 1.0, f"the README's update barely moves the logits (max |Δ| = {effect:.3g})"
    print(f"README example ran in {time.monotonic() - started:.0f} s on a plain install; "
          f"m = 0 is exact and m = 2 moves the logits by up to {effect:.1f}")


if __name__ == "__main__":
    main()
