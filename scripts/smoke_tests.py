#!/usr/bin/env python
"""Thin wrapper: the checks ship in the package (`ctt check smoke`, deploy/checks.py).

    python scripts/smoke_tests.py --url http://127.0.0.1:3000 --api-key "$API_KEY"
"""

import sys

from deploy.checks import main

if __name__ == "__main__":
    sys.exit(main(suite_name="smoke"))
