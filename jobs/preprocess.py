"""Ray job: `ribfrac-ray preprocess`. Arguments are passed through; see `ribfrac-ray preprocess --help`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- python jobs/preprocess.py --workdir /abs/path
"""

from _entry import run

run("preprocess")
