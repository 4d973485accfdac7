"""SCOUT: step-by-step grounding conversations for LLaVA (see DESIGN.md section 3)."""
