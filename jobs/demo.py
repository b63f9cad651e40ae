"""Ray job: `ribfrac-ray demo`. Arguments are passed through; see `ribfrac-ray demo --help`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- python jobs/demo.py --workdir /abs/path
"""

from _entry import run

run("demo")
