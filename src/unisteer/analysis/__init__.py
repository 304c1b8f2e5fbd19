"""Preference–utility analysis over the multiplier m: the fast paired scoring engine (`paired`), resumable
sweeps (`sweep`), log-odds and their aggregation (`logodds`), validity-decay fits (`fitting`, applied to a
sweep by `fits`), the manifold measurement (`manifold`), plots and the reports (`plots`, `report`).

May import: `unisteer.engine`, `unisteer.data`, and unisteer's `errors`, `config`, `files`.
"""
