"""`python -m dicom_indexer`: the same as `python client.py`."""

from .cli import main

raise SystemExit(main())
