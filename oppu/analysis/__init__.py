"""The paper's analysis suites (section 6, appendices B and F) over a finished run, with plots.

``oppu analyze --suite NAME --run DIR`` runs one (``all``: every one); each writes
``DIR/analysis/NAME.json``, ``NAME.png`` and its section of ``DIR/analysis/report.md``, training
and evaluating through the main pipeline's jobs on sub runs under ``DIR/analysis/NAME/``.
"""

from oppu.analysis.suites import MODULES, SuiteOptions, run_suite, suite_names

__all__ = ["MODULES", "SuiteOptions", "run_suite", "suite_names"]
