#!/usr/bin/env python
"""Thin wrapper: the checks ship in the package (`ctt check integration`, deploy/checks.py).

    python scripts/integration_tests.py --environment staging
"""

import sys

from deploy.checks import main

if __name__ == "__main__":
    sys.exit(main(suite_name="integration"))
