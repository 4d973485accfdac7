"""Evaluation: the batched answer runner (`model_grounding`), scorers (`eval_refexp`, `eval_grounded_caption`,
`eval_localization`, `eval_retention`), the SCOUT question converter (`scout_questions`) and `summary`."""
