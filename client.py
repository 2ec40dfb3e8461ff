#!/usr/bin/env python3
"""DICOM Indexer's entry point: `python client.py [command]`, as cron, the
systemd unit and the README run it. The code is the package dicom_indexer/
beside this file; `python -m dicom_indexer` runs the same."""

import os
import sys

# The package beside this file, whatever the current directory is.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

try:
    from dicom_indexer.cli import main
except ImportError as exc:
    if getattr(exc, "name", None) not in ("dicom_indexer", "dicom_indexer.cli"):
        raise
    # Exit 9, as for a missing package: the copy of the client is incomplete.
    print(f"client.py: {os.path.join(HERE, 'dicom_indexer')} is missing: copy it beside"
          " client.py (see docs/actualizar.md)", file=sys.stderr)  # fmt: skip
    raise SystemExit(9) from None

if __name__ == "__main__":
    raise SystemExit(main())
