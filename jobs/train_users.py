"""Train one personal adapter per test user with a Ray Data actor pool, publishing to the store.

The command ``oppu train-users`` (same flags) runs this from an installed wheel.

    ray job submit --working-dir . -- python jobs/train_users.py --config oppu/configs/lamp.yaml \
        --set run_dir=/shared/oppu-run --set users.actors=4

Only named users (a new user's first adapter, or users with new history; what ``oppu users train``
does): add --set users.users=[newbie,user07] to the line above.

On GPUs, train each actor's users together: --set users.trainer=batched --set users.num_gpus_per_actor=1
--set users.users_per_batch=32 (users.batched.* tunes it; see oppu/run_config/stages.py UserStage).
"""

import sys

from oppu.commands.stages import job_main
from oppu.pipeline import STAGE_COMMANDS

if __name__ == "__main__":
    sys.exit(job_main(STAGE_COMMANDS["train-users"], __doc__))
