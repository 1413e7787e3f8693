"""Evaluation: TOFU / MUSE / membership-inference metrics, jitted scoring and KV-cache generation.

Modules: `metrics` and `mia` (pure formulas), `scoring` (jitted teacher forcing), `generate`
(jitted greedy decoding), `tofu` and `muse` (pipelines), `report` (tables and plots), `cli`
(`jaxunlearn eval`).
"""
