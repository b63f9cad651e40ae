"""Ray job: `ribfrac-ray train`. Arguments are passed through; see `ribfrac-ray train --help`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- python jobs/train.py --workdir /abs/path
"""

from _entry import run

run("train")
