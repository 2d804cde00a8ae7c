#!/usr/bin/env python
"""Smoke tests: is the deployed service alive, ready, and answering every task? (seconds)

    python scripts/smoke_tests.py --environment staging
    python scripts/smoke_tests.py --url http://127.0.0.1:3000 --api-key "$API_KEY"
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from checks import SMOKE_CHECKS, main_for  # noqa: E402

if __name__ == "__main__":
    main_for("smoke tests", __doc__, SMOKE_CHECKS)
