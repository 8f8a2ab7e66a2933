"""Analysis of a results table (`repeat-lm collect`): degradation, scaling-law fits, MoE-proxy tuning, planning.

Modules: `results` (read the table and the runs' curves), `laws` (Chinchilla and data-constrained laws: predict,
compute-optimal split, fit), `scaling` (fits and the Chinchilla check on a table), `degradation`, `proxy`,
`planner`, `plots`, `report` (Markdown + self-contained HTML). See docs/analysis.md.
"""
