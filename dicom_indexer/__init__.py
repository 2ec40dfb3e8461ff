"""DICOM Indexer: registers the studies of a PACS with a central indexer
webservice, one JSON document per study, sent once and again whenever the
study changes.

The parts, from source to service:
  config         config.json / server.json -> Settings, checked once, at load
  engines        MySQL/MariaDB, PostgreSQL and SQLite: small adapters
  database       one connection through an engine (Database)
  sources        what a PACS holds and how it changes: dcm4chee 2.x and
                 arc-light 5 through their database, Orthanc through its REST
                 API; one table of sources (sources/__init__.py)
  study_service  the queue: what is pending, sent, failed, deleted
  values         DICOM value rules shared by the sources
  document       one study's fields -> the 11-key JSON (pure)
  http           the one HTTP layer: bounded bodies, deadlines, safe URLs
  service        the central index's client (Sender)
  delivery       fates, the sending pool and one run's sending
  concurrency    how many requests the service is sent at once
  run            a run's stop flag, report, rate cap and progress bar
  reconciliation what reconcile compares
  commands       run_*(): one per command
  metrics        the textfile for node_exporter
  logs           logging, and secrets kept out of it
  cli            argparse and main(): they only translate
"""

from __future__ import annotations

from pathlib import Path

__version__ = "2.5.1"


# The install folder (client.py, config.json, the install scripts): the
# package's parent.
HERE = Path(__file__).resolve().parent.parent
