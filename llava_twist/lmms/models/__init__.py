"""``LMMS_EVAL_PLUGINS=llava_twist.lmms``: lmms-eval imports ``models.<name>.<class>`` for each entry."""

AVAILABLE_MODELS = {"llava_twist": "LlavaTwist"}
