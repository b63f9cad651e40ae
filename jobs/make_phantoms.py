"""Ray job: `ribfrac-ray make-phantoms`. Arguments are passed through; see `ribfrac-ray make-phantoms --help`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- python jobs/make_phantoms.py --workdir /abs/path
"""

from _entry import run

run("make-phantoms")
