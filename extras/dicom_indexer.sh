#!/bin/sh
# Cron entry point: one quiet run of the DICOM Indexer client. The crontab
# line of the original client stays as it was:
#   */5 * * * * /srv/dicom_indexer/extras/dicom_indexer.sh
# Prints nothing when every study was delivered, so cron mails only failures.
# Works from any directory: it finds client.py beside this script.
#
# It picks a Python that can run client.py (3.8 or newer): the project's
# virtualenv (.venv, then venv) if it is one, else python3 (or python3.N,
# or python) on PATH. On the servers that carry dcm4chee 2.x, `python` is
# often Python 2.7 and the original client's venv a Python 2 one: client.py
# cannot even be parsed there, so the choice is made here, in sh.
# Exit code 9: no Python 3.8 or newer was found (one line says what was).
set -u
EXIT_NO_PYTHON=9

case $0 in
    */*) here=${0%/*} ;;
    *) here=. ;;
esac
project=$(CDPATH='' cd -- "$here/.." && pwd) || exit "$EXIT_NO_PYTHON"

found=""
for candidate in "$project/.venv/bin/python" "$project/venv/bin/python" \
    python3 python3.13 python3.12 python3.11 python3.10 python3.9 python3.8 python; do
    case $candidate in
        /*) [ -x "$candidate" ] || continue ;;
        *) command -v "$candidate" >/dev/null 2>&1 || continue ;;
    esac
    # Python 2 runs this line too: it only prints the version.
    version=$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) \
        || continue
    major=${version%%.*}
    minor=${version#*.}
    if [ "$major" -gt 3 ] || { [ "$major" -eq 3 ] && [ "$minor" -ge 8 ]; }; then
        exec "$candidate" "$project/client.py" -q "$@"
    fi
    found="${found:+$found, }$candidate is $version"
done
echo "dicom_indexer.sh: no Python 3.8 or newer found (${found:-no python on PATH});" \
    "install Python 3.8+ and create $project/.venv (docs/actualizar.md: \"Actualizar desde el cliente" \
    "original\")" >&2
exit "$EXIT_NO_PYTHON"
