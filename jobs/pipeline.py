"""Run base adaptation, personal adapters and evaluation in one job, against a prepared data set.

    ray job submit --working-dir . -- python jobs/pipeline.py --config oppu/configs/lamp.yaml \
        --set run_dir=/shared/oppu-run
"""

import sys

from oppu.pipeline import job_main

if __name__ == "__main__":
    sys.exit(job_main(["base", "users", "evaluate"], __doc__))
