#!/bin/sh
# Cron entry point: one quiet run of the DICOM Indexer client.
#   */5 * * * * /srv/dicom-indexer/extras/dicom_indexer.sh
# Prints nothing when every study was delivered, so cron mails only failures.
# Works from any directory: it finds client.py beside this script, and uses the
# project's virtualenv (.venv or venv) when there is one.
set -eu
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
project=$(dirname -- "$here")
python=python3
for venv in "$project/.venv" "$project/venv"; do
    if [ -x "$venv/bin/python" ]; then
        python="$venv/bin/python"
        break
    fi
done
exec "$python" "$project/client.py" -q "$@"
