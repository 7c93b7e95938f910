"""Beam's start-up log lines that say nothing about this pipeline, and the worker's stderr.

Every local run used to print, per process, lines like these (Beam 2.77):

* ``apitools not found, and bigquery client libraries are not available ...``: logged at
  import when the GCP packages are only partly installed; no part of this pipeline uses
  BigQuery. Logged on the root logger, so it also made ``logging`` install its default
  stderr handler in each worker, which then printed everything the harness logs at INFO.
* ``No semi_persistent_directory found ...``: the harness has no folder for a pickled main
  session, which this pipeline never uses (every DoFn lives in an importable module).
  Printed by each worker and again by the launcher, which relays worker logs.

:func:`drop_not_applicable` removes exactly those two messages, by their fixed text, from
the loggers that emit them. :func:`configure_worker` also gives an SDK worker's own stderr
a handler at ERROR before Beam is imported: warnings and errors still reach the launcher
through Beam's logging channel (and are printed there), and errors are printed by the
worker as well, which matters when that channel never came up. No record that carries a
value is affected: the filter matches fixed texts only.
"""

from __future__ import annotations

import logging

NOT_APPLICABLE = ("apitools not found, and bigquery client libraries are not available",
                  "No semi_persistent_directory found")

#: loggers that emit the messages above (the first is logged on the root logger)
EMITTERS = ("", "apache_beam.runners.worker.sdk_worker_main")


class DropNotApplicable(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(NOT_APPLICABLE))


_FILTER = DropNotApplicable()


def drop_not_applicable() -> None:
    for name in EMITTERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def configure_worker() -> None:
    """Before Beam is imported in an SDK worker: errors to stderr, the two lines above dropped."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setLevel(logging.ERROR)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    drop_not_applicable()
