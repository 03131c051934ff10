"""Markdown reports with figures for a run folder or a sweep folder.

``write_report(path)`` looks at what the folder holds: ``summary.json`` (a run written by
:func:`lipmargin.train.fit`) or ``results.json`` (a sweep written by ``lipmargin sweep``).  It
saves PNGs drawn by :mod:`lipmargin.report.plots` next to a ``report.md`` and returns that file's path;
nothing is printed.  matplotlib (the ``[plot]`` extra) is needed only when a report is written.

Modules: :mod:`~lipmargin.report.certificates` (per-sample radii of a run), :mod:`~lipmargin.report.run`
(a run's report), :mod:`~lipmargin.report.sweep` (a sweep's report and :func:`write_report`),
:mod:`~lipmargin.report.plots` (the figures), ``_common`` (Markdown and JSON helpers).
"""

from __future__ import annotations

from lipmargin.report import plots
from lipmargin.report._common import REPORT_NAME
from lipmargin.report.certificates import Certificates, load_certificates, read_certificates
from lipmargin.report.run import write_run_report
from lipmargin.report.sweep import write_report, write_sweep_report

__all__ = [
    "REPORT_NAME",
    "Certificates",
    "load_certificates",
    "plots",
    "read_certificates",
    "write_report",
    "write_run_report",
    "write_sweep_report",
]
