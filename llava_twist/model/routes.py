"""The routes a prompt can take through TWIST, named once (no imports: the CLI, eval and playground read them)."""

FROZEN = "frozen"  # the original LLaVA computation, bit for bit
GROUNDING = "grounding"  # through the grounding experts
AUTO = "auto"  # the router decides per prompt
ROUTES = (AUTO, FROZEN, GROUNDING)
TASK_ROUTE = {"grounding": GROUNDING, "understanding": FROZEN}  # a record's task (scout_data.schema) -> its route
