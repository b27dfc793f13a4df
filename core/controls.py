"""The controls a run can add (docs/method.md section 9), by name: `RunRequest.controls` holds some
of CONTROLS; core/pipeline.py's CONTROL_STEPS says what each one does.

- cross: every model of the pair scored on the other's answer tokens (weights vs tokens);
- perturb: a matched random perturbation of the base as a null model, run as a pair of its own;
- seed: the pair's `seed_null` model (a post-training differing only in seed), likewise.
"""

from __future__ import annotations

from typing import Literal, get_args

Control = Literal["cross", "perturb", "seed"]
CONTROLS: tuple[str, ...] = get_args(Control)
# Controls that run a null model against the base as a pair run of its own.
NULL_CONTROLS: tuple[str, ...] = ("perturb", "seed")
