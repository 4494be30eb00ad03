"""Robustness evaluation of any checkpoint, from any trainer. `advmoe eval` is
`evaluation.robustness.evaluate_checkpoint` (with `EvalSettings`); the attacks it runs on a model are
`evaluation.suite` (`evaluate_model`), the eval.json it writes is built by `evaluation.document`, the
images are shared out to processes by `evaluation.sharding` (torchrun, or `evaluate_in_processes`),
and a finished evaluation is reused through `evaluation.cache`. AutoAttack is `evaluation.autoattack`,
the checks against gradient masking `evaluation.sanity` and eval.md `evaluation.summary`. The report
over a folder of runs is a study: `studies.robustness`."""
