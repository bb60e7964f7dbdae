"""Adapt the base LLM to the task on the non-test users with Ray Train (plain and RAG flavours).

The command ``oppu train-base`` (same flags) runs this from an installed wheel.

    ray job submit --working-dir . -- python jobs/train_base.py --config oppu/configs/lamp.yaml \
        --set run_dir=/shared/oppu-run
"""

import sys

from oppu.commands.stages import job_main
from oppu.pipeline import STAGE_COMMANDS

if __name__ == "__main__":
    sys.exit(job_main(STAGE_COMMANDS["train-base"], __doc__))
