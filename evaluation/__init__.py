"""Robustness evaluation of any checkpoint, from any trainer: `advmoe eval` (evaluation.robustness),
AutoAttack (evaluation.autoattack), sanity checks against gradient masking (evaluation.sanity) and
the report over a folder of runs (evaluation.robustness_report)."""
