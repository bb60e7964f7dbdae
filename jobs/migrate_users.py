"""A base upgrade's migration: every user with an adapter on the run's bases trained onto new ones.

``oppu users migrate --run DIR --to-bases DIR2`` (same flags, the run config from DIR) runs this
from an installed wheel. DIR2 holds the new bases, adapted with ``--set bases=DIR2``:

    ray job submit --working-dir . -- python jobs/migrate_users.py --config oppu/configs/quickstart.yaml \
        --set run_dir=/shared/oppu-run --to-bases /shared/oppu-run/bases/v2

Resumable (users already migrated are not trained again); one JSON status line per variant at the
end, exit status 0 once every variant is complete; ``--status`` prints them without training.
The serve app keeps serving the old bases' adapters until it is redeployed on the new bases
(docs/cluster.md, *Base upgrade*).
"""

import argparse
import sys

from oppu.commands.users import migrate_job_main, migrate_job_parser


def parser() -> argparse.ArgumentParser:
    """This job's flags (tests/unit/test_doc_commands.py checks the usage line above with it)."""
    return migrate_job_parser(__doc__)


if __name__ == "__main__":
    sys.exit(migrate_job_main(__doc__))
