"""``python -m maml_fast train|eval|bench|presets`` (the same as the ``maml-fast`` console script)."""
import sys

from .cli import main

sys.exit(main())
