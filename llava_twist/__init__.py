"""llava-twist: visual grounding for LLaVA-1.5 without forgetting (TWIST & SCOUT, arXiv 2410.10491)."""

from llava_twist._require_llava import require_llava

require_llava()

__version__ = "0.1.0"
