"""Answer the test users' queries with every method (Ray Data batch inference) and score them.

    ray job submit --working-dir . -- python jobs/evaluate.py --config oppu/configs/lamp.yaml \
        --set run_dir=/shared/oppu-run
"""

import sys

from oppu.pipeline import job_main

if __name__ == "__main__":
    sys.exit(job_main(["evaluate"], __doc__))
