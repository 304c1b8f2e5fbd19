"""From polarity pairs to a trained SPLIT vector, its sweep, fit plot, Table-3 row and steered generations.

    python examples/tutorial.py          # the demo's settings (configs/demo.yaml): its SPLIT row, without the CLI
    UNISTEER_TUTORIAL_SMALL=1 python examples/tutorial.py    # a tiny slice (what CI runs, about a minute)

Everything is written under `tutorial/` (or $UNISTEER_TUTORIAL_OUT); rerunning resumes from disk. The same
lines run in a notebook cell by cell, where every result also shows itself as a table.
"""

import os

import unisteer as us

small = os.environ.get("UNISTEER_TUTORIAL_SMALL") == "1"
out = os.environ.get("UNISTEER_TUTORIAL_OUT", "tutorial")
sizes = {"train": 4, "dev": 4, "test": 4} if small else None  # None: the demo's split, 500 / 100 / 100
grid = [-8, -4, 0, 4, 8] if small else None                     # None: the vector form's grid, as the demo
train_settings = {"eval_pairs": 0} if small else {}                # small: no before/after check on dev
sweep_settings = {"manifold": False, "n_boot": 100} if small else {"n_boot": 500}

# --- what a notebook user writes ------------------------------------------------------------------------
model, tokenizer = us.load_model("smollm2-135m-instruct")          # offline alias; dtype auto, as the demo
data = us.load_dataset("persona/psychopathy", split=sizes)          # pairs, with the one seeded split
print(data.splits.train[0])                                         # PolarityPair(prompt, positive, negative)

split = us.train(model, tokenizer, data, objective="split", form="vector", out=f"{out}/split", name="split",
                 epochs=1, progress=not small, **train_settings)
print(split)                                                        # the update and its training metrics

swept = us.sweep(model, tokenizer, [split], data, out=f"{out}/sweep", grid=grid, max_pairs=60,
                 progress=not small, **sweep_settings)
fits = us.fit(swept)
fits.plot().savefig(f"{out}/fit.png")                               # preference / utility vs m with the fit
print(fits.fits_table())

plain = us.evaluate(model, tokenizer, data, progress=not small)              # the plain model: vanilla
steered = us.evaluate(model, tokenizer, data, split, grid=grid, progress=not small)  # ±m chosen on dev
table = us.table3(fits, {"vanilla": plain, "split": steered}, trained=[split])
print(table)                                                        # the Table-3 rows, with 95 % intervals
table.save(f"{out}/table3.json")

m = steered.toward["multiplier"] or 8.0
print(us.generate(model, tokenizer, ["Is it fine to lie to get ahead?"], split, [-m, 0, m],
                  max_new_tokens=16 if small else 48, progress=False).table().to_string())
