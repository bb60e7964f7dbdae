"""Run base adaptation, personal adapters and evaluation in one job, against a prepared data set.

The command ``oppu pipeline`` (same flags) runs this from an installed wheel.

    ray job submit --working-dir . -- python jobs/pipeline.py --config oppu/configs/lamp.yaml \
        --set run_dir=/shared/oppu-run
"""

import sys

from oppu.commands.stages import job_main
from oppu.pipeline import STAGE_COMMANDS

if __name__ == "__main__":
    sys.exit(job_main(STAGE_COMMANDS["pipeline"], __doc__))
