"""Answer the test users' queries with every method (Ray Data batch inference) and score them.

The command ``oppu evaluate`` (same flags) runs this from an installed wheel.

    ray job submit --working-dir . -- python jobs/evaluate.py --config oppu/configs/lamp.yaml \
        --set run_dir=/shared/oppu-run
"""

import sys

from oppu.commands.stages import job_main
from oppu.pipeline import STAGE_COMMANDS

if __name__ == "__main__":
    sys.exit(job_main(STAGE_COMMANDS["evaluate"], __doc__))
