"""Train one personal adapter per test user with a Ray Data actor pool, publishing to the store.

    ray job submit --working-dir . -- python jobs/train_users.py --config oppu/configs/lamp2m.yaml \
        --set run_dir=/shared/oppu-run --set users.actors=4
"""

import sys

from oppu.pipeline import job_main

if __name__ == "__main__":
    sys.exit(job_main(["users"], __doc__))
